//! Tokens: configuration, discovery, and administration (initialising a token in a free slot).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use cryptoki::mechanism::MechanismType;
use cryptoki::session::UserType;
use cryptoki::slot::Slot;

use crate::error::{Error, ErrorKind, Result};
use crate::keys::KeyType;
use crate::module::Module;
use crate::pin::{Pin, PinSource};
use crate::profile::Profile;
use crate::session::TokenSession;

/// The default module path (SoftHSM2 on Debian/Ubuntu).
pub const DEFAULT_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The mechanisms the layer uses, checked once when a token is opened.
const LAYER_MECHANISMS: [MechanismType; 7] = [
    MechanismType::ECC_KEY_PAIR_GEN,
    MechanismType::ECDSA,
    MechanismType::RSA_PKCS_KEY_PAIR_GEN,
    MechanismType::RSA_PKCS,
    MechanismType::RSA_PKCS_PSS,
    MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
    MechanismType::EDDSA,
];

/// Which token on the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// By CKA_LABEL of the token (C_GetTokenInfo's label, trailing blanks ignored).
    Label(String),
    /// By serial number.
    Serial(String),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "label {l:?}"),
            TokenSelector::Serial(s) => write!(f, "serial {s:?}"),
        }
    }
}

/// Everything needed to open a token.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Which token.
    pub token: TokenSelector,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// The token's profile; `None`: detect it from the module's and token's manufacturer info.
    pub profile: Option<Profile>,
}

impl TokenConfig {
    /// A configuration for the token with `label` on `module`, PIN from `pin`, profile detected.
    pub fn new(module: impl Into<PathBuf>, label: impl Into<String>, pin: PinSource) -> Self {
        TokenConfig {
            module: module.into(),
            token: TokenSelector::Label(label.into()),
            pin,
            profile: None,
        }
    }
}

/// A slot as listed by [`list_slots`].
#[derive(Debug, Clone)]
pub struct SlotSummary {
    /// The slot id.
    pub slot_id: u64,
    /// Slot description.
    pub description: String,
    /// The token in it, if any.
    pub token: Option<TokenSummary>,
}

/// A token's identity as C_GetTokenInfo reports it.
#[derive(Debug, Clone)]
pub struct TokenSummary {
    /// Token label (trailing blanks trimmed).
    pub label: String,
    /// Serial number.
    pub serial: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Whether the token is initialised.
    pub initialized: bool,
    /// Whether the user PIN is set.
    pub user_pin_initialized: bool,
}

fn token_summary(module: &Module, slot: Slot) -> Result<Option<TokenSummary>> {
    let st = module.read();
    let sinfo = st
        .ctx
        .get_slot_info(slot)
        .map_err(|e| Error::pkcs11("C_GetSlotInfo failed", e))?;
    if !sinfo.token_present() {
        return Ok(None);
    }
    let t = st
        .ctx
        .get_token_info(slot)
        .map_err(|e| Error::pkcs11("C_GetTokenInfo failed", e))?;
    Ok(Some(TokenSummary {
        label: t.label().trim_end().to_string(),
        serial: t.serial_number().trim_end().to_string(),
        manufacturer: t.manufacturer_id().trim_end().to_string(),
        model: t.model().trim_end().to_string(),
        initialized: t.token_initialized(),
        user_pin_initialized: t.user_pin_initialized(),
    }))
}

/// Lists the module's slots and their tokens.
pub fn list_slots(module_path: &Path) -> Result<Vec<SlotSummary>> {
    let module = Module::get(module_path)?;
    let slots = module
        .read()
        .ctx
        .get_all_slots()
        .map_err(|e| Error::pkcs11("C_GetSlotList failed", e))?;
    let mut out = Vec::new();
    for slot in slots {
        let description = module
            .read()
            .ctx
            .get_slot_info(slot)
            .map(|i| i.slot_description().trim_end().to_string())
            .map_err(|e| Error::pkcs11("C_GetSlotInfo failed", e))?;
        out.push(SlotSummary {
            slot_id: slot.id(),
            description,
            token: token_summary(&module, slot)?,
        });
    }
    Ok(out)
}

/// Initialises a token labelled `label` in the first free slot (token present, not initialised): sets
/// the SO PIN, then logs in as SO and sets the user PIN. Serialised with other administration in this
/// process. Fails with `KeyExists`-like `InvalidInput` if a token with that label already exists, and
/// with `NoFreeSlot` when no slot is free.
pub fn init_token(
    module_path: &Path,
    label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
) -> Result<SlotSummary> {
    if label.is_empty() || label.len() > 32 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "a token label has 1 to 32 bytes",
        ));
    }
    let module = Module::get(module_path)?;
    let _admin = module.admin_lock();
    let slots = list_slots(module_path)?;
    if slots.iter().any(|s| {
        s.token
            .as_ref()
            .is_some_and(|t| t.initialized && t.label == label)
    }) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("a token labelled {label:?} already exists"),
        ));
    }
    let free = slots
        .iter()
        .find(|s| s.token.as_ref().is_some_and(|t| !t.initialized))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::NoFreeSlot,
                "no free slot (with an uninitialised token) on the module",
            )
        })?;
    let slot = Slot::try_from(free.slot_id).map_err(|e| Error::pkcs11("bad slot id", e))?;
    let st = module.read();
    st.ctx
        .init_token(slot, &so_pin.auth(), label)
        .map_err(|e| Error::pkcs11("C_InitToken failed", e))?;
    let session = st
        .ctx
        .open_rw_session(slot)
        .map_err(|e| Error::pkcs11("C_OpenSession failed", e))?;
    session
        .login(UserType::So, Some(&so_pin.auth()))
        .map_err(|e| Error::pkcs11("SO login failed", e))?;
    session
        .init_pin(&user_pin.auth())
        .map_err(|e| Error::pkcs11("C_InitPIN failed", e))?;
    let _ = session.logout();
    drop(session);
    drop(st);
    tracing::info!(label, slot = free.slot_id, "token initialised");
    Ok(SlotSummary {
        slot_id: free.slot_id,
        description: free.description.clone(),
        token: token_summary(&module, slot)?,
    })
}

pub(crate) struct TokenInner {
    pub(crate) module: Arc<Module>,
    pub(crate) selector: TokenSelector,
    pub(crate) slot: RwLock<Slot>,
    pub(crate) pin: Pin,
    pub(crate) profile: Profile,
    pub(crate) summary: TokenSummary,
    pub(crate) mechanisms: Vec<MechanismType>,
}

/// An opened token: module + slot + PIN + profile. `Clone + Send + Sync` (an `Arc` inside): share it
/// between threads and open one [`TokenSession`] per worker thread with [`Token::session`].
#[derive(Clone)]
pub struct Token {
    pub(crate) inner: Arc<TokenInner>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.inner.module.path())
            .field("token", &self.inner.selector)
            .field("profile", &self.inner.profile)
            .finish_non_exhaustive()
    }
}

fn find_slot(module: &Module, selector: &TokenSelector) -> Result<(Slot, TokenSummary)> {
    // C_GetSlotList rescans SoftHSM2's token directory: run at the same time as C_InitToken in another thread of
    // this process, both insert the new token and SoftHSM2 aborts the process. The administrative lock keeps them
    // apart (opening a token is rare).
    let _admin = module.admin_lock();
    let slots = module
        .read()
        .ctx
        .get_slots_with_initialized_token()
        .map_err(|e| Error::pkcs11("C_GetSlotList failed", e))?;
    for slot in slots {
        if let Some(t) = token_summary(module, slot)? {
            let hit = match selector {
                TokenSelector::Label(l) => &t.label == l,
                TokenSelector::Serial(s) => &t.serial == s,
            };
            if hit {
                return Ok((slot, t));
            }
        }
    }
    Err(Error::new(
        ErrorKind::TokenNotFound,
        format!(
            "no initialised token with {selector} on {}",
            module.path().display()
        ),
    ))
}

impl Token {
    /// Opens the token: loads the module (once per process), finds the slot, reads the PIN, detects
    /// the profile, and checks the PIN by logging in once (so a wrong PIN fails here, clearly).
    pub fn open(config: &TokenConfig) -> Result<Token> {
        let module = Module::get(&config.module)?;
        // A module may fail the slot list for a moment (SoftHSM2 does while another process writes the token's
        // files): a transient failure is tried again, a few times, before the open fails.
        let mut wait = std::time::Duration::from_millis(50);
        let (slot, summary) = loop {
            match find_slot(&module, &config.token) {
                Err(e) if e.is_transient() && wait < std::time::Duration::from_secs(2) => {
                    tracing::warn!(token = %config.token, error = %e, "the token's slot list failed; trying again");
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                r => break r?,
            }
        };
        let pin = config.pin.resolve()?;
        let profile = match config.profile {
            Some(p) => p,
            None => {
                let (lm, ld) = module.library_info()?;
                Profile::detect(&lm, &ld, &summary.manufacturer, &summary.model)
            }
        };
        // A mechanism the layer uses counts when the token lists it (C_GetMechanismList) and describes it
        // (C_GetMechanismInfo): a token restricted by its policy (SoftHSM2's `slots.mechanisms`, an HSM in a
        // certified mode) drops mechanisms from its list while C_GetMechanismInfo may still describe them.
        // cryptoki logs an error for each vendor mechanism of the list it has no name for (target
        // `cryptoki::mechanism`; the CLI's default log filter silences it). A module whose list fails is asked
        // mechanism by mechanism only.
        let listed = module.read().ctx.get_mechanism_list(slot).ok();
        let mechanisms = LAYER_MECHANISMS
            .into_iter()
            .filter(|m| listed.as_ref().is_none_or(|l| l.contains(m)))
            .filter(|m| module.read().ctx.get_mechanism_info(slot, *m).is_ok())
            .collect();
        let token = Token {
            inner: Arc::new(TokenInner {
                module,
                selector: config.token.clone(),
                slot: RwLock::new(slot),
                pin,
                profile,
                summary,
                mechanisms,
            }),
        };
        // Check the PIN now.
        drop(token.session()?);
        tracing::debug!(token = %token.inner.selector, profile = profile.name(), "token opened");
        Ok(token)
    }

    /// Opens a new R/W session, logged in as the user. One per worker thread.
    pub fn session(&self) -> Result<TokenSession> {
        TokenSession::open(self.clone())
    }

    /// The token's profile.
    pub fn profile(&self) -> Profile {
        self.inner.profile
    }

    /// The token's identity.
    pub fn summary(&self) -> &TokenSummary {
        &self.inner.summary
    }

    /// The module this token is on.
    pub fn module(&self) -> &Arc<Module> {
        &self.inner.module
    }

    /// Holds the module's call lock when the profile allows one effective session (calls of all
    /// sessions on such tokens are serialised by the layer, not left to the module).
    pub(crate) fn serialized(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        (self.inner.profile.effective_sessions() == Some(1)).then(|| self.inner.module.serial())
    }

    pub(crate) fn slot(&self) -> Slot {
        *self.inner.slot.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot id the token is in now (it can change after [`reinitialize`](Self::reinitialize)).
    pub fn slot_id(&self) -> u64 {
        self.slot().id()
    }

    /// Whether the token supports `mechanism` (C_GetMechanismInfo; cached for the layer's own).
    pub fn has_mechanism(&self, mechanism: MechanismType) -> bool {
        if LAYER_MECHANISMS.contains(&mechanism) {
            return self.inner.mechanisms.contains(&mechanism);
        }
        self.inner
            .module
            .read()
            .ctx
            .get_mechanism_info(self.slot(), mechanism)
            .is_ok()
    }

    /// Why this token cannot generate and sign with `key_type`, if it cannot: the profile's known
    /// limits, then the token's mechanism list (key-pair generation and signing mechanism).
    pub fn unsupported_reason(&self, key_type: KeyType) -> Option<String> {
        if let Some(why) = self.inner.profile.refuses(key_type) {
            return Some(why);
        }
        let (gen_mech, sign_mech) = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                (MechanismType::ECC_KEY_PAIR_GEN, MechanismType::ECDSA)
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => (
                MechanismType::RSA_PKCS_KEY_PAIR_GEN,
                MechanismType::RSA_PKCS,
            ),
            KeyType::Ed25519 => (
                MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
                MechanismType::EDDSA,
            ),
        };
        for m in [gen_mech, sign_mech] {
            if !self.has_mechanism(m) {
                return Some(format!("the token does not support {m}"));
            }
        }
        if let Some(bits) = key_type.rsa_bits()
            && let Ok(info) = self
                .inner
                .module
                .read()
                .ctx
                .get_mechanism_info(self.slot(), gen_mech)
            && (bits as usize) > info.max_key_size()
            && info.max_key_size() > 0
        {
            return Some(format!(
                "the token generates RSA keys up to {} bits",
                info.max_key_size()
            ));
        }
        None
    }

    /// Whether the token supports `key_type` (see [`unsupported_reason`](Self::unsupported_reason)).
    pub fn supports(&self, key_type: KeyType) -> bool {
        self.unsupported_reason(key_type).is_none()
    }

    /// Re-initialises the PKCS#11 library (C_Finalize + C_Initialize) and finds the token's slot again:
    /// the hook for a token that was pulled and re-inserted. Every session of every token on the
    /// module becomes stale (`ErrorKind::Stale`) and must be re-opened ([`TokenSession::reopen`]).
    /// `seen_generation` is the module generation the caller's failing session had
    /// ([`TokenSession::generation`]): if another thread already re-initialised, this does nothing.
    pub fn reinitialize(&self, seen_generation: u64) -> Result<()> {
        self.inner.module.reinitialize(seen_generation)?;
        let (slot, _) = find_slot(&self.inner.module, &self.inner.selector)?;
        *self.inner.slot.write().unwrap_or_else(|p| p.into_inner()) = slot;
        Ok(())
    }
}
