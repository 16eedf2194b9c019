//! SPIRE's `KeyManager` v1: a SPIRE server's own CA and JWT keys, generated on the token and used through the
//! signing pipeline.
//!
//! Keys are namespaced per calling SPIRE server: the token label is `spire-km/<ns>/<key id>/<generation>`, where
//! `<ns>` is the first 16 hex digits of SHA-256 of the caller's SPIFFE ID and, when the plug-in sends one, its key
//! identifier (the `signet-key-identifier` request header, from `key_identifier_value` / `key_identifier_file` in
//! `plugin_data`, as SPIRE's cloud KMS key managers have it), so two servers never share a key even when they use
//! the same key ids, and neither do two servers of an HA pair that share one SPIFFE ID. A call without a key
//! identifier uses the SPIFFE ID's namespace alone, as before identifiers existed, so a running SPIRE deployment
//! keeps its keys; adding an identifier later moves that server to a new, empty namespace (SPIRE then generates
//! new keys) and the old one is swept once unused. A key identifier is 1 to 128 characters of `A-Z a-z 0-9 - _ .`;
//! anything else is INVALID_ARGUMENT.
//!
//! Every KeyManager call records its namespace's last use in the datastore (at most every [`KeyStore::touch_every`]
//! per replica, at once for `GenerateKey`), shared by the replicas. [`sweep_once`] (run every
//! `[key_manager] sweep_every` by [`sweep`]) destroys on the token the keys of every namespace not used for
//! `[key_manager] sweep_after` (default 14 days, as SPIRE's KMS key managers): the datastore decides, in one
//! transaction that deletes the namespace only if it is still unused, so a namespace used within the window is never
//! swept and two replicas never sweep the same one. Each sweep writes an audit line (`method` `Sweep`, outcome
//! `destroyed`) and counts `signet_keymanager_swept_namespaces_total` and `signet_keymanager_swept_keys_total`. `GenerateKey` on an existing id makes a new key under a new generation (a new
//! fingerprint) and destroys the old one. The fingerprint is the SHA-256 of the key's SubjectPublicKeyInfo, in hex.
//! `SignData` takes a digest of the hash the request names (its length is checked) and returns ECDSA signatures as
//! ASN.1 DER, RSA signatures as PKCS#1 v1.5 or PSS (salt length = hash length) per the request.
//!
//! Status codes: a bad request is INVALID_ARGUMENT (unknown or unspecified key type, bad key id, unknown hash
//! algorithm, no signer options, a hash or PSS salt the key does not sign with, a digest whose length is not the
//! named hash's, an empty one included); a key id the caller has not generated is NOT_FOUND. Token failures are
//! classified by kind ([`token_status`]): only transient ones are UNAVAILABLE (SPIRE retries UNAVAILABLE without
//! end), a key type the token cannot make is UNIMPLEMENTED, a token unusable as configured is FAILED_PRECONDITION.

use std::collections::HashMap;
use std::sync::Arc;

use ring::digest::{SHA256, digest};
use signet_pkcs11::{KeyGenOptions, SignAlgorithm, Token};
use signet_proto::spire::plugin::server::keymanager::v1 as pb;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use super::status::token_status;
use super::{AppState, Caller, Subject, pipeline_status};
use crate::audit::{AuditRecord, Outcome};
use crate::ca::Clock;
use crate::pipeline::{Pipeline, PipelineKey};
use crate::policy::Service;

const LABEL_PREFIX: &str = "spire-km/";

/// The request header that carries the plug-in's key identifier.
pub const KEY_IDENTIFIER_HEADER: &str = "signet-key-identifier";

/// Whether `id` is a usable key identifier: 1 to 128 characters of `A-Z a-z 0-9 - _ .`.
pub fn valid_key_identifier(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The key identifier a request carries, if any; INVALID_ARGUMENT when it is not one.
fn key_identifier_of<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    let Some(v) = request.metadata().get(KEY_IDENTIFIER_HEADER) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| {
        Status::invalid_argument(format!("{KEY_IDENTIFIER_HEADER} is not ASCII text"))
    })?;
    if !valid_key_identifier(v) {
        return Err(Status::invalid_argument(format!(
            "{KEY_IDENTIFIER_HEADER} {:?} is not a key identifier: 1 to 128 characters of A-Z a-z 0-9 - _ .",
            v.chars().take(140).collect::<String>()
        )));
    }
    Ok(Some(v.to_string()))
}

#[derive(Debug)]
struct KmKey {
    label: String,
    key_type: pb::KeyType,
    spki: Vec<u8>,
    fingerprint: String,
    key: PipelineKey,
}

impl KmKey {
    fn public_key(&self, id: &str) -> pb::PublicKey {
        pb::PublicKey {
            id: id.to_string(),
            r#type: self.key_type as i32,
            pkix_data: self.spki.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// The KeyManager keys on the token.
#[derive(Debug)]
pub struct KeyStore {
    token: Token,
    pipeline: Pipeline,
    keys: std::sync::RwLock<HashMap<(String, String), Arc<KmKey>>>,
    /// The datastore's record of which key answers for each id, shared by every replica.
    store: std::sync::OnceLock<crate::store::Store>,
    /// Serialises key generation (rare: SPIRE rotations), never held while signing.
    generating: Mutex<()>,
    /// The time last uses are recorded in and the sweep reads.
    clock: std::sync::OnceLock<Arc<dyn Clock>>,
    /// When this replica last recorded each namespace's use (unix seconds of the clock).
    touched: std::sync::Mutex<HashMap<String, i64>>,
    /// See [`KeyStore::touch_every`].
    touch_every: std::sync::OnceLock<i64>,
}

/// The namespace of a caller's keys: the SPIFFE ID's alone without a key identifier (as before identifiers
/// existed), or the pair's. A SPIFFE ID holds no newline and an identifier neither, so no two pairs meet.
pub fn namespace(caller: &str, key_identifier: Option<&str>) -> String {
    let d = match key_identifier {
        None => digest(&SHA256, caller.as_bytes()),
        Some(k) => digest(&SHA256, format!("{caller}\n{k}").as_bytes()),
    };
    hex::encode(&d.as_ref()[..8])
}

/// A caller's namespace, as a KeyManager call names it.
#[derive(Debug, Clone)]
struct Space {
    ns: String,
    key_identifier: Option<String>,
}

fn fingerprint(spki: &[u8]) -> String {
    hex::encode(digest(&SHA256, spki).as_ref())
}

fn proto_key_type(t: signet_pkcs11::KeyType) -> Option<pb::KeyType> {
    Some(match t {
        signet_pkcs11::KeyType::EcP256 => pb::KeyType::EcP256,
        signet_pkcs11::KeyType::EcP384 => pb::KeyType::EcP384,
        signet_pkcs11::KeyType::Rsa2048 => pb::KeyType::Rsa2048,
        signet_pkcs11::KeyType::Rsa4096 => pb::KeyType::Rsa4096,
        _ => return None,
    })
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn parse_label(label: &str) -> Option<(String, String, u128)> {
    let rest = label.strip_prefix(LABEL_PREFIX)?;
    let mut parts = rest.split('/');
    let (ns, id, generation) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let generation = u128::from_str_radix(generation, 16).ok()?;
    Some((ns.to_string(), id.to_string(), generation))
}

/// Why the KeyManager's keys cannot be loaded, recorded or swept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyManagerError {
    /// No session on the token.
    #[error("key manager: cannot open a session: {0}")]
    Session(#[source] signet_pkcs11::Error),
    /// The token's keys cannot be listed.
    #[error("key manager: cannot list keys: {0}")]
    List(#[source] signet_pkcs11::Error),
    /// A key on the token cannot be used (its public key, its type).
    #[error("key manager: {}", .0.message())]
    Register(#[source] Status),
    /// The datastore failed.
    #[error("key manager: {0}")]
    Store(#[source] crate::store::StoreError),
    /// The datastore failed during a sweep.
    #[error("key manager sweep: {0}")]
    SweepStore(#[source] crate::store::StoreError),
    /// The blocking task listing the token's keys did not finish.
    #[error("key manager sweep: the token task failed: {0}")]
    SweepTask(#[source] tokio::task::JoinError),
    /// The token's keys cannot be listed during a sweep.
    #[error("key manager sweep: cannot list the token's keys: {0}")]
    SweepList(#[source] signet_pkcs11::Error),
    /// The sweep's audit line cannot be written: nothing is destroyed.
    #[error("key manager sweep: {0}")]
    SweepAudit(#[source] crate::audit::AuditError),
}

impl KeyStore {
    /// Loads the KeyManager keys already on `token` (the newest generation of each id; older ones left by an
    /// interrupted `GenerateKey` are destroyed) and registers them with `pipeline`, which must sign with that
    /// token. Blocking: call it from a blocking context.
    pub fn load(token: Token, pipeline: Pipeline) -> Result<Self, KeyManagerError> {
        let mut session = token.session().map_err(KeyManagerError::Session)?;
        let listed = session.list_keys().map_err(KeyManagerError::List)?;
        let mut newest: HashMap<(String, String), (u128, String)> = HashMap::new();
        let mut stale = Vec::new();
        for k in listed {
            let Some((ns, id, generation)) = parse_label(&k.label) else {
                continue;
            };
            match newest.get(&(ns.clone(), id.clone())) {
                Some((g, _)) if *g >= generation => stale.push(k.label.clone()),
                Some((_, old)) => {
                    stale.push(old.clone());
                    newest.insert((ns, id), (generation, k.label.clone()));
                }
                None => {
                    newest.insert((ns, id), (generation, k.label.clone()));
                }
            }
        }
        for label in stale {
            if let Err(e) = session.destroy_key(&label) {
                tracing::warn!(label, error = %e, "key manager: cannot destroy a replaced key");
            }
        }
        let mut keys = HashMap::new();
        for ((ns, id), (_, label)) in newest {
            let k = register(&mut session, &pipeline, &label).map_err(KeyManagerError::Register)?;
            keys.insert((ns, id), Arc::new(k));
        }
        Ok(Self {
            token,
            pipeline,
            keys: std::sync::RwLock::new(keys),
            store: std::sync::OnceLock::new(),
            generating: Mutex::new(()),
            clock: std::sync::OnceLock::new(),
            touched: std::sync::Mutex::new(HashMap::new()),
            touch_every: std::sync::OnceLock::new(),
        })
    }

    /// Keeps the keys' records in `store` from now on, and looks there for keys another replica generated; last
    /// uses are recorded in `clock`'s time. The namespaces of keys found on the token that the datastore does not
    /// know yet are recorded as used now (so they get the whole sweep window).
    pub async fn attach_store(
        &self,
        store: crate::store::Store,
        clock: Arc<dyn Clock>,
        sweep_after: std::time::Duration,
    ) -> Result<(), KeyManagerError> {
        let now = clock.now().unix_timestamp();
        let _ = self.clock.set(clock);
        let _ = self.touch_every.set(Self::touch_every(sweep_after));
        let namespaces: std::collections::BTreeSet<String> = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|(ns, _)| ns.clone())
            .collect();
        for ns in namespaces {
            store
                .adopt_keymanager_namespace(&ns, now)
                .await
                .map_err(KeyManagerError::Store)?;
        }
        let _ = self.store.set(store);
        Ok(())
    }

    /// How often (seconds) a replica records a namespace's use at most: a quarter of `sweep_after`, 5 minutes at
    /// most. The sweep adds it to its window, so a use not recorded yet never lets it destroy a key.
    pub fn touch_every(sweep_after: std::time::Duration) -> i64 {
        i64::try_from((sweep_after / 4).as_secs().min(300)).unwrap_or(300)
    }

    fn now(&self) -> i64 {
        self.clock.get().map_or_else(
            || time::OffsetDateTime::now_utc().unix_timestamp(),
            |c| c.now().unix_timestamp(),
        )
    }

    /// Records that `space` of `caller` is in use (see [`touch_every`](Self::touch_every)); `now`: whatever the
    /// last record (`GenerateKey`). A datastore failure is returned; the caller decides.
    async fn touch(
        &self,
        caller: &str,
        space: &Space,
        now_anyway: bool,
    ) -> Result<(), crate::store::StoreError> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        let every = self.touch_every.get().copied().unwrap_or(300);
        let now = self.now();
        let fresh = self
            .touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&space.ns)
            .is_some_and(|t| now.saturating_sub(*t) < every && now >= *t);
        if fresh && !now_anyway {
            return Ok(());
        }
        store
            .touch_keymanager_namespace(&crate::store::KeyManagerNamespace {
                namespace: space.ns.clone(),
                caller: caller.to_string(),
                key_identifier: space.key_identifier.clone().unwrap_or_default(),
                last_used_at: now,
            })
            .await?;
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(space.ns.clone(), now);
        Ok(())
    }

    /// Forgets every key of namespace `ns` (swept here or by another replica).
    pub fn forget_namespace(&self, ns: &str) {
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(n, _), _| n != ns);
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(ns);
    }

    fn cached(&self, ns: &str, id: &str) -> Option<Arc<KmKey>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(ns.to_string(), id.to_string()))
            .cloned()
    }

    /// The key `id` of namespace `ns`: known here, or (with a datastore) generated through another replica and
    /// found on the shared token by the label the datastore records.
    async fn get(&self, ns: &str, id: &str) -> Result<Option<Arc<KmKey>>, Status> {
        let ns = ns.to_string();
        if let Some(k) = self.cached(&ns, id) {
            return Ok(Some(k));
        }
        let Some(store) = self.store.get() else {
            return Ok(None);
        };
        // The datastore is a service signet reaches over the network (or a file): its failures are transient.
        let rec = store
            .keymanager_key(&ns, id)
            .await
            .map_err(|e| Status::unavailable(format!("key manager: {e}")))?;
        let Some(rec) = rec else {
            return Ok(None);
        };
        let (token, pipeline, label) = (self.token.clone(), self.pipeline.clone(), rec.label);
        let found = tokio::task::spawn_blocking(move || {
            let mut s = token
                .session()
                .map_err(|e| token_status(&e, "key manager: cannot open a session"))?;
            register(&mut s, &pipeline, &label)
        })
        .await
        .map_err(join_status)
        .and_then(|r| r)?;
        let k = Arc::new(found);
        self.insert(ns, id.to_string(), k.clone());
        Ok(Some(k))
    }

    /// Forgets what is known of `id` in namespace `ns` (another replica replaced it); `None`: of every key.
    pub fn forget(&self, which: Option<(&str, &str)>) {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        match which {
            Some((ns, id)) => {
                keys.remove(&(ns.to_string(), id.to_string()));
            }
            None => keys.clear(),
        }
    }

    /// Destroys a key generated for a `GenerateKey` that did not complete (its audit line or its datastore record
    /// could not be written); a failure is logged (`signet token` lists what is left).
    async fn discard(&self, label: &str) {
        let (token, label) = (self.token.clone(), label.to_string());
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = token.session().and_then(|mut s| s.destroy_key(&label)) {
                tracing::warn!(label, error = %e, "key manager: cannot destroy a discarded key");
            }
        })
        .await;
    }

    fn insert(&self, ns: String, id: String, key: Arc<KmKey>) {
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert((ns, id), key);
    }
}

/// What one sweep did: the namespaces it swept and how many keys it destroyed on the token.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// The namespaces swept.
    pub namespaces: Vec<String>,
    /// Keys destroyed on the token.
    pub keys: usize,
}

/// Destroys the keys of every namespace not used for `after` (plus the recording interval, see
/// [`KeyStore::touch_every`]). For each stale namespace: the token's keys of that namespace are listed, then the
/// datastore claims the sweep (only if the namespace is still unused: a call in between keeps it), then the audit
/// line is written, then the listed keys are destroyed. A key generated after the listing belongs to a call that
/// recorded its use first, so the claim fails and nothing is destroyed.
pub async fn sweep_once(
    state: &AppState,
    after: std::time::Duration,
) -> Result<Swept, KeyManagerError> {
    let ks = &state.keys;
    let mut out = Swept::default();
    let Some(store) = ks.store.get() else {
        return Ok(out);
    };
    let after = i64::try_from(after.as_secs()).unwrap_or(i64::MAX);
    let every = ks.touch_every.get().copied().unwrap_or(300);
    let now = ks.now();
    let cutoff = now.saturating_sub(after).saturating_sub(every);
    let stale = store
        .stale_keymanager_namespaces(cutoff)
        .await
        .map_err(KeyManagerError::SweepStore)?;
    for n in stale {
        let prefix = format!("{LABEL_PREFIX}{}/", n.namespace);
        let token = ks.token.clone();
        let labels = tokio::task::spawn_blocking(move || {
            let mut s = token.session()?;
            Ok::<_, signet_pkcs11::Error>(
                s.list_keys()?
                    .into_iter()
                    .map(|k| k.label)
                    .filter(|l| l.starts_with(&prefix))
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .map_err(KeyManagerError::SweepTask)?
        .map_err(KeyManagerError::SweepList)?;
        let Some(ids) = store
            .claim_keymanager_sweep(&n.namespace, cutoff)
            .await
            .map_err(KeyManagerError::SweepStore)?
        else {
            continue;
        };
        ks.forget_namespace(&n.namespace);
        let since = time::OffsetDateTime::from_unix_timestamp(n.last_used_at)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| n.last_used_at.to_string());
        let mut r = AuditRecord::new(&n.caller, "key-manager", "Sweep", Outcome::Destroyed);
        r.key_id = (!ids.is_empty()).then(|| ids.join(","));
        r.reason = Some(format!(
            "namespace {} ({}) unused since {since}: {} key(s) destroyed on the token",
            n.namespace,
            if n.key_identifier.is_empty() {
                "no key identifier".to_string()
            } else {
                format!("key identifier {:?}", n.key_identifier)
            },
            labels.len()
        ));
        // Audit first: if it cannot be written the keys stay on the token (found and adopted at the next start).
        let records = [r];
        super::count(&records);
        state
            .audit
            .record(&records)
            .await
            .map_err(KeyManagerError::SweepAudit)?;
        let token = ks.token.clone();
        let destroyed = tokio::task::spawn_blocking(move || {
            let mut n = 0usize;
            for label in labels {
                match token.session().and_then(|mut s| s.destroy_key(&label)) {
                    Ok(()) => n += 1,
                    Err(e) => {
                        tracing::warn!(label, error = %e, "key manager sweep: cannot destroy a key")
                    }
                }
            }
            n
        })
        .await
        .unwrap_or(0);
        metrics::counter!("signet_keymanager_swept_namespaces_total").increment(1);
        metrics::counter!("signet_keymanager_swept_keys_total").increment(destroyed as u64);
        tracing::info!(namespace = %n.namespace, caller = %n.caller, key_identifier = %n.key_identifier,
            last_used = %since, keys = destroyed, "key manager: swept an unused namespace");
        out.keys += destroyed;
        out.namespaces.push(n.namespace);
    }
    Ok(out)
}

/// Runs [`sweep_once`] every `every` until shutdown; `after` zero: never.
pub async fn sweep(
    state: Arc<AppState>,
    after: std::time::Duration,
    every: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    if after.is_zero() || every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::until_shutdown(&mut shutdown) => return,
        }
        if let Err(e) = sweep_once(&state, after).await {
            tracing::warn!(error = %e, "key manager: the sweep failed; it runs again later");
        }
    }
}

fn register(
    session: &mut signet_pkcs11::TokenSession,
    pipeline: &Pipeline,
    label: &str,
) -> Result<KmKey, Status> {
    let found = session
        .find_key(label)
        .map_err(|e| token_status(&e, &format!("key {label:?}")))?;
    let key_type = proto_key_type(found.key_type()).ok_or_else(|| {
        Status::failed_precondition(format!("key {label:?} has a type SPIRE does not use"))
    })?;
    let spki = session
        .public_key_der(label)
        .map_err(|e| token_status(&e, &format!("key {label:?}")))?;
    let key = pipeline.key(label).map_err(|e| {
        let s = pipeline_status(&e);
        Status::new(s.code(), format!("key {label:?}: {}", s.message()))
    })?;
    Ok(KmKey {
        label: label.to_string(),
        key_type,
        fingerprint: fingerprint(&spki),
        spki,
        key,
    })
}

fn join_status(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("key manager: the token task failed: {e}"))
}

/// The stages of a `SignData` in the appliance, recorded per successful call in the histogram
/// `signet_keymanager_sign_stage_seconds{stage}`: `admit` (authentication of the caller's credential, policy,
/// in-flight bound), `checks` (key look-up, algorithm and digest checks, rate limit), `pipeline` (queue, HSM worker,
/// C_Sign, reply, post-sign check: the pipeline's own histograms split it further) and `audit` (the audit line, DER
/// encoding of the signature).
pub const SIGN_STAGE_SECONDS: &str = "signet_keymanager_sign_stage_seconds";

fn sign_stages() -> &'static [metrics::Histogram; 4] {
    static STAGES: std::sync::OnceLock<[metrics::Histogram; 4]> = std::sync::OnceLock::new();
    STAGES.get_or_init(|| {
        ["admit", "checks", "pipeline", "audit"]
            .map(|stage| metrics::histogram!(SIGN_STAGE_SECONDS, "stage" => stage))
    })
}

/// The KeyManager service.
#[derive(Debug, Clone)]
pub struct KeyManagerService {
    state: Arc<AppState>,
}

impl KeyManagerService {
    /// The service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// Admits a call, reads its key identifier (a bad one is refused with INVALID_ARGUMENT, audited) and records
    /// the use of its namespace. A datastore that cannot record the use does not stop the call (it is logged):
    /// the sweep needs the same datastore to act, and `GenerateKey` needs it anyway.
    async fn enter<T>(
        &self,
        request: &Request<T>,
        method: &'static str,
    ) -> Result<(Caller, Space), Status> {
        let st = &self.state;
        let caller = st.admit(request, Service::KeyManager, method).await?;
        let key_identifier = match key_identifier_of(request) {
            Ok(k) => k,
            Err(s) => return Err(st.refuse(&caller, s, None).await),
        };
        let space = Space {
            ns: namespace(&caller.id, key_identifier.as_deref()),
            key_identifier,
        };
        if let Err(e) = st
            .keys
            .touch(&caller.id, &space, method == "GenerateKey")
            .await
        {
            tracing::warn!(caller = %caller.id, namespace = %space.ns, error = %e,
                "key manager: cannot record the namespace's use");
        }
        Ok((caller, space))
    }
}

fn hash_of(h: i32) -> Result<signet_pkcs11::HashAlg, Status> {
    match pb::HashAlgorithm::try_from(h) {
        Ok(pb::HashAlgorithm::Sha256) => Ok(signet_pkcs11::HashAlg::Sha256),
        Ok(pb::HashAlgorithm::Sha384) => Ok(signet_pkcs11::HashAlg::Sha384),
        Ok(pb::HashAlgorithm::Sha512) => Ok(signet_pkcs11::HashAlg::Sha512),
        Ok(other) => Err(Status::invalid_argument(format!(
            "hash algorithm {} is not supported: use SHA256, SHA384 or SHA512",
            other.as_str_name()
        ))),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown hash algorithm {h}"
        ))),
    }
}

fn sign_algorithm(
    key_type: pb::KeyType,
    opts: Option<pb::sign_data_request::SignerOpts>,
) -> Result<(SignAlgorithm, usize), Status> {
    use pb::sign_data_request::SignerOpts;
    use signet_pkcs11::HashAlg;
    let (hash, pss) = match opts {
        None => {
            return Err(Status::invalid_argument(
                "signer_opts is required: give hash_algorithm or pss_options",
            ));
        }
        Some(SignerOpts::HashAlgorithm(h)) => (hash_of(h)?, None),
        Some(SignerOpts::PssOptions(p)) => (hash_of(p.hash_algorithm)?, Some(p.salt_length)),
    };
    let len = hash.output_len();
    let alg = match (key_type, hash, pss) {
        (pb::KeyType::EcP256, HashAlg::Sha256, None) => SignAlgorithm::EcdsaSha256,
        (pb::KeyType::EcP384, HashAlg::Sha384, None) => SignAlgorithm::EcdsaSha384,
        (pb::KeyType::EcP256 | pb::KeyType::EcP384, _, None) => {
            return Err(Status::invalid_argument(format!(
                "a {} key signs {} digests only",
                key_type.as_str_name(),
                if key_type == pb::KeyType::EcP256 {
                    "SHA256"
                } else {
                    "SHA384"
                }
            )));
        }
        (pb::KeyType::EcP256 | pb::KeyType::EcP384, _, Some(_)) => {
            return Err(Status::invalid_argument(
                "PSS options apply to RSA keys only",
            ));
        }
        (pb::KeyType::Rsa2048 | pb::KeyType::Rsa4096, h, None) => match h {
            HashAlg::Sha256 => SignAlgorithm::RsaPkcs1Sha256,
            HashAlg::Sha384 => SignAlgorithm::RsaPkcs1Sha384,
            _ => SignAlgorithm::RsaPkcs1Sha512,
        },
        (pb::KeyType::Rsa2048 | pb::KeyType::Rsa4096, h, Some(salt)) => {
            // Go's rsa.PSSSaltLengthAuto (0) and PSSSaltLengthEqualsHash (-1) both verify a salt of the hash length.
            let fits = salt == 0 || salt == -1 || usize::try_from(salt).is_ok_and(|s| s == len);
            if !fits {
                return Err(Status::invalid_argument(format!(
                    "PSS salt length {salt} is not supported: use the hash length ({len}), -1 or 0"
                )));
            }
            match h {
                HashAlg::Sha256 => SignAlgorithm::RsaPssSha256,
                HashAlg::Sha384 => SignAlgorithm::RsaPssSha384,
                _ => SignAlgorithm::RsaPssSha512,
            }
        }
        (pb::KeyType::UnspecifiedKeyType, ..) => {
            return Err(Status::internal("key of unknown type"));
        }
    };
    Ok((alg, len))
}

fn token_key_type(t: i32) -> Result<(pb::KeyType, signet_pkcs11::KeyType), Status> {
    let kt = pb::KeyType::try_from(t)
        .map_err(|_| Status::invalid_argument(format!("unknown key type {t}")))?;
    let tt = match kt {
        pb::KeyType::EcP256 => signet_pkcs11::KeyType::EcP256,
        pb::KeyType::EcP384 => signet_pkcs11::KeyType::EcP384,
        pb::KeyType::Rsa2048 => signet_pkcs11::KeyType::Rsa2048,
        pb::KeyType::Rsa4096 => signet_pkcs11::KeyType::Rsa4096,
        pb::KeyType::UnspecifiedKeyType => {
            return Err(Status::invalid_argument(
                "key_type is required: EC_P256, EC_P384, RSA_2048 or RSA_4096",
            ));
        }
    };
    Ok((kt, tt))
}

#[tonic::async_trait]
impl pb::key_manager_server::KeyManager for KeyManagerService {
    async fn generate_key(
        &self,
        request: Request<pb::GenerateKeyRequest>,
    ) -> Result<Response<pb::GenerateKeyResponse>, Status> {
        let st = &self.state;
        let (caller, space) = self.enter(&request, "GenerateKey").await?;
        let req = request.into_inner();
        let subject = || Some(Subject::KeyId(req.key_id.clone()));
        if !valid_key_id(&req.key_id) {
            let s =
                Status::invalid_argument("key_id must be 1 to 128 characters of A-Z a-z 0-9 - _ .");
            return Err(st.refuse(&caller, s, subject()).await);
        }
        let (kt, tt) = match token_key_type(req.key_type) {
            Ok(v) => v,
            Err(s) => return Err(st.refuse(&caller, s, subject()).await),
        };
        if let Err(d) = st
            .grant(&caller)
            .and_then(|g| g.take(1).map_err(|d| super::denied_status(&d)))
        {
            return Err(st.refuse(&caller, d, subject()).await);
        }
        let ks = &st.keys;
        let ns = space.ns.clone();
        // One generation at a time per store: key generation is rare (SPIRE rotations) and must not interleave
        // with the replacement of the same id.
        let generating = ks.generating.lock().await;
        let generation = time::OffsetDateTime::now_utc()
            .unix_timestamp_nanos()
            .max(0) as u128;
        let label = format!("{LABEL_PREFIX}{ns}/{}/{generation:x}", req.key_id);
        let old = ks.get(&ns, &req.key_id).await.ok().flatten();
        let (token, pipeline, l) = (ks.token.clone(), ks.pipeline.clone(), label.clone());
        let made = tokio::task::spawn_blocking(move || {
            let mut s = token
                .session()
                .map_err(|e| token_status(&e, "cannot open a session on the token"))?;
            s.generate_key(&l, tt, KeyGenOptions::default())
                .map_err(|e| {
                    token_status(
                        &e,
                        &format!("the token could not generate a {} key", kt.as_str_name()),
                    )
                })?;
            register(&mut s, &pipeline, &l)
        })
        .await
        .map_err(join_status)
        .and_then(|r| r);
        let made = match made {
            Ok(k) => Arc::new(KmKey { key_type: kt, ..k }),
            Err(s) => {
                let mut r = caller.record(Outcome::Failed);
                r.key_id = Some(req.key_id.clone());
                r.reason = Some(s.message().to_string());
                r.code = Some(super::code_name(s.code()));
                st.audit(&[r]).await?;
                return Err(s);
            }
        };
        // The audit line is written before the key is recorded, usable or returned; if it cannot be, or the
        // datastore cannot record the key, the new key is destroyed and nothing changes.
        let mut r = caller.record(Outcome::KeyUsed);
        r.key_id = Some(req.key_id.clone());
        r.authority = Some(made.fingerprint.clone());
        r.reason = Some(format!("generated {}", kt.as_str_name()));
        if let Err(s) = st.audit(&[r]).await {
            ks.discard(&made.label).await;
            return Err(s);
        }
        // Every replica finds the new key through the datastore before the old one is destroyed.
        if let Some(store) = ks.store.get() {
            let rec = crate::store::KeyManagerRecord {
                namespace: ns.clone(),
                key_id: req.key_id.clone(),
                label: made.label.clone(),
                public_key: made.spki.clone(),
                updated_at: time::OffsetDateTime::now_utc().unix_timestamp(),
            };
            let kept = async {
                let mut tx = store.begin().await?;
                tx.put_keymanager_key(&rec).await?;
                tx.commit().await
            };
            if let Err(e) = kept.await {
                ks.discard(&made.label).await;
                let s = Status::unavailable(format!(
                    "the datastore cannot record the new key ({e}); it was discarded, the old one is unchanged"
                ));
                let mut r = caller.record(Outcome::Failed);
                r.key_id = Some(req.key_id.clone());
                r.code = Some(super::code_name(s.code()));
                r.reason = Some(s.message().to_string());
                st.audit(&[r]).await?;
                return Err(s);
            }
        }
        ks.insert(ns, req.key_id.clone(), made.clone());
        drop(generating);
        if let Some(old) = old {
            let token = ks.token.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = token.session().and_then(|mut s| s.destroy_key(&old.label)) {
                    tracing::warn!(label = %old.label, error = %e, "key manager: cannot destroy a replaced key");
                }
            })
            .await;
        }
        Ok(Response::new(pb::GenerateKeyResponse {
            public_key: Some(made.public_key(&req.key_id)),
        }))
    }

    async fn get_public_key(
        &self,
        request: Request<pb::GetPublicKeyRequest>,
    ) -> Result<Response<pb::GetPublicKeyResponse>, Status> {
        let st = &self.state;
        let (caller, space) = self.enter(&request, "GetPublicKey").await?;
        let id = request.into_inner().key_id;
        let subject = || Some(Subject::KeyId(id.clone()));
        match st.keys.get(&space.ns, &id).await {
            Ok(Some(k)) => Ok(Response::new(pb::GetPublicKeyResponse {
                public_key: Some(k.public_key(&id)),
            })),
            Ok(None) => {
                let s = Status::not_found(format!(
                    "no key {id:?} for this caller: call GenerateKey first"
                ));
                Err(st.refuse(&caller, s, subject()).await)
            }
            Err(s) => Err(st.refuse(&caller, s, subject()).await),
        }
    }

    async fn get_public_keys(
        &self,
        request: Request<pb::GetPublicKeysRequest>,
    ) -> Result<Response<pb::GetPublicKeysResponse>, Status> {
        let st = &self.state;
        let (caller, space) = self.enter(&request, "GetPublicKeys").await?;
        let ns = space.ns;
        if let Some(store) = st.keys.store.get() {
            let ids = match store.keymanager_ids(&ns).await {
                Ok(ids) => ids,
                Err(e) => {
                    let s = Status::unavailable(format!("key manager: {e}"));
                    return Err(st.refuse(&caller, s, None).await);
                }
            };
            for id in ids {
                if let Err(s) = st.keys.get(&ns, &id).await {
                    return Err(st.refuse(&caller, s, Some(Subject::KeyId(id))).await);
                }
            }
        }
        let mut public_keys: Vec<pb::PublicKey> = st
            .keys
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((n, _), _)| *n == ns)
            .map(|((_, id), k)| k.public_key(id))
            .collect();
        public_keys.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(pb::GetPublicKeysResponse { public_keys }))
    }

    async fn sign_data(
        &self,
        request: Request<pb::SignDataRequest>,
    ) -> Result<Response<pb::SignDataResponse>, Status> {
        let st = &self.state;
        let started = std::time::Instant::now();
        let (caller, space) = self.enter(&request, "SignData").await?;
        let admitted = std::time::Instant::now();
        let req = request.into_inner();
        let subject = || Some(Subject::KeyId(req.key_id.clone()));
        let found = match st.keys.get(&space.ns, &req.key_id).await {
            Ok(k) => k,
            Err(s) => return Err(st.refuse(&caller, s, subject()).await),
        };
        let Some(k) = found else {
            let s = Status::not_found(format!(
                "no key {:?} for this caller: call GenerateKey first",
                req.key_id
            ));
            return Err(st.refuse(&caller, s, subject()).await);
        };
        let alg = sign_algorithm(k.key_type, req.signer_opts).and_then(|(alg, len)| {
            if req.data.len() == len {
                Ok(alg)
            } else {
                Err(Status::invalid_argument(format!(
                    "data must be a {len}-byte digest of the named hash, got {} bytes",
                    req.data.len()
                )))
            }
        });
        let alg = match alg {
            Ok(a) => a,
            Err(s) => return Err(st.refuse(&caller, s, subject()).await),
        };
        if let Err(d) = st
            .grant(&caller)
            .and_then(|g| g.take(1).map_err(|d| super::denied_status(&d)))
        {
            return Err(st.refuse(&caller, d, subject()).await);
        }
        let submitted = std::time::Instant::now();
        let signed = k
            .key
            .pipeline()
            .submit_digest(&k.key, alg, &req.data, caller.deadline)
            .await;
        let returned = std::time::Instant::now();
        let sig = match signed {
            Ok(raw) if matches!(k.key_type, pb::KeyType::EcP256 | pb::KeyType::EcP384) => {
                crate::keys::ecdsa_raw_to_der(&raw).map_err(|e| {
                    Status::internal(format!("bad ECDSA signature from the token: {e}"))
                })
            }
            Ok(sig) => Ok(sig),
            Err(e) => Err(pipeline_status(&e)),
        };
        let mut r = caller.record(Outcome::KeyUsed);
        r.key_id = Some(req.key_id.clone());
        r.authority = Some(k.fingerprint.clone());
        if let Err(s) = &sig {
            r.outcome = Outcome::Failed;
            r.code = Some(super::code_name(s.code()));
            r.reason = Some(s.message().to_string());
        }
        st.audit(&[r]).await?;
        if sig.is_ok() {
            let stages = sign_stages();
            stages[0].record(admitted.duration_since(started).as_secs_f64());
            stages[1].record(submitted.duration_since(admitted).as_secs_f64());
            stages[2].record(returned.duration_since(submitted).as_secs_f64());
            stages[3].record(returned.elapsed().as_secs_f64());
        }
        Ok(Response::new(pb::SignDataResponse {
            signature: sig?,
            key_fingerprint: k.fingerprint.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet_pkcs11::cryptoki::context::Function;
    use signet_pkcs11::cryptoki::error::{Error as CkError, RvError};
    use signet_pkcs11::{Error, ErrorKind};
    use tonic::Code;

    fn rv(rv: RvError) -> Error {
        Error::pkcs11(
            "C_GenerateKeyPair",
            CkError::Pkcs11(rv, Function::GenerateKeyPair),
        )
    }

    #[test]
    fn token_errors_are_classified_by_kind() {
        let cases = [
            (rv(RvError::DeviceRemoved), Code::Unavailable),
            (rv(RvError::DeviceError), Code::Unavailable),
            (rv(RvError::SessionHandleInvalid), Code::Unavailable),
            (rv(RvError::FunctionFailed), Code::Unavailable),
            (rv(RvError::GeneralError), Code::Unavailable),
            (Error::new(ErrorKind::Stale, "stale"), Code::Unavailable),
            (rv(RvError::MechanismInvalid), Code::Unimplemented),
            (rv(RvError::CurveNotSupported), Code::Unimplemented),
            (rv(RvError::KeySizeRange), Code::Unimplemented),
            (
                Error::new(ErrorKind::NotSupported, "no RSA-4096 on this token"),
                Code::Unimplemented,
            ),
            (rv(RvError::PinIncorrect), Code::FailedPrecondition),
            (rv(RvError::PinLocked), Code::FailedPrecondition),
            (
                Error::new(ErrorKind::PinUnavailable, "no PIN"),
                Code::FailedPrecondition,
            ),
            (
                Error::new(ErrorKind::TokenNotFound, "gone"),
                Code::FailedPrecondition,
            ),
            (rv(RvError::TemplateInconsistent), Code::Internal),
            (rv(RvError::TemplateIncomplete), Code::Internal),
            (rv(RvError::AttributeValueInvalid), Code::Internal),
            (rv(RvError::TokenWriteProtected), Code::Internal),
            (Error::new(ErrorKind::KeyExists, "exists"), Code::Internal),
        ];
        for (e, want) in cases {
            let s = token_status(&e, "generating");
            assert_eq!(s.code(), want, "{e}");
            assert!(s.message().starts_with("generating: "), "{}", s.message());
        }
    }

    #[test]
    fn unknown_and_unspecified_key_types_are_invalid_arguments() {
        for t in [0, 99, -1] {
            let e = token_key_type(t).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{t}");
        }
        assert!(token_key_type(pb::KeyType::Rsa4096 as i32).is_ok());
    }

    #[test]
    fn signer_options_are_checked() {
        use pb::sign_data_request::{PssOptions, SignerOpts};
        let bad = [
            (pb::KeyType::EcP256, None),
            (pb::KeyType::EcP256, Some(SignerOpts::HashAlgorithm(77))),
            (
                pb::KeyType::EcP256,
                Some(SignerOpts::HashAlgorithm(pb::HashAlgorithm::Sha384 as i32)),
            ),
            (
                pb::KeyType::EcP256,
                Some(SignerOpts::PssOptions(PssOptions {
                    salt_length: 32,
                    hash_algorithm: pb::HashAlgorithm::Sha256 as i32,
                })),
            ),
            (
                pb::KeyType::Rsa2048,
                Some(SignerOpts::PssOptions(PssOptions {
                    salt_length: 7,
                    hash_algorithm: pb::HashAlgorithm::Sha256 as i32,
                })),
            ),
            (
                pb::KeyType::Rsa2048,
                Some(SignerOpts::HashAlgorithm(
                    pb::HashAlgorithm::UnspecifiedHashAlgorithm as i32,
                )),
            ),
        ];
        for (kt, opts) in bad {
            let e = sign_algorithm(kt, opts).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{kt:?} {opts:?}");
        }
    }
}
