//! The SPIFFE bundle endpoint server: HTTP/1.1 over TLS, `GET /` (and `HEAD /`) answer the trust domain's current
//! bundle document as UTF-8 JSON with `Content-Type: application/json` and an `ETag`. A request whose
//! `If-None-Match` holds the current tag gets `304 Not Modified` with no body, so a poller pays for the bundle only
//! when it changed. The document is rendered once per bundle version (per `spiffe_sequence`), not per request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::rustls;

use crate::bundle::TrustBundle;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
/// The longest a connection may live (a poller needs one request).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Why the bundle endpoint's TLS configuration or credential cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// rustls refuses the certificate chain or the key.
    #[error("the bundle endpoint's certificate or key is unusable: {0}")]
    Credential(#[source] rustls::Error),
    /// rustls refuses the protocol versions.
    #[error("cannot build the bundle endpoint's TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// A certificate or key file cannot be read, is not PEM, or holds no certificate.
    #[error(transparent)]
    File(#[from] crate::datadir::PemFileError),
    /// The key file holds no PEM block.
    #[error("{} holds no PEM block (a private key was expected)", path.display())]
    NoKey {
        /// The file.
        path: std::path::PathBuf,
    },
    /// The key file's PEM block is not a private key.
    #[error("{}: a {tag:?} block is not a private key", path.display())]
    NotAKey {
        /// The file.
        path: std::path::PathBuf,
        /// The PEM block's label.
        tag: String,
    },
}

/// The server's rustls configuration: Mozilla "intermediate" (TLS 1.2 and 1.3; ring's suites, all of them ECDHE
/// with AES-GCM or ChaCha20-Poly1305; X25519, P-256 and P-384 key exchange), no client authentication, HTTP/1.1.
pub fn tls_config(
    chain: Vec<Vec<u8>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, EndpointError> {
    let mut cfg = builder()?
        .with_single_cert(chain.into_iter().map(CertificateDer::from).collect(), key)
        .map_err(EndpointError::Credential)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// [`tls_config`] presenting whatever `cert` holds at each handshake: with `https_spiffe`, the appliance's own
/// server X509-SVID, which [`crate::own`] renews in place.
pub fn tls_config_live(
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
) -> Result<rustls::ServerConfig, EndpointError> {
    let mut cfg = builder()?.with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn builder() -> Result<
    rustls::ConfigBuilder<rustls::ServerConfig, rustls::server::WantsServerCert>,
    EndpointError,
> {
    Ok(
        rustls::ServerConfig::builder_with_provider(super::verify::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(EndpointError::Config)?
            .with_no_client_auth(),
    )
}

/// Reads a PEM certificate chain (leaf first) and its private key (PKCS#8, SEC1 or PKCS#1).
pub fn load_pem(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<(Vec<Vec<u8>>, PrivateKeyDer<'static>), EndpointError> {
    let chain = crate::datadir::read_pem_certs(cert)?;
    let block = crate::datadir::read_pem(key)?
        .into_iter()
        .next()
        .ok_or_else(|| EndpointError::NoKey {
            path: key.to_path_buf(),
        })?;
    let der = block.contents().to_vec();
    let key = match block.tag() {
        "PRIVATE KEY" => PrivateKeyDer::Pkcs8(der.into()),
        "EC PRIVATE KEY" => PrivateKeyDer::Sec1(der.into()),
        "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(der.into()),
        other => {
            return Err(EndpointError::NotAKey {
                path: key.to_path_buf(),
                tag: other.to_string(),
            });
        }
    };
    Ok((chain, key))
}

/// The rendered current bundle.
#[derive(Debug)]
struct Rendered {
    sequence: u64,
    body: Bytes,
    etag: HeaderValue,
}

/// Why the current bundle cannot be served.
#[derive(Debug, thiserror::Error)]
enum RenderError {
    /// The bundle document cannot be built or encoded.
    #[error(transparent)]
    Bundle(#[from] crate::spiffe::BundleError),
    /// The ETag is not a valid header value.
    #[error("the ETag is not a valid header value: {0}")]
    Etag(#[from] hyper::header::InvalidHeaderValue),
}

/// What the handler needs.
#[derive(Debug)]
struct Shared {
    bundle: TrustBundle,
    refresh_hint_secs: u64,
    cache: Mutex<Option<Arc<Rendered>>>,
}

impl Shared {
    fn current(&self) -> Result<Arc<Rendered>, RenderError> {
        let snap = self.bundle.current();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = cache.as_ref()
            && r.sequence == snap.sequence
        {
            return Ok(r.clone());
        }
        let mut doc = snap.document()?;
        doc.refresh_hint_secs = Some(self.refresh_hint_secs);
        let json = doc.to_json()?;
        let digest = ring::digest::digest(&ring::digest::SHA256, json.as_bytes());
        let etag = format!(
            "\"{}-{}\"",
            snap.sequence,
            hex::encode(&digest.as_ref()[..12])
        );
        let r = Arc::new(Rendered {
            sequence: snap.sequence,
            body: Bytes::from(json),
            etag: HeaderValue::from_str(&etag)?,
        });
        *cache = Some(r.clone());
        Ok(r)
    }
}

fn etag_matches(header: Option<&HeaderValue>, etag: &HeaderValue) -> bool {
    let Some(v) = header.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let want = etag.to_str().unwrap_or_default();
    v.split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == want)
}

fn respond(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/" {
        return respond(StatusCode::NOT_FOUND, "the bundle endpoint serves / only\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let rendered = match shared.current() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "the bundle cannot be rendered for the bundle endpoint");
            return respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the bundle cannot be rendered\n",
            );
        }
    };
    let not_modified = etag_matches(req.headers().get(header::IF_NONE_MATCH), &rendered.etag);
    let mut r = if not_modified {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if req.method() == Method::HEAD {
        Response::new(Full::new(Bytes::new()))
    } else {
        Response::new(Full::new(rendered.body.clone()))
    };
    let h = r.headers_mut();
    h.insert(header::ETAG, rendered.etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if !not_modified {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    r
}

/// Serves the bundle endpoint on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    bundle: TrustBundle,
    refresh_hint: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        bundle,
        refresh_hint_secs: refresh_hint.as_secs().max(1),
        cache: Mutex::new(None),
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = crate::shutdown::until_shutdown(&mut shutdown) => return,
        };
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "bundle endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = crate::shutdown::until_shutdown(&mut shutdown) => return,
        };
        // Small responses go out at once rather than waiting for the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ =
                tokio::time::timeout(CONNECTION_LIFETIME, connection(acceptor, shared, tcp, peer))
                    .await;
        });
    }
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let tls = match acceptor.accept(tcp).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "bundle endpoint: TLS handshake failed");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            let r = handle(&shared, &req);
            metrics::counter!("signet_federation_endpoint_requests_total", "status" => r.status().as_u16().to_string())
                .increment(1);
            Ok::<_, Infallible>(r)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "bundle endpoint: connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_lists_and_weak_tags() {
        let tag = HeaderValue::from_static("\"7-abc\"");
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(etag_matches(Some(&h("\"7-abc\"")), &tag));
        assert!(etag_matches(Some(&h("\"1-x\", W/\"7-abc\"")), &tag));
        assert!(etag_matches(Some(&h("*")), &tag));
        assert!(!etag_matches(Some(&h("\"6-abc\"")), &tag));
        assert!(!etag_matches(None, &tag));
    }
}
