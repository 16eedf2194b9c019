//! Shared test fixtures: authority key factories (pluggable, so a token-backed key can run the same suite), workload
//! keys and CSRs, and the openssl verifier.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use signet::keys::{AuthorityKey, KeyError, KeyType, SignatureScheme, SoftwareKey};
use signet::spiffe::TrustDomain;
use signet::x509::{Authority, RootRequest};
use time::OffsetDateTime;

/// Makes authority keys of a type. The SoftHSM2-backed implementation plugs in here.
pub trait KeyFactory: Sync {
    /// A short name for messages.
    fn name(&self) -> &str;
    /// A fresh key of `key_type`, or `None` if this backend cannot make one.
    fn make(&self, key_type: KeyType) -> Option<Arc<dyn AuthorityKey>>;
}

/// ring-backed software keys; RSA keys come from `openssl genpkey` (ring cannot generate RSA).
pub struct SoftwareKeys;

impl KeyFactory for SoftwareKeys {
    fn name(&self) -> &str {
        "software"
    }
    fn make(&self, key_type: KeyType) -> Option<Arc<dyn AuthorityKey>> {
        let key = if key_type.is_rsa() {
            SoftwareKey::from_pkcs8(&rsa_pkcs8(rsa_bits(key_type))).unwrap()
        } else {
            SoftwareKey::generate(key_type).unwrap().0
        };
        Some(Arc::new(key))
    }
}

pub fn rsa_bits(key_type: KeyType) -> usize {
    match key_type {
        KeyType::Rsa2048 => 2048,
        KeyType::Rsa3072 => 3072,
        KeyType::Rsa4096 => 4096,
        _ => unreachable!(),
    }
}

/// An RSA PKCS#8 DER of `bits`, made once per size by openssl and cached.
pub fn rsa_pkcs8(bits: usize) -> Vec<u8> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Vec<u8>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap();
    cache
        .entry(bits)
        .or_insert_with(|| {
            let dir = tempfile::tempdir().unwrap();
            let pem_path = dir.path().join("k.pem");
            let der_path = dir.path().join("k.der");
            let bits_opt = format!("rsa_keygen_bits:{bits}");
            run_openssl(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                &bits_opt,
                "-out",
                pem_path.to_str().unwrap(),
            ]);
            // openssl writes PKCS#1 for RSA in DER; convert to unencrypted PKCS#8.
            run_openssl(&[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                pem_path.to_str().unwrap(),
                "-outform",
                "DER",
                "-out",
                der_path.to_str().unwrap(),
            ]);
            std::fs::read(der_path).unwrap()
        })
        .clone()
}

pub fn run_openssl(args: &[&str]) -> std::process::Output {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

pub fn root_subject(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "signet tests");
    dn.push(DnType::CommonName, cn);
    dn
}

/// A root authority of `key_type` from `factory`.
pub fn root(factory: &dyn KeyFactory, key_type: KeyType) -> Option<Authority> {
    let key = factory.make(key_type)?;
    let req = RootRequest {
        trust_domain: td(),
        subject: root_subject(&format!("root {key_type}")),
        ttl: Duration::from_secs(24 * 3600),
        path_len: None,
    };
    Some(Authority::self_signed_root(key, &req, now()).unwrap())
}

/// Workload / SPIRE-server key types a CSR can carry, and rcgen's algorithm for each.
pub fn rcgen_alg(key_type: KeyType) -> &'static rcgen::SignatureAlgorithm {
    match key_type {
        KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyType::Ed25519 => &rcgen::PKCS_ED25519,
        _ => &rcgen::PKCS_RSA_SHA256,
    }
}

/// A workload key pair (rcgen) of `key_type`.
pub fn workload_key(key_type: KeyType) -> KeyPair {
    if key_type.is_rsa() {
        let der = rsa_pkcs8(rsa_bits(key_type));
        KeyPair::try_from(der.as_slice()).unwrap()
    } else {
        KeyPair::generate_for(rcgen_alg(key_type)).unwrap()
    }
}

/// A CSR (DER) with the given URIs and DNS names and subject.
pub fn csr(key: &KeyPair, uris: &[&str], dns: &[&str], subject: DistinguishedName) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject;
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .chain(
            dns.iter()
                .map(|d| SanType::DnsName((*d).try_into().unwrap())),
        )
        .collect();
    params.serialize_request(key).unwrap().der().to_vec()
}

/// SPIRE's default CA subject (C=US, O=SPIFFE).
pub fn spire_subject() -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CountryName,
        rcgen::DnValue::PrintableString("US".try_into().unwrap()),
    );
    dn.push(
        DnType::OrganizationName,
        rcgen::DnValue::PrintableString("SPIFFE".try_into().unwrap()),
    );
    dn
}

pub fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// `openssl verify -x509_strict -purpose any -CAfile root -untrusted chain leaf`; returns (success, output).
pub fn openssl_verify(roots: &[Vec<u8>], chain: &[Vec<u8>], leaf: &[u8]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, ders: &[Vec<u8>]| {
        let p = dir.path().join(name);
        std::fs::write(&p, ders.iter().map(|d| pem_of(d)).collect::<String>()).unwrap();
        p
    };
    let root = write("root.pem", roots);
    let leaf_p = write("leaf.pem", &[leaf.to_vec()]);
    let mut args: Vec<String> = vec![
        "verify".into(),
        "-x509_strict".into(),
        "-purpose".into(),
        "any".into(),
    ];
    args.extend(["-CAfile".into(), path(&root)]);
    if !chain.is_empty() {
        let c = write("chain.pem", chain);
        args.extend(["-untrusted".into(), path(&c)]);
    }
    args.push(path(&leaf_p));
    let out = Command::new("openssl")
        .args(&args)
        .output()
        .expect("openssl must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A key that counts its signatures, and optionally corrupts them (a faulty HSM).
#[derive(Debug)]
pub struct ProbeKey {
    pub inner: Arc<dyn AuthorityKey>,
    pub signatures: std::sync::atomic::AtomicUsize,
    pub corrupt: bool,
    pub fail_transient: bool,
}

impl ProbeKey {
    pub fn new(inner: Arc<dyn AuthorityKey>) -> Self {
        Self {
            inner,
            signatures: Default::default(),
            corrupt: false,
            fail_transient: false,
        }
    }
    pub fn count(&self) -> usize {
        self.signatures.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl AuthorityKey for ProbeKey {
    fn key_type(&self) -> KeyType {
        self.inner.key_type()
    }
    fn spki_der(&self) -> &[u8] {
        self.inner.spki_der()
    }
    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.signatures
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.fail_transient {
            return Err(KeyError::signing("token not present", true));
        }
        let mut sig = self.inner.sign(scheme, message)?;
        if self.corrupt {
            let last = sig.len() - 1;
            sig[last] ^= 1;
        }
        Ok(sig)
    }
}

/// Keys generated on a real SoftHSM2 token (one fresh token per factory), signing through [`TokenKey`]: the
/// signature comes from the token, the issuance core lints, assembles and checks it.
///
/// [`TokenKey`]: signet::keys::token::TokenKey
pub struct SoftHsmKeys {
    _hsm: signet_pkcs11::testing::SoftHsm,
    token: signet_pkcs11::Token,
    next: std::sync::atomic::AtomicU32,
}

impl SoftHsmKeys {
    /// A factory over a fresh SoftHSM2 token, or `None` (after a loud SKIP line) when SoftHSM2 is missing.
    pub fn new() -> Option<Self> {
        let hsm = signet_pkcs11::testing::SoftHsm::new()?;
        let token = hsm.open();
        Some(Self {
            _hsm: hsm,
            token,
            next: std::sync::atomic::AtomicU32::new(0),
        })
    }
}

impl KeyFactory for SoftHsmKeys {
    fn name(&self) -> &str {
        "softhsm2"
    }
    fn make(&self, key_type: KeyType) -> Option<Arc<dyn AuthorityKey>> {
        let token_type = key_type;
        if !self.token.supports(token_type) {
            eprintln!("SKIP softhsm2 {key_type}: not supported by this token");
            return None;
        }
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let label = format!("issuance-{key_type}-{n}");
        let mut session = self.token.session().unwrap();
        session
            .generate_key(&label, token_type, signet_pkcs11::KeyGenOptions::default())
            .unwrap();
        let key = signet::keys::token::TokenKey::open(self.token.clone(), &label, 2).unwrap();
        Some(Arc::new(key))
    }
}
