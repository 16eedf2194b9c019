//! TLS for the APIs: the server's rustls configuration, and the check of the client's X509-SVID.
//!
//! Nothing runs for a peer before it is authenticated: the handshake requires a client certificate and verifies its
//! chain against the bundle's current roots ([`LiveClientTrust`], so a root added by a rotation is trusted at once
//! without a new TLS configuration). A peer without one gets no TLS session; the accept loop counts and audits such
//! refusals in aggregate. Every RPC checks the chain again ([`ClientTrust::authenticate`], cached per chain) and
//! learns who signed the leaf ([`SignedBy`]): signet's own issuing keys (a root, or an issuing intermediate of
//! delegated mode directly below one, see [`crate::x509::issuing`]), or a CA below signet such as a SPIRE server's.
//! Below an offline root (`authority.x509.parent = "external"`) the roots are not signet's: its issuing keys are then
//! its own intermediates (the bundle's `own_cas`), and a CA the offline root signed for someone else is not signet's.
//! The services give a role only to the first kind (see `AppState::admit`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio_rustls::rustls;

use x509_parser::certificate::X509Certificate;

use crate::bundle::TrustBundle;
use crate::spiffe::TrustDomain;
use crate::x509::issuing;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why the TLS configuration, or the client trust of a set of roots, cannot be built (signet's own credential or
/// bundle is at fault, not a client).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A root of the bundle is not a usable trust anchor.
    #[error("a bundle root is not usable as a trust anchor: {0}")]
    Anchor(#[source] rustls::Error),
    /// rustls refused to build the client certificate verifier (for example: no roots).
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The server's certificate or key is unusable.
    #[error(transparent)]
    Credential(#[from] crate::own::OwnError),
    /// rustls refuses the server's certificate or key.
    #[error("the server certificate or key is unusable: {0}")]
    Certificate(#[source] rustls::Error),
    /// rustls refused the protocol versions of the configuration.
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// Why a client is not authenticated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The client presented no certificate.
    #[error("no client certificate: present an X509-SVID of trust domain {trust_domain} (mTLS)")]
    NoCertificate {
        /// The trust domain served.
        trust_domain: TrustDomain,
    },
    /// The chain does not verify to a root of the bundle (expired, unknown issuer, bad signature, ...).
    #[error("the client certificate is not trusted by trust domain {trust_domain}: {source}")]
    Untrusted {
        /// The trust domain served.
        trust_domain: TrustDomain,
        /// What the verifier found.
        #[source]
        source: rustls::Error,
    },
    /// The leaf is not an X509-SVID (no or several URI SANs, or not a SPIFFE ID).
    #[error(transparent)]
    NotSvid(#[from] crate::x509::SvidIdError),
    /// The leaf's SPIFFE ID is of another trust domain.
    #[error("the client certificate's SPIFFE ID is not accepted: {0}")]
    ForeignId(#[source] crate::spiffe::SpiffeIdError),
    /// The trust of the bundle's roots cannot be built: signet's fault, not the client's.
    #[error(transparent)]
    Trust(#[from] TlsError),
}

fn verifier_for(roots: &[Vec<u8>]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(CertificateDer::from(r.clone()))
            .map_err(TlsError::Anchor)?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .build()
        .map_err(TlsError::Verifier)
}

/// Who signed a client's leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignedBy {
    /// One of signet's own issuing keys: a root of the bundle, or an issuing intermediate of delegated mode
    /// directly below one.
    Signet,
    /// A CA below signet's roots that is not signet's own (for example the CA a SPIRE server got from
    /// `MintX509CA`); the subject of that CA.
    Downstream(String),
}

/// An authenticated client: its SPIFFE ID and who signed its leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The SPIFFE ID of the client's X509-SVID.
    pub id: String,
    /// Who signed it.
    pub signed_by: SignedBy,
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
    roots: Arc<Vec<Vec<u8>>>,
    /// signet's own intermediates below offline roots: their leaves and issuing intermediates are signet's.
    own_cas: Arc<Vec<Vec<u8>>>,
    verified: Arc<Mutex<Verified>>,
}

/// Verified chains: digest -> (the peer, trusted until, Unix seconds).
type Verified = HashMap<[u8; 32], (Peer, i64)>;

/// Most verified chains remembered; beyond it the memory starts afresh.
const MAX_REMEMBERED: usize = 10_000;

fn chain_digest(certs: &[CertificateDer<'_>]) -> [u8; 32] {
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

/// True when `child` names `parent` as its issuer and `parent`'s key verifies `child`'s signature.
fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

impl ClientTrust {
    /// Trust `roots` for clients of `trust_domain`.
    pub fn new(roots: &[Vec<u8>], trust_domain: TrustDomain) -> Result<Self, TlsError> {
        Ok(Self {
            verifier: verifier_for(roots)?,
            trust_domain,
            roots: Arc::new(roots.to_vec()),
            own_cas: Arc::new(Vec::new()),
            verified: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The same trust, with `own_cas` (signet's own intermediates below offline roots, DER) counted as signet's
    /// issuing keys like its roots: a leaf they sign, or an issuing intermediate directly below one, is signet's.
    pub fn with_own_cas(mut self, own_cas: &[Vec<u8>]) -> Self {
        self.own_cas = Arc::new(own_cas.to_vec());
        self
    }

    /// Who signed `leaf`: a root of the bundle or an issuing intermediate of signet's directly below one (both
    /// signet's own keys), or else the presented CA that did. Called once the chain verified to a root, so some
    /// presented certificate or root signed the leaf.
    fn signer_of(&self, leaf: &[u8], presented: &[CertificateDer<'_>]) -> SignedBy {
        let Ok((_, leaf)) = x509_parser::parse_x509_certificate(leaf) else {
            return SignedBy::Downstream("an unparsable certificate".into());
        };
        // signet's issuing keys: its roots, or (below an offline root) its own intermediates.
        let roots: Vec<X509Certificate<'_>> = if self.own_cas.is_empty() {
            self.roots.iter()
        } else {
            self.own_cas.iter()
        }
        .filter_map(|r| x509_parser::parse_x509_certificate(r).ok().map(|(_, c)| c))
        .collect();
        if roots.iter().any(|r| signed_by(&leaf, r)) {
            return SignedBy::Signet;
        }
        let mut downstream = None;
        for c in presented {
            let Ok((_, ca)) = x509_parser::parse_x509_certificate(c) else {
                continue;
            };
            if !signed_by(&leaf, &ca) {
                continue;
            }
            if issuing::carries_issuing_policy(&ca) && roots.iter().any(|r| signed_by(&ca, r)) {
                return SignedBy::Signet;
            }
            downstream.get_or_insert_with(|| ca.subject().to_string());
        }
        SignedBy::Downstream(downstream.unwrap_or_else(|| "an unknown CA".into()))
    }

    /// The caller from the certificates it presented (leaf first), or why it is not authenticated: the chain must
    /// verify to a root of the bundle and the leaf must be an X509-SVID of the trust domain. Who signed the leaf is
    /// reported, not judged: the services decide what a credential that signet did not sign may do.
    pub fn authenticate(&self, certs: Option<&[CertificateDer<'_>]>) -> Result<Peer, AuthError> {
        let td = &self.trust_domain;
        let Some((leaf, intermediates)) = certs.and_then(|c| c.split_first()) else {
            return Err(AuthError::NoCertificate {
                trust_domain: td.clone(),
            });
        };
        let all = certs.unwrap_or_default();
        let digest = chain_digest(all);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some((peer, until)) = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
            && now < *until
        {
            return Ok(peer.clone());
        }
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|source| AuthError::Untrusted {
                trust_domain: td.clone(),
                source,
            })?;
        let id = crate::x509::svid_spiffe_id(leaf, "the client certificate")?;
        id.require_trust_domain(td).map_err(AuthError::ForeignId)?;
        let peer = Peer {
            id: id.as_str().to_string(),
            signed_by: self.signer_of(leaf, intermediates),
        };
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
        verified.insert(digest, (peer.clone(), until));
        Ok(peer)
    }
}

/// The client trust of the live bundle: rebuilt when the bundle's sequence changes, shared by the TLS handshake
/// and the per-RPC check, so a root added to the bundle is trusted at once and a removed one at once no longer is.
#[derive(Debug)]
pub struct LiveClientTrust {
    bundle: TrustBundle,
    trust_domain: TrustDomain,
    cached: Mutex<Option<(u64, ClientTrust)>>,
}

impl LiveClientTrust {
    /// Client trust following `bundle`.
    pub fn new(bundle: TrustBundle, trust_domain: TrustDomain) -> Self {
        Self {
            bundle,
            trust_domain,
            cached: Mutex::new(None),
        }
    }

    /// The trust of the bundle's current roots.
    pub fn current(&self) -> Result<ClientTrust, TlsError> {
        let snapshot = self.bundle.current();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seq, v)) = cached.as_ref()
            && *seq == snapshot.sequence
        {
            return Ok(v.clone());
        }
        let v = ClientTrust::new(&snapshot.x509_roots, self.trust_domain.clone())?
            .with_own_cas(&snapshot.own_cas);
        *cached = Some((snapshot.sequence, v.clone()));
        Ok(v)
    }

    /// Authenticates a client's certificates against the current roots.
    pub fn authenticate(&self, certs: Option<&[CertificateDer<'_>]>) -> Result<Peer, AuthError> {
        self.current()?.authenticate(certs)
    }
}

/// Requires a client certificate at the handshake and verifies it against the live bundle: a peer without an
/// X509-SVID of the trust domain that chains to its roots gets no TLS session, so nothing of the appliance runs for
/// it. The same check runs again per RPC (cached), where it also learns who signed the leaf.
struct HandshakeClientVerifier {
    trust: Arc<LiveClientTrust>,
    /// For the handshake signatures and the supported schemes (these do not depend on the roots).
    schemes: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for HandshakeClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeClientVerifier")
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for HandshakeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the roots change with rotation, and clients present their one SVID anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        self.trust
            .authenticate(Some(&chain))
            .map(|_| ClientCertVerified::assertion())
            .map_err(|refusal| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(Refusal(refusal))),
                ))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.schemes.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.schemes.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.supported_verify_schemes()
    }
}

/// Why a client certificate was refused at the handshake: the [`AuthError`], its source. rustls shows a custom
/// certificate error by its `Debug` form only (in the refusal's audit line), so that form carries the message.
struct Refusal(AuthError);

impl std::fmt::Debug for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Refusal").field(&self.0.to_string()).finish()
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The server's rustls configuration: `chain` (leaf first, DER) with its PKCS#8 key, HTTP/2 only, client
/// certificates required and verified against the live bundle at the handshake (`trust`).
pub fn server_config(
    chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
    trust: Arc<LiveClientTrust>,
) -> Result<rustls::ServerConfig, TlsError> {
    let cert = crate::own::LiveCert::new(&chain, &key_pkcs8)?;
    server_config_live(Arc::new(cert), trust)
}

/// [`server_config`] presenting whatever `cert` holds at each handshake: renewing the server's credential
/// ([`crate::own`]) swaps the certificate for new connections without touching open ones.
pub fn server_config_live(
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
    trust: Arc<LiveClientTrust>,
) -> Result<rustls::ServerConfig, TlsError> {
    let roots = trust.bundle.current().x509_roots.clone();
    let verifier = Arc::new(HandshakeClientVerifier {
        trust,
        schemes: verifier_for(&roots)?,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(ca: bool) -> Vec<u8> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        if ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        } else {
            p.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://example.org/x".try_into().unwrap(),
            )];
        }
        p.self_signed(&kp).unwrap().der().to_vec()
    }

    #[test]
    fn refusals_keep_their_kind_and_source() {
        let td = TrustDomain::parse("example.org").unwrap();
        assert!(matches!(
            ClientTrust::new(&[], td.clone()),
            Err(TlsError::Verifier(_))
        ));
        let trust = ClientTrust::new(&[self_signed(true)], td).unwrap();
        let e = trust.authenticate(None).unwrap_err();
        assert!(matches!(e, AuthError::NoCertificate { .. }), "{e:?}");
        let stranger = [CertificateDer::from(self_signed(false))];
        let e = trust.authenticate(Some(&stranger)).unwrap_err();
        assert!(matches!(e, AuthError::Untrusted { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("not trusted by trust domain example.org"),
            "{e}"
        );
        let source = std::error::Error::source(&e).expect("the verifier's error is the source");
        assert!(source.downcast_ref::<rustls::Error>().is_some());
        // At the handshake the refusal shows its message in rustls's Debug form and keeps the AuthError as source.
        let refusal = Refusal(e);
        assert!(format!("{refusal:?}").contains("not trusted by trust domain example.org"));
        assert!(
            std::error::Error::source(&refusal)
                .and_then(|s| s.downcast_ref::<AuthError>())
                .is_some()
        );
    }
}
