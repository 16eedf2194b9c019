//! Certificate issuance: X509-SVID leaves, the signing CA minted for SPIRE (UpstreamAuthority `MintX509CA`), other
//! intermediate CAs, and self-signed roots.
//!
//! rcgen builds the DER; it signs through [`LintingSigner`], an rcgen `SigningKey` over an [`AuthorityKey`] that
//! (1) lints the TBSCertificate for its profile before anything is signed, (2) has the key sign, (3) verifies the
//! returned signature with ring against the authority's public key, and (4) re-encodes ECDSA r||s as DER.
//!
//! A leaf can also be issued in two steps, so that no thread waits for a token: [`Authority::prepare_x509_svid`]
//! builds and lints the TBSCertificate (rcgen signs it with a placeholder, which is thrown away) and returns an
//! [`UnsignedCertificate`]; once the key's signature over [`UnsignedCertificate::tbs`] is known (from
//! [`AuthorityKey::sign_then`]), [`Authority::complete`] verifies it and assembles the certificate around the same
//! TBS bytes.
//!
//! Lifetimes follow one rule for every request (the TTL rule, also in the API protos): a zero TTL is refused here
//! (the API maps 0 to its default before it gets here); a leaf's or a SPIRE CA's NotAfter is `now + ttl` **cut at
//! this authority's NotAfter** — never refused for outliving it, in direct and delegated mode alike (both issue
//! through [`Authority::issue_x509_svid`] / [`Authority::prepare_x509_svid`]); a TTL too large to represent (up to
//! `Duration::MAX`) is cut the same way and never overflows; an authority that has expired issues nothing
//! ([`IssueError::Authority`]). Internal intermediates ([`Authority::issue_intermediate`]) are refused instead of
//! cut: their callers size them to the issuer's remaining life.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyIdMethod, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer as _;

use super::csr::{CsrError, RequestedCa, VerifiedCsr, parse_and_verify_csr};
use crate::keys::KeySchemes as _;
use crate::keys::spki::{SubjectKey, SubjectKeyKind};
use crate::keys::{
    AuthorityKey, KeyError, KeyType, SignatureScheme, ecdsa_raw_to_der, verify_signature,
};
use crate::lint::LintFailure;
use crate::lint::x509::valid_dns_name;
use crate::lint::x509::{IssuerFacts, LintContext, Profile, lint_tbs};
use crate::spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// How far NotBefore is backdated to tolerate clock skew (SPIRE uses the same).
pub const BACKDATE: Duration = Duration::from_secs(10);
/// TTL of a CA minted for SPIRE when the request gives none.
pub const DEFAULT_SPIRE_CA_TTL: Duration = Duration::from_secs(3600);

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The CSR was rejected.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The requested SPIFFE ID is invalid or not allowed here.
    #[error("requested SPIFFE ID rejected: {0}")]
    SpiffeId(#[from] SpiffeIdError),
    /// The request carries no SPIFFE ID.
    #[error("the request carries no SPIFFE ID (URI SAN): an X509-SVID needs exactly one")]
    MissingSpiffeId,
    /// A requested DNS name is not valid.
    #[error("DNS name {0:?} is not a valid DNS name")]
    BadDnsName(String),
    /// The TTL is zero, negative or too large to represent.
    #[error("invalid TTL: {0}")]
    InvalidTtl(String),
    /// The credential would outlive its issuer.
    #[error(
        "requested NotAfter {requested} is after the issuer's NotAfter {issuer}: ask for a shorter TTL or rotate \
         the issuer"
    )]
    TtlExceedsIssuer {
        /// Requested NotAfter (Unix seconds).
        requested: i64,
        /// Issuer NotAfter (Unix seconds).
        issuer: i64,
    },
    /// The to-be-signed certificate failed the pre-issuance lint; nothing was signed.
    #[error(transparent)]
    Lint(#[from] LintFailure),
    /// The authority key failed to sign.
    #[error("authority key failed: {0}")]
    Key(#[from] KeyError),
    /// The key returned a signature that does not verify: nothing was issued.
    #[error(
        "post-sign check failed: the signature returned by the authority key does not verify against its public \
         key ({0}); the key or token is faulty, nothing was issued"
    )]
    PostSignCheck(String),
    /// The authority certificate or key is unusable.
    #[error("authority unusable: {0}")]
    Authority(String),
    /// The certificate could not be assembled.
    #[error("certificate assembly failed: {0}")]
    Assembly(String),
    /// A CA request asks for a longer path (more CAs below it) than the caller's policy allows.
    #[error(
        "the CSR asks for a CA with {requested}, but the policy allows this caller pathLen {allowed} at most \
         (spire_ca_path_len): ask for no BasicConstraints or a pathLen within it, or raise the policy's value"
    )]
    PathLenBeyondPolicy {
        /// What the CSR asks for ("no path length limit" or "pathLen N").
        requested: String,
        /// The policy's `spire_ca_path_len`.
        allowed: u8,
    },
}

impl IssueError {
    /// A short stable name of the rule broken (lint rules keep their own names).
    pub fn rule(&self) -> &'static str {
        match self {
            IssueError::Csr(e) => e.rule(),
            IssueError::SpiffeId(e) => e.rule(),
            IssueError::MissingSpiffeId => "missing-spiffe-id",
            IssueError::BadDnsName(_) => "dns-name",
            IssueError::InvalidTtl(_) => "ttl",
            IssueError::TtlExceedsIssuer { .. } => "ttl-exceeds-issuer",
            IssueError::Lint(l) => l.rule,
            IssueError::Key(_) => "key",
            IssueError::PostSignCheck(_) => "post-sign-check",
            IssueError::Authority(_) => "authority",
            IssueError::PathLenBeyondPolicy { .. } => "x509.path-len",
            IssueError::Assembly(_) => "assembly",
        }
    }

    /// Whether retrying may succeed (only a transient key failure).
    pub fn is_transient(&self) -> bool {
        matches!(self, IssueError::Key(k) if k.is_transient())
    }
}

/// rcgen's algorithm and the signature OID for an issuer key type.
fn issuer_alg(key_type: KeyType) -> (&'static rcgen::SignatureAlgorithm, &'static str) {
    match key_type {
        KeyType::EcP256 => (&rcgen::PKCS_ECDSA_P256_SHA256, "1.2.840.10045.4.3.2"),
        KeyType::EcP384 => (&rcgen::PKCS_ECDSA_P384_SHA384, "1.2.840.10045.4.3.3"),
        KeyType::Ed25519 => (&rcgen::PKCS_ED25519, "1.3.101.112"),
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            (&rcgen::PKCS_RSA_SHA256, "1.2.840.113549.1.1.11")
        }
    }
}

/// The rcgen signing adapter: lint, sign, verify, re-encode. In capture mode it lints, keeps the TBSCertificate and
/// returns a placeholder instead of signing.
pub struct LintingSigner<'a> {
    key: &'a dyn AuthorityKey,
    scheme: SignatureScheme,
    alg: &'static rcgen::SignatureAlgorithm,
    public_bits: Vec<u8>,
    ctx: LintContext<'a>,
    failure: RefCell<Option<IssueError>>,
    /// Capture mode: the TBSCertificate rcgen asked to sign.
    captured: Option<RefCell<Option<Vec<u8>>>>,
}

impl std::fmt::Debug for LintingSigner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LintingSigner")
            .field("key", &self.key)
            .field("profile", &self.ctx.profile)
            .finish()
    }
}

impl<'a> LintingSigner<'a> {
    fn new(key: &'a dyn AuthorityKey, ctx: LintContext<'a>) -> Result<Self, IssueError> {
        let own = SubjectKey::from_spki_der(key.spki_der())
            .map_err(|e| IssueError::Authority(format!("authority public key: {e}")))?;
        let (alg, _) = issuer_alg(key.key_type());
        Ok(Self {
            key,
            scheme: key.key_type().x509_scheme(),
            alg,
            public_bits: own.raw().to_vec(),
            ctx,
            failure: RefCell::new(None),
            captured: None,
        })
    }

    fn sign_checked(&self, tbs: &[u8]) -> Result<Vec<u8>, IssueError> {
        lint_tbs(tbs, &self.ctx)?;
        if let Some(captured) = &self.captured {
            *captured.borrow_mut() = Some(tbs.to_vec());
            return Ok(Vec::new());
        }
        let raw = self.key.sign(self.scheme, tbs)?;
        checked_signature(self.key, self.scheme, tbs, raw)
    }

    /// Turn rcgen's result into ours, preferring the detailed failure stashed during `sign`.
    fn finish(
        &self,
        result: Result<rcgen::Certificate, rcgen::Error>,
    ) -> Result<Vec<u8>, IssueError> {
        if let Some(failure) = self.failure.borrow_mut().take() {
            return Err(failure);
        }
        result
            .map(|c| c.der().to_vec())
            .map_err(|e| IssueError::Assembly(e.to_string()))
    }
}

impl rcgen::PublicKeyData for LintingSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public_bits
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl rcgen::SigningKey for LintingSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_checked(msg).map_err(|e| {
            *self.failure.borrow_mut() = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Verifies `raw` (as the key returns it) over `tbs` against the key's public half, and encodes it as X.509 wants
/// it (ECDSA r||s as DER).
fn checked_signature(
    key: &dyn AuthorityKey,
    scheme: SignatureScheme,
    tbs: &[u8],
    raw: Vec<u8>,
) -> Result<Vec<u8>, IssueError> {
    // Fail closed: a public key that does not parse fails the check like a signature that does not verify.
    let checked = verify_signature(key.spki_der(), scheme, tbs, &raw);
    key.post_sign_checked(&raw, checked.is_ok());
    checked.map_err(|e| IssueError::PostSignCheck(e.to_string()))?;
    match scheme {
        SignatureScheme::EcdsaP256Sha256 | SignatureScheme::EcdsaP384Sha384 => {
            Ok(ecdsa_raw_to_der(&raw)?)
        }
        _ => Ok(raw),
    }
}

/// A leaf built and linted, waiting for its signature (see the module docs).
#[derive(Debug, Clone)]
pub struct UnsignedCertificate {
    /// The TBSCertificate DER: what the key signs.
    tbs: Vec<u8>,
    /// rcgen's certificate around `tbs`, with an empty signature: its AlgorithmIdentifier is reused.
    draft: Vec<u8>,
    not_after: OffsetDateTime,
}

impl UnsignedCertificate {
    /// The TBSCertificate DER, the message to sign with the authority key's X.509 scheme.
    pub fn tbs(&self) -> &[u8] {
        &self.tbs
    }
}

/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }`, from the
/// TBSCertificate's and AlgorithmIdentifier's encodings as they are.
struct CertificateParts<'a> {
    tbs: &'a [u8],
    algorithm: &'a [u8],
    signature: der::asn1::BitStringRef<'a>,
}

impl der::FixedTag for CertificateParts<'_> {
    const TAG: der::Tag = der::Tag::Sequence;
}

impl der::EncodeValue for CertificateParts<'_> {
    fn value_len(&self) -> der::Result<der::Length> {
        use der::Encode as _;
        der::Length::try_from(self.tbs.len())?
            + der::Length::try_from(self.algorithm.len())?
            + self.signature.encoded_len()?
    }

    fn encode_value(&self, writer: &mut impl der::Writer) -> der::Result<()> {
        use der::Encode as _;
        writer.write(self.tbs)?;
        writer.write(self.algorithm)?;
        self.signature.encode(writer)
    }
}

/// Puts `signature` (X.509's encoding) into rcgen's `draft` certificate in place of its placeholder.
fn assemble(draft: &[u8], signature: &[u8]) -> Result<Vec<u8>, IssueError> {
    use der::{Decode as _, Encode as _, Reader as _};
    let bad = |e: der::Error| IssueError::Assembly(format!("certificate assembly: {e}"));
    let mut reader = der::SliceReader::new(draft).map_err(bad)?;
    let (tbs, algorithm) = reader
        .sequence(|r| {
            let tbs = r.tlv_bytes()?;
            let algorithm = r.tlv_bytes()?;
            der::asn1::BitStringRef::decode(r)?;
            Ok::<_, der::Error>((tbs, algorithm))
        })
        .map_err(bad)?;
    reader.finish().map_err(bad)?;
    CertificateParts {
        tbs,
        algorithm,
        signature: der::asn1::BitStringRef::from_bytes(signature).map_err(bad)?,
    }
    .to_der()
    .map_err(bad)
}

/// An issued certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The certificate DER.
    pub der: Vec<u8>,
    /// Its NotAfter.
    pub not_after: OffsetDateTime,
}

impl IssuedCertificate {
    /// PEM `CERTIFICATE` block.
    pub fn pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.der.clone()))
    }
}

/// The CA minted for SPIRE, with what `MintX509CAResponse` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedCa {
    /// `x509_ca_chain`: the new CA first, then the intermediates up to (not including) the root.
    pub x509_ca_chain: Vec<Vec<u8>>,
    /// `upstream_x509_roots`.
    pub upstream_x509_roots: Vec<Vec<u8>>,
    /// NotAfter of the new CA.
    pub not_after: OffsetDateTime,
}

/// A leaf X509-SVID to issue.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    /// The SPIFFE ID (URI SAN).
    pub spiffe_id: SpiffeId,
    /// The subject public key.
    pub subject_key: SubjectKey,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Subject; empty means an empty subject (the SAN is then critical).
    pub subject: DistinguishedName,
    /// Lifetime from now.
    pub ttl: Duration,
}

impl LeafRequest {
    /// A request for a trusted caller that supplies a bare public key (SPKI DER).
    pub fn from_spki(
        spiffe_id: SpiffeId,
        spki_der: &[u8],
        ttl: Duration,
    ) -> Result<Self, IssueError> {
        let subject_key = SubjectKey::from_spki_der(spki_der).map_err(CsrError::SubjectKey)?;
        Ok(Self {
            spiffe_id,
            subject_key,
            dns_names: Vec::new(),
            subject: DistinguishedName::new(),
            ttl,
        })
    }

    /// A request from a verified CSR: its SPIFFE ID, DNS names and key. The CSR's subject is NOT copied (a
    /// requester must not choose names that other systems may authorize on); the leaf gets an empty subject and a
    /// critical SAN unless the caller sets [`LeafRequest::subject`] from its own policy.
    pub fn from_csr(csr: &VerifiedCsr, ttl: Duration) -> Result<Self, IssueError> {
        let spiffe_id = csr
            .spiffe_id()
            .cloned()
            .ok_or(IssueError::MissingSpiffeId)?;
        Ok(Self {
            spiffe_id,
            subject_key: csr.subject_key().clone(),
            dns_names: csr.dns_names().to_vec(),
            subject: DistinguishedName::new(),
            ttl,
        })
    }
}

/// A self-signed root to create.
#[derive(Debug, Clone)]
pub struct RootRequest {
    /// The trust domain (the root's URI SAN is `spiffe://<td>`).
    pub trust_domain: TrustDomain,
    /// Subject (e.g. O=..., CN=...). Must not be empty.
    pub subject: DistinguishedName,
    /// Lifetime.
    pub ttl: Duration,
    /// pathLenConstraint; `None` for none. 0 is refused (leaves would be the only thing it could sign).
    pub path_len: Option<u8>,
}

/// An intermediate CA to issue from a bare public key (e.g. delegated mode's in-memory issuing key).
#[derive(Debug, Clone)]
pub struct IntermediateRequest {
    /// The subject public key.
    pub subject_key: SubjectKey,
    /// Subject. Must not be empty.
    pub subject: DistinguishedName,
    /// Lifetime; refused if it outlives the issuer.
    pub ttl: Duration,
    /// pathLenConstraint (0 for a CA that signs leaves only).
    pub path_len: Option<u8>,
}

/// A CA certificate with its key: something that issues.
#[derive(Debug)]
pub struct Authority {
    key: Arc<dyn AuthorityKey>,
    cert_der: Vec<u8>,
    subject_der: Vec<u8>,
    issuer_params: CertificateParams,
    key_id: Vec<u8>,
    not_after: OffsetDateTime,
    trust_domain: TrustDomain,
    /// Intermediates above this CA up to (not including) the root.
    intermediates: Vec<Vec<u8>>,
    /// The roots this CA chains to (itself, for a root).
    roots: Vec<Vec<u8>>,
    /// This CA's own pathLenConstraint (`None`: none).
    path_len: Option<u32>,
}

fn random_serial() -> Result<SerialNumber, IssueError> {
    let rng = ring::rand::SystemRandom::new();
    loop {
        let mut bytes = [0u8; 16];
        rng.fill(&mut bytes)
            .map_err(|_| IssueError::Assembly("the system random generator failed".into()))?;
        // Uniform over [1, 2^128-1]; values under 2^64 (probability 2^-64) are redrawn so every serial carries at
        // least 64 bits, as the lint requires.
        if bytes[..8].iter().any(|b| *b != 0) {
            let start = bytes.iter().position(|b| *b != 0).unwrap_or(0);
            return Ok(SerialNumber::from_slice(&bytes[start..]));
        }
    }
}

fn add_ttl(now: OffsetDateTime, ttl: Duration) -> Result<OffsetDateTime, IssueError> {
    if ttl.is_zero() {
        return Err(IssueError::InvalidTtl("the TTL must be positive".into()));
    }
    let ttl = time::Duration::try_from(ttl)
        .map_err(|_| IssueError::InvalidTtl("the TTL is too large".into()))?;
    now.checked_add(ttl)
        .ok_or_else(|| IssueError::InvalidTtl("NotAfter would be out of range".into()))
}

fn validity(now: OffsetDateTime) -> Result<(OffsetDateTime, OffsetDateTime), IssueError> {
    let now = now
        .replace_nanosecond(0)
        .map_err(|e| IssueError::Assembly(e.to_string()))?;
    let backdate =
        time::Duration::try_from(BACKDATE).map_err(|e| IssueError::Assembly(e.to_string()))?;
    Ok((now, now - backdate))
}

impl Authority {
    /// An authority from an existing CA certificate and its key. `intermediates` are the CA certificates above it up
    /// to (not including) the root; `roots` the roots it chains to (empty if `cert_der` is itself the root).
    pub fn new(
        cert_der: Vec<u8>,
        key: Arc<dyn AuthorityKey>,
        trust_domain: TrustDomain,
        intermediates: Vec<Vec<u8>>,
        roots: Vec<Vec<u8>>,
    ) -> Result<Self, IssueError> {
        let bad = |m: String| IssueError::Authority(m);
        let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(&cert_der)
            .map_err(|e| bad(format!("certificate does not parse: {e}")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the certificate".into()));
        }
        if cert.public_key().raw != key.spki_der() {
            return Err(bad(
                "the certificate's public key is not the key's public key".into(),
            ));
        }
        let path_len = match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => bc.value.path_len_constraint,
            _ => {
                return Err(bad(
                    "the certificate is not a CA (BasicConstraints cA=true)".into(),
                ));
            }
        };
        if !matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign()) {
            return Err(bad("the certificate's KeyUsage lacks keyCertSign".into()));
        }
        let ski = cert
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.0.to_vec())
                }
                _ => None,
            });
        let key_id = match ski {
            Some(ski) if !ski.is_empty() => ski,
            _ => return Err(bad("the CA certificate has no SubjectKeyIdentifier".into())),
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(u) = name {
                    let id = SpiffeId::parse(u).map_err(|e| bad(format!("CA URI SAN: {e}")))?;
                    id.require_trust_domain(&trust_domain)
                        .map_err(|e| bad(format!("CA URI SAN: {e}")))?;
                }
            }
        }
        let subject =
            super::names::to_rcgen(cert.subject()).map_err(|e| bad(format!("CA subject: {e}")))?;
        let mut issuer_params = CertificateParams::default();
        issuer_params.distinguished_name = subject;
        issuer_params.key_identifier_method = KeyIdMethod::PreSpecified(key_id.clone());
        issuer_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let not_after = cert.validity().not_after.to_datetime();
        let subject_der = cert.subject().as_raw().to_vec();
        let self_issued = cert.subject().as_raw() == cert.issuer().as_raw();
        let roots = match (roots.is_empty(), self_issued) {
            (false, _) => roots,
            (true, true) => vec![cert_der.clone()],
            (true, false) => {
                return Err(bad(
                    "the CA is not self-signed: give the roots it chains to".into(),
                ));
            }
        };
        Ok(Self {
            key,
            cert_der,
            subject_der,
            issuer_params,
            key_id,
            not_after,
            trust_domain,
            intermediates,
            roots,
            path_len,
        })
    }

    /// Create a self-signed root for `req` with `key`, and return it as an authority.
    pub fn self_signed_root(
        key: Arc<dyn AuthorityKey>,
        req: &RootRequest,
        now: OffsetDateTime,
    ) -> Result<Self, IssueError> {
        if req.subject.iter().next().is_none() {
            return Err(IssueError::Authority(
                "a root needs a non-empty subject".into(),
            ));
        }
        if req.path_len == Some(0) {
            return Err(IssueError::Lint(LintFailure::record(
                "x509.path-len",
                "a root must not carry pathlen 0: leave it unset or give 1 or more",
            )));
        }
        let (now, not_before) = validity(now)?;
        let not_after = add_ttl(now, req.ttl)?;
        let own = SubjectKey::from_spki_der(key.spki_der())
            .map_err(|e| IssueError::Authority(format!("root key: {e}")))?;
        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        params.distinguished_name = req.subject.clone();
        params.subject_alt_names = vec![san_uri(&req.trust_domain.id())?];
        params.is_ca = IsCa::Ca(match req.path_len {
            None => BasicConstraints::Unconstrained,
            Some(n) => BasicConstraints::Constrained(n),
        });
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.key_identifier_method = KeyIdMethod::PreSpecified(own.key_identifier());
        let (_, signature_oid) = issuer_alg(key.key_type());
        let ctx = LintContext {
            profile: Profile::Root,
            trust_domain: &req.trust_domain,
            subject_spki: key.spki_der(),
            signature_oid,
            issuer: None,
            path_len: req.path_len.map(u32::from),
            subject_der: None,
            issuing: false,
        };
        let signer = LintingSigner::new(key.as_ref(), ctx)?;
        let der = signer.finish(params.self_signed(&signer))?;
        Self::new(
            der,
            key.clone(),
            req.trust_domain.clone(),
            Vec::new(),
            Vec::new(),
        )
    }

    /// This CA's certificate DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// This CA's NotAfter.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The key.
    pub fn key(&self) -> &Arc<dyn AuthorityKey> {
        &self.key
    }

    /// The chain a certificate issued by this authority is presented with: this CA (unless it is a root) then the
    /// intermediates above it, root excluded.
    pub fn chain(&self) -> Vec<Vec<u8>> {
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        if !self.is_root() {
            chain.push(self.cert_der.clone());
        }
        chain.extend(self.intermediates.iter().cloned());
        chain
    }

    /// The CA certificates above this one up to (not including) the root, as given to [`new`](Self::new).
    pub fn intermediates(&self) -> &[Vec<u8>] {
        &self.intermediates
    }

    /// The roots this authority chains to.
    pub fn roots(&self) -> &[Vec<u8>] {
        &self.roots
    }

    /// This CA's own pathLenConstraint (`None`: none).
    pub fn path_len(&self) -> Option<u32> {
        self.path_len
    }

    /// True when this authority is a self-signed root.
    pub fn is_root(&self) -> bool {
        self.roots.len() == 1 && self.roots[0] == self.cert_der
    }

    fn lint_context<'a>(
        &'a self,
        profile: Profile,
        subject_spki: &'a [u8],
        path_len: Option<u32>,
    ) -> LintContext<'a> {
        let (_, signature_oid) = issuer_alg(self.key.key_type());
        LintContext {
            profile,
            trust_domain: &self.trust_domain,
            subject_spki,
            signature_oid,
            issuer: Some(IssuerFacts {
                subject_der: &self.subject_der,
                key_id: &self.key_id,
                not_after: self.not_after.unix_timestamp(),
            }),
            path_len,
            subject_der: None,
            issuing: false,
        }
    }

    fn sign_params(
        &self,
        params: &CertificateParams,
        subject_key: &SubjectKey,
        ctx: LintContext<'_>,
    ) -> Result<Vec<u8>, IssueError> {
        let signer = LintingSigner::new(self.key.as_ref(), ctx)?;
        let issuer = Issuer::from_params(&self.issuer_params, &signer);
        let result = params.signed_by(subject_key, &issuer);
        signer.finish(result)
    }

    /// Issue a leaf X509-SVID. Its NotAfter is `now + ttl` cut at this authority's NotAfter.
    pub fn issue_x509_svid(
        &self,
        req: &LeafRequest,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let (params, not_after) = self.leaf_params(req, now)?;
        let ctx = self.lint_context(Profile::Leaf, req.subject_key.spki_der(), None);
        let der = self.sign_params(&params, &req.subject_key, ctx)?;
        Ok(IssuedCertificate { der, not_after })
    }

    /// The first step of issuing a leaf in two (see the module docs): the same checks, template and lint as
    /// [`issue_x509_svid`](Self::issue_x509_svid), without signing.
    pub fn prepare_x509_svid(
        &self,
        req: &LeafRequest,
        now: OffsetDateTime,
    ) -> Result<UnsignedCertificate, IssueError> {
        let (params, not_after) = self.leaf_params(req, now)?;
        let ctx = self.lint_context(Profile::Leaf, req.subject_key.spki_der(), None);
        let mut signer = LintingSigner::new(self.key.as_ref(), ctx)?;
        signer.captured = Some(RefCell::new(None));
        let issuer = Issuer::from_params(&self.issuer_params, &signer);
        let result = params.signed_by(&req.subject_key, &issuer);
        let draft = signer.finish(result)?;
        let tbs = signer
            .captured
            .and_then(RefCell::into_inner)
            .ok_or_else(|| IssueError::Assembly("rcgen signed no TBSCertificate".into()))?;
        Ok(UnsignedCertificate {
            tbs,
            draft,
            not_after,
        })
    }

    /// The second step: checks `raw`, the authority key's signature over `unsigned.tbs()` (as
    /// [`AuthorityKey::sign`] returns it), against the key's public half, and assembles the certificate.
    pub fn complete(
        &self,
        unsigned: UnsignedCertificate,
        raw: Vec<u8>,
    ) -> Result<IssuedCertificate, IssueError> {
        let key = self.key.as_ref();
        let signature = checked_signature(key, key.key_type().x509_scheme(), &unsigned.tbs, raw)?;
        Ok(IssuedCertificate {
            der: assemble(&unsigned.draft, &signature)?,
            not_after: unsigned.not_after,
        })
    }

    /// A leaf's template: the request checked against this authority, validity, serial, SANs, usages.
    fn leaf_params(
        &self,
        req: &LeafRequest,
        now: OffsetDateTime,
    ) -> Result<(CertificateParams, OffsetDateTime), IssueError> {
        req.spiffe_id.require_trust_domain(&self.trust_domain)?;
        req.spiffe_id.require_workload()?;
        for d in &req.dns_names {
            if !valid_dns_name(d) {
                return Err(IssueError::BadDnsName(d.clone()));
            }
        }
        let (now, not_before) = validity(now)?;
        let not_after = self.capped_not_after(now, req.ttl)?;

        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        params.distinguished_name = req.subject.clone();
        let mut sans = vec![san_uri(&req.spiffe_id)?];
        for d in &req.dns_names {
            sans.push(SanType::DnsName(d.clone().try_into().map_err(
                |e: rcgen::Error| IssueError::BadDnsName(format!("{d}: {e}")),
            )?));
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if matches!(req.subject_key.kind(), SubjectKeyKind::Rsa(_)) {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::PreSpecified(req.subject_key.key_identifier());
        Ok((params, not_after))
    }

    /// Issue an intermediate CA for a bare public key. A TTL that would outlive this authority is refused.
    pub fn issue_intermediate(
        &self,
        req: &IntermediateRequest,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        self.intermediate(req, false, now)
    }

    /// Issue one of signet's own issuing intermediates (delegated mode): as
    /// [`issue_intermediate`](Self::issue_intermediate), with the issuing certificate policy that lets signet's
    /// trust boundary accept the leaves it signs as signet's own (see [`super::issuing`]).
    pub fn issue_issuing_intermediate(
        &self,
        req: &IntermediateRequest,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        self.intermediate(req, true, now)
    }

    fn intermediate(
        &self,
        req: &IntermediateRequest,
        issuing: bool,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let (now, _) = validity(now)?;
        let not_after = add_ttl(now, req.ttl)?;
        self.check_within_issuer(not_after)?;
        self.issue_ca(
            &req.subject_key,
            &req.subject,
            None,
            not_after,
            req.path_len,
            issuing,
            now,
        )
    }

    /// SPIRE's `MintX509CA`: sign the CSR of a SPIRE server's CA. The CSR's URI SAN must be exactly
    /// `spiffe://<td>`; the result has CA=true, KeyUsage keyCertSign|cRLSign (critical), SKI and AKI, the CSR's
    /// subject, NotBefore backdated 10 s, TTL `preferred_ttl_secs` (1 h if 0), NotAfter capped at this authority's
    /// NotAfter, and the pathLenConstraint [`spire_ca_path_len`](Self::spire_ca_path_len) picks from `policy_path_len`.
    pub fn mint_spire_ca(
        &self,
        csr_der: &[u8],
        preferred_ttl_secs: i32,
        policy_path_len: Option<u8>,
        now: OffsetDateTime,
    ) -> Result<MintedCa, IssueError> {
        let csr = parse_and_verify_csr(csr_der)?;
        let id = csr.spiffe_id().ok_or(IssueError::MissingSpiffeId)?;
        id.require_trust_domain(&self.trust_domain)?;
        if !id.is_trust_domain_id() {
            return Err(IssueError::SpiffeId(SpiffeIdError::UnexpectedPath(
                self.trust_domain.to_string(),
            )));
        }
        if !csr.dns_names().is_empty() {
            return Err(IssueError::Csr(CsrError::UnsupportedSan(
                "DNS (on a CA request)",
            )));
        }
        let ttl = match preferred_ttl_secs {
            0 => DEFAULT_SPIRE_CA_TTL,
            n if n < 0 => {
                return Err(IssueError::InvalidTtl(format!(
                    "preferred_ttl {n} is negative"
                )));
            }
            n => Duration::from_secs(n.unsigned_abs().into()),
        };
        let path_len = self.spire_ca_path_len(policy_path_len, csr.requested_ca())?;
        let (now, _) = validity(now)?;
        let not_after = self.capped_not_after(now, ttl)?;
        let issued = self.issue_ca(
            csr.subject_key(),
            csr.subject(),
            Some(csr.subject_der()),
            not_after,
            path_len,
            false,
            now,
        )?;
        let mut x509_ca_chain = vec![issued.der];
        x509_ca_chain.extend(self.chain());
        Ok(MintedCa {
            x509_ca_chain,
            upstream_x509_roots: self.roots.clone(),
            not_after,
        })
    }

    /// The pathLenConstraint of a SPIRE server's CA: the policy's (`None`: none, as SPIRE's own upstream
    /// authorities write), or the shorter one the CSR asks for; below a CA that is itself constrained to `p`, at most
    /// `p - 1`. A CSR asking for more than the policy allows is refused
    /// ([`PathLenBeyondPolicy`](IssueError::PathLenBeyondPolicy)), and so is a policy value this authority cannot
    /// give (the configuration check at start makes that one rare: it is left for an authority that a rotation
    /// brought in).
    pub fn spire_ca_path_len(
        &self,
        policy: Option<u8>,
        requested: Option<RequestedCa>,
    ) -> Result<Option<u8>, IssueError> {
        let mut path_len = policy;
        match (requested, policy) {
            (Some(RequestedCa::Unconstrained), Some(allowed)) => {
                return Err(IssueError::PathLenBeyondPolicy {
                    requested: "no path length limit".into(),
                    allowed,
                });
            }
            (Some(RequestedCa::PathLen(n)), Some(allowed)) if n > u32::from(allowed) => {
                return Err(IssueError::PathLenBeyondPolicy {
                    requested: format!("pathLen {n}"),
                    allowed,
                });
            }
            (Some(RequestedCa::PathLen(n)), _) => {
                // Shorter than (or as long as) the policy allows, or no policy limit: as asked.
                path_len = Some(u8::try_from(n).unwrap_or(u8::MAX));
            }
            _ => {}
        }
        match (self.path_len, path_len) {
            (None, p) => Ok(p),
            (Some(0), _) => Err(IssueError::Authority(
                "the signing authority has pathLen 0: it cannot sign a CA for a SPIRE server"
                    .into(),
            )),
            (Some(own), None) => Ok(Some(u8::try_from(own - 1).unwrap_or(u8::MAX))),
            (Some(own), Some(p)) if u32::from(p) < own => Ok(Some(p)),
            (Some(own), Some(p)) => Err(IssueError::Authority(format!(
                "a CA with pathLen {p} cannot be signed by this authority, whose pathLen is {own}: lower \
                 spire_ca_path_len to {} at most",
                own - 1
            ))),
        }
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the CA template's parts, each used once; a struct would only rename them"
    )]
    fn issue_ca(
        &self,
        subject_key: &SubjectKey,
        subject: &DistinguishedName,
        subject_der: Option<&[u8]>,
        not_after: OffsetDateTime,
        path_len: Option<u8>,
        issuing: bool,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        if subject.iter().next().is_none() {
            return Err(IssueError::Csr(CsrError::Subject(
                "a CA needs a non-empty subject".into(),
            )));
        }
        let (_, not_before) = validity(now)?;
        let mut params = CertificateParams::default();
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        params.distinguished_name = subject.clone();
        params.subject_alt_names = vec![san_uri(&self.trust_domain.id())?];
        params.is_ca = IsCa::Ca(match path_len {
            None => BasicConstraints::Unconstrained,
            Some(n) => BasicConstraints::Constrained(n),
        });
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::PreSpecified(subject_key.key_identifier());
        let mut ctx = self.lint_context(
            Profile::IntermediateCa,
            subject_key.spki_der(),
            path_len.map(u32::from),
        );
        ctx.subject_der = subject_der;
        ctx.issuing = issuing;
        if issuing {
            params.custom_extensions.push(
                super::issuing::issuing_extension()
                    .map_err(|e| IssueError::Assembly(e.to_string()))?,
            );
        }
        let der = self.sign_params(&params, subject_key, ctx)?;
        Ok(IssuedCertificate { der, not_after })
    }

    /// Sign a caller-built template. This is the escape hatch for profiles the functions above do not cover; the
    /// pre-issuance lint for `profile` (with `path_len` as the expected pathLenConstraint of a CA) still decides
    /// whether anything is signed, so a template that breaks a rule fails with that rule's name.
    pub fn issue_with_params(
        &self,
        params: &CertificateParams,
        subject_key: &SubjectKey,
        profile: Profile,
        path_len: Option<u8>,
    ) -> Result<IssuedCertificate, IssueError> {
        let ctx = self.lint_context(profile, subject_key.spki_der(), path_len.map(u32::from));
        let der = self.sign_params(params, subject_key, ctx)?;
        Ok(IssuedCertificate {
            der,
            not_after: params.not_after,
        })
    }

    /// `now + ttl`, cut at this authority's NotAfter: the TTL rule's last step, the same for every leaf and SPIRE CA
    /// in every mode. A TTL too large to add (up to `Duration::MAX`) is cut too, never an overflow. Zero is refused
    /// (callers map 0 to their default first); so is an authority that has expired.
    fn capped_not_after(
        &self,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<OffsetDateTime, IssueError> {
        if ttl.is_zero() {
            return Err(IssueError::InvalidTtl("the TTL must be positive".into()));
        }
        if self.not_after <= now {
            return Err(IssueError::Authority(
                "this authority has expired; rotate it".into(),
            ));
        }
        let wanted = time::Duration::try_from(ttl)
            .ok()
            .and_then(|t| now.checked_add(t));
        Ok(match wanted {
            Some(t) if t < self.not_after => t,
            _ => self.not_after,
        })
    }

    fn check_within_issuer(&self, not_after: OffsetDateTime) -> Result<(), IssueError> {
        if not_after > self.not_after {
            return Err(IssueError::TtlExceedsIssuer {
                requested: not_after.unix_timestamp(),
                issuer: self.not_after.unix_timestamp(),
            });
        }
        Ok(())
    }
}

/// rcgen's signing adapter for a certificate signing request: the token key signs, the signature is checked against
/// its public half (no certificate lint: a request is not a certificate).
struct RequestSigner<'a> {
    key: &'a dyn AuthorityKey,
    alg: &'static rcgen::SignatureAlgorithm,
    public_bits: Vec<u8>,
    failure: RefCell<Option<IssueError>>,
}

impl rcgen::PublicKeyData for RequestSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public_bits
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl rcgen::SigningKey for RequestSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let scheme = self.key.key_type().x509_scheme();
        let signed = self
            .key
            .sign(scheme, msg)
            .map_err(IssueError::from)
            .and_then(|raw| checked_signature(self.key, scheme, msg, raw));
        signed.map_err(|e| {
            *self.failure.borrow_mut() = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}

/// A PKCS#10 certificate signing request (DER) for `key`, signed by it on the token: the subject `subject`, the URI
/// SAN `spiffe://<td>` and, as requested extensions, what a CA of the trust domain carries (BasicConstraints cA,
/// KeyUsage keyCertSign and cRLSign). An offline root signs it into signet's intermediate.
pub fn certificate_request(
    key: &dyn AuthorityKey,
    trust_domain: &TrustDomain,
    subject: &DistinguishedName,
) -> Result<Vec<u8>, IssueError> {
    let own = SubjectKey::from_spki_der(key.spki_der())
        .map_err(|e| IssueError::Authority(format!("authority public key: {e}")))?;
    let (alg, _) = issuer_alg(key.key_type());
    let signer = RequestSigner {
        key,
        alg,
        public_bits: own.raw().to_vec(),
        failure: RefCell::new(None),
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = subject.clone();
    params.subject_alt_names = vec![san_uri(&trust_domain.id())?];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let result = params.serialize_request(&signer);
    if let Some(failure) = signer.failure.borrow_mut().take() {
        return Err(failure);
    }
    result
        .map(|csr| csr.der().to_vec())
        .map_err(|e| IssueError::Assembly(e.to_string()))
}

fn san_uri(id: &SpiffeId) -> Result<SanType, IssueError> {
    let uri = id
        .as_str()
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| IssueError::Assembly(e.to_string()))?;
    Ok(SanType::URI(uri))
}
