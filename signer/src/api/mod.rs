//! The gRPC services of the appliance and what they share: authentication of the caller (the SPIFFE ID of its
//! verified client X509-SVID), authorisation by the [`Policy`], the audit log, and the mapping of every failure to
//! the gRPC status that says what to do about it.
//!
//! - [`upstream`]: SPIRE's `UpstreamAuthority` v1 (`MintX509CAAndSubscribe`, `PublishJWTKeyAndSubscribe`,
//!   `SubscribeToLocalBundle`);
//! - [`keymanager`]: SPIRE's `KeyManager` v1, keys on the token namespaced per calling SPIRE server;
//! - [`issuer`]: signet's `Issuer` (batch X509-SVIDs, JWT-SVIDs, the bundle);
//! - [`admin`]: signet's `Admin` (status, rotation);
//! - [`tls`]: the server's rustls configuration and the client-certificate check;
//! - [`listener`]: the port's front door: connection bounds, handshake timeouts, aggregated refusals;
//! - [`join`]: join tokens (`Admin.CreateJoinToken`, `Bootstrap.ExchangeJoinToken` on the bootstrap port) and the
//!   renewal of a caller's own X509-SVID (`Issuer.RenewX509SVID`).
//!
//! Every RPC starts with [`AppState::admit`]: no client certificate, a certificate that does not chain to the
//! trust domain's roots, or one without a SPIFFE ID of the trust domain is UNAUTHENTICATED; a caller the policy does
//! not allow is PERMISSION_DENIED. Each refusal is audited before it is answered.
//!
//! Metrics: every audited outcome counts in `signet_api_outcomes_total{service,method,outcome}`; every RPC's time,
//! from [`AppState::admit`] until the handler drops its last [`Caller`], is recorded in the histogram
//! `signet_api_request_seconds{service,method,outcome}`, its `outcome` the worst the RPC audited (`failed`, then
//! `refused`, then the first success; `none` if it audited nothing). For a subscription stream that is the stream's
//! life.

pub mod admin;
pub mod issuer;
pub mod join;
pub mod keymanager;
pub mod listener;
pub mod status;
pub mod tls;
pub mod upstream;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic::Status;

use crate::audit::{AuditLog, AuditRecord, Outcome};
use crate::bundle::TrustBundle;
use crate::jwt::JwtIssuer;
use crate::pipeline::{Pipeline, X509SvidIssuer};
use crate::policy::{Denied, Grant, Policy, Service};
use crate::spiffe::TrustDomain;
use crate::x509::Authority;
pub use crate::x509::{cert_facts, cert_ski};
pub use status::{
    code_name, denied_status, issue_status, jwt_status, pipeline_status, rotation_status,
    svid_status,
};

/// The authorities that sign now. A rotation replaces the whole set at once ([`AppState::set_signers`]); a request
/// takes the set once ([`AppState::signers`]) and finishes with it.
#[derive(Debug)]
pub struct Signers {
    /// The root authority (signs SPIRE's CAs), presented with the cross-certificate a rotation calls for.
    pub root: Arc<Authority>,
    /// Leaf issuance (direct or delegated).
    pub x509: X509SvidIssuer,
    /// JWT-SVID issuance.
    pub jwt: Arc<JwtIssuer>,
}

/// Everything the services share.
#[derive(Debug)]
pub struct AppState {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Who may do what.
    pub policy: Policy,
    /// The audit log.
    pub audit: AuditLog,
    /// What signs now (swapped when a rotation activates a new root or JWT key).
    signers: std::sync::RwLock<Arc<Signers>>,
    /// The authorities' life cycle (rotation, status from the datastore).
    pub authorities: Arc<crate::ca::Authorities>,
    /// The signing pipeline of the authorities.
    pub pipeline: Pipeline,
    /// The live bundle (the authorities' own).
    pub bundle: TrustBundle,
    /// SPIRE KeyManager keys.
    pub keys: keymanager::KeyStore,
    /// Most CSRs per batch call.
    pub max_batch: usize,
    /// Deadline of a request.
    pub request_timeout: Duration,
    /// Turns true when the server shuts down (ends the subscription streams).
    pub shutdown: watch::Receiver<bool>,
    /// Foreign trust domains' bundles (federation).
    pub federated: crate::federation::FederatedBundles,
    /// This replica among those sharing the datastore.
    pub replication: Arc<crate::replica::Replication>,
    /// The datastore (join tokens; the authorities' own).
    pub store: crate::store::Store,
    /// The bootstrap port's address, once it listens (answered with a new join token).
    pub bootstrap_addr: std::sync::OnceLock<std::net::SocketAddr>,
    client_trust: Arc<tls::LiveClientTrust>,
    in_flight: Arc<InFlight>,
    token_sessions: std::collections::HashMap<String, u32>,
}

/// What [`AppState::new`] assembles, each part named. The bundle and the datastore are the authorities' own
/// ([`crate::ca::Authorities::bundle`], [`crate::ca::Authorities::store`]), so they cannot disagree with them.
#[derive(Debug)]
pub struct AppParts {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Who may do what.
    pub policy: Policy,
    /// The audit log.
    pub audit: AuditLog,
    /// What signs when the services start (the authorities' active set).
    pub signers: Signers,
    /// The authorities' life cycle on the datastore.
    pub authorities: Arc<crate::ca::Authorities>,
    /// The signing pipeline of the authorities.
    pub pipeline: Pipeline,
    /// SPIRE KeyManager keys.
    pub keys: keymanager::KeyStore,
    /// This replica among those sharing the datastore ([`crate::replica::Replication::single`] when alone).
    pub replication: Arc<crate::replica::Replication>,
    /// Most CSRs per batch call (`server.max_batch`).
    pub max_batch: usize,
    /// Deadline of a request (`pipeline.default_timeout`).
    pub request_timeout: Duration,
    /// Requests one caller may have in flight at once; beyond, RESOURCE_EXHAUSTED
    /// (`server.max_in_flight_per_caller`, [`DEFAULT_MAX_IN_FLIGHT_PER_CALLER`] by default).
    pub max_in_flight_per_caller: usize,
    /// Worker sessions per token, by token name (reported by `Admin.GetStatus`).
    pub token_sessions: std::collections::HashMap<String, u32>,
    /// Turns true when the server shuts down (ends the subscription streams).
    pub shutdown: watch::Receiver<bool>,
}

impl AppState {
    /// Assembles the state from its parts.
    pub fn new(parts: AppParts) -> Self {
        let AppParts {
            trust_domain,
            policy,
            audit,
            signers,
            authorities,
            pipeline,
            keys,
            replication,
            max_batch,
            request_timeout,
            max_in_flight_per_caller,
            token_sessions,
            shutdown,
        } = parts;
        let bundle = authorities.bundle().clone();
        let store = authorities.store().clone();
        let client_trust = Arc::new(tls::LiveClientTrust::new(
            bundle.clone(),
            trust_domain.clone(),
        ));
        Self {
            trust_domain,
            policy,
            audit,
            signers: std::sync::RwLock::new(Arc::new(signers)),
            authorities,
            pipeline,
            bundle,
            keys,
            max_batch,
            request_timeout,
            shutdown,
            federated: crate::federation::FederatedBundles::default(),
            replication,
            store,
            bootstrap_addr: std::sync::OnceLock::new(),
            client_trust,
            in_flight: Arc::new(InFlight::new(max_in_flight_per_caller)),
            token_sessions,
        }
    }

    /// The client trust of the live bundle, shared with the TLS handshake.
    pub fn client_trust(&self) -> Arc<tls::LiveClientTrust> {
        self.client_trust.clone()
    }

    /// What signs now.
    pub fn signers(&self) -> Arc<Signers> {
        self.signers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces what signs (after a rotation step committed).
    pub fn set_signers(&self, signers: Signers) {
        *self.signers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(signers);
    }

    /// Worker sessions of the token `name` (0 if unknown).
    pub fn token_sessions(&self, name: &str) -> u32 {
        self.token_sessions.get(name).copied().unwrap_or(0)
    }

    /// The deadline of a request starting now: the client's `grpc-timeout` when it sets a shorter one than
    /// `pipeline.default_timeout`, so work for a caller that has given up is dropped before it reaches the token.
    pub fn deadline_of<T>(&self, req: &tonic::Request<T>) -> Instant {
        let own = self.request_timeout;
        let theirs = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        Instant::now() + theirs.map_or(own, |t| t.min(own))
    }

    /// Authenticates the caller of `req` and checks that the policy lets it use `service`. A refusal is audited,
    /// then returned as the status to answer.
    ///
    /// Only credentials signet signed itself ([`tls::SignedBy::Signet`]) get a role; one that a CA below signet
    /// signed (a SPIRE server's) is refused with PERMISSION_DENIED unless its rule opts in, for the issuer service
    /// only. A caller with more than its share of requests in flight is refused with RESOURCE_EXHAUSTED.
    pub async fn admit<T>(
        &self,
        req: &tonic::Request<T>,
        service: Service,
        method: &'static str,
    ) -> Result<Caller, Status> {
        self.admit_as(req, service, method, |caller, signed_by| {
            if let tls::SignedBy::Downstream(signer) = signed_by {
                self.policy.admit_downstream(caller, signer, service)?;
            }
            self.policy.authorize(caller, service).map(|_| ())
        })
        .await
    }

    /// Authenticates the caller of `req` for what any caller in the policy may do for itself (renew its own
    /// X509-SVID), whatever services its rule grants: a credential signet signed and a rule naming the caller are
    /// enough. A credential a CA below signet signed is refused whatever its rule says: renewing it would turn it into
    /// one of signet's own. Refusals are audited, as in [`admit`](Self::admit).
    pub async fn admit_self<T>(
        &self,
        req: &tonic::Request<T>,
        method: &'static str,
    ) -> Result<Caller, Status> {
        let service = Service::Issuer;
        self.admit_as(req, service, method, |caller, signed_by| {
            if let tls::SignedBy::Downstream(signer) = signed_by {
                return Err(Denied::Downstream {
                    caller: caller.to_string(),
                    signer: signer.clone(),
                    service: service.name(),
                });
            }
            self.policy.own(caller).map(|_| ())
        })
        .await
    }

    /// The steps every admission shares: authenticate the peer, let `decide` judge the caller and who signed its
    /// credential, and count the request in flight; each refusal audited.
    async fn admit_as<T>(
        &self,
        req: &tonic::Request<T>,
        service: Service,
        method: &'static str,
        decide: impl FnOnce(&str, &tls::SignedBy) -> Result<(), Denied>,
    ) -> Result<Caller, Status> {
        let timer = Arc::new(RequestTimer::start(service.name(), method));
        // Over the gRPC port, the chain the TLS handshake verified; from a caller in this process (no TLS), the
        // chain it presents through [`InProcess`]. Both go through the same checks.
        let (certs, via) = match req.peer_certs() {
            Some(c) => (Some(c), None),
            None => match req.extensions().get::<InProcessPeer>() {
                Some(p) => (Some(p.0.clone()), Some(IN_PROCESS)),
                None => (None, None),
            },
        };
        let peer = match self
            .client_trust
            .authenticate(certs.as_deref().map(Vec::as_slice))
        {
            Ok(p) => p,
            Err(reason) => {
                return Err(self
                    .refuse(
                        &Caller::anonymous(service, method, via, timer),
                        status::auth_status(&reason),
                        None,
                    )
                    .await);
            }
        };
        let mut caller = Caller {
            id: peer.id,
            service,
            method,
            deadline: self.deadline_of(req),
            via,
            _in_flight: None,
            timer,
        };
        if let Err(d) = decide(&caller.id, &peer.signed_by) {
            return Err(self.refuse(&caller, denied_status(&d), None).await);
        }
        match self.in_flight.enter(&caller.id) {
            Some(guard) => caller._in_flight = Some(Arc::new(guard)),
            None => {
                let s = Status::resource_exhausted(format!(
                    "caller {} has {} requests in flight, the most one caller may: wait for answers before \
                     sending more",
                    caller.id, self.in_flight.max
                ));
                return Err(self.refuse(&caller, s, None).await);
            }
        }
        Ok(caller)
    }

    /// The caller's grant (after [`admit`](Self::admit) succeeded).
    pub fn grant<'a>(&'a self, caller: &'a Caller) -> Result<Grant<'a>, Status> {
        self.policy
            .authorize(&caller.id, caller.service)
            .map_err(|d| denied_status(&d))
    }

    /// Audits a refusal (with the requested SPIFFE ID or key id, if any) and returns the status to answer; if the
    /// audit line cannot be written, UNAVAILABLE.
    pub async fn refuse(
        &self,
        caller: &Caller,
        status: Status,
        subject: Option<Subject>,
    ) -> Status {
        let mut r = caller.record(Outcome::Refused);
        r.code = Some(code_name(status.code()));
        r.reason = Some(status.message().to_string());
        if let Some(s) = subject {
            s.apply(&mut r);
        }
        count(std::slice::from_ref(&r));
        match self.audit.record(&[r]).await {
            Ok(()) => status,
            Err(e) => Status::unavailable(e.to_string()),
        }
    }

    /// Writes `records` (flushed) or fails with UNAVAILABLE.
    pub async fn audit(&self, records: &[AuditRecord]) -> Result<(), Status> {
        count(records);
        self.audit
            .record(records)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }
}

/// What a refusal was about.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Subject {
    /// A SPIFFE ID.
    SpiffeId(String),
    /// A KeyManager key id.
    KeyId(String),
}

impl Subject {
    fn apply(self, r: &mut AuditRecord) {
        match self {
            Subject::SpiffeId(s) => r.spiffe_id = Some(s),
            Subject::KeyId(k) => r.key_id = Some(k),
        }
    }
}

/// An authenticated caller on one RPC. It counts as one request in flight for its caller until the last clone is
/// dropped (the handler returns).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The caller's SPIFFE ID (empty when not authenticated).
    pub id: String,
    /// The service called.
    pub service: Service,
    /// The RPC.
    pub method: &'static str,
    /// When the answer is due.
    pub deadline: Instant,
    /// `Some("in-process")` for a caller in this process ([`InProcess`]); recorded in its audit lines.
    pub via: Option<&'static str>,
    _in_flight: Option<Arc<InFlightGuard>>,
    timer: Arc<RequestTimer>,
}

impl Caller {
    fn anonymous(
        service: Service,
        method: &'static str,
        via: Option<&'static str>,
        timer: Arc<RequestTimer>,
    ) -> Self {
        Self {
            id: String::new(),
            service,
            method,
            deadline: Instant::now(),
            via,
            _in_flight: None,
            timer,
        }
    }

    /// An audit record for this call (its outcome also labels the call's time in `signet_api_request_seconds`).
    pub fn record(&self, outcome: Outcome) -> AuditRecord {
        self.timer.saw(outcome);
        let mut r = AuditRecord::new(&self.id, self.service.name(), self.method, outcome);
        r.via = self.via;
        r
    }
}

/// The time of one RPC, recorded in `signet_api_request_seconds` when the last clone of its [`Caller`] is dropped.
#[derive(Debug)]
struct RequestTimer {
    started: Instant,
    service: &'static str,
    method: &'static str,
    /// The worst outcome audited so far (see the module docs).
    outcome: Mutex<Option<Outcome>>,
}

impl RequestTimer {
    fn start(service: &'static str, method: &'static str) -> Self {
        Self {
            started: Instant::now(),
            service,
            method,
            outcome: Mutex::new(None),
        }
    }

    fn saw(&self, outcome: Outcome) {
        let rank = |o: Outcome| match o {
            Outcome::Failed => 2,
            Outcome::Refused => 1,
            _ => 0,
        };
        let mut worst = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if worst.is_none_or(|w| rank(outcome) > rank(w)) {
            *worst = Some(outcome);
        }
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or("none", outcome_name);
        metrics::histogram!(
            "signet_api_request_seconds",
            "service" => self.service,
            "method" => self.method,
            "outcome" => outcome
        )
        .record(self.started.elapsed().as_secs_f64());
    }
}

/// The `via` of audit lines of callers in this process.
pub const IN_PROCESS: &str = "in-process";

/// The certificate chain a caller in this process presents instead of a TLS client certificate. Only
/// [`InProcess`] puts it into a request's extensions: a request from the network never carries it (tonic fills
/// extensions from the connection, not from what the peer sends).
#[derive(Clone)]
struct InProcessPeer(Arc<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>>);

/// The appliance's services for a caller in the same process: the SPIRE plug-in with `--embedded` calls them
/// directly, with no TLS, no TCP and no second gRPC server, and still through the same admission as a caller over
/// the network: the credential it presents (the data directory's admin X509-SVID, re-read when renewed) is checked
/// against the live bundle ([`AppState::admit`]: signed by signet, of the trust domain, not expired), the policy
/// decides what its SPIFFE ID may do, per-caller limits apply, and every audit line names that SPIFFE ID with
/// `"via": "in-process"`.
#[derive(Clone)]
pub struct InProcess {
    state: Arc<AppState>,
    cert_path: std::path::PathBuf,
    /// The chain presented now, and when the file was last looked at.
    current: Arc<Mutex<(Instant, InProcessPeer)>>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// How often the credential file is looked at again (the appliance renews it at half its life).
const IN_PROCESS_RELOAD: Duration = Duration::from_secs(1);

/// Why the in-process caller's credential cannot be read.
pub type InProcessError = crate::datadir::PemFileError;

fn read_chain(path: &std::path::Path) -> Result<InProcessPeer, InProcessError> {
    let chain = crate::datadir::read_pem_certs(path)?
        .into_iter()
        .map(tokio_rustls::rustls::pki_types::CertificateDer::from)
        .collect();
    Ok(InProcessPeer(Arc::new(chain)))
}

impl InProcess {
    /// Callers presenting the certificate chain in `cert_path` (PEM, leaf first).
    pub fn new(
        state: Arc<AppState>,
        cert_path: std::path::PathBuf,
    ) -> Result<Self, InProcessError> {
        let chain = read_chain(&cert_path)?;
        Ok(Self {
            state,
            cert_path,
            current: Arc::new(Mutex::new((Instant::now(), chain))),
        })
    }

    /// The shared state (the services are built over it).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    fn peer(&self) -> InProcessPeer {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.0.elapsed() >= IN_PROCESS_RELOAD {
            cur.0 = Instant::now();
            // A file being replaced (renewal writes through a rename) or unreadable keeps the chain held.
            match read_chain(&self.cert_path) {
                Ok(c) => cur.1 = c,
                Err(e) => tracing::debug!(error = %e, "in-process credential not reloaded"),
            }
        }
        cur.1.clone()
    }

    /// `req` as the in-process caller sends it: its metadata (SPIRE's `grpc-timeout`) kept, the credential added.
    pub fn request<T>(&self, mut req: tonic::Request<T>) -> tonic::Request<T> {
        req.extensions_mut().insert(self.peer());
        req
    }
}

/// Requests in flight one caller may have by default (`server.max_in_flight_per_caller`).
pub const DEFAULT_MAX_IN_FLIGHT_PER_CALLER: usize = 4096;

/// Requests in flight per caller, each bounded.
#[derive(Debug)]
struct InFlight {
    max: usize,
    counts: Mutex<std::collections::HashMap<String, usize>>,
}

/// One request in flight; counted down when dropped.
#[derive(Debug)]
struct InFlightGuard {
    of: Arc<InFlight>,
    caller: String,
}

impl InFlight {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            counts: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Counts a request of `caller` in, or `None` when it already has `max` in flight.
    fn enter(self: &Arc<Self>, caller: &str) -> Option<InFlightGuard> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(caller.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(InFlightGuard {
            of: self.clone(),
            caller: caller.to_string(),
        })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut counts = self.of.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

/// Counts audited outcomes per service, method and outcome (`signet_api_outcomes_total`).
fn count(records: &[AuditRecord]) {
    for r in records {
        metrics::counter!(
            "signet_api_outcomes_total",
            "service" => r.service,
            "method" => r.method,
            "outcome" => outcome_name(r.outcome)
        )
        .increment(1);
    }
}

/// The `outcome` label of an audited outcome.
fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Issued => "issued",
        Outcome::KeyUsed => "key_used",
        Outcome::Published => "published",
        Outcome::Refused => "refused",
        Outcome::Failed => "failed",
        Outcome::Rotated => "rotated",
        Outcome::Destroyed => "destroyed",
    }
}

/// Parses a gRPC `grpc-timeout` header value (up to 8 digits and a unit: H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_is_bounded_per_caller_and_counted_down() {
        let f = Arc::new(InFlight::new(2));
        let a1 = f.enter("a").unwrap();
        let _a2 = f.enter("a").unwrap();
        assert!(
            f.enter("a").is_none(),
            "a third request of one caller is refused"
        );
        let _b = f.enter("b").expect("another caller has its own count");
        drop(a1);
        let _a3 = f.enter("a").expect("an answered request frees its place");
        drop((_a2, _a3, _b));
        assert!(
            f.counts.lock().unwrap().is_empty(),
            "callers with nothing in flight are forgotten"
        );
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
