//! Client connections to a signet appliance: gRPC over rustls with the appliance checked SPIFFE-style.
//!
//! Every client of the appliance (the CLI, the SPIRE plug-in, the load generator) checks it the same way: the chain
//! it presents must verify to the trust bundle's roots, and its leaf must carry exactly the URI SAN of the
//! appliance's SPIFFE ID, `spiffe://<trust domain>/signet/server` ([`ServerAuth::Spiffe`]). The address dialled does
//! not matter, so `127.0.0.1:8443` (the address `signet serve` prints) works as well as a DNS name. For deployments
//! that give the appliance a DNS name in its certificate (`[server] names`), [`ServerAuth::Dns`] checks that name
//! instead, as a web client would.
//!
//! tonic's own TLS settings cannot take a custom certificate verifier, so the channel is built with
//! [`Endpoint::connect_with_connector`] and a tokio-rustls connector ([`channel`], [`lazy_channel`]) that offers HTTP/2
//! by ALPN. The client's credential comes from a [`ResolvesClientCert`]: [`SwappableIdentity`] lets a long-running
//! client (the plug-in) replace its X509-SVID while it runs; connections opened afterwards present the new one
//! (TLS session resumption is off, since a resumed session would present the old one).

use std::sync::{Arc, RwLock};

use tokio_rustls::rustls;
use tokio_rustls::rustls::client::ResolvesClientCert;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Channel, Endpoint, Uri};

/// The path of the appliance's own SPIFFE ID under its trust domain.
pub const SERVER_ID_PATH: &str = "/signet/server";

/// The SPIFFE ID of the appliance of `trust_domain` (`spiffe://<td>/signet/server`).
pub fn server_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}{SERVER_ID_PATH}")
}

/// The trust domain of a SPIFFE ID (`spiffe://td/...` -> `td`), if it is one.
pub fn trust_domain_of(spiffe_id: &str) -> Option<&str> {
    spiffe_id
        .strip_prefix("spiffe://")
        .map(|rest| rest.split('/').next().unwrap_or(rest))
        .filter(|td| !td.is_empty())
}

/// How the client checks the appliance's certificate (beyond its chain to the bundle's roots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAuth {
    /// Its leaf's URI SAN must be exactly this SPIFFE ID; the address dialled does not matter.
    Spiffe(String),
    /// Its leaf must be valid for this DNS name (or IP address), as a web client checks a server.
    Dns(String),
}

impl ServerAuth {
    /// The appliance of `trust_domain` by its SPIFFE ID, or by `server_name` when one is given.
    pub fn for_appliance(trust_domain: &str, server_name: Option<&str>) -> Self {
        match server_name.map(str::trim).filter(|n| !n.is_empty()) {
            Some(n) => ServerAuth::Dns(n.to_string()),
            None => ServerAuth::Spiffe(server_id(trust_domain)),
        }
    }
}

/// Why the appliance's certificate was refused (the text reaches the user through the connection error).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

fn refused(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Refused(msg)),
    )))
}

/// The roots that verify the appliance; replaceable while connections are made (a bundle that changed).
#[derive(Debug, Clone, Default)]
pub struct LiveRoots(Arc<RwLock<Arc<Vec<CertificateDer<'static>>>>>);

impl LiveRoots {
    /// Roots from DER certificates.
    pub fn new(roots: Vec<Vec<u8>>) -> Self {
        let r = Self::default();
        r.set(roots);
        r
    }

    /// Replaces the roots (connections made from now on use them).
    pub fn set(&self, roots: Vec<Vec<u8>>) {
        let v: Vec<CertificateDer<'static>> = roots.into_iter().map(CertificateDer::from).collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
    }

    /// The roots now.
    pub fn get(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Verifies the appliance: chain to the live roots (webpki, server-auth usage), then the SPIFFE ID or DNS name.
#[derive(Debug)]
pub struct ApplianceVerifier {
    roots: LiveRoots,
    auth: ServerAuth,
    provider: Arc<CryptoProvider>,
}

impl ApplianceVerifier {
    /// A verifier of `auth` against `roots`.
    pub fn new(roots: LiveRoots, auth: ServerAuth) -> Self {
        Self {
            roots,
            auth,
            provider: provider(),
        }
    }
}

/// The URI SANs of a DER certificate.
fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the appliance's certificate does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("the appliance's certificate has a bad SAN extension: {e}"))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

impl ServerCertVerifier for ApplianceVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.roots.get();
        let anchors: Vec<_> = roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        if anchors.is_empty() {
            return Err(refused(
                "no usable root in the trust bundle to verify the appliance with".into(),
            ));
        }
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| refused(format!("the appliance's certificate does not parse: {e}")))?;
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            refused(format!(
                "the appliance's certificate does not chain to the trust bundle's roots: {e}"
            ))
        })?;
        match &self.auth {
            ServerAuth::Spiffe(want) => {
                let uris = uri_sans(end_entity).map_err(refused)?;
                if uris.len() == 1 && uris[0] == *want {
                    Ok(ServerCertVerified::assertion())
                } else if uris.is_empty() {
                    Err(refused(format!(
                        "the server's certificate carries no SPIFFE ID: it is not the signet appliance {want}"
                    )))
                } else {
                    Err(refused(format!(
                        "the server's certificate is the X509-SVID of {}, not of the signet appliance {want}: \
                         refusing to talk to it",
                        uris.join(", ")
                    )))
                }
            }
            ServerAuth::Dns(name) => {
                let sn = ServerName::try_from(name.as_str())
                    .map_err(|e| refused(format!("server name {name:?}: {e}")))?;
                ee.verify_is_valid_for_subject_name(&sn).map_err(|e| {
                    refused(format!(
                        "the appliance's certificate is not valid for the name {name}: {e} (leave the server name \
                         unset to check the appliance by its SPIFFE ID instead)"
                    ))
                })?;
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client X509-SVID (chain, leaf first, and its PKCS#8 key) as rustls presents it.
pub fn certified_key(chain_der: Vec<Vec<u8>>, key_pkcs8: Vec<u8>) -> Result<CertifiedKey, String> {
    let key = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key_pkcs8.into()))
        .map_err(|e| format!("the client key is unusable: {e}"))?;
    if chain_der.is_empty() {
        return Err("the client certificate chain is empty".into());
    }
    let certified = CertifiedKey::new(
        chain_der.into_iter().map(CertificateDer::from).collect(),
        key,
    );
    // A key that is not the certificate's would fail every handshake with a bare transport error (as when a
    // certificate file is read just before its renewal replaced it and the key file just after): say so instead.
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(e) => Err(format!(
            "{KEY_MISMATCH} ({e}): give the key that belongs to the certificate"
        )),
    }
}

/// How [`certified_key`] says that a key is not its certificate's (callers that read a pair a renewal may be
/// replacing read it again on this).
pub const KEY_MISMATCH: &str = "the client key does not match the client certificate";

/// A client X509-SVID from PEM text (the chain, leaf first, and a PKCS#8 `PRIVATE KEY`).
pub fn certified_key_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, String> {
    let chain: Vec<Vec<u8>> =
        pem_blocks(chain_pem, "CERTIFICATE").map_err(|e| format!("the client certificate: {e}"))?;
    let key = pem_blocks(key_pem, "PRIVATE KEY")
        .map_err(|e| format!("the client key: {e}"))?
        .into_iter()
        .next()
        .ok_or("the client key holds no PKCS#8 PRIVATE KEY block")?;
    certified_key(chain, key)
}

/// The contents of the PEM blocks tagged `tag`.
pub fn pem_blocks(text: &[u8], tag: &str) -> Result<Vec<Vec<u8>>, String> {
    let out: Vec<Vec<u8>> = pem::parse_many(text)
        .map_err(|e| format!("not PEM: {e}"))?
        .into_iter()
        .filter(|p| p.tag() == tag)
        .map(|p| p.contents().to_vec())
        .collect();
    if out.is_empty() {
        return Err(format!("no {tag} block"));
    }
    Ok(out)
}

/// The client's X509-SVID, replaceable while the client runs: connections opened after [`set`](Self::set) present
/// the new one; connections (and their streams) already open keep going.
#[derive(Debug, Default)]
pub struct SwappableIdentity {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl SwappableIdentity {
    /// Starting with `key` (or none: the client presents no certificate).
    pub fn new(key: Option<CertifiedKey>) -> Self {
        Self {
            current: RwLock::new(key.map(Arc::new)),
        }
    }

    /// Replaces the credential.
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(key));
    }

    /// The credential now.
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesClientCert for SwappableIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.get().is_some()
    }
}

/// The rustls client configuration: the appliance checked by `verifier`, the client's credential from `identity`
/// (none: no client certificate), HTTP/2 by ALPN.
pub fn client_config(
    verifier: Arc<ApplianceVerifier>,
    identity: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(id) => builder.with_client_cert_resolver(id),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed TLS session carries the client certificate of the session it resumes, so a
    // client that swapped its credential would go on presenting the old one (until the appliance refuses it as
    // expired). Connections are long-lived; a full handshake each costs little.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// `host:port` (an `https://` prefix and a trailing `/` are dropped) as tonic's endpoint and the TLS server name to
/// send (SNI; an IP address sends none).
fn endpoint_of(address: &str) -> Result<(Endpoint, String), String> {
    let hp = address
        .trim()
        .strip_prefix("https://")
        .unwrap_or(address.trim())
        .trim_end_matches('/');
    if hp.contains("://") || !hp.contains(':') {
        return Err(format!("{address:?} is not host:port"));
    }
    let host = hp
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or_default()
        .to_string();
    // TLS is done by the connector below: tonic sees plain HTTP/2.
    let ep = Endpoint::from_shared(format!("http://{hp}"))
        .map_err(|e| format!("{address:?} is not an address: {e}"))?;
    Ok((ep, host))
}

type Connecting = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
                    std::io::Error,
                >,
            > + Send,
    >,
>;

fn connector(
    cfg: Arc<rustls::ClientConfig>,
    host: String,
) -> impl tower::Service<
    Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = Connecting,
> + Clone
+ Send
+ 'static {
    let tls = tokio_rustls::TlsConnector::from(cfg);
    tower::service_fn(move |uri: Uri| {
        let (tls, host) = (tls.clone(), host.clone());
        let fut: Connecting = Box::pin(async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| std::io::Error::other("the address has no host:port"))?;
            let tcp = tokio::net::TcpStream::connect(authority).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(host)
                .map_err(|e| std::io::Error::other(format!("server name: {e}")))?;
            let stream = tls.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        });
        fut
    })
}

/// A channel to `address` (`host:port`), connected now; `tune` sets the endpoint's timeouts and keep-alive. The
/// error says why, with its causes (a refused certificate names what was wrong with it).
pub async fn channel(
    address: &str,
    cfg: Arc<rustls::ClientConfig>,
    tune: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, String> {
    let (ep, host) = endpoint_of(address)?;
    tune(ep)
        .connect_with_connector(connector(cfg, host))
        .await
        .map_err(|e| error_chain(&e))
}

/// An error and its causes, `: `-separated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A lazily connecting channel to `address` (`host:port`); reconnects on its own after a failure, each time with
/// the configuration's current credential.
pub fn lazy_channel(
    address: &str,
    cfg: Arc<rustls::ClientConfig>,
    tune: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, String> {
    let (ep, host) = endpoint_of(address)?;
    Ok(tune(ep).connect_with_connector_lazy(connector(cfg, host)))
}

/// Checks an address (`host:port`).
pub fn check_address(address: &str) -> Result<(), String> {
    endpoint_of(address).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_and_ids() {
        assert_eq!(
            trust_domain_of("spiffe://example.org/a/b"),
            Some("example.org")
        );
        assert_eq!(trust_domain_of("https://x"), None);
        assert_eq!(
            ServerAuth::for_appliance("example.org", None),
            ServerAuth::Spiffe("spiffe://example.org/signet/server".into())
        );
        assert_eq!(
            ServerAuth::for_appliance("example.org", Some("signet.example.org")),
            ServerAuth::Dns("signet.example.org".into())
        );
        assert!(endpoint_of("127.0.0.1:8443").is_ok());
        assert!(endpoint_of("https://127.0.0.1:8443/").is_ok());
        assert!(endpoint_of("nohost").is_err());
    }
}
