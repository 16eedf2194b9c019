//! TLS for the APIs: the server's rustls configuration, and the check of the client's X509-SVID.
//!
//! The handshake asks every client for a certificate and verifies that the client holds its key (the TLS
//! CertificateVerify signature), but leaves the chain check to the application: [`ClientTrust::authenticate`] runs
//! on every RPC, against the bundle's current roots, before anything else. This way a client with no certificate or
//! with one from another CA gets a gRPC UNAUTHENTICATED that says why, and the refusal is in the audit log, instead
//! of a bare handshake failure; and a root added to the bundle is trusted at once, without a new TLS configuration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio_rustls::rustls;

use crate::spiffe::TrustDomain;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn verifier_for(roots: &[Vec<u8>]) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(CertificateDer::from(r.clone()))
            .map_err(|e| format!("a bundle root is not usable as a trust anchor: {e}"))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .build()
        .map_err(|e| format!("cannot build the client certificate verifier: {e}"))
}

/// Verifies client X509-SVIDs against a set of roots.
///
/// A chain that verified once is remembered (by the SHA-256 of its certificates) until the earliest NotAfter in it,
/// so a connection's RPCs after the first cost a hash and a map lookup, not a signature check. The memory belongs to
/// one set of roots: a bundle change builds a new `ClientTrust` and starts afresh.
#[derive(Clone)]
pub struct ClientTrust {
    verifier: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
    verified: Arc<Mutex<Verified>>,
}

/// Verified chains: digest -> (SPIFFE ID, trusted until, Unix seconds).
type Verified = HashMap<[u8; 32], (String, i64)>;

/// Most verified chains remembered; beyond it the memory starts afresh.
const MAX_REMEMBERED: usize = 10_000;

fn chain_digest(certs: &[CertificateDer<'static>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for c in certs {
        ctx.update(&(c.len() as u64).to_be_bytes());
        ctx.update(c);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl std::fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTrust")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientTrust {
    /// Trust `roots` for clients of `trust_domain`.
    pub fn new(roots: &[Vec<u8>], trust_domain: TrustDomain) -> Result<Self, String> {
        Ok(Self {
            verifier: verifier_for(roots)?,
            trust_domain,
            verified: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The caller's SPIFFE ID from the certificates it presented (leaf first), or why it is not authenticated.
    pub fn authenticate(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
    ) -> Result<String, String> {
        let td = &self.trust_domain;
        let Some((leaf, intermediates)) = certs.and_then(|c| c.split_first()) else {
            return Err(format!(
                "no client certificate: present an X509-SVID of trust domain {td} (mTLS)"
            ));
        };
        let all = certs.unwrap_or_default();
        let digest = chain_digest(all);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some((id, until)) = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
            && now < *until
        {
            return Ok(id.clone());
        }
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| {
                format!("the client certificate is not trusted by trust domain {td}: {e}")
            })?;
        let id = crate::x509::svid_spiffe_id(leaf, "the client certificate")?;
        id.require_trust_domain(td)
            .map_err(|e| format!("the client certificate's SPIFFE ID is not accepted: {e}"))?;
        let until = all
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .min()
            .unwrap_or(now);
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= MAX_REMEMBERED {
            verified.clear();
        }
        verified.insert(digest, (id.as_str().to_string(), until));
        Ok(id.as_str().to_string())
    }
}

/// Asks for a client certificate and checks the client's possession of its key; the chain is checked per RPC
/// (see the module docs).
#[derive(Debug)]
struct DeferredClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server's rustls configuration: `chain` (leaf first, DER) with its PKCS#8 key, HTTP/2 only, client
/// certificates requested (hinting `roots`) and checked per RPC.
pub fn server_config(
    chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
    roots: &[Vec<u8>],
) -> Result<rustls::ServerConfig, String> {
    let verifier = Arc::new(DeferredClientVerifier {
        inner: verifier_for(roots)?,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(key_pkcs8.into()),
        )
        .map_err(|e| format!("the server certificate or key is unusable: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
