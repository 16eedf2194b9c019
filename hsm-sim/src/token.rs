//! The simulated device: one slot, one token, its sessions, login state, objects, and the behaviour of a network
//! HSM around them (latency, the session limit, the signature rate limit, injected faults). This is the whole
//! PKCS#11 logic in safe Rust; the FFI layer only converts C arguments into calls on [`Device`] and back.
//!
//! Locking: the token state (login, objects) sits behind one `RwLock` taken briefly; each session has its own
//! mutex; signing and key generation run (and sleep out their latency) without holding any shared lock, so
//! concurrent sessions overlap as they do on a real network HSM.
//!
//! Layout: this file holds the device's state, its types and the helpers every operation shares; the operations
//! themselves are grouped in `token/`, one `impl Device` block a file: `behaviour` (faults, control file, latency,
//! rate limit), `slot` (slot and token), `sessions`, `login` (PINs and login), `objects`, `keys` (key-pair
//! generation), `signing` and `random`.

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

// The device's operations, by group (each file one `impl Device` block).
mod behaviour;
mod keys;
mod login;
mod objects;
mod random;
mod sessions;
mod signing;
mod slot;

#[cfg(test)]
mod tests;
