//! The simulated device: one slot, one token, its sessions, login state, objects, and the behaviour of a network
//! HSM around them (latency, the session limit, the signature rate limit, injected faults). This is the whole
//! PKCS#11 logic in safe Rust; the FFI layer only converts C arguments into calls on [`Device`] and back.
//!
//! Locking: the token state (login, objects) sits behind one `RwLock` taken briefly; each session has its own
//! mutex; signing and key generation run (and sleep out their latency) without holding any shared lock, so
//! concurrent sessions overlap as they do on a real network HSM.

use crate::config::{Config, ConfigError, RateLimitMode};
use crate::control::ControlWatch;
use crate::crypto::{
    Curve, KeyMaterial, KeySpec, MECHANISMS, SignMechanism, ulong_bytes, ulong_from,
};
use crate::faults::{Applied, Counters, FaultPlan, Faults, OpKind};
use crate::limiter::TokenBucket;
use crate::rv::{CkResult, Rv};
use crate::store::{
    AeadKey, Attributes, ObjectPayload, PinRecord, Sealed, Store, StoreError, StoredObject,
    TokenRecord, decode_attributes, encode_attributes, open, random_bytes, seal,
};
use cryptoki_sys::*;
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// The only slot.
pub const SLOT_ID: CK_SLOT_ID = 0;
/// Shortest PIN accepted.
pub const MIN_PIN_LEN: usize = 4;
/// Longest PIN accepted.
pub const MAX_PIN_LEN: usize = 255;

/// Attributes whose values never leave the token.
const SENSITIVE_ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_VALUE,
    CKA_PRIVATE_EXPONENT,
    CKA_PRIME_1,
    CKA_PRIME_2,
    CKA_EXPONENT_1,
    CKA_EXPONENT_2,
    CKA_COEFFICIENT,
];

/// Attributes C_SetAttributeValue may change.
const MODIFIABLE_ATTRIBUTES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_LABEL,
    CKA_ID,
    CKA_SUBJECT,
    CKA_START_DATE,
    CKA_END_DATE,
    CKA_APPLICATION,
];

/// Why the device could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The token directory is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who is logged in (login is per token, shared by all sessions, as PKCS#11 says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginState {
    /// Nobody.
    Public,
    /// The normal user.
    User,
    /// The Security Officer.
    So,
}

/// An object's attributes and, for a private key, its key.
#[derive(Debug, Clone)]
pub struct Object {
    attrs: Attributes,
    key: Option<Arc<KeyMaterial>>,
}

impl Object {
    fn bool_attr(&self, t: CK_ATTRIBUTE_TYPE, default: bool) -> bool {
        self.attrs
            .get(&t)
            .and_then(|v| v.first())
            .map(|b| *b != 0)
            .unwrap_or(default)
    }
}

#[derive(Debug)]
struct ObjectEntry {
    /// File id for token objects.
    file: Option<String>,
    private: bool,
    /// Session that owns a session object.
    owner: Option<CK_SESSION_HANDLE>,
    /// Ciphertext of a private token object.
    sealed: Option<Sealed>,
    /// The object, when readable (always for public objects; after user login for private token objects).
    open: Option<Arc<Object>>,
}

#[derive(Debug)]
struct TokenState {
    record: Option<TokenRecord>,
    login: LoginState,
    token_key: Option<AeadKey>,
    objects: BTreeMap<CK_OBJECT_HANDLE, ObjectEntry>,
}

#[derive(Debug)]
struct SignOp {
    mechanism: SignMechanism,
    key: Arc<KeyMaterial>,
    buffer: Vec<u8>,
    multipart: bool,
}

#[derive(Debug)]
struct Session {
    rw: bool,
    find: Option<(Vec<CK_OBJECT_HANDLE>, usize)>,
    sign: Option<SignOp>,
}

/// CK_TOKEN_INFO's variable parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Label (unpadded).
    pub label: String,
    /// Serial number.
    pub serial: String,
    /// CKF_* flags.
    pub flags: CK_FLAGS,
    /// Open sessions.
    pub sessions: u64,
    /// Open read/write sessions.
    pub rw_sessions: u64,
    /// Session limit (0: none).
    pub max_sessions: u64,
}

/// CK_SESSION_INFO's variable parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    /// CKS_* state.
    pub state: CK_STATE,
    /// CKF_RW_SESSION | CKF_SERIAL_SESSION.
    pub flags: CK_FLAGS,
}

/// What C_GetAttributeValue answers for one attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrValue {
    /// The value.
    Value(Vec<u8>),
    /// The value exists but never leaves the token.
    Sensitive,
    /// The object has no such attribute.
    Invalid,
}

/// What C_Sign / C_SignFinal produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignOutput {
    /// The caller asked for the length only; the operation stays active.
    Length(usize),
    /// The caller's buffer is too short for a signature of this length; the operation stays active.
    TooSmall(usize),
    /// The signature; the operation has ended.
    Signature(Vec<u8>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The simulated HSM.
#[derive(Debug)]
pub struct Device {
    cfg: Config,
    store: Store,
    state: RwLock<TokenState>,
    sessions: Mutex<HashMap<CK_SESSION_HANDLE, Arc<Mutex<Session>>>>,
    next_handle: AtomicU64,
    faults: Mutex<Faults>,
    limiter: Option<Mutex<TokenBucket>>,
    control: Option<Mutex<ControlWatch>>,
}

fn check_pin_len(pin: &[u8]) -> CkResult<()> {
    if pin.len() < MIN_PIN_LEN || pin.len() > MAX_PIN_LEN {
        return Err(Rv(CKR_PIN_LEN_RANGE));
    }
    Ok(())
}

fn bool_of(template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)], t: CK_ATTRIBUTE_TYPE) -> Option<bool> {
    template
        .iter()
        .rev()
        .find(|(k, _)| *k == t)
        .and_then(|(_, v)| v.first())
        .map(|b| *b != 0)
}

fn value_of(template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)], t: CK_ATTRIBUTE_TYPE) -> Option<&[u8]> {
    template
        .iter()
        .rev()
        .find(|(k, _)| *k == t)
        .map(|(_, v)| v.as_slice())
}

fn b(v: bool) -> Vec<u8> {
    vec![u8::from(v)]
}

impl Device {
    /// Opens the device described by `cfg`, loading the token from its directory.
    pub fn open(cfg: Config) -> Result<Device, DeviceError> {
        let store = Store::open(cfg.token_dir()?)?;
        let record = store.load_token()?;
        let now = Instant::now();
        let (faults, _) = Faults::new(cfg.faults.clone(), now);
        let limiter = (cfg.max_ops_per_sec > 0.0).then(|| {
            Mutex::new(TokenBucket::new(
                cfg.max_ops_per_sec,
                cfg.effective_burst(),
                now,
            ))
        });
        let control = cfg.control_file.clone().map(|p| {
            Mutex::new(ControlWatch::new(
                p,
                Duration::from_millis(cfg.control_poll_ms),
            ))
        });
        let dev = Device {
            store,
            state: RwLock::new(TokenState {
                record,
                login: LoginState::Public,
                token_key: None,
                objects: BTreeMap::new(),
            }),
            sessions: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            faults: Mutex::new(faults),
            limiter,
            control,
            cfg,
        };
        dev.load_objects()?;
        dev.poll();
        Ok(dev)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn handle(&self) -> CK_ULONG {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn read(&self) -> RwLockReadGuard<'_, TokenState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, TokenState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn load_objects(&self) -> Result<(), StoreError> {
        let stored = self.store.load_objects()?;
        let mut st = self.write();
        for (id, obj) in stored {
            let entry = match obj {
                StoredObject::Public { attributes } => {
                    let Some(attrs) = decode_attributes(&attributes) else {
                        continue;
                    };
                    ObjectEntry {
                        file: Some(id),
                        private: false,
                        owner: None,
                        sealed: None,
                        open: Some(Arc::new(Object { attrs, key: None })),
                    }
                }
                StoredObject::Sealed { sealed } => ObjectEntry {
                    file: Some(id),
                    private: true,
                    owner: None,
                    sealed: Some(sealed),
                    open: None,
                },
            };
            let h = self.handle();
            st.objects.insert(h, entry);
        }
        Ok(())
    }

    // ----- faults, control, latency -----

    /// Reads the control file if it is due, and applies a changed plan.
    pub fn poll(&self) {
        let Some(control) = &self.control else { return };
        // Another thread polling right now is as good as polling ourselves.
        let Ok(mut watch) = control.try_lock() else {
            return;
        };
        let now = Instant::now();
        if let Some(result) = watch.poll(now) {
            let applied = {
                let mut f = lock(&self.faults);
                match result {
                    Ok(plan) => {
                        f.set_error(None);
                        f.apply(plan, now)
                    }
                    Err(msg) => {
                        f.set_error(Some(msg));
                        Applied::default()
                    }
                }
            };
            if applied.drop_sessions {
                self.drop_all_sessions();
            }
            if applied.renumber_objects {
                self.renumber_objects();
            }
        }
        let counters = {
            let mut f = lock(&self.faults);
            f.take_dirty().then(|| f.counters().clone())
        };
        if let Some(c) = counters {
            watch.write_status(now, &c);
        }
    }

    /// Writes the status now if something changed and a write is due (`force`: regardless of the interval).
    fn flush_status(&self, force: bool) {
        let Some(control) = &self.control else { return };
        let Ok(mut watch) = control.try_lock() else {
            return;
        };
        let now = Instant::now();
        if !watch.status_due(now, force) {
            return;
        }
        let counters = {
            let mut f = lock(&self.faults);
            f.take_dirty().then(|| f.counters().clone())
        };
        if let Some(c) = counters {
            watch.write_status(now, &c);
        }
    }

    /// Called when the library is finalised: the last counters reach the status file.
    pub fn shutdown(&self) {
        self.flush_status(true);
    }

    /// Takes the fault engine out (leaving a fresh one), to carry it over a re-initialisation of the library in the
    /// same process: a device does not forget that it was unplugged, nor re-arm a one-shot fault, because its
    /// driver was finalised and initialised again.
    pub fn take_faults(&self) -> Faults {
        let (fresh, _) = Faults::new(FaultPlan::default(), Instant::now());
        std::mem::replace(&mut *lock(&self.faults), fresh)
    }

    /// Puts back a fault engine taken from the previous device of this process (see [`Device::take_faults`]).
    pub fn carry_faults(&self, faults: Faults) {
        *lock(&self.faults) = faults;
    }

    /// The counters of injected faults.
    pub fn counters(&self) -> Counters {
        lock(&self.faults).counters().clone()
    }

    /// Drops every session and the login, as a device reset does.
    /// Gives every object a new handle (the old ones become invalid); sessions, login and objects stay.
    fn renumber_objects(&self) {
        {
            let mut st = self.write();
            let objects = std::mem::take(&mut st.objects);
            for (_, entry) in objects {
                let h = self.handle();
                st.objects.insert(h, entry);
            }
        }
        // A search in progress would hand out the old handles: end it (the state lock is released first, and each
        // session is locked on its own).
        let sessions: Vec<_> = lock(&self.sessions).values().cloned().collect();
        for s in sessions {
            lock(&s).find = None;
        }
    }

    fn drop_all_sessions(&self) {
        lock(&self.sessions).clear();
        let mut st = self.write();
        st.objects.retain(|_, e| e.owner.is_none());
        Self::logout_locked(&mut st);
    }

    /// Whether the token is present (slot calls report it; they never fail for an unplugged token).
    pub fn token_present(&self) -> bool {
        self.poll();
        lock(&self.faults).present(Instant::now())
    }

    /// Entry of every call that needs the token: control poll, unplug check, the fault for `op`, call latency.
    fn enter(&self, op: Option<OpKind>) -> CkResult<()> {
        self.poll();
        let result = {
            let mut f = lock(&self.faults);
            let r = f.check_present(Instant::now());
            match (r, op) {
                (Ok(()), Some(op)) => f.check_op(op),
                (r, _) => r,
            }
        };
        if result.is_err() {
            self.flush_status(false);
        }
        result?;
        if self.cfg.call_latency_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.cfg.call_latency_ms));
        }
        Ok(())
    }

    /// A round trip to the device for a signature or a key generation: rate limit, latency, injected failure.
    fn round_trip(&self, op: OpKind) -> CkResult<()> {
        if op == OpKind::Sign
            && let Some(limiter) = &self.limiter
        {
            match self.cfg.rate_limit {
                RateLimitMode::Wait => {
                    let wait = lock(limiter).reserve(Instant::now());
                    if !wait.is_zero() {
                        lock(&self.faults).count_rate_limited();
                        std::thread::sleep(wait);
                    }
                }
                RateLimitMode::Reject => {
                    if !lock(limiter).try_take(Instant::now()) {
                        lock(&self.faults).count_rate_limited();
                        self.flush_status(false);
                        return Err(self.cfg.rate_limit_rv);
                    }
                }
            }
        }
        let mut latency = self.cfg.latency();
        if self.cfg.jitter_ms > 0 {
            latency += Duration::from_millis(rand::thread_rng().gen_range(0..=self.cfg.jitter_ms));
        }
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
        let result = {
            let mut f = lock(&self.faults);
            f.check_present(Instant::now())
                .and_then(|()| f.check_op(op))
        };
        if result.is_err() {
            self.flush_status(false);
        }
        result
    }

    fn session(&self, h: CK_SESSION_HANDLE) -> CkResult<Arc<Mutex<Session>>> {
        lock(&self.sessions)
            .get(&h)
            .cloned()
            .ok_or(Rv(CKR_SESSION_HANDLE_INVALID))
    }

    // ----- slot and token -----

    /// CK_TOKEN_INFO.
    pub fn token_info(&self) -> CkResult<TokenInfo> {
        self.enter(None)?;
        let (sessions, rw_sessions) = {
            let map = lock(&self.sessions);
            let rw = map.values().filter(|s| lock(s).rw).count() as u64;
            (map.len() as u64, rw)
        };
        let st = self.read();
        let mut flags = CKF_RNG | CKF_LOGIN_REQUIRED;
        let (label, serial) = match &st.record {
            Some(r) => {
                flags |= CKF_TOKEN_INITIALIZED;
                if let Some(u) = &r.user {
                    flags |= CKF_USER_PIN_INITIALIZED;
                    flags |= self.pin_flags(
                        u.failures,
                        CKF_USER_PIN_COUNT_LOW,
                        CKF_USER_PIN_FINAL_TRY,
                        CKF_USER_PIN_LOCKED,
                    );
                }
                flags |= self.pin_flags(
                    r.so.failures,
                    CKF_SO_PIN_COUNT_LOW,
                    CKF_SO_PIN_FINAL_TRY,
                    CKF_SO_PIN_LOCKED,
                );
                (r.label.clone(), r.serial.clone())
            }
            None => (String::new(), String::new()),
        };
        Ok(TokenInfo {
            label,
            serial,
            flags,
            sessions,
            rw_sessions,
            max_sessions: self.cfg.max_sessions,
        })
    }

    fn pin_flags(
        &self,
        failures: u32,
        low: CK_FLAGS,
        final_try: CK_FLAGS,
        locked: CK_FLAGS,
    ) -> CK_FLAGS {
        let max = self.cfg.max_pin_failures;
        if max == 0 || failures == 0 {
            0
        } else if failures >= max {
            locked
        } else if failures + 1 == max {
            low | final_try
        } else {
            low
        }
    }

    fn pin_locked(&self, rec: &PinRecord) -> bool {
        self.cfg.max_pin_failures > 0 && rec.failures >= self.cfg.max_pin_failures
    }

    /// The mechanisms offered.
    pub fn mechanisms(&self) -> CkResult<Vec<CK_MECHANISM_TYPE>> {
        self.enter(None)?;
        Ok(MECHANISMS.iter().map(|m| m.0).collect())
    }

    /// CK_MECHANISM_INFO of one mechanism: (min key size, max key size, flags).
    pub fn mechanism_info(&self, m: CK_MECHANISM_TYPE) -> CkResult<(CK_ULONG, CK_ULONG, CK_FLAGS)> {
        self.enter(None)?;
        MECHANISMS
            .iter()
            .find(|x| x.0 == m)
            .map(|x| (x.1, x.2, x.3))
            .ok_or(Rv(CKR_MECHANISM_INVALID))
    }

    /// C_InitToken: (re)initialises the token, destroying every object.
    pub fn init_token(&self, so_pin: &[u8], label: &str) -> CkResult<()> {
        self.enter(None)?;
        check_pin_len(so_pin)?;
        if !lock(&self.sessions).is_empty() {
            return Err(Rv(CKR_SESSION_EXISTS));
        }
        let existing = self.read().record.clone();
        if let Some(rec) = &existing {
            if self.pin_locked(&rec.so) {
                return Err(Rv(CKR_PIN_LOCKED));
            }
            if rec.so.unlock(so_pin).is_none() {
                self.count_failure(false)?;
                return Err(Rv(CKR_PIN_INCORRECT));
            }
        }
        let token_key: AeadKey = Zeroizing::new(random_bytes::<32>()?);
        let so = PinRecord::new(so_pin, &token_key, self.cfg.pin_kdf_iterations)?;
        let record = TokenRecord {
            version: 1,
            label: label.trim_end().to_string(),
            serial: hex::encode(random_bytes::<8>()?),
            so,
            user: None,
        };
        let mut st = self.write();
        self.store.delete_all_objects()?;
        self.store.save_token(&record)?;
        st.objects.clear();
        st.record = Some(record);
        st.login = LoginState::Public;
        st.token_key = None;
        Ok(())
    }

    fn count_failure(&self, user: bool) -> CkResult<()> {
        let mut st = self.write();
        let Some(rec) = st.record.as_mut() else {
            return Ok(());
        };
        let pin = if user {
            rec.user.as_mut()
        } else {
            Some(&mut rec.so)
        };
        if let Some(p) = pin {
            p.failures = p.failures.saturating_add(1);
        }
        let rec = rec.clone();
        self.store.save_token(&rec)?;
        Ok(())
    }

    // ----- sessions -----

    /// C_OpenSession.
    pub fn open_session(&self, rw: bool) -> CkResult<CK_SESSION_HANDLE> {
        self.enter(Some(OpKind::OpenSession))?;
        if self.read().record.is_none() {
            return Err(Rv(CKR_TOKEN_NOT_RECOGNIZED));
        }
        if !rw && self.read().login == LoginState::So {
            return Err(Rv(CKR_SESSION_READ_WRITE_SO_EXISTS));
        }
        let mut map = lock(&self.sessions);
        if self.cfg.max_sessions > 0 && map.len() as u64 >= self.cfg.max_sessions {
            return Err(Rv(CKR_SESSION_COUNT));
        }
        let h = self.handle();
        map.insert(
            h,
            Arc::new(Mutex::new(Session {
                rw,
                find: None,
                sign: None,
            })),
        );
        Ok(h)
    }

    /// C_CloseSession: its session objects go with it; the last session's close logs out.
    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> CkResult<()> {
        self.enter(None)?;
        let remaining = {
            let mut map = lock(&self.sessions);
            map.remove(&h).ok_or(Rv(CKR_SESSION_HANDLE_INVALID))?;
            map.len()
        };
        let mut st = self.write();
        st.objects.retain(|_, e| e.owner != Some(h));
        if remaining == 0 {
            Self::logout_locked(&mut st);
        }
        Ok(())
    }

    /// C_CloseAllSessions.
    pub fn close_all_sessions(&self) -> CkResult<()> {
        self.enter(None)?;
        self.drop_all_sessions();
        Ok(())
    }

    /// C_GetSessionInfo.
    pub fn session_info(&self, h: CK_SESSION_HANDLE) -> CkResult<SessionInfo> {
        self.enter(None)?;
        let s = self.session(h)?;
        let rw = lock(&s).rw;
        let state = match (self.read().login, rw) {
            (LoginState::Public, false) => CKS_RO_PUBLIC_SESSION,
            (LoginState::Public, true) => CKS_RW_PUBLIC_SESSION,
            (LoginState::User, false) => CKS_RO_USER_FUNCTIONS,
            (LoginState::User, true) => CKS_RW_USER_FUNCTIONS,
            (LoginState::So, _) => CKS_RW_SO_FUNCTIONS,
        };
        let flags = CKF_SERIAL_SESSION | if rw { CKF_RW_SESSION } else { 0 };
        Ok(SessionInfo { state, flags })
    }

    /// The login state (for tests and diagnostics).
    pub fn login_state(&self) -> LoginState {
        self.read().login
    }

    // ----- PINs and login -----

    /// C_Login.
    pub fn login(&self, h: CK_SESSION_HANDLE, user_type: CK_USER_TYPE, pin: &[u8]) -> CkResult<()> {
        self.enter(Some(OpKind::Login))?;
        self.session(h)?;
        let user = match user_type {
            CKU_USER => true,
            CKU_SO => false,
            _ => return Err(Rv(CKR_USER_TYPE_INVALID)),
        };
        let rec = {
            let st = self.read();
            match (st.login, user) {
                (LoginState::User, true) | (LoginState::So, false) => {
                    return Err(Rv(CKR_USER_ALREADY_LOGGED_IN));
                }
                (LoginState::User, false) | (LoginState::So, true) => {
                    return Err(Rv(CKR_USER_ANOTHER_ALREADY_LOGGED_IN));
                }
                _ => {}
            }
            let record = st.record.as_ref().ok_or(Rv(CKR_TOKEN_NOT_RECOGNIZED))?;
            if user {
                record
                    .user
                    .clone()
                    .ok_or(Rv(CKR_USER_PIN_NOT_INITIALIZED))?
            } else {
                record.so.clone()
            }
        };
        if !user && lock(&self.sessions).values().any(|s| !lock(s).rw) {
            return Err(Rv(CKR_SESSION_READ_ONLY_EXISTS));
        }
        if self.pin_locked(&rec) {
            return Err(Rv(CKR_PIN_LOCKED));
        }
        // The slow PIN hash runs without holding the token lock.
        let Some(key) = rec.unlock(pin) else {
            self.count_failure(user)?;
            return Err(Rv(CKR_PIN_INCORRECT));
        };
        let mut st = self.write();
        // Another session may have logged in while the PIN was hashed: the same user is "already
        // logged in" (the application is), only the other user type is refused.
        match (st.login, user) {
            (LoginState::Public, _) => {}
            (LoginState::User, true) | (LoginState::So, false) => {
                return Err(Rv(CKR_USER_ALREADY_LOGGED_IN));
            }
            _ => return Err(Rv(CKR_USER_ANOTHER_ALREADY_LOGGED_IN)),
        }
        if rec.failures > 0
            && let Some(r) = st.record.as_mut()
        {
            let p = if user {
                r.user.as_mut()
            } else {
                Some(&mut r.so)
            };
            if let Some(p) = p {
                p.failures = 0;
            }
            let r = r.clone();
            self.store.save_token(&r)?;
        }
        if user {
            for (h, e) in st.objects.iter_mut() {
                if let (Some(sealed), Some(file)) = (&e.sealed, &e.file) {
                    match open(&key, file.as_bytes(), sealed).and_then(|p| payload_to_object(&p)) {
                        Some(obj) => e.open = Some(Arc::new(obj)),
                        None => {
                            // A damaged or foreign file stays invisible rather than failing the login.
                            let _ = h;
                        }
                    }
                }
            }
            st.login = LoginState::User;
        } else {
            st.login = LoginState::So;
        }
        st.token_key = Some(key);
        Ok(())
    }

    fn logout_locked(st: &mut TokenState) {
        st.login = LoginState::Public;
        st.token_key = None;
        for e in st.objects.values_mut() {
            if e.sealed.is_some() {
                e.open = None;
            }
        }
    }

    /// C_Logout.
    pub fn logout(&self, h: CK_SESSION_HANDLE) -> CkResult<()> {
        self.enter(None)?;
        self.session(h)?;
        let mut st = self.write();
        if st.login == LoginState::Public {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        Self::logout_locked(&mut st);
        Ok(())
    }

    /// C_InitPIN: the SO sets the user PIN.
    pub fn init_pin(&self, h: CK_SESSION_HANDLE, pin: &[u8]) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        if !lock(&s).rw {
            return Err(Rv(CKR_SESSION_READ_ONLY));
        }
        check_pin_len(pin)?;
        let mut st = self.write();
        if st.login != LoginState::So {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        let key = st.token_key.clone().ok_or(Rv(CKR_GENERAL_ERROR))?;
        let user = PinRecord::new(pin, &key, self.cfg.pin_kdf_iterations)?;
        let rec = st.record.as_mut().ok_or(Rv(CKR_TOKEN_NOT_RECOGNIZED))?;
        rec.user = Some(user);
        let rec = rec.clone();
        self.store.save_token(&rec)?;
        Ok(())
    }

    /// C_SetPIN: changes the SO PIN in an SO session, the user PIN otherwise.
    pub fn set_pin(&self, h: CK_SESSION_HANDLE, old: &[u8], new: &[u8]) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        if !lock(&s).rw {
            return Err(Rv(CKR_SESSION_READ_ONLY));
        }
        check_pin_len(new)?;
        let (so, rec) = {
            let st = self.read();
            let record = st.record.as_ref().ok_or(Rv(CKR_TOKEN_NOT_RECOGNIZED))?;
            if st.login == LoginState::So {
                (true, record.so.clone())
            } else {
                (
                    false,
                    record
                        .user
                        .clone()
                        .ok_or(Rv(CKR_USER_PIN_NOT_INITIALIZED))?,
                )
            }
        };
        if self.pin_locked(&rec) {
            return Err(Rv(CKR_PIN_LOCKED));
        }
        let Some(key) = rec.unlock(old) else {
            self.count_failure(!so)?;
            return Err(Rv(CKR_PIN_INCORRECT));
        };
        let fresh = PinRecord::new(new, &key, self.cfg.pin_kdf_iterations)?;
        let mut st = self.write();
        let record = st.record.as_mut().ok_or(Rv(CKR_TOKEN_NOT_RECOGNIZED))?;
        if so {
            record.so = fresh;
        } else {
            record.user = Some(fresh);
        }
        let record = record.clone();
        self.store.save_token(&record)?;
        Ok(())
    }

    // ----- objects -----

    fn visible(st: &TokenState, e: &ObjectEntry) -> bool {
        !e.private || st.login == LoginState::User
    }

    /// Writes a token object; returns the ciphertext of a private one.
    fn persist(
        &self,
        st: &TokenState,
        file: &str,
        obj: &Object,
        private: bool,
    ) -> CkResult<Option<Sealed>> {
        let stored = if private {
            let key = st.token_key.as_ref().ok_or(Rv(CKR_USER_NOT_LOGGED_IN))?;
            let secret = match &obj.key {
                Some(k) => Some((
                    k.kind().to_string(),
                    hex::encode(k.secret_bytes()?.as_slice()),
                )),
                None => None,
            };
            let payload = ObjectPayload {
                attributes: encode_attributes(&obj.attrs),
                key: secret,
            };
            let json =
                Zeroizing::new(serde_json::to_vec(&payload).map_err(|_| Rv(CKR_GENERAL_ERROR))?);
            StoredObject::Sealed {
                sealed: seal(key, file.as_bytes(), &json)?,
            }
        } else {
            StoredObject::Public {
                attributes: encode_attributes(&obj.attrs),
            }
        };
        self.store.save_object(file, &stored)?;
        Ok(match stored {
            StoredObject::Sealed { sealed } => Some(sealed),
            StoredObject::Public { .. } => None,
        })
    }

    /// Adds an object (persisting a token object) and returns its handle.
    fn insert_object(
        &self,
        st: &mut TokenState,
        session: CK_SESSION_HANDLE,
        obj: Object,
    ) -> CkResult<CK_OBJECT_HANDLE> {
        let token = obj.bool_attr(CKA_TOKEN, false);
        let private = obj.bool_attr(CKA_PRIVATE, false);
        let (file, sealed) = if token {
            let id = hex::encode(random_bytes::<12>()?);
            // The ciphertext is kept so that a logout can lock the object again.
            let sealed = self.persist(st, &id, &obj, private)?;
            (Some(id), sealed)
        } else {
            (None, None)
        };
        let h = self.handle();
        st.objects.insert(
            h,
            ObjectEntry {
                file,
                private,
                owner: (!token).then_some(session),
                sealed,
                open: Some(Arc::new(obj)),
            },
        );
        Ok(h)
    }

    fn check_write_access(
        &self,
        st: &TokenState,
        session: &Session,
        token: bool,
        private: bool,
    ) -> CkResult<()> {
        if token && !session.rw {
            return Err(Rv(CKR_SESSION_READ_ONLY));
        }
        if private && st.login != LoginState::User {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        Ok(())
    }

    /// C_CreateObject: public keys, certificates and data objects (private keys are only generated inside).
    pub fn create_object(
        &self,
        h: CK_SESSION_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> CkResult<CK_OBJECT_HANDLE> {
        self.enter(Some(OpKind::Objects))?;
        let s = self.session(h)?;
        let class = value_of(template, CKA_CLASS)
            .and_then(ulong_from)
            .ok_or(Rv(CKR_TEMPLATE_INCOMPLETE))?;
        if !matches!(class, CKO_PUBLIC_KEY | CKO_CERTIFICATE | CKO_DATA) {
            return Err(Rv(CKR_ATTRIBUTE_VALUE_INVALID));
        }
        if template
            .iter()
            .any(|(t, _)| SENSITIVE_ATTRIBUTES.contains(t) && class != CKO_DATA)
        {
            return Err(Rv(CKR_TEMPLATE_INCONSISTENT));
        }
        if class == CKO_PUBLIC_KEY {
            let key_type = value_of(template, CKA_KEY_TYPE)
                .and_then(ulong_from)
                .ok_or(Rv(CKR_TEMPLATE_INCOMPLETE))?;
            let needed: &[CK_ATTRIBUTE_TYPE] = match key_type {
                CKK_EC | CKK_EC_EDWARDS => &[CKA_EC_PARAMS, CKA_EC_POINT],
                CKK_RSA => &[CKA_MODULUS, CKA_PUBLIC_EXPONENT],
                _ => return Err(Rv(CKR_ATTRIBUTE_VALUE_INVALID)),
            };
            if needed.iter().any(|t| value_of(template, *t).is_none()) {
                return Err(Rv(CKR_TEMPLATE_INCOMPLETE));
            }
        }
        let token = bool_of(template, CKA_TOKEN).unwrap_or(false);
        let private = bool_of(template, CKA_PRIVATE).unwrap_or(false);
        let mut attrs: Attributes = template.iter().cloned().collect();
        attrs.insert(CKA_TOKEN, b(token));
        attrs.insert(CKA_PRIVATE, b(private));
        attrs.entry(CKA_MODIFIABLE).or_insert_with(|| b(true));
        attrs.entry(CKA_LABEL).or_default();
        if class != CKO_DATA {
            attrs.entry(CKA_ID).or_default();
        }
        let session = lock(&s);
        let mut st = self.write();
        self.check_write_access(&st, &session, token, private)?;
        self.insert_object(&mut st, h, Object { attrs, key: None })
    }

    /// C_DestroyObject.
    pub fn destroy_object(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> CkResult<()> {
        self.enter(Some(OpKind::Objects))?;
        let s = self.session(h)?;
        let session = lock(&s);
        let mut st = self.write();
        let e = st
            .objects
            .get(&obj)
            .filter(|e| Self::visible(&st, e))
            .ok_or(Rv(CKR_OBJECT_HANDLE_INVALID))?;
        if e.file.is_some() && !session.rw {
            return Err(Rv(CKR_SESSION_READ_ONLY));
        }
        if let Some(file) = e.file.clone() {
            self.store.delete_object(&file)?;
        }
        st.objects.remove(&obj);
        Ok(())
    }

    fn object(&self, st: &TokenState, obj: CK_OBJECT_HANDLE) -> CkResult<Arc<Object>> {
        st.objects
            .get(&obj)
            .filter(|e| Self::visible(st, e))
            .and_then(|e| e.open.clone())
            .ok_or(Rv(CKR_OBJECT_HANDLE_INVALID))
    }

    /// C_GetAttributeValue: one answer per requested type.
    pub fn get_attributes(
        &self,
        h: CK_SESSION_HANDLE,
        obj: CK_OBJECT_HANDLE,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> CkResult<Vec<AttrValue>> {
        self.enter(Some(OpKind::Objects))?;
        self.session(h)?;
        let o = self.object(&self.read(), obj)?;
        let is_private_key = o.key.is_some();
        Ok(types
            .iter()
            .map(|t| {
                if is_private_key && SENSITIVE_ATTRIBUTES.contains(t) {
                    AttrValue::Sensitive
                } else {
                    o.attrs
                        .get(t)
                        .map(|v| AttrValue::Value(v.clone()))
                        .unwrap_or(AttrValue::Invalid)
                }
            })
            .collect())
    }

    /// C_SetAttributeValue: the label, the id and a few other descriptive attributes.
    pub fn set_attributes(
        &self,
        h: CK_SESSION_HANDLE,
        obj: CK_OBJECT_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> CkResult<()> {
        self.enter(Some(OpKind::Objects))?;
        let s = self.session(h)?;
        let session = lock(&s);
        let mut st = self.write();
        let current = self.object(&st, obj)?;
        if !current.bool_attr(CKA_MODIFIABLE, true) {
            return Err(Rv(CKR_ATTRIBUTE_READ_ONLY));
        }
        if template
            .iter()
            .any(|(t, _)| !MODIFIABLE_ATTRIBUTES.contains(t))
        {
            return Err(Rv(CKR_ATTRIBUTE_READ_ONLY));
        }
        let (file, private) = match st.objects.get(&obj) {
            Some(e) => (e.file.clone(), e.private),
            None => return Err(Rv(CKR_OBJECT_HANDLE_INVALID)),
        };
        self.check_write_access(&st, &session, file.is_some(), private)?;
        let mut updated = (*current).clone();
        for (t, v) in template {
            updated.attrs.insert(*t, v.clone());
        }
        let sealed = match &file {
            Some(file) => self.persist(&st, file, &updated, private)?,
            None => None,
        };
        if let Some(e) = st.objects.get_mut(&obj) {
            e.open = Some(Arc::new(updated));
            if sealed.is_some() {
                e.sealed = sealed;
            }
        }
        Ok(())
    }

    /// C_FindObjectsInit.
    pub fn find_init(
        &self,
        h: CK_SESSION_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> CkResult<()> {
        self.enter(Some(OpKind::Objects))?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        if session.find.is_some() {
            return Err(Rv(CKR_OPERATION_ACTIVE));
        }
        let st = self.read();
        let found = st
            .objects
            .iter()
            .filter(|(_, e)| Self::visible(&st, e))
            .filter_map(|(h, e)| e.open.as_ref().map(|o| (h, o)))
            .filter(|(_, o)| template.iter().all(|(t, v)| o.attrs.get(t) == Some(v)))
            .map(|(h, _)| *h)
            .collect();
        session.find = Some((found, 0));
        Ok(())
    }

    /// C_FindObjects: up to `max` more handles.
    pub fn find_next(&self, h: CK_SESSION_HANDLE, max: usize) -> CkResult<Vec<CK_OBJECT_HANDLE>> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        let (found, pos) = session
            .find
            .as_mut()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        let end = pos.saturating_add(max).min(found.len());
        let out = found[*pos..end].to_vec();
        *pos = end;
        Ok(out)
    }

    /// C_FindObjectsFinal.
    pub fn find_final(&self, h: CK_SESSION_HANDLE) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        lock(&s)
            .find
            .take()
            .map(|_| ())
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))
    }

    // ----- keys -----

    /// C_GenerateKeyPair: returns (public key handle, private key handle).
    pub fn generate_key_pair(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        public: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
        private: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> CkResult<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        self.enter(None)?;
        let s = self.session(h)?;
        let (spec, ec_params, key_type) = match mechanism {
            CKM_EC_KEY_PAIR_GEN | CKM_EC_EDWARDS_KEY_PAIR_GEN => {
                let params =
                    value_of(public, CKA_EC_PARAMS).or_else(|| value_of(private, CKA_EC_PARAMS));
                let curve = match (params, mechanism) {
                    (Some(p), _) => Curve::from_ec_params(p)?,
                    (None, CKM_EC_EDWARDS_KEY_PAIR_GEN) => Curve::Ed25519,
                    (None, _) => return Err(Rv(CKR_TEMPLATE_INCOMPLETE)),
                };
                let edwards = curve == Curve::Ed25519;
                if edwards != (mechanism == CKM_EC_EDWARDS_KEY_PAIR_GEN) {
                    return Err(Rv(CKR_TEMPLATE_INCONSISTENT));
                }
                let params = params
                    .map(<[u8]>::to_vec)
                    .unwrap_or_else(|| curve.default_ec_params());
                (
                    KeySpec::Ec(curve),
                    Some(params),
                    if edwards { CKK_EC_EDWARDS } else { CKK_EC },
                )
            }
            CKM_RSA_PKCS_KEY_PAIR_GEN => {
                let bits = value_of(public, CKA_MODULUS_BITS)
                    .and_then(ulong_from)
                    .ok_or(Rv(CKR_TEMPLATE_INCOMPLETE))?;
                let exponent = value_of(public, CKA_PUBLIC_EXPONENT)
                    .map(<[u8]>::to_vec)
                    .unwrap_or(vec![1, 0, 1]);
                (
                    KeySpec::Rsa {
                        bits: bits as usize,
                        exponent,
                    },
                    None,
                    CKK_RSA,
                )
            }
            _ => return Err(Rv(CKR_MECHANISM_INVALID)),
        };
        for (tpl, class) in [(public, CKO_PUBLIC_KEY), (private, CKO_PRIVATE_KEY)] {
            if value_of(tpl, CKA_CLASS)
                .and_then(ulong_from)
                .is_some_and(|c| c != class)
                || value_of(tpl, CKA_KEY_TYPE)
                    .and_then(ulong_from)
                    .is_some_and(|k| k != key_type)
            {
                return Err(Rv(CKR_TEMPLATE_INCONSISTENT));
            }
            if tpl.iter().any(|(t, _)| SENSITIVE_ATTRIBUTES.contains(t)) {
                return Err(Rv(CKR_TEMPLATE_INCONSISTENT));
            }
        }
        let pub_token = bool_of(public, CKA_TOKEN).unwrap_or(false);
        let pub_private = bool_of(public, CKA_PRIVATE).unwrap_or(false);
        let priv_token = bool_of(private, CKA_TOKEN).unwrap_or(false);
        {
            let session = lock(&s);
            let st = self.read();
            self.check_write_access(&st, &session, pub_token, pub_private)?;
            self.check_write_access(&st, &session, priv_token, true)?;
        }
        self.round_trip(OpKind::Keygen)?;
        let key = Arc::new(KeyMaterial::generate(&spec)?);

        let mut pub_attrs: Attributes = public.iter().cloned().collect();
        let mut priv_attrs: Attributes = private.iter().cloned().collect();
        for (attrs, class) in [
            (&mut pub_attrs, CKO_PUBLIC_KEY),
            (&mut priv_attrs, CKO_PRIVATE_KEY),
        ] {
            attrs.insert(CKA_CLASS, ulong_bytes(class));
            attrs.insert(CKA_KEY_TYPE, ulong_bytes(key_type));
            attrs.insert(CKA_LOCAL, b(true));
            attrs.insert(CKA_KEY_GEN_MECHANISM, ulong_bytes(mechanism));
            attrs.entry(CKA_LABEL).or_default();
            attrs.entry(CKA_ID).or_default();
            attrs.entry(CKA_MODIFIABLE).or_insert_with(|| b(true));
            // The token offers no key derivation, whatever the template asked for.
            attrs.insert(CKA_DERIVE, b(false));
            if let Some(p) = &ec_params {
                attrs.insert(CKA_EC_PARAMS, p.clone());
            }
        }
        pub_attrs.insert(CKA_TOKEN, b(pub_token));
        pub_attrs.insert(CKA_PRIVATE, b(pub_private));
        pub_attrs.entry(CKA_VERIFY).or_insert_with(|| b(true));
        pub_attrs.entry(CKA_ENCRYPT).or_insert_with(|| b(false));
        pub_attrs.entry(CKA_WRAP).or_insert_with(|| b(false));
        pub_attrs.entry(CKA_TRUSTED).or_insert_with(|| b(false));
        for (t, v) in key.public_attributes(true)? {
            pub_attrs.insert(t, v);
        }
        priv_attrs.insert(CKA_TOKEN, b(priv_token));
        // Private keys are private objects and never leave the token.
        priv_attrs.insert(CKA_PRIVATE, b(true));
        priv_attrs.insert(CKA_SENSITIVE, b(true));
        priv_attrs.insert(CKA_ALWAYS_SENSITIVE, b(true));
        priv_attrs.insert(CKA_EXTRACTABLE, b(false));
        priv_attrs.insert(CKA_NEVER_EXTRACTABLE, b(true));
        priv_attrs.entry(CKA_SIGN).or_insert_with(|| b(true));
        priv_attrs.entry(CKA_DECRYPT).or_insert_with(|| b(false));
        priv_attrs.entry(CKA_UNWRAP).or_insert_with(|| b(false));
        priv_attrs
            .entry(CKA_SIGN_RECOVER)
            .or_insert_with(|| b(false));
        priv_attrs
            .entry(CKA_ALWAYS_AUTHENTICATE)
            .or_insert_with(|| b(false));
        for (t, v) in key.public_attributes(false)? {
            priv_attrs.insert(t, v);
        }

        let _session = lock(&s);
        let mut st = self.write();
        // The login may have ended while the key was being generated.
        if st.login != LoginState::User {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        let pub_h = self.insert_object(
            &mut st,
            h,
            Object {
                attrs: pub_attrs,
                key: None,
            },
        )?;
        let priv_h = match self.insert_object(
            &mut st,
            h,
            Object {
                attrs: priv_attrs,
                key: Some(key),
            },
        ) {
            Ok(p) => p,
            Err(e) => {
                if let Some(f) = st.objects.remove(&pub_h).and_then(|e| e.file) {
                    let _ = self.store.delete_object(&f);
                }
                return Err(e);
            }
        };
        Ok((pub_h, priv_h))
    }

    // ----- signing -----

    /// C_SignInit.
    pub fn sign_init(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: SignMechanism,
        key: CK_OBJECT_HANDLE,
    ) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        if session.sign.is_some() {
            return Err(Rv(CKR_OPERATION_ACTIVE));
        }
        let st = self.read();
        let entry = st.objects.get(&key).ok_or(Rv(CKR_KEY_HANDLE_INVALID))?;
        if entry.private && st.login != LoginState::User {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        let obj = entry.open.clone().ok_or(Rv(CKR_KEY_HANDLE_INVALID))?;
        let material = obj.key.clone().ok_or(Rv(CKR_KEY_TYPE_INCONSISTENT))?;
        if !obj.bool_attr(CKA_SIGN, false) {
            return Err(Rv(CKR_KEY_FUNCTION_NOT_PERMITTED));
        }
        if !material.accepts(&mechanism) {
            return Err(Rv(CKR_KEY_TYPE_INCONSISTENT));
        }
        session.sign = Some(SignOp {
            mechanism,
            key: material,
            buffer: Vec::new(),
            multipart: false,
        });
        Ok(())
    }

    /// C_Sign. `capacity` is the caller's buffer size (`None`: a length query).
    pub fn sign(
        &self,
        h: CK_SESSION_HANDLE,
        data: &[u8],
        capacity: Option<usize>,
    ) -> CkResult<SignOutput> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        let op = session
            .sign
            .as_ref()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        if op.multipart {
            return Err(Rv(CKR_OPERATION_ACTIVE));
        }
        let len = op.key.signature_len();
        match capacity {
            None => return Ok(SignOutput::Length(len)),
            Some(c) if c < len => return Ok(SignOutput::TooSmall(len)),
            Some(_) => {}
        }
        let op = session
            .sign
            .take()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        drop(session);
        self.finish_sign(&op, data).map(SignOutput::Signature)
    }

    /// C_SignUpdate.
    pub fn sign_update(&self, h: CK_SESSION_HANDLE, data: &[u8]) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        let op = session
            .sign
            .as_mut()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        op.multipart = true;
        op.buffer.extend_from_slice(data);
        Ok(())
    }

    /// C_SignFinal. `capacity` as for [`Device::sign`].
    pub fn sign_final(
        &self,
        h: CK_SESSION_HANDLE,
        capacity: Option<usize>,
    ) -> CkResult<SignOutput> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        let op = session
            .sign
            .as_ref()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        let len = op.key.signature_len();
        match capacity {
            None => return Ok(SignOutput::Length(len)),
            Some(c) if c < len => return Ok(SignOutput::TooSmall(len)),
            Some(_) => {}
        }
        let op = session
            .sign
            .take()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        drop(session);
        self.finish_sign(&op, &op.buffer).map(SignOutput::Signature)
    }

    fn finish_sign(&self, op: &SignOp, data: &[u8]) -> CkResult<Vec<u8>> {
        self.round_trip(OpKind::Sign)?;
        let mut signature = op.key.sign(&op.mechanism, data)?;
        let corrupted = lock(&self.faults).after_signature(&mut signature);
        if corrupted {
            self.flush_status(false);
        }
        Ok(signature)
    }

    // ----- random -----

    /// C_GenerateRandom.
    pub fn generate_random(&self, h: CK_SESSION_HANDLE, out: &mut [u8]) -> CkResult<()> {
        self.enter(Some(OpKind::Random))?;
        self.session(h)?;
        use ring::rand::SecureRandom;
        ring::rand::SystemRandom::new()
            .fill(out)
            .map_err(|_| Rv(CKR_DEVICE_ERROR))
    }

    /// C_SeedRandom: accepted and ignored (the token draws from the operating system's RNG, which needs no seed).
    pub fn seed_random(&self, h: CK_SESSION_HANDLE, _seed: &[u8]) -> CkResult<()> {
        self.enter(None)?;
        self.session(h)?;
        Ok(())
    }
}

fn payload_to_object(bytes: &[u8]) -> Option<Object> {
    let payload: ObjectPayload = serde_json::from_slice(bytes).ok()?;
    let attrs = decode_attributes(&payload.attributes)?;
    let key = match &payload.key {
        Some((kind, secret)) => {
            let raw = Zeroizing::new(hex::decode(secret).ok()?);
            Some(Arc::new(KeyMaterial::from_secret(kind, &raw).ok()?))
        }
        None => None,
    };
    Some(Object { attrs, key })
}

#[cfg(test)]
mod tests;
