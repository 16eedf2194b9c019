//! X509-SVID issuance through the pipeline, in `direct` or `delegated` mode.
//!
//! [`X509SvidIssuer::issue_x509_svids`] runs the per-certificate CPU work (CSR signature check, template, pre-issuance
//! lint, post-sign verification) on the pipeline's [`CpuPool`], so an async handler just awaits it. The results of
//! one call (a BatchMintX509SVID request) are collected and handed over together: the handler's task is woken once,
//! not once per certificate.
//! - `direct`: the authority's key is a [`PipelineKey`](super::PipelineKey). A CPU thread builds and lints the
//!   certificate ([`Authority::prepare_x509_svid`]), queues the token's signature over the TBS
//!   ([`AuthorityKey::sign_then`]) and moves on to the next request. When the HSM worker has the signature it queues
//!   the rest (post-sign check, assembly: [`Authority::complete`]) on the CPU pool. No thread waits for the token, so
//!   the queue in front of the tokens holds every certificate in flight and the workers sign in full batches.
//! - `delegated`: the token key signs a short-lived issuing intermediate whose key is a [`SoftwareKey`] in process
//!   memory; leaves are signed with ring on the CPU pool and chain through that intermediate. The intermediate is
//!   replaced when `rotate_at` of its life has passed (by default half): the first request after that point starts
//!   a rotation on the CPU pool while requests keep using the current intermediate, which stays valid; the new one is
//!   swapped in atomically.
//!
//! In both modes a leaf's NotAfter is `now + ttl` cut at the issuing authority's NotAfter (the root's in direct
//! mode, the intermediate's in delegated mode), never refused for outliving it: the TTL rule of the Issuer API.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rcgen::{DistinguishedName, DnType};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::cpu::CpuPool;
use super::error::PipelineError;
use super::job::with_deadline;
use crate::keys::KeySchemes as _;
use crate::keys::spki::SubjectKey;
use crate::keys::{AuthorityKey, KeyError, KeyType, SignThen, SoftwareKey};
use crate::x509::{
    Authority, IntermediateRequest, IssueError, LeafRequest, UnsignedCertificate,
    parse_and_verify_csr,
};

/// How an authority signs leaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SigningMode {
    /// Every certificate is signed by the token key through the pipeline.
    Direct,
    /// The token key signs a short-lived in-memory issuing intermediate that signs the leaves.
    Delegated(DelegatedConfig),
}

/// Settings of delegated mode.
#[derive(Debug, Clone)]
pub struct DelegatedConfig {
    /// Lifetime of each issuing intermediate (capped at the upstream authority's remaining life).
    pub intermediate_ttl: Duration,
    /// Fraction of the intermediate's life after which it is replaced (0.0..=1.0; 0.5 by default).
    pub rotate_at: f64,
    /// Key type of the intermediate (generated with ring).
    pub key_type: KeyType,
    /// Subject of the intermediate (must not be empty).
    pub subject: DistinguishedName,
}

impl Default for DelegatedConfig {
    fn default() -> Self {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::OrganizationName, "signet");
        subject.push(DnType::CommonName, "signet issuing CA");
        Self {
            intermediate_ttl: Duration::from_secs(4 * 3600),
            rotate_at: 0.5,
            key_type: KeyType::EcP256,
            subject,
        }
    }
}

/// An issued X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Svid {
    /// The leaf certificate (DER).
    pub cert_der: Vec<u8>,
    /// The certificates between the leaf and the root, leaf-side first (the issuing intermediate in delegated mode,
    /// then whatever is above it); the root is not included.
    pub chain: Vec<Vec<u8>>,
    /// The leaf's NotAfter.
    pub not_after: OffsetDateTime,
}

/// Why an X509-SVID was not issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The request or the certificate was refused (CSR, SPIFFE ID, TTL, lint, post-sign check).
    #[error(transparent)]
    Issue(IssueError),
    /// The pipeline could not sign (overloaded, deadline, no token, shutting down, token refused).
    #[error(transparent)]
    Pipeline(PipelineError),
}

impl SvidError {
    /// Whether the same request may succeed if retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            SvidError::Issue(e) => e.is_transient(),
            SvidError::Pipeline(e) => e.is_retryable(),
        }
    }
}

impl From<IssueError> for SvidError {
    fn from(e: IssueError) -> Self {
        // A pipeline failure reaches us wrapped by the issuance core (IssueError::Key(KeyError::Signing { source }));
        // surface it as what it is, so callers can map Overloaded / DeadlineExceeded to the right status.
        match PipelineError::in_chain(&e) {
            Some(p) => SvidError::Pipeline(p),
            None => SvidError::Issue(e),
        }
    }
}

impl From<PipelineError> for SvidError {
    fn from(e: PipelineError) -> Self {
        SvidError::Pipeline(e)
    }
}

struct Issuing {
    authority: Arc<Authority>,
    rotate_after: OffsetDateTime,
}

struct Delegated {
    cfg: DelegatedConfig,
    current: RwLock<Arc<Issuing>>,
    rotating: AtomicBool,
}

struct Inner {
    upstream: Arc<Authority>,
    cpu: CpuPool,
    delegated: Option<Delegated>,
}

/// Issues X509-SVIDs from CSRs through the pipeline (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct X509SvidIssuer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for X509SvidIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509SvidIssuer")
            .field("delegated", &self.inner.delegated.is_some())
            .finish_non_exhaustive()
    }
}

fn mint(upstream: &Authority, cfg: &DelegatedConfig) -> Result<Issuing, SvidError> {
    let now = OffsetDateTime::now_utc();
    let (key, _pkcs8) = SoftwareKey::generate(cfg.key_type).map_err(IssueError::Key)?;
    let subject_key = SubjectKey::from_spki_der(key.spki_der())
        .map_err(|e| IssueError::Authority(format!("issuing key: {e}")))?;
    let remaining: Duration = (upstream.not_after() - now).try_into().unwrap_or_default();
    let ttl = cfg.intermediate_ttl.min(remaining);
    let req = IntermediateRequest {
        subject_key,
        subject: cfg.subject.clone(),
        ttl,
        path_len: Some(0),
    };
    let issued = upstream.issue_issuing_intermediate(&req, now)?;
    let key: Arc<dyn AuthorityKey> = Arc::new(key);
    let authority = Authority::new(
        issued.der,
        key,
        upstream.trust_domain().clone(),
        upstream.chain(),
        upstream.roots().to_vec(),
    )?;
    let life = issued.not_after - now;
    let rotate_after = now + life * cfg.rotate_at.clamp(0.0, 1.0);
    ::metrics::counter!(super::metrics::ROTATIONS).increment(1);
    tracing::info!(not_after = %issued.not_after, "issuing intermediate minted");
    Ok(Issuing {
        authority: Arc::new(authority),
        rotate_after,
    })
}

impl X509SvidIssuer {
    /// An issuer for `upstream` (a CA whose key is normally a [`PipelineKey`](super::PipelineKey)) in `mode`, doing
    /// its CPU work on `cpu`. In delegated mode the first issuing intermediate is minted now, on the CPU pool.
    pub async fn start(
        upstream: Authority,
        mode: SigningMode,
        cpu: CpuPool,
    ) -> Result<Self, SvidError> {
        let upstream = Arc::new(upstream);
        let delegated = match mode {
            SigningMode::Direct => None,
            SigningMode::Delegated(cfg) => {
                let (up, c) = (upstream.clone(), cfg.clone());
                let first = cpu.run(move || mint(&up, &c)).await??;
                Some(Delegated {
                    cfg,
                    current: RwLock::new(Arc::new(first)),
                    rotating: AtomicBool::new(false),
                })
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                upstream,
                cpu,
                delegated,
            }),
        })
    }

    /// The roots the issued SVIDs chain to.
    pub fn roots(&self) -> Vec<Vec<u8>> {
        self.inner.upstream.roots().to_vec()
    }

    /// The current issuing intermediate (delegated mode), DER.
    pub fn current_intermediate(&self) -> Option<Vec<u8>> {
        self.current().map(|i| i.authority.cert_der().to_vec())
    }

    fn current(&self) -> Option<Arc<Issuing>> {
        self.inner
            .delegated
            .as_ref()
            .map(|d| d.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The authority that signs leaves now, starting a background rotation when the intermediate is due.
    fn signer(&self) -> Arc<Authority> {
        let Some(d) = self.inner.delegated.as_ref() else {
            return self.inner.upstream.clone();
        };
        let cur = d.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        if OffsetDateTime::now_utc() >= cur.rotate_after && !d.rotating.swap(true, Ordering::AcqRel)
        {
            let inner = self.inner.clone();
            let started = self.inner.cpu.spawn(move || {
                if let Some(d) = inner.delegated.as_ref() {
                    if let Err(e) = Self::rotate_inner(&inner) {
                        tracing::error!(error = %e, "rotating the issuing intermediate failed; will retry");
                    }
                    d.rotating.store(false, Ordering::Release);
                }
            });
            if started.is_err() {
                d.rotating.store(false, Ordering::Release);
            }
        }
        cur.authority.clone()
    }

    fn rotate_inner(inner: &Inner) -> Result<(), SvidError> {
        let Some(d) = inner.delegated.as_ref() else {
            return Ok(());
        };
        let next = Arc::new(mint(&inner.upstream, &d.cfg)?);
        *d.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// Mints a new issuing intermediate now and swaps it in (delegated mode; a no-op in direct mode). Requests in
    /// flight finish with the old one, which stays valid.
    pub async fn rotate(&self) -> Result<(), SvidError> {
        let inner = self.inner.clone();
        self.inner
            .cpu
            .run(move || Self::rotate_inner(&inner))
            .await?
    }

    /// Issues an X509-SVID for a DER CSR: on the CPU pool, verify the CSR's signature, build the template, lint it,
    /// sign (through the pipeline in direct mode, with the in-memory intermediate in delegated mode) and verify the
    /// signature. The NotAfter is `now + ttl` cut at the issuing authority's (the intermediate in delegated mode, the
    /// root in direct mode): the same rule in both. The work is queued
    /// when this is called (a full CPU queue answers `Overloaded` at once); work not started by `deadline`, or whose
    /// future was dropped, is skipped.
    pub fn issue_x509_svid(
        &self,
        csr_der: Vec<u8>,
        ttl: Duration,
        deadline: Instant,
    ) -> impl Future<Output = Result<X509Svid, SvidError>> + Send + 'static + use<> {
        let all = self.issue_x509_svids(vec![(csr_der, ttl)], deadline);
        async move {
            all.await
                .pop()
                .unwrap_or(Err(SvidError::Pipeline(PipelineError::ShuttingDown)))
        }
    }

    /// Issues X509-SVIDs for several (CSR, TTL) pairs, each as [`issue_x509_svid`](Self::issue_x509_svid) does and
    /// all in parallel; the results come in the order of `requests`, and the caller is woken once, when the last is
    /// ready.
    pub fn issue_x509_svids(
        &self,
        requests: Vec<(Vec<u8>, Duration)>,
        deadline: Instant,
    ) -> impl Future<Output = Vec<Result<X509Svid, SvidError>>> + Send + 'static + use<> {
        let n = requests.len();
        let (collector, rx) = Collector::new(n);
        let authority = self.signer();
        let delegated = self.inner.delegated.is_some();
        for (i, (csr_der, ttl)) in requests.into_iter().enumerate() {
            let sink = Sink::new(&collector, i);
            let (authority, cpu) = (authority.clone(), self.inner.cpu.clone());
            let queued = self.inner.cpu.spawn(move || {
                if sink.abandoned() {
                    return; // the caller gave up: skip the work
                }
                if Instant::now() >= deadline {
                    sink.put(Err(SvidError::Pipeline(PipelineError::DeadlineExceeded)));
                } else if delegated {
                    sink.put(issue_leaf(&authority, &csr_der, ttl));
                } else {
                    issue_direct(authority, &csr_der, ttl, deadline, cpu, sink);
                }
            });
            if let Err(e) = queued {
                collector.refused(i, e);
            }
        }
        collector.release();
        async move {
            // The collector always sends (its slots fill even when work is dropped); this is a backstop, and the
            // wait ends at the deadline whatever happens to the work.
            let waited = if tokio::runtime::Handle::try_current().is_ok() {
                tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), rx).await
            } else {
                Ok(rx.await)
            };
            match waited {
                Ok(Ok(results)) => results,
                Ok(Err(_)) => (0..n)
                    .map(|_| Err(SvidError::Pipeline(PipelineError::ShuttingDown)))
                    .collect(),
                Err(_) => (0..n)
                    .map(|_| Err(SvidError::Pipeline(PipelineError::DeadlineExceeded)))
                    .collect(),
            }
        }
    }
}

/// Direct mode on a CPU thread: check the CSR, build and lint the certificate, queue the token's signature and move
/// on; [`Complete`] finishes the certificate on the CPU pool when the signature arrives, so no CPU thread waits for
/// the token.
fn issue_direct(
    authority: Arc<Authority>,
    csr_der: &[u8],
    ttl: Duration,
    deadline: Instant,
    cpu: CpuPool,
    sink: Sink,
) {
    let unsigned = match prepare_leaf(&authority, csr_der, ttl) {
        Ok(u) => u,
        Err(e) => return sink.put(Err(e)),
    };
    let key = authority.key().clone();
    let tbs = unsigned.tbs().to_vec();
    let then = Complete {
        authority,
        unsigned,
        cpu,
        sink,
    };
    with_deadline(deadline, || {
        key.sign_then(key.key_type().x509_scheme(), &tbs, Box::new(then));
    });
}

type SvidResult = Result<X509Svid, SvidError>;

/// The results of one [`X509SvidIssuer::issue_x509_svids`] call: one slot per request. They are sent to the caller
/// when every slot is filled and the submitter has released its hold (so that a refusal found while submitting can
/// still be recorded).
struct Collector {
    slots: Mutex<Vec<Option<SvidResult>>>,
    /// Slots not filled yet, plus one while the submitter holds the collector.
    left: AtomicUsize,
    tx: Mutex<Option<oneshot::Sender<Vec<SvidResult>>>>,
}

impl Collector {
    fn new(n: usize) -> (Arc<Self>, oneshot::Receiver<Vec<SvidResult>>) {
        let (tx, rx) = oneshot::channel();
        let c = Collector {
            slots: Mutex::new((0..n).map(|_| None).collect()),
            left: AtomicUsize::new(n + 1),
            tx: Mutex::new(Some(tx)),
        };
        (Arc::new(c), rx)
    }

    fn abandoned(&self) -> bool {
        lock(&self.tx)
            .as_ref()
            .is_none_or(oneshot::Sender::is_closed)
    }

    /// Records a refusal of slot `i` at submission (its sink, dropped unrun, filled it with `ShuttingDown`).
    fn refused(&self, i: usize, e: PipelineError) {
        if let Some(slot) = lock(&self.slots).get_mut(i) {
            *slot = Some(Err(SvidError::Pipeline(e)));
        }
    }

    fn fill(&self, i: usize, result: SvidResult) {
        if let Some(slot) = lock(&self.slots).get_mut(i) {
            *slot = Some(result);
        }
        self.release();
    }

    /// Counts one slot (or the submitter's hold) done; the last sends the results.
    fn release(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let results = std::mem::take(&mut *lock(&self.slots))
            .into_iter()
            .map(|r| r.unwrap_or(Err(SvidError::Pipeline(PipelineError::ShuttingDown))))
            .collect();
        if let Some(tx) = lock(&self.tx).take() {
            let _ = tx.send(results);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One slot of a [`Collector`]: filled exactly once, with `ShuttingDown` if dropped unfilled (work dropped unrun).
struct Sink {
    collector: Option<Arc<Collector>>,
    index: usize,
}

impl Sink {
    fn new(collector: &Arc<Collector>, index: usize) -> Self {
        Sink {
            collector: Some(collector.clone()),
            index,
        }
    }

    fn abandoned(&self) -> bool {
        self.collector.as_ref().is_none_or(|c| c.abandoned())
    }

    fn put(mut self, result: SvidResult) {
        if let Some(c) = self.collector.take() {
            c.fill(self.index, result);
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(c) = self.collector.take() {
            // Dropped by a thread that panics (a CPU task, an HSM worker running the continuation): internal.
            let e = if std::thread::panicking() {
                PipelineError::Internal("the thread issuing the X509-SVID panicked".into())
            } else {
                PipelineError::ShuttingDown
            };
            c.fill(self.index, Err(SvidError::Pipeline(e)));
        }
    }
}

/// The rest of a direct-mode X509-SVID once the token has answered: the post-sign check and the assembly, on the CPU
/// pool (on the answering thread only if the pool refuses the work; a signature already made is not thrown away).
struct Complete {
    authority: Arc<Authority>,
    unsigned: UnsignedCertificate,
    cpu: CpuPool,
    sink: Sink,
}

impl SignThen for Complete {
    fn abandoned(&self) -> bool {
        self.sink.abandoned()
    }

    fn resume(self: Box<Self>, result: Result<Vec<u8>, KeyError>) {
        let Complete {
            authority,
            unsigned,
            cpu,
            sink,
        } = *self;
        if sink.abandoned() {
            return;
        }
        let raw = match result {
            Ok(raw) => raw,
            Err(e) => return sink.put(Err(SvidError::from(IssueError::Key(e)))),
        };
        // Which token made the signature, for the post-sign check on the CPU thread (see `key.rs`).
        let signer = super::key::take_signer();
        cpu.spawn_to_completion(move || {
            super::key::restore_signer(signer);
            let issued = authority
                .complete(unsigned, raw)
                .map(|issued| X509Svid {
                    cert_der: issued.der,
                    chain: authority.chain(),
                    not_after: issued.not_after,
                })
                .map_err(SvidError::from);
            sink.put(issued);
        });
    }
}

/// The leaf request for a CSR, after checking the CSR's signature. The TTL goes as asked: the authority cuts the
/// NotAfter at its own, the same in both modes.
fn leaf_request(csr_der: &[u8], ttl: Duration) -> Result<LeafRequest, SvidError> {
    let csr = parse_and_verify_csr(csr_der).map_err(IssueError::Csr)?;
    Ok(LeafRequest::from_csr(&csr, ttl)?)
}

/// Delegated mode's per-certificate work, on the calling (CPU) thread: CSR check, template, lint, sign, verify.
fn issue_leaf(authority: &Authority, csr_der: &[u8], ttl: Duration) -> Result<X509Svid, SvidError> {
    let now = OffsetDateTime::now_utc();
    let req = leaf_request(csr_der, ttl)?;
    let issued = authority.issue_x509_svid(&req, now)?;
    Ok(X509Svid {
        cert_der: issued.der,
        chain: authority.chain(),
        not_after: issued.not_after,
    })
}

/// Direct mode's first half: CSR check, template, lint; not signed.
fn prepare_leaf(
    authority: &Authority,
    csr_der: &[u8],
    ttl: Duration,
) -> Result<UnsignedCertificate, SvidError> {
    let now = OffsetDateTime::now_utc();
    let req = leaf_request(csr_der, ttl)?;
    Ok(authority.prepare_x509_svid(&req, now)?)
}
