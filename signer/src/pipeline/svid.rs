//! X509-SVID issuance through the pipeline, in `direct` or `delegated` mode.
//!
//! [`X509SvidIssuer::issue_x509_svid`] runs the per-certificate CPU work (CSR signature check, template, pre-issuance
//! lint, post-sign verification) on the pipeline's [`CpuPool`], so an async handler just awaits it:
//! - `direct`: the authority's key is a [`PipelineKey`](super::PipelineKey): rcgen's `sign(tbs)` hashes the TBS on
//!   the CPU thread and waits there for the token's signature.
//! - `delegated`: the token key signs a short-lived issuing intermediate whose key is a [`SoftwareKey`] in process
//!   memory; leaves are signed with ring on the CPU pool and chain through that intermediate. The intermediate is
//!   replaced when `rotate_at` of its life has passed (by default half): the first request after that point starts
//!   a rotation on the CPU pool while requests keep using the current intermediate, which stays valid; the new one is
//!   swapped in atomically. Leaf TTLs are capped at the intermediate's remaining life.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rcgen::{DistinguishedName, DnType};
use time::OffsetDateTime;

use super::cpu::CpuPool;
use super::error::PipelineError;
use super::job::with_deadline;
use crate::keys::{AuthorityKey, KeyType, SoftwareKey};
use crate::spki::SubjectKey;
use crate::x509::{Authority, IntermediateRequest, IssueError, LeafRequest, parse_and_verify_csr};

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
    let issued = upstream.issue_intermediate(&req, now)?;
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
            if !started {
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
    /// signature. `ttl` is capped at the issuing intermediate's remaining life in delegated mode. The work is queued
    /// when this is called (a full CPU queue answers `Overloaded` at once); work not started by `deadline`, or whose
    /// future was dropped, is skipped.
    pub fn issue_x509_svid(
        &self,
        csr_der: Vec<u8>,
        ttl: Duration,
        deadline: Instant,
    ) -> impl Future<Output = Result<X509Svid, SvidError>> + Send + 'static + use<> {
        let authority = self.signer();
        let delegated = self.inner.delegated.is_some();
        let task = self.inner.cpu.run(move || {
            if Instant::now() >= deadline {
                return Err(SvidError::Pipeline(PipelineError::DeadlineExceeded));
            }
            with_deadline(deadline, || {
                issue_leaf(&authority, &csr_der, ttl, delegated)
            })
        });
        async move { task.await? }
    }
}

/// The per-certificate work, on the calling (CPU) thread: CSR check, template, lint, sign, verify.
pub(crate) fn issue_leaf(
    authority: &Authority,
    csr_der: &[u8],
    ttl: Duration,
    cap_ttl: bool,
) -> Result<X509Svid, SvidError> {
    let csr = parse_and_verify_csr(csr_der).map_err(IssueError::Csr)?;
    let now = OffsetDateTime::now_utc();
    let ttl = if cap_ttl {
        let remaining: Duration = (authority.not_after() - now).try_into().unwrap_or_default();
        ttl.min(remaining)
    } else {
        ttl
    };
    let req = LeafRequest::from_csr(&csr, ttl)?;
    let issued = authority.issue_x509_svid(&req, now)?;
    Ok(X509Svid {
        cert_der: issued.der,
        chain: authority.chain(),
        not_after: issued.not_after,
    })
}
