//! The trust domain's authorities and their life cycle: X.509 roots and JWT signing keys, each with its key on the
//! token, kept in the datastore ([`crate::store`]), rotated without an outage and without a gap in trust.
//!
//! An authority moves through `preparing -> prepared -> published -> active -> superseded -> retired`, and its key
//! is destroyed on the token when asked:
//!
//! | step | what it does | refused when |
//! | --- | --- | --- |
//! | prepare | generates the next key on the token; for X.509 a self-signed root and two cross-certificates: the new root's key certified by the old root (old -> new) and the old root's key certified by the new root (new -> old), so either generation's clients verify the other's credentials | a rotation of that kind is already under way; the token refuses to generate the key (nothing is left behind) |
//! | publish | the new root / key joins the bundle; `spiffe_sequence` increases; every subscription stream gets the new roots or keys | nothing is prepared |
//! | activate | new issuance signs with the new key; the old one is `superseded`: it stops signing, stays in the bundle, and records until when what it signed can be valid | less than `publish_lead` (3–5 × the bundle's refresh hint) since publishing |
//! | retire | the superseded root / key leaves the bundle (SPIRE servers drop an X.509 root from their bundle only if it was tainted first and they recorded the taint; an untainted one stays there until it expires: `signet rotate retire --taint-first`) | something it signed may still be valid |
//! | taint | marks an authority compromised: SPIRE receives the root `tainted` and re-mints its intermediate at once | the authority is not in the bundle |
//! | destroy | destroys a retired authority's key on the token | the authority is not retired |
//!
//! While a new root is published and the old one still signs, X.509 credentials are presented with the new -> old
//! cross-certificate; once the new root signs and the old one is still in the bundle, with the old -> new one. A
//! client that holds only the old bundle (the old root) and one that holds only the new root both verify every
//! credential at every step.
//!
//! **Every step is one datastore transaction committed before the step takes effect** (before the bundle changes,
//! before another key signs). The two steps that touch the token are journalled before the token is touched and
//! finished after it: `prepare` first commits a `preparing` row naming the label, then generates the key, then
//! commits the certificates; `destroy` first commits the request, then destroys the key, then commits that it is
//! gone. [`Authorities::open`] finishes whatever a crash interrupted: a `preparing` row is carried forward (the key
//! is generated if it is not on the token yet, the certificates made), a requested destruction is carried out. A
//! step killed before its journal line is as if it never started. So no step is lost or applied twice, and no key
//! on the token is orphaned or lost; [`Authorities::orphans`] lists keys of signet's label families that no row
//! names. The crash points the tests use to kill the process at each of these moments are described in
//! [`crash`].
//!
//! The schedule ([`Schedule`], like SPIRE's: prepare and publish at half of the active authority's life, activate
//! at ~83 %, retire as soon as nothing the superseded one signed is valid) is run by [`Authorities::tick`]; every
//! step is also available by hand (`signet rotate`, the Admin API). Time comes from a [`Clock`], so a test drives a
//! whole rotation without sleeping.
//!
//! Metrics (updated whenever the authorities change here, including steps another replica committed and
//! [`Authorities::reload`] picked up), labels `kind` (`x509`, `jwt`) and `label` (the key's label):
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `signet_authority_not_after_seconds{kind,label}` | gauge | the authority's NotAfter, Unix seconds |
//! | `signet_authority_state{kind,label,state}` | gauge | 1 for the authority's state, 0 for the other five |
//! | `signet_authority_tainted{kind,label}` | gauge | 1 when the authority was tainted |
//! | `signet_authority_successor{kind}` | gauge | 1 while a successor of that kind is prepared or published |

pub mod clock;
pub mod crash;
pub mod external;
pub mod keyring;

use std::sync::Arc;
use std::time::Duration;

use rcgen::{DistinguishedName, DnType};
use time::OffsetDateTime;
use tokio::sync::{Mutex, watch};

use crate::bundle::{BundleSnapshot, JwtKey, KeyOwner, TrustBundle};
use crate::keys::AuthorityKey;
use crate::keys::spki::SubjectKey;
use crate::spiffe::TrustDomain;
pub use crate::store::{AuthorityKind, AuthorityRecord, AuthorityState};
use crate::store::{Store, StoreError, Txn};
use crate::x509::{Authority, IntermediateRequest, RootRequest};
pub use clock::{Clock, ManualClock, SystemClock};
pub use keyring::{Keyring, KeyringError, TokenKeyring};

/// How many refresh hints must pass between publishing a key and signing with it (the SPIFFE federation rule asks
/// for 3 to 5).
pub const PUBLISH_LEAD_HINTS: u64 = 4;

/// Why a rotation step was refused or failed. The state is unchanged unless said otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    /// The step does not apply to the authorities as they are.
    #[error("{0}")]
    Precondition(String),
    /// The step is allowed later.
    #[error("{step} is allowed from {ready_at} on ({why})")]
    TooEarly {
        /// The step.
        step: &'static str,
        /// When it becomes allowed.
        ready_at: OffsetDateTime,
        /// Why.
        why: String,
    },
    /// No authority with that label.
    #[error("no authority labelled {0:?} in this trust domain")]
    NotFound(String),
    /// The token refused or failed.
    #[error(transparent)]
    Token(#[from] KeyringError),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A certificate could not be made.
    #[error("certificate: {0}")]
    Certificate(String),
    /// An installed certificate was refused (below an offline root): why.
    #[error("{0}")]
    Refused(String),
    /// The certificate from the offline ceremony is not fit to install (below an offline root).
    #[error(transparent)]
    NotInstallable(#[from] external::InstallError),
    /// The step's witness (the Admin API's audit log) could not record it: the step did not happen.
    #[error("the step could not be recorded ({0}); nothing was changed")]
    NotRecorded(#[source] crate::audit::AuditError),
}

/// Told about a rotation step just before it commits, i.e. before it takes effect anywhere (the bundle, what signs,
/// the token): the Admin API writes the step's audit line here ([`Authorities::publish_with`] and its siblings), and
/// if that fails the step does not happen ([`RotationError::NotRecorded`]).
pub trait StepWitness: Sync {
    /// `step` of the authority `label` is about to commit; an error stops it.
    fn before_commit(
        &self,
        step: &'static str,
        label: &str,
    ) -> impl std::future::Future<Output = Result<(), crate::audit::AuditError>> + Send;
}

/// No witness: the schedule and the CLI's steps commit without telling anyone first.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unwitnessed;

impl StepWitness for Unwitnessed {
    async fn before_commit(
        &self,
        _step: &'static str,
        _label: &str,
    ) -> Result<(), crate::audit::AuditError> {
        Ok(())
    }
}

async fn witness<W: StepWitness>(
    w: &W,
    step: &'static str,
    label: &str,
) -> Result<(), RotationError> {
    w.before_commit(step, label)
        .await
        .map_err(RotationError::NotRecorded)
}

/// When the schedule moves an authority along, as fractions of the active authority's life.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Prepare and publish the successor at this fraction of the active one's life (SPIRE: 0.5).
    pub prepare_at: f64,
    /// Activate the successor at this fraction (SPIRE: ~0.83).
    pub activate_at: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            prepare_at: 0.5,
            activate_at: 0.83,
        }
    }
}

/// What the life cycle needs to know.
#[derive(Debug, Clone)]
pub struct RotationPolicy {
    /// Key type of new roots.
    pub x509_key_type: signet_pkcs11::KeyType,
    /// Key type of new JWT keys.
    pub jwt_key_type: signet_pkcs11::KeyType,
    /// Lifetime of a new root (and of a JWT key, for the schedule).
    pub root_ttl: Duration,
    /// Label family of roots: generation N is `<prefix>-g<N>` (the first one keeps the configured label).
    pub x509_label: String,
    /// Label family of JWT keys.
    pub jwt_label: String,
    /// Least time between publishing and activating.
    pub publish_lead: Duration,
    /// The longest life of anything a root signs (SPIRE CAs, SVIDs, issuing intermediates, signet's own
    /// credentials): a superseded root leaves the bundle this long after it stopped signing.
    pub max_x509_issued_ttl: Duration,
    /// The longest JWT-SVID life.
    pub max_jwt_issued_ttl: Duration,
    /// The automatic schedule; `None`: by hand only.
    pub schedule: Option<Schedule>,
    /// Why new keys cannot be prepared here, if they cannot (e.g. the authority signs with several tokens and a
    /// new key would exist on one of them only).
    pub cannot_prepare: Option<String>,
    /// The X.509 authority is an intermediate below an offline root ([`external`]); `None`: signet's own roots.
    pub external: Option<external::ExternalParent>,
}

impl RotationPolicy {
    /// Defaults around the given labels: P-256, one year, four refresh hints of publish lead, 24 h of issued life.
    pub fn new(x509_label: impl Into<String>, jwt_label: impl Into<String>) -> Self {
        Self {
            x509_key_type: signet_pkcs11::KeyType::EcP256,
            jwt_key_type: signet_pkcs11::KeyType::EcP256,
            root_ttl: Duration::from_secs(365 * 86_400),
            x509_label: x509_label.into(),
            jwt_label: jwt_label.into(),
            publish_lead: Duration::from_secs(
                PUBLISH_LEAD_HINTS * crate::bundle::REFRESH_HINT_SECS,
            ),
            max_x509_issued_ttl: Duration::from_secs(24 * 3600),
            max_jwt_issued_ttl: Duration::from_secs(24 * 3600),
            schedule: Some(Schedule::default()),
            cannot_prepare: None,
            external: None,
        }
    }

    /// Below an offline root, the least life an installed certificate must have left: the publish lead plus the
    /// longest life of what it signs.
    pub fn least_life(&self) -> Duration {
        self.publish_lead.saturating_add(self.max_x509_issued_ttl)
    }

    fn label_family(&self, kind: AuthorityKind) -> &str {
        match kind {
            AuthorityKind::X509 => &self.x509_label,
            AuthorityKind::Jwt => &self.jwt_label,
        }
    }

    fn key_type(&self, kind: AuthorityKind) -> signet_pkcs11::KeyType {
        match kind {
            AuthorityKind::X509 => self.x509_key_type,
            AuthorityKind::Jwt => self.jwt_key_type,
        }
    }

    fn issued_ttl(&self, kind: AuthorityKind) -> Duration {
        match kind {
            AuthorityKind::X509 => self.max_x509_issued_ttl,
            AuthorityKind::Jwt => self.max_jwt_issued_ttl,
        }
    }
}

/// What signs now: the active root (presented with the cross-certificate the rotation calls for) and the active
/// JWT key.
#[derive(Debug, Clone)]
pub struct ActiveSet {
    /// The active X.509 authority; its [`Authority::chain`] holds the cross-certificate clients need, if any.
    pub x509: Arc<Authority>,
    /// The active JWT key's label and signer.
    pub jwt: Option<(String, Arc<dyn AuthorityKey>)>,
}

/// The trust domain's authorities: the datastore rows, the live bundle and the active set, moved along one step at
/// a time (see the module docs).
#[derive(Debug)]
pub struct Authorities {
    td: TrustDomain,
    store: Store,
    keyring: Arc<dyn Keyring>,
    clock: Arc<dyn Clock>,
    policy: RotationPolicy,
    bundle: TrustBundle,
    records: Mutex<Vec<AuthorityRecord>>,
    active: watch::Sender<Arc<ActiveSet>>,
    /// What the active set was built from, so that it is rebuilt only when that changes.
    plan: std::sync::Mutex<Option<ActivePlan>>,
    /// Descendants the process itself holds and serves (its own TLS credentials): (issuer's SPKI, NotAfter, name).
    holds: std::sync::Mutex<Vec<(Vec<u8>, i64, String)>>,
}

/// What an [`ActiveSet`] is built from: the active root (its label and certificate), the cross-certificate it is
/// presented with, and the active JWT key's label.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ActivePlan {
    x509_label: String,
    x509_cert: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    /// The upstream roots, when the authority is an intermediate below them; `None`: it is itself the root.
    roots: Option<Vec<Vec<u8>>>,
    jwt_label: Option<String>,
}

/// Every state, for the `signet_authority_state` series (one per state, so that a change leaves no stale 1).
const STATES: [AuthorityState; 6] = [
    AuthorityState::Preparing,
    AuthorityState::Prepared,
    AuthorityState::Published,
    AuthorityState::Active,
    AuthorityState::Superseded,
    AuthorityState::Retired,
];

/// Sets the authorities' gauges (see the module docs) from `records`.
fn export_metrics(records: &[AuthorityRecord]) {
    for r in records {
        let (kind, label) = (r.kind.name(), r.label.clone());
        if let Some(t) = r.not_after {
            metrics::gauge!("signet_authority_not_after_seconds", "kind" => kind, "label" => label.clone())
                .set(t as f64);
        }
        for s in STATES {
            metrics::gauge!(
                "signet_authority_state",
                "kind" => kind,
                "label" => label.clone(),
                "state" => s.name()
            )
            .set(if r.state == s { 1.0 } else { 0.0 });
        }
        metrics::gauge!("signet_authority_tainted", "kind" => kind, "label" => label)
            .set(if r.tainted { 1.0 } else { 0.0 });
    }
    for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
        let successor = records.iter().any(|r| {
            r.kind == kind
                && matches!(
                    r.state,
                    AuthorityState::Prepared | AuthorityState::Published
                )
        });
        metrics::gauge!("signet_authority_successor", "kind" => kind.name()).set(if successor {
            1.0
        } else {
            0.0
        });
    }
}

fn unix(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn at(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn dur(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn cert_err(e: impl std::fmt::Display) -> RotationError {
    RotationError::Certificate(e.to_string())
}

fn root_subject(td: &TrustDomain, generation: i64) -> DistinguishedName {
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "signet");
    // Each generation has its own name, so that chain builders never mistake one root for the other.
    if generation <= 1 {
        subject.push(DnType::CommonName, format!("signet root {td}"));
    } else {
        subject.push(
            DnType::CommonName,
            format!("signet root {td} #{generation}"),
        );
    }
    subject
}

/// The subject signet asks the offline root for (below an offline root): one name per generation, like roots.
pub fn intermediate_subject(td: &TrustDomain, generation: i64) -> DistinguishedName {
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "signet");
    if generation <= 1 {
        subject.push(DnType::CommonName, format!("signet intermediate {td}"));
    } else {
        subject.push(
            DnType::CommonName,
            format!("signet intermediate {td} #{generation}"),
        );
    }
    subject
}

/// Why an authority below an offline root cannot be published yet.
fn awaiting_message(label: &str) -> String {
    format!(
        "awaiting the authority's certificate: {label} has no certificate yet; have the offline root sign its CSR \
         (signet rotate csr), then run signet rotate install --cert FILE [--chain FILE]"
    )
}

fn subject_of(der: &[u8]) -> Result<DistinguishedName, RotationError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(cert_err)?;
    crate::x509::names::to_rcgen(cert.subject()).map_err(cert_err)
}

fn not_after_of(der: &[u8]) -> Result<OffsetDateTime, RotationError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(cert_err)?;
    Ok(cert.validity().not_after.to_datetime())
}

/// Certifies `subject_cert`'s key and name with `issuer`, valid until `not_after` at the latest (cut at the
/// issuer's end).
fn cross_certify(
    issuer: &Authority,
    subject_cert: &[u8],
    spki: &[u8],
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Vec<u8>, RotationError> {
    let end = not_after.min(issuer.not_after());
    let ttl: Duration = (end - now).try_into().map_err(|_| {
        RotationError::Certificate(
            "the issuing root ends before the cross-certificate would start".into(),
        )
    })?;
    let req = IntermediateRequest {
        subject_key: SubjectKey::from_spki_der(spki).map_err(cert_err)?,
        subject: subject_of(subject_cert)?,
        ttl,
        path_len: None,
    };
    Ok(issuer.issue_intermediate(&req, now).map_err(cert_err)?.der)
}

impl Authorities {
    /// Loads the authorities of `td` from `store`, finishes any step a crash interrupted (see the module docs) and
    /// builds the bundle and the active set. When the store has no active authority of a kind yet, the key
    /// `initial_x509` / `initial_jwt` names (already on the token, with `initial_root` its certificate) is adopted
    /// as generation 1.
    pub async fn open(
        td: TrustDomain,
        store: Store,
        keyring: Arc<dyn Keyring>,
        clock: Arc<dyn Clock>,
        policy: RotationPolicy,
        initial: Initial,
    ) -> Result<Self, RotationError> {
        let tds = td.to_string();
        // Replicas sharing the datastore start one at a time through here.
        let lock = store.step_lock().await?;
        let mut records = store.authorities(&tds).await?;
        let now = clock.now();
        // Adopt the first authorities.
        for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
            if records
                .iter()
                .any(|r| r.kind == kind && r.state == AuthorityState::Active)
            {
                continue;
            }
            let (label, cert) = match kind {
                AuthorityKind::X509 => {
                    (initial.x509_label.clone(), Some(initial.x509_root.clone()))
                }
                AuthorityKind::Jwt => (initial.jwt_label.clone(), None),
            };
            let kr = keyring.clone();
            let l2 = label.clone();
            let spki = tokio::task::spawn_blocking(move || kr.public_key(&l2))
                .await
                .map_err(|e| RotationError::Precondition(e.to_string()))??
                .ok_or_else(|| {
                    RotationError::Precondition(format!(
                        "the initial key {label:?} is not on the token"
                    ))
                })?;
            let generation = records
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| r.generation)
                .max()
                .unwrap_or(0)
                + 1;
            let rec = AuthorityRecord {
                label: label.clone(),
                trust_domain: tds.clone(),
                kind,
                generation,
                state: AuthorityState::Active,
                token: keyring.token_name().to_string(),
                key_type: policy.key_type(kind).name().to_string(),
                kid: (kind == AuthorityKind::Jwt).then(|| crate::jwt::kid_for_spki(&spki)),
                not_after: match &cert {
                    Some(c) => Some(unix(not_after_of(c)?)),
                    None => Some(unix(now) + dur(policy.root_ttl)),
                },
                public_key: Some(spki),
                certificate: cert,
                chain: match kind {
                    AuthorityKind::X509 if !initial.x509_chain.is_empty() => {
                        Some(initial.x509_chain.concat())
                    }
                    _ => None,
                },
                cross_from_previous: None,
                cross_to_previous: None,
                created_at: unix(now),
                published_at: Some(unix(now)),
                activated_at: Some(unix(now)),
                superseded_at: None,
                issued_until: None,
                retired_at: None,
                destroy_requested_at: None,
                destroyed_at: None,
                tainted: false,
            };
            let mut tx = store.begin().await?;
            tx.insert_authority(&rec).await?;
            // The sequence starts at the current Unix time, so it keeps increasing from the in-memory bundles of
            // earlier versions.
            tx.bump_sequence(&tds, u64::try_from(unix(now)).unwrap_or(1))
                .await?;
            tx.journal(&tds, unix(now), "adopt", &label, kind.name())
                .await?;
            tx.commit().await?;
            tracing::info!(
                label,
                kind = kind.name(),
                "authority adopted into the datastore"
            );
            records.push(rec);
        }
        // The live bundle also moves with JWT keys SPIRE servers publish, which are kept in memory only; starting
        // at no less than the current Unix time keeps the sequence increasing across restarts.
        let mut sequence = store.sequence(&tds).await?.unwrap_or(1);
        let floor = u64::try_from(unix(now)).unwrap_or(1);
        if sequence < floor {
            let mut tx = store.begin().await?;
            sequence = tx.bump_sequence(&tds, floor).await?;
            tx.commit().await?;
        }
        let mut snapshot = Self::snapshot_of(&records, sequence, policy.external.as_ref());
        let now_unix = unix(now);
        snapshot.jwt_keys.extend(
            store
                .published_jwt_keys(&tds)
                .await?
                .into_iter()
                .filter(|k| k.expires_at == 0 || k.expires_at > now_unix)
                .map(|k| JwtKey {
                    kid: k.kid,
                    spki: k.public_key,
                    expires_at: k.expires_at,
                    tainted: k.tainted,
                    owner: KeyOwner::from_stored(k.owner),
                }),
        );
        lock.release().await;
        let bundle = TrustBundle::from_snapshot(snapshot);
        let plan = Self::plan_of(&records, policy.external.as_ref())?;
        let set = Self::active_of(&td, keyring.clone(), plan.clone()).await?;
        let (active, _) = watch::channel(Arc::new(set));
        let this = Self {
            td,
            store,
            keyring,
            clock,
            policy,
            bundle,
            records: Mutex::new(records),
            active,
            plan: std::sync::Mutex::new(Some(plan)),
            holds: std::sync::Mutex::new(Vec::new()),
        };
        this.recover().await?;
        export_metrics(&this.records.lock().await);
        this.export_awaited(&this.records.lock().await);
        Ok(this)
    }

    /// Records a credential this process serves (its own server or client certificate), issued by the key whose
    /// SubjectPublicKeyInfo is `issuer_spki` and valid until `not_after`: the issuer is not retired while it is in
    /// use, since relying parties that drop the issuer would stop trusting the process. `what` names the
    /// credential: a new hold under the same name replaces the earlier one (the credential was renewed, the old one
    /// is no longer served).
    pub fn hold_descendant(&self, issuer_spki: &[u8], not_after: OffsetDateTime, what: &str) {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.retain(|(_, _, w)| w != what);
        holds.push((issuer_spki.to_vec(), unix(not_after), what.to_string()));
    }

    /// Stores the JWT keys of the live bundle that SPIRE servers published (those no authority row names), with the
    /// bundle's current sequence number, so that a restart still publishes them. Expired keys are dropped; keys
    /// without a recorded owner are already stored and left as they are.
    pub async fn keep_published_jwt_keys(&self) -> Result<(), RotationError> {
        let records = self.records.lock().await;
        let current = self.bundle.current();
        let tds = self.td.to_string();
        let mut tx = self.store.begin().await?;
        tx.expire_published_jwt_keys(&tds, unix(self.clock.now()))
            .await?;
        for k in current.jwt_keys.iter().filter(|k| {
            matches!(k.owner, KeyOwner::Publisher(_))
                && !records
                    .iter()
                    .any(|r| r.kid.as_deref() == Some(k.kid.as_str()))
        }) {
            tx.put_published_jwt_key(&tds, &Self::stored_key(k)).await?;
        }
        // The stored sequence catches up with the live one (max(stored + 1, live)).
        tx.bump_sequence(&tds, current.sequence).await?;
        tx.commit().await?;
        Ok(())
    }

    fn stored_key(k: &JwtKey) -> crate::store::PublishedJwtKey {
        crate::store::PublishedJwtKey {
            kid: k.kid.clone(),
            public_key: k.spki.clone(),
            expires_at: k.expires_at,
            tainted: k.tainted,
            owner: k.owner.stored().to_string(),
        }
    }

    /// Whether `kid` names one of signet's own JWT authorities, in the bundle or not (prepared, retired): such a key
    /// id is never accepted from a publisher.
    pub async fn is_own_kid(&self, kid: &str) -> bool {
        self.records
            .lock()
            .await
            .iter()
            .any(|r| r.kid.as_deref() == Some(kid))
    }

    /// Stores a JWT key a SPIRE server publishes, before it joins the live bundle
    /// ([`TrustBundle::publish_jwt_key`]): one transaction that drops expired published keys, inserts the key (or
    /// updates it, under the same owner only: [`StoreError::NotOwner`] otherwise) and moves the stored sequence
    /// past the live one. A key id of signet's own authorities is refused ([`RotationError::Precondition`]).
    pub async fn store_published_jwt_key(&self, key: &JwtKey) -> Result<(), RotationError> {
        let records = self.records.lock().await;
        if records
            .iter()
            .any(|r| r.kid.as_deref() == Some(key.kid.as_str()))
        {
            return Err(RotationError::Precondition(format!(
                "key id {:?} is one of signet's own JWT authorities",
                key.kid
            )));
        }
        let tds = self.td.to_string();
        let mut tx = self.store.begin().await?;
        tx.expire_published_jwt_keys(&tds, unix(self.clock.now()))
            .await?;
        tx.put_published_jwt_key(&tds, &Self::stored_key(key))
            .await?;
        tx.bump_sequence(&tds, self.next_sequence()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The live bundle.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The datastore.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What signs now.
    pub fn active(&self) -> Arc<ActiveSet> {
        self.active.borrow().clone()
    }

    /// Follows the active set.
    pub fn subscribe_active(&self) -> watch::Receiver<Arc<ActiveSet>> {
        self.active.subscribe()
    }

    /// The policy.
    pub fn policy(&self) -> &RotationPolicy {
        &self.policy
    }

    /// Every authority, by kind and generation.
    pub async fn list(&self) -> Vec<AuthorityRecord> {
        let mut l = self.records.lock().await.clone();
        l.sort_by(|a, b| (a.kind.name(), a.generation).cmp(&(b.kind.name(), b.generation)));
        l
    }

    /// Keys on the token whose labels belong to signet's families (`<x509 label>`, `<x509 label>-g<N>`, the same
    /// for JWT) but that no authority row names, or rows whose key is gone although they were not destroyed
    /// (`lost`). Both lists are empty in a consistent state.
    pub async fn orphans(&self) -> Result<(Vec<String>, Vec<String>), RotationError> {
        let records = self.records.lock().await.clone();
        let kr = self.keyring.clone();
        let labels = tokio::task::spawn_blocking(move || kr.labels())
            .await
            .map_err(|e| RotationError::Precondition(e.to_string()))??;
        let family = |l: &str| {
            [&self.policy.x509_label, &self.policy.jwt_label]
                .iter()
                .any(|p| {
                    l == p.as_str()
                        || l.strip_prefix(p.as_str())
                            .is_some_and(|s| s.starts_with("-g"))
                })
        };
        let orphans = labels
            .iter()
            .filter(|l| family(l) && !records.iter().any(|r| &r.label == *l))
            .cloned()
            .collect();
        let lost = records
            .iter()
            .filter(|r| r.destroyed_at.is_none() && !labels.contains(&r.label))
            .map(|r| r.label.clone())
            .collect();
        Ok((orphans, lost))
    }

    fn snapshot_of(
        records: &[AuthorityRecord],
        sequence: u64,
        external: Option<&external::ExternalParent>,
    ) -> BundleSnapshot {
        let in_bundle = |k: AuthorityKind| {
            records
                .iter()
                .filter(move |r| r.kind == k && r.state.in_bundle())
        };
        let own: Vec<Vec<u8>> = in_bundle(AuthorityKind::X509)
            .filter_map(|r| r.certificate.clone())
            .collect();
        // Below an offline root the bundle holds the upstream roots; signet's intermediates are its own CAs (the
        // trust boundary counts what they sign as signet's). A tainted intermediate leaves the roots as they are.
        let (x509_roots, x509_tainted, own_cas) = match external {
            Some(e) => (e.roots.clone(), Vec::new(), own),
            None => (
                own,
                in_bundle(AuthorityKind::X509)
                    .filter(|r| r.tainted)
                    .filter_map(|r| r.certificate.clone())
                    .collect(),
                Vec::new(),
            ),
        };
        BundleSnapshot {
            sequence,
            x509_roots,
            x509_tainted,
            own_cas,
            jwt_keys: in_bundle(AuthorityKind::Jwt)
                .filter_map(|r| {
                    Some(JwtKey {
                        kid: r.kid.clone()?,
                        spki: r.public_key.clone()?,
                        expires_at: 0,
                        tainted: r.tainted,
                        owner: KeyOwner::Signet,
                    })
                })
                .collect(),
        }
    }

    fn plan_of(
        records: &[AuthorityRecord],
        external: Option<&external::ExternalParent>,
    ) -> Result<ActivePlan, RotationError> {
        let active = |k: AuthorityKind| {
            records
                .iter()
                .find(|r| r.kind == k && r.state == AuthorityState::Active)
                .cloned()
        };
        let x = active(AuthorityKind::X509)
            .ok_or_else(|| RotationError::Precondition("no active X.509 root".into()))?;
        // The cross-certificate the credentials are presented with.
        let previous_in_bundle = records.iter().any(|r| {
            r.kind == AuthorityKind::X509
                && r.generation == x.generation - 1
                && r.state == AuthorityState::Superseded
        });
        let successor = records.iter().find(|r| {
            r.kind == AuthorityKind::X509
                && r.generation == x.generation + 1
                && r.state == AuthorityState::Published
        });
        let intermediates: Vec<Vec<u8>> = match (external, previous_in_bundle, successor) {
            // Below an offline root: the chain installed with the intermediate (every generation chains to the
            // same root, no cross-certificate is needed).
            (Some(_), _, _) => external::split_ders(x.chain.as_deref().unwrap_or_default()),
            (None, true, _) => x.cross_from_previous.iter().cloned().collect(),
            (None, false, Some(s)) => s.cross_to_previous.iter().cloned().collect(),
            (None, false, None) => Vec::new(),
        };
        let cert = x.certificate.clone().ok_or_else(|| {
            RotationError::Precondition(format!("root {:?} has no certificate", x.label))
        })?;
        Ok(ActivePlan {
            x509_label: x.label,
            x509_cert: cert,
            intermediates,
            roots: external.map(|e| e.roots.clone()),
            jwt_label: active(AuthorityKind::Jwt).map(|j| j.label),
        })
    }

    async fn active_of(
        td: &TrustDomain,
        keyring: Arc<dyn Keyring>,
        plan: ActivePlan,
    ) -> Result<ActiveSet, RotationError> {
        let td = td.clone();
        tokio::task::spawn_blocking(move || {
            let key = keyring.signer(&plan.x509_label)?;
            let cert = plan.x509_cert;
            let roots = plan.roots.unwrap_or_else(|| vec![cert.clone()]);
            let authority =
                Authority::new(cert, key, td, plan.intermediates, roots).map_err(cert_err)?;
            let jwt = match plan.jwt_label {
                Some(j) => {
                    let signer = keyring.signer(&j)?;
                    Some((j, signer))
                }
                None => None,
            };
            Ok(ActiveSet {
                x509: Arc::new(authority),
                jwt,
            })
        })
        .await
        .map_err(|e| RotationError::Precondition(e.to_string()))?
    }

    /// The least sequence number the next change may take: past the live bundle's, which other changes (JWT keys
    /// SPIRE servers publish, kept in memory) also move.
    fn next_sequence(&self) -> u64 {
        self.bundle.current().sequence.saturating_add(1)
    }

    /// Makes the committed `records` take effect: the bundle and the active set (rebuilt when what signs changed).
    /// The JWT keys SPIRE servers published (the datastore's, and any in the live bundle that no authority row
    /// names) stay.
    async fn take_effect(&self, records: &[AuthorityRecord]) -> Result<(), RotationError> {
        export_metrics(records);
        self.export_awaited(records);
        let tds = self.td.to_string();
        let sequence = self.store.sequence(&tds).await?.unwrap_or(1);
        let mut snapshot = Self::snapshot_of(records, sequence, self.policy.external.as_ref());
        let ours = |kid: &str| records.iter().any(|r| r.kid.as_deref() == Some(kid));
        let now = unix(self.clock.now());
        for k in self.store.published_jwt_keys(&tds).await? {
            if (k.expires_at == 0 || k.expires_at > now) && !ours(&k.kid) {
                snapshot.jwt_keys.push(JwtKey {
                    kid: k.kid,
                    spki: k.public_key,
                    expires_at: k.expires_at,
                    tainted: k.tainted,
                    owner: KeyOwner::from_stored(k.owner),
                });
            }
        }
        let live = self.bundle.current();
        for k in live.jwt_keys.iter().filter(|k| !ours(&k.kid)) {
            if !snapshot.jwt_keys.iter().any(|s| s.kid == k.kid) {
                snapshot.jwt_keys.push(k.clone());
            }
        }
        self.bundle.replace(snapshot);
        let plan = Self::plan_of(records, self.policy.external.as_ref())?;
        let same = self.plan.lock().unwrap_or_else(|p| p.into_inner()).as_ref() == Some(&plan);
        if !same {
            let set = Self::active_of(&self.td, self.keyring.clone(), plan.clone()).await?;
            self.active.send_replace(Arc::new(set));
            *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = Some(plan);
        }
        Ok(())
    }

    /// Re-reads the authorities, the bundle's sequence and the published JWT keys from the datastore and makes
    /// what changed take effect: how a replica follows the steps and publications another replica committed.
    /// Returns whether anything changed.
    pub async fn reload(&self) -> Result<bool, RotationError> {
        let mut records = self.records.lock().await;
        let tds = self.td.to_string();
        let fresh = self.store.authorities(&tds).await?;
        let sequence = self.store.sequence(&tds).await?.unwrap_or(1);
        if fresh == *records && sequence <= self.bundle.current().sequence {
            return Ok(false);
        }
        *records = fresh;
        self.take_effect(&records).await?;
        Ok(true)
    }

    /// Takes the datastore's step lock and brings `records` up to date under it: every step starts here, so steps
    /// taken through different replicas never interleave and each sees what the others committed.
    async fn lock_step(
        &self,
        records: &mut Vec<AuthorityRecord>,
    ) -> Result<crate::store::DbLock, RotationError> {
        let lock = self.store.step_lock().await?;
        let fresh = self.store.authorities(&self.td.to_string()).await?;
        if fresh != *records {
            *records = fresh;
            self.take_effect(records).await?;
        }
        Ok(lock)
    }

    async fn begin(
        &self,
        step: &'static str,
        label: &str,
        detail: &str,
    ) -> Result<Txn, RotationError> {
        let mut tx = self.store.begin().await?;
        tx.journal(
            &self.td.to_string(),
            unix(self.clock.now()),
            step,
            label,
            detail,
        )
        .await?;
        Ok(tx)
    }

    /// A step that changes the bundle: `rec`'s new state is journalled and committed with the next bundle sequence,
    /// then replaces its row in `records`, which then take effect.
    async fn commit_bundle_change<W: StepWitness>(
        &self,
        step: &'static str,
        rec: AuthorityRecord,
        records: &mut [AuthorityRecord],
        w: &W,
    ) -> Result<(), RotationError> {
        witness(w, step, &rec.label).await?;
        let mut tx = self.begin(step, &rec.label, rec.kind.name()).await?;
        tx.update_authority(&rec).await?;
        tx.bump_sequence(&self.td.to_string(), self.next_sequence())
            .await?;
        self.commit(tx, step).await?;
        if let Some(r) = records.iter_mut().find(|r| r.label == rec.label) {
            *r = rec;
        }
        self.take_effect(records).await
    }

    async fn commit(&self, tx: Txn, step: &'static str) -> Result<(), RotationError> {
        crash::reached(step, "before-journal");
        tx.commit().await?;
        crash::reached(step, "after-journal");
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<dyn Keyring>) -> Result<T, RotationError> + Send + 'static,
    ) -> Result<T, RotationError> {
        let kr = self.keyring.clone();
        tokio::task::spawn_blocking(move || f(kr))
            .await
            .map_err(|e| RotationError::Precondition(format!("a token task failed: {e}")))?
    }

    /// Finishes steps that a process which died left half done, if there are any (the replica that runs the
    /// schedule calls this on every tick; see the module docs). Returns whether there were.
    pub async fn finish_abandoned(&self) -> Result<bool, RotationError> {
        let rows = self.store.authorities(&self.td.to_string()).await?;
        if !rows.iter().any(Self::pending) {
            return Ok(false);
        }
        self.recover().await?;
        Ok(true)
    }

    fn pending(r: &AuthorityRecord) -> bool {
        r.state == AuthorityState::Preparing
            || (r.destroy_requested_at.is_some() && r.destroyed_at.is_none())
    }

    /// Finishes steps a crash interrupted (see the module docs). Under the step lock, a half-done step in the
    /// datastore belongs to no live process.
    async fn recover(&self) -> Result<(), RotationError> {
        let mut records = self.records.lock().await;
        let lock = self.lock_step(&mut records).await?;
        let pending: Vec<AuthorityRecord> = records
            .iter()
            .filter(|r| Self::pending(r))
            .cloned()
            .collect();
        for r in pending {
            if r.state == AuthorityState::Preparing {
                tracing::warn!(
                    label = r.label,
                    "finishing a prepare step a stop interrupted"
                );
                let label = r.label.clone();
                let key_type = self.policy.key_type(r.kind);
                let spki = self
                    .blocking(move |kr| match kr.public_key(&label)? {
                        Some(k) => Ok(k),
                        None => Ok(kr.generate(&label, key_type)?),
                    })
                    .await;
                match spki {
                    Ok(spki) => self.finish_prepare(&mut records, r, spki).await?,
                    Err(e) => {
                        // The token refuses now: the step is abandoned as a refused prepare would be, so that the
                        // appliance still starts; the operator prepares again later.
                        tracing::error!(label = r.label, error = %e, "the interrupted prepare cannot be finished; abandoned");
                        // Nothing of the step may stay on the token (if this fails too, `orphans` reports it).
                        let l = r.label.clone();
                        let _ = self.blocking(move |kr| Ok(kr.destroy(&l)?)).await;
                        let mut tx = self
                            .begin("prepare-abandoned", &r.label, &e.to_string())
                            .await?;
                        tx.delete_authority(&r.label).await?;
                        tx.commit().await?;
                        records.retain(|x| x.label != r.label);
                    }
                }
            } else {
                tracing::warn!(
                    label = r.label,
                    "finishing a destroy step a stop interrupted"
                );
                self.finish_destroy(&mut records, r).await?;
            }
        }
        let result = self.take_effect(&records).await;
        lock.release().await;
        result
    }

    /// The rotation in progress for `kind`, if any: an authority preparing, prepared or published.
    fn in_progress(records: &[AuthorityRecord], kind: AuthorityKind) -> Option<&AuthorityRecord> {
        records.iter().find(|r| {
            r.kind == kind
                && matches!(
                    r.state,
                    AuthorityState::Preparing
                        | AuthorityState::Prepared
                        | AuthorityState::Published
                )
        })
    }

    /// Prepare: a new key on the token and (X.509) its root and cross-certificates. Returns the new label.
    pub async fn prepare(&self, kind: AuthorityKind) -> Result<String, RotationError> {
        self.prepare_with(kind, &Unwitnessed).await
    }

    /// [`prepare`](Self::prepare), told to `w` before the step's first commit (before the token is touched).
    pub async fn prepare_with<W: StepWitness>(
        &self,
        kind: AuthorityKind,
        w: &W,
    ) -> Result<String, RotationError> {
        if let Some(why) = &self.policy.cannot_prepare {
            return Err(RotationError::Precondition(why.clone()));
        }
        let mut records = self.records.lock().await;
        let _step = self.lock_step(&mut records).await?;
        if let Some(r) = Self::in_progress(&records, kind) {
            return Err(RotationError::Precondition(format!(
                "a {} rotation is already under way ({} is {}): activate it first",
                kind.name(),
                r.label,
                r.state.name()
            )));
        }
        let generation = records
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.generation)
            .max()
            .unwrap_or(0)
            + 1;
        let label = format!("{}-g{generation}", self.policy.label_family(kind));
        if records.iter().any(|r| r.label == label) {
            return Err(RotationError::Precondition(format!(
                "label {label:?} is taken"
            )));
        }
        let now = self.clock.now();
        let rec = AuthorityRecord {
            label: label.clone(),
            trust_domain: self.td.to_string(),
            kind,
            generation,
            state: AuthorityState::Preparing,
            token: self.keyring.token_name().to_string(),
            key_type: self.policy.key_type(kind).name().to_string(),
            public_key: None,
            certificate: None,
            chain: None,
            cross_from_previous: None,
            cross_to_previous: None,
            kid: None,
            not_after: None,
            created_at: unix(now),
            published_at: None,
            activated_at: None,
            superseded_at: None,
            issued_until: None,
            retired_at: None,
            destroy_requested_at: None,
            destroyed_at: None,
            tainted: false,
        };
        witness(w, "prepare", &label).await?;
        // A key left on the token under this label by an earlier, failed attempt that never reached the journal
        // would make generation fail; it names no authority, so it is removed first.
        let l = label.clone();
        self.blocking(move |kr| Ok(kr.destroy(&l)?)).await?;
        let mut tx = self.begin("prepare", &label, kind.name()).await?;
        tx.insert_authority(&rec).await?;
        self.commit(tx, "prepare").await?;
        records.push(rec.clone());
        let (l, key_type) = (label.clone(), self.policy.key_type(kind));
        let generated = self
            .blocking(move |kr| Ok(kr.generate(&l, key_type)?))
            .await;
        let spki = match generated {
            Ok(k) => k,
            Err(e) => {
                // Undo the journalled intent: the token refused, nothing of this step remains.
                let l = label.clone();
                let _ = self.blocking(move |kr| Ok(kr.destroy(&l)?)).await;
                let mut tx = self
                    .begin("prepare-abandoned", &label, &e.to_string())
                    .await?;
                tx.delete_authority(&label).await?;
                tx.commit().await?;
                records.retain(|r| r.label != label);
                return Err(e);
            }
        };
        crash::reached("prepare", "after-effect");
        self.finish_prepare(&mut records, rec, spki).await?;
        Ok(label)
    }

    async fn finish_prepare(
        &self,
        records: &mut [AuthorityRecord],
        mut rec: AuthorityRecord,
        spki: Vec<u8>,
    ) -> Result<(), RotationError> {
        let now = self.clock.now();
        match rec.kind {
            AuthorityKind::Jwt => {
                rec.kid = Some(crate::jwt::kid_for_spki(&spki));
                rec.not_after = Some(unix(now) + dur(self.policy.root_ttl));
            }
            AuthorityKind::X509 if self.policy.external.is_some() => {
                // Below an offline root: the certificate comes back from the ceremony (`install`); until then the
                // authority is prepared without one and cannot be published.
                tracing::warn!(
                    label = rec.label,
                    "authority key generated on the token: its certificate is awaited from the offline root (signet \
                     rotate csr writes the request, signet rotate install takes the certificate)"
                );
            }
            AuthorityKind::X509 => {
                let current = records
                    .iter()
                    .find(|r| r.kind == AuthorityKind::X509 && r.state == AuthorityState::Active)
                    .cloned()
                    .ok_or_else(|| RotationError::Precondition("no active X.509 root".into()))?;
                let td = self.td.clone();
                let (label, generation, ttl) =
                    (rec.label.clone(), rec.generation, self.policy.root_ttl);
                let spki2 = spki.clone();
                let made = self
                    .blocking(move |kr| {
                        let new_key = kr.signer(&label)?;
                        if new_key.spki_der() != spki2 {
                            return Err(RotationError::Precondition(format!(
                                "the key labelled {label:?} changed on the token"
                            )));
                        }
                        let root = Authority::self_signed_root(
                            new_key,
                            &RootRequest {
                                trust_domain: td.clone(),
                                subject: root_subject(&td, generation),
                                ttl,
                                path_len: None,
                            },
                            now,
                        )
                        .map_err(cert_err)?;
                        let old_cert = current.certificate.clone().unwrap_or_default();
                        let old = Authority::new(
                            old_cert.clone(),
                            kr.signer(&current.label)?,
                            td,
                            Vec::new(),
                            Vec::new(),
                        )
                        .map_err(cert_err)?;
                        let old_spki = current.public_key.clone().unwrap_or_default();
                        // old -> new: the new root's name and key, certified by the old root.
                        let from_previous =
                            cross_certify(&old, root.cert_der(), &spki2, now, root.not_after())?;
                        // new -> old: the old root's name and key, certified by the new root.
                        let to_previous =
                            cross_certify(&root, &old_cert, &old_spki, now, old.not_after())?;
                        Ok((
                            root.cert_der().to_vec(),
                            root.not_after(),
                            from_previous,
                            to_previous,
                        ))
                    })
                    .await?;
                rec.certificate = Some(made.0);
                rec.not_after = Some(unix(made.1));
                rec.cross_from_previous = Some(made.2);
                rec.cross_to_previous = Some(made.3);
            }
        }
        rec.public_key = Some(spki);
        rec.state = AuthorityState::Prepared;
        let mut tx = self.begin("prepared", &rec.label, rec.kind.name()).await?;
        tx.update_authority(&rec).await?;
        tx.commit().await?;
        tracing::info!(
            label = rec.label,
            kind = rec.kind.name(),
            "authority prepared"
        );
        if let Some(r) = records.iter_mut().find(|r| r.label == rec.label) {
            *r = rec;
        }
        export_metrics(records);
        Ok(())
    }

    fn awaits_certificate(r: &AuthorityRecord) -> bool {
        r.kind == AuthorityKind::X509
            && r.state == AuthorityState::Prepared
            && r.certificate.is_none()
    }

    /// Below an offline root: the X.509 authority whose certificate is awaited, if one is, and by when it must be
    /// installed for the schedule to activate it on time (the schedule's activation time less the publish lead;
    /// `None` without a schedule).
    pub async fn awaited_certificate(&self) -> Option<(String, Option<OffsetDateTime>)> {
        let records = self.records.lock().await;
        self.awaited_in(&records)
    }

    fn awaited_in(&self, records: &[AuthorityRecord]) -> Option<(String, Option<OffsetDateTime>)> {
        let r = records.iter().find(|r| Self::awaits_certificate(r))?;
        let by = self.policy.schedule.and_then(|s| {
            let active = records
                .iter()
                .find(|r| r.kind == AuthorityKind::X509 && r.state == AuthorityState::Active)?;
            let born = active
                .activated_at
                .unwrap_or(active.created_at)
                .min(active.created_at);
            let life = (active.not_after? - born).max(1) as f64;
            Some(at(
                born + (s.activate_at * life) as i64 - dur(self.policy.publish_lead)
            ))
        });
        Some((r.label.clone(), by))
    }

    /// Sets `signet_authority_certificate_awaited{kind}` (1 while an authority below an offline root waits for its
    /// certificate) and `signet_authority_certificate_awaited_by_seconds{kind}` (by when, Unix seconds; 0: no
    /// schedule or nothing awaited).
    fn export_awaited(&self, records: &[AuthorityRecord]) {
        if self.policy.external.is_none() {
            return;
        }
        let awaited = self.awaited_in(records);
        metrics::gauge!("signet_authority_certificate_awaited", "kind" => "x509")
            .set(if awaited.is_some() { 1.0 } else { 0.0 });
        let by = awaited
            .and_then(|(_, by)| by)
            .map_or(0.0, |t| unix(t) as f64);
        metrics::gauge!("signet_authority_certificate_awaited_by_seconds", "kind" => "x509")
            .set(by);
    }

    /// Below an offline root: the certificate signing request (PEM) of the X.509 authority whose certificate is
    /// awaited, signed by its key on the token, and its label.
    pub async fn certificate_request(&self) -> Result<(String, String), RotationError> {
        if self.policy.external.is_none() {
            return Err(RotationError::Precondition(
                "the X.509 authority is signet's own root (authority.x509.parent = \"self\"): there is no \
                 certificate to request"
                    .into(),
            ));
        }
        let rec = {
            let records = self.records.lock().await;
            records
                .iter()
                .find(|r| Self::awaits_certificate(r))
                .cloned()
        };
        let Some(rec) = rec else {
            return Err(RotationError::Precondition(
                "no X.509 authority awaits a certificate: run signet rotate prepare first".into(),
            ));
        };
        let td = self.td.clone();
        let label = rec.label.clone();
        let der = self
            .blocking(move |kr| {
                let key = kr.signer(&label)?;
                crate::x509::certificate_request(
                    key.as_ref(),
                    &td,
                    &intermediate_subject(&td, rec.generation),
                )
                .map_err(cert_err)
            })
            .await?;
        Ok((
            rec.label,
            pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der)),
        ))
    }

    /// Install: below an offline root, the certificate the ceremony returned for the authority that awaits one
    /// (`cert`, DER) with the CA certificates between it and the upstream root (`chain`), once
    /// [`external::check_installed`] and the authority's own checks found it fit. The authority can then be
    /// published. Returns its label.
    pub async fn install_with<W: StepWitness>(
        &self,
        cert: Vec<u8>,
        chain: Vec<Vec<u8>>,
        w: &W,
    ) -> Result<String, RotationError> {
        let Some(ext) = self.policy.external.clone() else {
            return Err(RotationError::Precondition(
                "install is for an X.509 authority below an offline root (authority.x509.parent = \"external\"); \
                 this one makes its own roots"
                    .into(),
            ));
        };
        let mut records = self.records.lock().await;
        let _step = self.lock_step(&mut records).await?;
        let Some(mut rec) = records
            .iter()
            .find(|r| Self::awaits_certificate(r))
            .cloned()
        else {
            return Err(RotationError::Precondition(
                "no X.509 authority awaits a certificate: run signet rotate prepare first".into(),
            ));
        };
        let spki = rec.public_key.clone().unwrap_or_default();
        let not_after = external::check_installed(
            &cert,
            &chain,
            &rec.label,
            &spki,
            &ext,
            OffsetDateTime::now_utc(),
        )?;
        // What signs with it must accept it too (the key on the token, the trust domain's names).
        let (label, td, c2, ch2, roots) = (
            rec.label.clone(),
            self.td.clone(),
            cert.clone(),
            chain.clone(),
            ext.roots.clone(),
        );
        self.blocking(move |kr| {
            Authority::new(c2, kr.signer(&label)?, td, ch2, roots)
                .map(|_| ())
                .map_err(|e| RotationError::Refused(format!("the certificate is not usable: {e}")))
        })
        .await?;
        rec.certificate = Some(cert);
        rec.chain = (!chain.is_empty()).then(|| chain.concat());
        rec.not_after = Some(unix(not_after));
        witness(w, "install", &rec.label).await?;
        let mut tx = self.begin("install", &rec.label, rec.kind.name()).await?;
        tx.update_authority(&rec).await?;
        self.commit(tx, "install").await?;
        let label = rec.label.clone();
        if let Some(r) = records.iter_mut().find(|r| r.label == label) {
            *r = rec;
        }
        self.take_effect(&records).await?;
        tracing::info!(label, %not_after, "authority certificate installed");
        Ok(label)
    }

    /// Publish: the prepared authority of `kind` joins the bundle.
    pub async fn publish(&self, kind: AuthorityKind) -> Result<String, RotationError> {
        self.publish_with(kind, &Unwitnessed).await
    }

    /// [`publish`](Self::publish), told to `w` before it commits.
    pub async fn publish_with<W: StepWitness>(
        &self,
        kind: AuthorityKind,
        w: &W,
    ) -> Result<String, RotationError> {
        let mut records = self.records.lock().await;
        let _step = self.lock_step(&mut records).await?;
        let Some(mut rec) = records
            .iter()
            .find(|r| r.kind == kind && r.state == AuthorityState::Prepared)
            .cloned()
        else {
            return Err(RotationError::Precondition(format!(
                "no prepared {} authority to publish: prepare one first",
                kind.name()
            )));
        };
        if Self::awaits_certificate(&rec) {
            return Err(RotationError::Precondition(awaiting_message(&rec.label)));
        }
        let now = self.clock.now();
        rec.state = AuthorityState::Published;
        rec.published_at = Some(unix(now));
        let label = rec.label.clone();
        self.commit_bundle_change("publish", rec, &mut records, w)
            .await?;
        tracing::info!(label, kind = kind.name(), "authority published");
        Ok(label)
    }

    /// Activate: the published authority of `kind` signs from now on; the active one is superseded.
    pub async fn activate(&self, kind: AuthorityKind) -> Result<String, RotationError> {
        self.activate_with(kind, &Unwitnessed).await
    }

    /// [`activate`](Self::activate), told to `w` before it commits.
    pub async fn activate_with<W: StepWitness>(
        &self,
        kind: AuthorityKind,
        w: &W,
    ) -> Result<String, RotationError> {
        let mut records = self.records.lock().await;
        let _step = self.lock_step(&mut records).await?;
        let Some(mut rec) = records
            .iter()
            .find(|r| r.kind == kind && r.state == AuthorityState::Published)
            .cloned()
        else {
            let why = match Self::in_progress(&records, kind) {
                Some(r) => format!("{} is {}: publish it first", r.label, r.state.name()),
                None => "prepare and publish one first".into(),
            };
            return Err(RotationError::Precondition(format!(
                "no published {} authority to activate: {why}",
                kind.name()
            )));
        };
        let now = self.clock.now();
        let ready = at(rec.published_at.unwrap_or(0) + dur(self.policy.publish_lead));
        if now < ready {
            return Err(RotationError::TooEarly {
                step: "activate",
                ready_at: ready,
                why: format!(
                    "{} was published at {}; relying parties need {} s ({} refresh hints) to fetch it",
                    rec.label,
                    at(rec.published_at.unwrap_or(0)),
                    self.policy.publish_lead.as_secs(),
                    PUBLISH_LEAD_HINTS
                ),
            });
        }
        let mut old = records
            .iter()
            .find(|r| r.kind == kind && r.state == AuthorityState::Active)
            .cloned();
        rec.state = AuthorityState::Active;
        rec.activated_at = Some(unix(now));
        witness(w, "activate", &rec.label).await?;
        let mut tx = self.begin("activate", &rec.label, kind.name()).await?;
        tx.update_authority(&rec).await?;
        if let Some(o) = old.as_mut() {
            o.state = AuthorityState::Superseded;
            o.superseded_at = Some(unix(now));
            let until = unix(now) + dur(self.policy.issued_ttl(kind));
            o.issued_until = Some(o.issued_until.unwrap_or(0).max(until));
            tx.update_authority(o).await?;
        }
        self.commit(tx, "activate").await?;
        for r in std::iter::once(rec.clone()).chain(old) {
            if let Some(x) = records.iter_mut().find(|x| x.label == r.label) {
                *x = r;
            }
        }
        self.take_effect(&records).await?;
        tracing::info!(label = rec.label, kind = kind.name(), "authority activated");
        Ok(rec.label)
    }

    /// Retire: the superseded authority of `kind` leaves the bundle, once nothing it signed is valid.
    pub async fn retire(&self, kind: AuthorityKind) -> Result<String, RotationError> {
        self.retire_with(kind, &Unwitnessed).await
    }

    /// [`retire`](Self::retire), told to `w` before it commits.
    pub async fn retire_with<W: StepWitness>(
        &self,
        kind: AuthorityKind,
        w: &W,
    ) -> Result<String, RotationError> {
        let mut records = self.records.lock().await;
        let _step = self.lock_step(&mut records).await?;
        let Some(mut rec) = records
            .iter()
            .find(|r| r.kind == kind && r.state == AuthorityState::Superseded)
            .cloned()
        else {
            return Err(RotationError::Precondition(format!(
                "no superseded {} authority to retire (the active one never leaves the bundle)",
                kind.name()
            )));
        };
        let now = self.clock.now();
        // First what is in use now: credentials this process and the live replicas serve (renewed right after
        // activate, so this clears within a heartbeat or two); then the time bound of everything else it signed.
        let held = self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(spki, until, _)| Some(spki) == rec.public_key.as_ref() && *until > unix(now))
            .map(|(_, until, what)| (*until, what.clone()));
        if let Some((until, what)) = held {
            return Err(RotationError::Precondition(format!(
                "{} still has a valid descendant in use here: {what} (valid until {}); it is renewed by the active \
                 root right after activate (see the log for why it was not), then retire",
                rec.label,
                at(until)
            )));
        }
        if let Some(cert) = rec.certificate.as_deref() {
            let root = crate::x509::root_id(cert);
            let since = OffsetDateTime::now_utc().unix_timestamp() - dur(crate::store::LIVE_WINDOW);
            let on_old: Vec<String> = self
                .store
                .live_replicas(since)
                .await?
                .into_iter()
                .filter(|r| r.may_serve_root(&root))
                .map(|r| match r.serving_roots {
                    Some(_) => format!("{} ({})", r.id, r.address),
                    None => format!("{} ({}, which does not report its roots)", r.id, r.address),
                })
                .collect();
            if !on_old.is_empty() {
                return Err(RotationError::Precondition(format!(
                    "{} still signs credentials that live replicas serve: {}; each replica renews its own \
                     credentials with the active root right after activate and reports it in its next heartbeat: \
                     retry in a few seconds, or see those replicas' logs",
                    rec.label,
                    on_old.join(", ")
                )));
            }
        }
        let until = rec.issued_until.unwrap_or(0);
        if unix(now) < until {
            return Err(RotationError::TooEarly {
                step: "retire",
                ready_at: at(until),
                why: format!(
                    "{} still has valid descendants: what it signed may be valid until then",
                    rec.label
                ),
            });
        }
        rec.state = AuthorityState::Retired;
        rec.retired_at = Some(unix(now));
        let label = rec.label.clone();
        self.commit_bundle_change("retire", rec, &mut records, w)
            .await?;
        tracing::info!(label, kind = kind.name(), "authority retired");
        Ok(label)
    }

    /// Taint: marks the authority `label` compromised (SPIRE is told at once).
    pub async fn taint(&self, label: &str) -> Result<(), RotationError> {
        self.taint_with(label, &Unwitnessed).await
    }

    /// [`taint`](Self::taint), told to `w` before it commits (not at all when the authority is already tainted).
    pub async fn taint_with<W: StepWitness>(
        &self,
        label: &str,
        w: &W,
    ) -> Result<(), RotationError> {
        let mut records = self.records.lock().await;
        let _step = self.lock_step(&mut records).await?;
        let Some(mut rec) = records.iter().find(|r| r.label == label).cloned() else {
            return Err(RotationError::NotFound(label.to_string()));
        };
        if !rec.state.in_bundle() {
            return Err(RotationError::Precondition(format!(
                "{label} is {}, not in the bundle: only a published, active or superseded authority can be tainted",
                rec.state.name()
            )));
        }
        if rec.tainted {
            return Ok(());
        }
        rec.tainted = true;
        self.commit_bundle_change("taint", rec, &mut records, w)
            .await?;
        tracing::warn!(label, "authority tainted");
        Ok(())
    }

    /// Destroy: removes a retired authority's key from the token.
    pub async fn destroy(&self, label: &str) -> Result<(), RotationError> {
        self.destroy_with(label, &Unwitnessed).await
    }

    /// [`destroy`](Self::destroy), told to `w` before the request commits (not at all when the key is already
    /// destroyed).
    pub async fn destroy_with<W: StepWitness>(
        &self,
        label: &str,
        w: &W,
    ) -> Result<(), RotationError> {
        let mut records = self.records.lock().await;
        let _step = self.lock_step(&mut records).await?;
        let Some(mut rec) = records.iter().find(|r| r.label == label).cloned() else {
            return Err(RotationError::NotFound(label.to_string()));
        };
        if rec.state != AuthorityState::Retired {
            return Err(RotationError::Precondition(format!(
                "{label} is {}: only a retired authority's key can be destroyed",
                rec.state.name()
            )));
        }
        if rec.destroyed_at.is_some() {
            return Ok(());
        }
        rec.destroy_requested_at = Some(unix(self.clock.now()));
        witness(w, "destroy", label).await?;
        let mut tx = self.begin("destroy", label, rec.kind.name()).await?;
        tx.update_authority(&rec).await?;
        self.commit(tx, "destroy").await?;
        if let Some(r) = records.iter_mut().find(|r| r.label == label) {
            *r = rec.clone();
        }
        self.finish_destroy(&mut records, rec).await
    }

    async fn finish_destroy(
        &self,
        records: &mut [AuthorityRecord],
        mut rec: AuthorityRecord,
    ) -> Result<(), RotationError> {
        let l = rec.label.clone();
        self.blocking(move |kr| Ok(kr.destroy(&l)?)).await?;
        crash::reached("destroy", "after-effect");
        rec.destroyed_at = Some(unix(self.clock.now()));
        let mut tx = self.begin("destroyed", &rec.label, rec.kind.name()).await?;
        tx.update_authority(&rec).await?;
        tx.commit().await?;
        tracing::info!(label = rec.label, "authority key destroyed on the token");
        if let Some(r) = records.iter_mut().find(|r| r.label == rec.label) {
            *r = rec;
        }
        Ok(())
    }

    /// Runs the schedule once: for each kind, the next step that is due (prepare and publish at `prepare_at` of
    /// the active authority's life, activate at `activate_at` once the publish lead has passed, retire once nothing
    /// the superseded one signed is valid). Returns the steps taken as (step, label).
    pub async fn tick(&self) -> Vec<(&'static str, String)> {
        let Some(s) = self.policy.schedule else {
            return Vec::new();
        };
        let mut done = Vec::new();
        for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
            let records = self.records.lock().await.clone();
            let now = unix(self.clock.now());
            let Some(active) = records
                .iter()
                .find(|r| r.kind == kind && r.state == AuthorityState::Active)
            else {
                continue;
            };
            let born = active
                .activated_at
                .unwrap_or(active.created_at)
                .min(active.created_at);
            let life = (active.not_after.unwrap_or(i64::MAX) - born).max(1) as f64;
            let age = (now - born) as f64;
            // Below an offline root the successor is prepared early (at half of prepare_at), so that the ceremony
            // has time, and published as soon as its certificate is installed (the bundle does not change).
            let external = kind == AuthorityKind::X509 && self.policy.external.is_some();
            let in_progress = Self::in_progress(&records, kind);
            let result = match in_progress.map(|r| r.state) {
                None if external && age >= s.prepare_at / 2.0 * life => {
                    self.prepare(kind).await.map(|l| ("prepare", l))
                }
                Some(AuthorityState::Prepared)
                    if external && in_progress.is_some_and(Self::awaits_certificate) =>
                {
                    if let Some((label, by)) = self.awaited_in(&records) {
                        tracing::warn!(
                            label,
                            by = %by.map_or_else(|| "-".to_string(), |t| t.to_string()),
                            "the X.509 authority's certificate is awaited from the offline root: signet rotate csr \
                             writes its request, signet rotate install takes the certificate"
                        );
                    }
                    Err(RotationError::Precondition(String::new()))
                }
                Some(AuthorityState::Prepared) if external => {
                    self.publish(kind).await.map(|l| ("publish", l))
                }
                None if external => Err(RotationError::Precondition(String::new())),
                None if age >= s.prepare_at * life => match self.prepare(kind).await {
                    Ok(_) => self.publish(kind).await.map(|l| ("prepare+publish", l)),
                    Err(e) => Err(e),
                },
                // A prepare+publish the schedule started and a stop interrupted; one prepared by hand waits for its
                // operator until the schedule would have published anyway.
                Some(AuthorityState::Prepared) if age >= s.prepare_at * life => {
                    self.publish(kind).await.map(|l| ("publish", l))
                }
                Some(AuthorityState::Published) if age >= s.activate_at * life => {
                    self.activate(kind).await.map(|l| ("activate", l))
                }
                _ => Err(RotationError::Precondition(String::new())),
            };
            match result {
                Ok(step) => done.push(step),
                Err(RotationError::Precondition(m)) if m.is_empty() => {}
                Err(RotationError::TooEarly { .. }) => {}
                Err(e) => {
                    tracing::warn!(kind = kind.name(), error = %e, "scheduled rotation step failed")
                }
            }
            let superseded_due = records.iter().any(|r| {
                r.kind == kind
                    && r.state == AuthorityState::Superseded
                    && r.issued_until.unwrap_or(0) <= now
            });
            if superseded_due {
                match self.retire(kind).await {
                    Ok(l) => done.push(("retire", l)),
                    Err(e) => {
                        tracing::warn!(kind = kind.name(), error = %e, "scheduled retirement failed")
                    }
                }
            }
        }
        done
    }
}

/// The authorities a fresh datastore adopts (see [`Authorities::open`]).
#[derive(Debug, Clone)]
pub struct Initial {
    /// The root key's label.
    pub x509_label: String,
    /// Its self-signed certificate (below an offline root: the installed intermediate certificate).
    pub x509_root: Vec<u8>,
    /// Below an offline root: the CA certificates between `x509_root` and the upstream root (else empty).
    pub x509_chain: Vec<Vec<u8>>,
    /// The JWT key's label.
    pub jwt_label: String,
}
