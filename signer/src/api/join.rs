//! A client's first credential and its renewals.
//!
//! **Join tokens.** An admin creates a one-time token for one SPIFFE ID (`Admin.CreateJoinToken`, `signet
//! join-token create`): 256 random bits, base64url, answered once and stored only as its SHA-256 in the datastore
//! (table `join_tokens`), so every replica sharing the datastore can spend it, once. The client exchanges it with a
//! CSR for exactly that ID for an X509-SVID and the bundle (`Bootstrap.ExchangeJoinToken`).
//!
//! The gRPC port requires a client certificate at the handshake (see [`super::tls`]), which a client without a
//! credential does not have. The exchange is therefore served on a port of its own, `[server] bootstrap_listen`:
//! server-authenticated TLS with the appliance's X509-SVID and no client certificate, serving the `Bootstrap` service
//! only (no reflection, no health), at most [`BOOTSTRAP_MAX_CONNECTIONS`] connections, and a per-peer-address rate
//! limit ([`PeerLimiter`]: [`BOOTSTRAP_BURST`] attempts, then one per [`BOOTSTRAP_REFILL`]). This keeps the main
//! port's rule (nothing runs for a peer without an SVID) intact, and the unauthenticated surface to one RPC whose
//! only input is a secret of 256 bits. Every attempt within the rate limit is audited (service `bootstrap`, with the
//! peer address and the token's fingerprint, the first 16 hex digits of its SHA-256); attempts beyond it are counted
//! in `signet_bootstrap_rate_limited_total` (so a flood cannot fill the audit log). An unknown, spent or expired
//! token is PERMISSION_DENIED; a CSR for another ID is INVALID_ARGUMENT and leaves the token unspent. A token is
//! spent by one datastore statement before the SVID is signed (two replicas cannot both spend it), and given back
//! if the signing then fails.
//!
//! **Renewal.** `Issuer.RenewX509SVID` lets any caller with a policy rule, whatever services it grants, get a fresh
//! X509-SVID for exactly its own SPIFFE ID ([`AppState::admit_self`]): a SPIRE server's plug-in renews the
//! credential it uses for UpstreamAuthority and KeyManager without being granted the issuer service. The lifetime
//! follows the TTL rule with the caller's `max_ttl`; its rate limit applies; signet's own IDs and credentials signed
//! below signet are refused; every call is audited.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use signet_proto::signet::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::issuer::{csr_spiffe_id, issuable};
use super::listener::{RefusalTally, accept_loop};
use super::{AppState, Subject, cert_facts, code_name, denied_status, svid_status};
use crate::audit::{AuditRecord, Outcome};
use crate::policy::{Denied, Service};
use crate::store::JoinTokenRecord;

/// The longest a join token may wait to be used.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);
/// A join token's default lifetime.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Exchanges one peer address may attempt at once before the rate limit applies.
pub const BOOTSTRAP_BURST: u32 = 5;
/// After the burst, one attempt per this long per peer address.
pub const BOOTSTRAP_REFILL: Duration = Duration::from_secs(6);
/// Most connections open on the bootstrap port at once.
pub const BOOTSTRAP_MAX_CONNECTIONS: usize = 256;
/// The lifetime of an SVID got with a join token when no policy rule names its ID as a caller.
const UNRULED_SVID_TTL: Duration = Duration::from_secs(3600);

/// The datastore's key of a join token: the lowercase hex SHA-256 of its secret.
pub fn token_hash(secret: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, secret.trim().as_bytes()).as_ref())
}

/// A token's fingerprint for the audit log (never the secret).
fn fingerprint(hash: &str) -> String {
    format!("join-token:{}", &hash[..hash.len().min(16)])
}

fn new_secret() -> Result<String, Status> {
    use ring::rand::SecureRandom as _;
    let mut b = zeroize::Zeroizing::new([0u8; 32]);
    ring::rand::SystemRandom::new()
        .fill(b.as_mut())
        .map_err(|_| Status::unavailable("the system random generator failed"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b[..]))
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn ttl_secs(secs: i64, default: Duration, what: &str) -> Result<Duration, Status> {
    match u64::try_from(secs) {
        Ok(0) => Ok(default),
        Ok(s) => Ok(Duration::from_secs(s)),
        Err(_) => Err(Status::invalid_argument(format!(
            "{what} {secs} is negative"
        ))),
    }
}

fn store_status(e: &crate::store::StoreError) -> Status {
    Status::unavailable(format!("the datastore failed: {e}"))
}

/// `Admin.CreateJoinToken`.
pub async fn create_join_token(
    st: &AppState,
    request: Request<pb::CreateJoinTokenRequest>,
) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
    let caller = st
        .admit(&request, Service::Admin, "CreateJoinToken")
        .await?;
    let req = request.into_inner();
    let subject = || Some(Subject::SpiffeId(req.spiffe_id.clone()));
    let checked = (|| {
        let id = crate::spiffe::SpiffeId::parse(&req.spiffe_id)
            .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
        issuable(&st.trust_domain, &id, "spiffe_id")?;
        let grant = st.grant(&caller)?;
        grant.check_id(id.as_str()).map_err(|d| denied_status(&d))?;
        let ttl = ttl_secs(req.ttl_seconds, DEFAULT_JOIN_TOKEN_TTL, "ttl_seconds")?;
        if ttl > MAX_JOIN_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds {}: a join token may live at most {} s (7 days)",
                req.ttl_seconds,
                MAX_JOIN_TOKEN_TTL.as_secs()
            )));
        }
        let store = &st.store;
        Ok((id.as_str().to_string(), ttl, store))
    })();
    let (id, ttl, store) = match checked {
        Ok(v) => v,
        Err(s) => return Err(st.refuse(&caller, s, subject()).await),
    };
    let secret = new_secret()?;
    let now = unix_now();
    let rec = JoinTokenRecord {
        token_hash: token_hash(&secret),
        spiffe_id: id.clone(),
        created_by: caller.id.clone(),
        created_at: now,
        expires_at: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        used_at: None,
    };
    if let Err(e) = store.put_join_token(&rec).await {
        return Err(st.refuse(&caller, store_status(&e), subject()).await);
    }
    let mut r = caller.record(Outcome::Issued);
    r.spiffe_id = Some(id.clone());
    r.key_id = Some(fingerprint(&rec.token_hash));
    r.expires_at = Some(rec.expires_at);
    r.reason = Some("join token created".into());
    st.audit(&[r]).await?;
    Ok(Response::new(pb::CreateJoinTokenResponse {
        token: secret,
        spiffe_id: id,
        expires_at: rec.expires_at,
        bootstrap_address: st
            .bootstrap_addr
            .get()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }))
}

/// Signs `csr` for `ttl`: the SVID message, or the status of the failure.
async fn issue_one(
    st: &AppState,
    csr: Vec<u8>,
    ttl: Duration,
    deadline: Instant,
) -> Result<(pb::X509svid, Option<String>), Status> {
    let issued = st
        .signers()
        .x509
        .issue_x509_svids(vec![(csr, ttl)], deadline)
        .await
        .into_iter()
        .next()
        .ok_or_else(|| Status::unavailable("the signing pipeline is shutting down"))?
        .map_err(|e| svid_status(&e))?;
    let (serial, authority) = cert_facts(&issued.cert_der);
    let mut cert_chain = vec![issued.cert_der];
    cert_chain.extend(issued.chain);
    Ok((
        pb::X509svid {
            spiffe_id: String::new(),
            cert_chain,
            expires_at: issued.not_after.unix_timestamp(),
            serial,
        },
        authority,
    ))
}

/// `Issuer.RenewX509SVID`.
pub async fn renew_x509_svid(
    st: &AppState,
    request: Request<pb::RenewX509svidRequest>,
) -> Result<Response<pb::RenewX509svidResponse>, Status> {
    let caller = st.admit_self(&request, "RenewX509SVID").await?;
    let req = request.into_inner();
    let checked = (|| {
        let id = csr_spiffe_id(&req.csr).map_err(|e| (None, super::status::csr_id_status(&e)))?;
        let ids = id.as_str().to_string();
        issuable(&st.trust_domain, &id, "CSR URI SAN").map_err(|s| (Some(ids.clone()), s))?;
        if ids != caller.id {
            return Err((
                Some(ids.clone()),
                Status::permission_denied(format!(
                    "a caller may renew only its own X509-SVID: the CSR asks for {ids} but the caller is {}",
                    caller.id
                )),
            ));
        }
        if crate::policy::is_reserved(&ids) {
            return Err((
                Some(ids.clone()),
                denied_status(&Denied::Reserved { id: ids.clone() }),
            ));
        }
        let ttl = super::issuer::ttl_of(req.ttl_seconds).map_err(|s| (Some(ids.clone()), s))?;
        let grant = st
            .policy
            .own(&caller.id)
            .map_err(|d| (Some(ids.clone()), denied_status(&d)))?;
        grant
            .take(1)
            .map_err(|d| (Some(ids.clone()), denied_status(&d)))?;
        Ok((ids, grant.x509_ttl(ttl)))
    })();
    let (id, ttl) = match checked {
        Ok(v) => v,
        Err((id, s)) => return Err(st.refuse(&caller, s, id.map(Subject::SpiffeId)).await),
    };
    match issue_one(st, req.csr, ttl, caller.deadline).await {
        Ok((mut svid, authority)) => {
            svid.spiffe_id = id.clone();
            let mut r = caller.record(Outcome::Issued);
            r.spiffe_id = Some(id);
            r.serial = Some(svid.serial.clone());
            r.authority = authority;
            r.expires_at = Some(svid.expires_at);
            r.reason = Some("renewal of the caller's own X509-SVID".into());
            st.audit(&[r]).await?;
            Ok(Response::new(pb::RenewX509svidResponse {
                svid: Some(svid),
                x509_authorities: st.bundle.current().x509_roots.clone(),
            }))
        }
        Err(s) => {
            let mut r = caller.record(if s.code() == Code::InvalidArgument {
                Outcome::Refused
            } else {
                Outcome::Failed
            });
            r.spiffe_id = Some(id);
            r.code = Some(code_name(s.code()));
            r.reason = Some(s.message().to_string());
            st.audit(&[r]).await?;
            Err(s)
        }
    }
}

/// Per-peer-address token buckets for the bootstrap port.
#[derive(Debug, Default)]
pub struct PeerLimiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Most peer addresses tracked; beyond it, full buckets are forgotten.
const MAX_PEERS: usize = 10_000;

impl PeerLimiter {
    /// Takes one attempt from `peer`'s bucket, or says how long until the next is allowed.
    pub fn take(&self, peer: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let rate = 1.0 / BOOTSTRAP_REFILL.as_secs_f64();
        let cap = f64::from(BOOTSTRAP_BURST);
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_PEERS && !b.contains_key(&peer) {
            b.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < cap);
            if b.len() >= MAX_PEERS {
                return Err(BOOTSTRAP_REFILL);
            }
        }
        let (tokens, at) = b.entry(peer).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

/// The `Bootstrap` service (the bootstrap port only).
#[derive(Debug, Clone)]
pub struct BootstrapService {
    state: Arc<AppState>,
    limiter: Arc<PeerLimiter>,
}

impl BootstrapService {
    /// The service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Self {
            state,
            limiter: Arc::new(PeerLimiter::default()),
        }
    }
}

#[tonic::async_trait]
impl pb::bootstrap_server::Bootstrap for BootstrapService {
    async fn exchange_join_token(
        &self,
        request: Request<pb::ExchangeJoinTokenRequest>,
    ) -> Result<Response<pb::ExchangeJoinTokenResponse>, Status> {
        let st = &self.state;
        let peer = request.remote_addr();
        if let Some(ip) = peer.map(|p| p.ip())
            && let Err(wait) = self.limiter.take(ip)
        {
            metrics::counter!("signet_bootstrap_rate_limited_total").increment(1);
            return Err(Status::resource_exhausted(format!(
                "too many join token attempts from {ip}: retry in {} s",
                wait.as_secs().max(1)
            )));
        }
        let deadline = st.deadline_of(&request);
        let req = request.into_inner();
        let hash = token_hash(&req.token);
        let record = |outcome: Outcome, id: Option<String>| {
            let mut r = AuditRecord::new("", "bootstrap", "ExchangeJoinToken", outcome);
            r.peer = peer.map(|p| p.ip().to_string());
            r.spiffe_id = id;
            r.key_id = Some(fingerprint(&hash));
            r
        };
        let refuse = |s: Status, id: Option<String>| {
            let mut r = record(Outcome::Refused, id);
            r.code = Some(code_name(s.code()));
            r.reason = Some(s.message().to_string());
            (r, s)
        };
        let checked = async {
            if req.token.trim().is_empty() {
                return Err(refuse(
                    Status::invalid_argument("token is empty: give the join token `signet join-token create` printed"),
                    None,
                ));
            }
            let store = &st.store;
            let now = unix_now();
            let tok = store
                .join_token(&hash)
                .await
                .map_err(|e| refuse(store_status(&e), None))?
                .ok_or_else(|| {
                    refuse(
                        Status::permission_denied("unknown join token: create one with `signet join-token create`"),
                        None,
                    )
                })?;
            let tid = Some(tok.spiffe_id.clone());
            if let Some(at) = tok.used_at {
                return Err(refuse(
                    Status::permission_denied(format!(
                        "the join token for {} was already used (at unix time {at}): a join token works once; \
                         create another",
                        tok.spiffe_id
                    )),
                    tid,
                ));
            }
            if tok.expires_at <= now {
                return Err(refuse(
                    Status::permission_denied(format!(
                        "the join token for {} expired at unix time {}: create another",
                        tok.spiffe_id, tok.expires_at
                    )),
                    tid,
                ));
            }
            let id = csr_spiffe_id(&req.csr)
                .map_err(|m| refuse(Status::invalid_argument(format!("csr: {m}")), tid.clone()))?;
            if id.as_str() != tok.spiffe_id {
                return Err(refuse(
                    Status::invalid_argument(format!(
                        "the CSR asks for {} but the join token is for {}: the token gets exactly its ID",
                        id.as_str(),
                        tok.spiffe_id
                    )),
                    tid,
                ));
            }
            let requested = super::issuer::ttl_of(req.ttl_seconds).map_err(|s| refuse(s, tid.clone()))?;
            let ttl = match st.policy.own(&tok.spiffe_id) {
                Ok(g) => g.x509_ttl(requested),
                Err(_) => {
                    if requested.is_zero() {
                        UNRULED_SVID_TTL
                    } else {
                        requested.min(UNRULED_SVID_TTL)
                    }
                }
            };
            match store.spend_join_token(&hash, &tok.spiffe_id, now).await {
                Ok(true) => Ok((store, tok.spiffe_id, ttl)),
                Ok(false) => Err(refuse(
                    Status::permission_denied(format!(
                        "the join token for {} was already used or has just expired",
                        tok.spiffe_id
                    )),
                    tid,
                )),
                Err(e) => Err(refuse(store_status(&e), tid)),
            }
        }
        .await;
        let (store, id, ttl) = match checked {
            Ok(v) => v,
            Err((r, s)) => {
                st.audit(&[r]).await?;
                return Err(s);
            }
        };
        match issue_one(st, req.csr, ttl, deadline).await {
            Ok((mut svid, authority)) => {
                svid.spiffe_id = id.clone();
                let mut r = record(Outcome::Issued, Some(id));
                r.serial = Some(svid.serial.clone());
                r.authority = authority;
                r.expires_at = Some(svid.expires_at);
                r.reason = Some("first X509-SVID for a join token".into());
                st.audit(&[r]).await?;
                Ok(Response::new(pb::ExchangeJoinTokenResponse {
                    svid: Some(svid),
                    x509_authorities: st.bundle.current().x509_roots.clone(),
                }))
            }
            Err(s) => {
                // Nothing was handed out: the token can be used again.
                if let Err(e) = store.unspend_join_token(&hash).await {
                    tracing::error!(error = %e, "cannot give back a join token after a failed issuance");
                }
                let mut r = record(
                    if s.code() == Code::InvalidArgument {
                        Outcome::Refused
                    } else {
                        Outcome::Failed
                    },
                    Some(id),
                );
                r.code = Some(code_name(s.code()));
                r.reason = Some(s.message().to_string());
                st.audit(&[r]).await?;
                Err(s)
            }
        }
    }
}

/// Why the bootstrap port cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// The address cannot be bound.
    #[error("listening on {addr} (bootstrap): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The bound address cannot be read.
    #[error("the bootstrap port's address: {0}")]
    Address(#[source] std::io::Error),
}

/// The bootstrap port's TLS: the appliance's X509-SVID (`chain`, leaf first, and its PKCS#8 key), no client
/// certificate asked, HTTP/2 only.
pub fn bootstrap_tls(
    chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
) -> Result<rustls::ServerConfig, super::tls::TlsError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(super::tls::TlsError::Config)?
    .with_no_client_auth()
    .with_single_cert(
        chain.into_iter().map(CertificateDer::from).collect(),
        PrivateKeyDer::Pkcs8(key_pkcs8.into()),
    )
    .map_err(super::tls::TlsError::Certificate)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Starts the bootstrap port on `listen` with `tls`; its handshake refusals go to `refusals` (audited with the main
/// port's). Returns the bound address; the tasks end at shutdown.
pub async fn start_bootstrap(
    listen: SocketAddr,
    tls: rustls::ServerConfig,
    state: Arc<AppState>,
    refusals: Arc<RefusalTally>,
    shutdown: watch::Receiver<bool>,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<SocketAddr, BootstrapError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| BootstrapError::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(BootstrapError::Address)?;
    let (tx, rx) = mpsc::channel(16);
    background.push(tokio::spawn(accept_loop(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        BOOTSTRAP_MAX_CONNECTIONS,
        refusals,
        tx,
        shutdown.clone(),
    )));
    let _ = state.bootstrap_addr.set(addr);
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(4))
        .timeout(Duration::from_secs(30))
        .add_service(
            pb::bootstrap_server::BootstrapServer::new(BootstrapService::new(state))
                .max_decoding_message_size(64 * 1024),
        );
    let mut stop = shutdown;
    background.push(tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(ReceiverStream::new(rx), async move {
                crate::shutdown::until_shutdown(&mut stop).await
            })
            .await
        {
            tracing::error!(error = %e, "the bootstrap port failed");
        }
    }));
    tracing::info!(%addr, "bootstrap port (join tokens) listening");
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_256_bit_base64url_and_hashed() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43, "32 bytes, base64url without padding");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(token_hash(&a).len(), 64);
        assert_eq!(token_hash(&a), token_hash(&format!(" {a}\n")));
    }

    #[test]
    fn the_peer_limiter_allows_a_burst_then_refuses() {
        let l = PeerLimiter::default();
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        for _ in 0..BOOTSTRAP_BURST {
            assert!(l.take(ip).is_ok());
        }
        assert!(l.take(ip).is_err());
        assert!(l.take("127.0.0.10".parse().unwrap()).is_ok(), "per peer");
    }
}
