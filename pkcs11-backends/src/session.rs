//! Sessions: one per worker thread, R/W and logged in once; key management and signing.
//!
//! Ownership model: a [`TokenSession`] is `Send` but not `Sync`. Open it on (or move it to) the
//! worker thread that uses it, and use it from that thread only; give each worker its own session
//! (`token.session()`), which is how a token signs in parallel. Key handles are looked up once per
//! session and cached (by label), never per signature. After a transient failure, [`reopen`]
//! replaces the PKCS#11 session (and logs in again) in place; after a re-initialisation of the
//! library ([`Token::reinitialize`](crate::Token::reinitialize)) every older session answers `Stale`
//! until re-opened.
//!
//! [`reopen`]: TokenSession::reopen

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{MutexGuard, RwLockReadGuard};

use cryptoki::error::RvError;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use ring::rand::SecureRandom;

use crate::encoding;
use crate::error::{Error, ErrorKind, Result};
use crate::keys::Family;
use crate::keys::{Key, KeyGenOptions, KeyInfo, KeyType};
use crate::module::ModuleState;
use crate::sign::{HashAlg, SignAlgorithm};
use crate::token::Token;

static EPOCHS: AtomicU64 = AtomicU64::new(1);

/// A logged-in R/W session on a token. `Send`, not `Sync`: one per worker thread (see the module
/// docs). Closed (and, if it is the application's last session on the token, logged out) on drop.
///
/// ```compile_fail
/// fn shared_between_threads<T: Sync>() {}
/// shared_between_threads::<signet_pkcs11::TokenSession>(); // not Sync: one session per thread
/// ```
pub struct TokenSession {
    token: Token,
    session: Option<Session>,
    generation: u64,
    epoch: u64,
    keys: HashMap<String, Key>,
}

impl fmt::Debug for TokenSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSession")
            .field("token", &self.token)
            .field("open", &self.session.is_some())
            .field("generation", &self.generation)
            .field("cached_keys", &self.keys.len())
            .finish()
    }
}

/// What a call on the session holds: the module's call lock when the profile serialises calls, and
/// the module's state (so that no re-initialisation happens during the call).
struct Held<'a> {
    _serial: Option<MutexGuard<'a, ()>>,
    _state: RwLockReadGuard<'a, ModuleState>,
}

fn stale() -> Error {
    Error::new(
        ErrorKind::Stale,
        "the session predates a re-initialisation of the PKCS#11 library (or is closed): re-open it",
    )
}

impl TokenSession {
    pub(crate) fn open(token: Token) -> Result<TokenSession> {
        let mut s = TokenSession {
            token,
            session: None,
            generation: 0,
            epoch: 0,
            keys: HashMap::new(),
        };
        s.reopen()?;
        Ok(s)
    }

    /// Closes the PKCS#11 session (if still valid) and opens a fresh one, logged in; forgets cached key
    /// handles (`Key`s found before become `Stale`). Use after a transient failure whose
    /// [`recovery`](Error::recovery) is `ReopenSession` (or after `Token::reinitialize`).
    pub fn reopen(&mut self) -> Result<()> {
        self.close_inner();
        self.keys.clear();
        let _serial = self.token.serialized();
        let st = self.token.inner.module.read();
        let slot = self.token.slot();
        let session = st.ctx.open_rw_session_no_drop(slot).map_err(|e| {
            Error::pkcs11(
                format!(
                    "cannot open a session on token with {}",
                    self.token.inner.selector
                ),
                e,
            )
        })?;
        let pin = &self.token.inner.pin;
        let module = &self.token.inner.module;
        match session.login(UserType::User, Some(&pin.auth())) {
            Ok(()) => module.record_login(slot.id(), pin),
            // Login state is per application: another session logged in already, and the token
            // did not look at this PIN. Check it against the one that logged in.
            Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                if module.login_matches(slot.id(), pin) == Some(false) {
                    let _ = session.close();
                    return Err(Error::new(
                        ErrorKind::PinIncorrect,
                        format!(
                            "logging in to token with {} failed: the PIN differs from the one this \
                             process is logged in with",
                            self.token.inner.selector
                        ),
                    ));
                }
            }
            Err(e) => {
                let _ = session.close();
                return Err(Error::pkcs11(
                    format!(
                        "logging in to token with {} failed",
                        self.token.inner.selector
                    ),
                    e,
                ));
            }
        }
        self.generation = st.generation;
        self.epoch = EPOCHS.fetch_add(1, Ordering::Relaxed);
        self.session = Some(session);
        Ok(())
    }

    fn close_inner(&mut self) {
        if let Some(session) = self.session.take() {
            let _serial = self.token.serialized();
            let st = self.token.inner.module.read();
            if st.generation == self.generation
                && let Err(e) = session.close()
            {
                tracing::debug!(error = %e, "closing a PKCS#11 session failed");
            }
            // Else the handle is from a finalised library instance: it must not be closed (the number
            // may have been reused by a new session).
        }
    }

    /// The module generation this session was opened in (pass it to `Token::reinitialize`).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The token this session is on.
    pub fn token(&self) -> &Token {
        &self.token
    }

    fn guard(&self) -> Result<(Held<'_>, &Session)> {
        let serial = self.token.serialized();
        let st = self.token.inner.module.read();
        match &self.session {
            Some(s) if st.generation == self.generation => Ok((
                Held {
                    _serial: serial,
                    _state: st,
                },
                s,
            )),
            _ => Err(stale()),
        }
    }

    /// Runs `f` with the raw cryptoki session (e.g. to compare against the bare library in benchmarks).
    /// The library cannot be re-initialised while `f` runs.
    pub fn with_raw_session<R>(&self, f: impl FnOnce(&Session) -> R) -> Result<R> {
        let (_held, s) = self.guard()?;
        Ok(f(s))
    }

    fn find(&self, template: &[Attribute]) -> Result<Vec<ObjectHandle>> {
        let (_held, s) = self.guard()?;
        s.find_objects(template)
            .map_err(|e| Error::pkcs11("C_FindObjects failed", e))
    }

    fn attributes(&self, object: ObjectHandle, types: &[AttributeType]) -> Result<Vec<Attribute>> {
        let (_held, s) = self.guard()?;
        s.get_attributes(object, types)
            .map_err(|e| Error::pkcs11("C_GetAttributeValue failed", e))
    }

    /// Generates a key pair on the token: private key CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE,
    /// !CKA_EXTRACTABLE, CKA_SIGN; public key CKA_TOKEN, CKA_VERIFY; both with `label` and one random
    /// 16-byte CKA_ID. A key with that label already on the token is a `KeyExists` error unless
    /// `options.replace`. Not idempotent: do not retry blindly.
    pub fn generate_key(
        &mut self,
        label: &str,
        key_type: KeyType,
        options: KeyGenOptions,
    ) -> Result<KeyInfo> {
        if label.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "a key label must not be empty",
            ));
        }
        if let Some(why) = self.token.unsupported_reason(key_type) {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!("cannot generate a {key_type} key: not supported by this token ({why})"),
            ));
        }
        let existing = self.find(&[Attribute::Label(label.as_bytes().to_vec())])?;
        if !existing.is_empty() {
            if !options.replace {
                return Err(Error::new(
                    ErrorKind::KeyExists,
                    format!(
                        "a key labelled {label:?} already exists on the token (ask to replace it)"
                    ),
                ));
            }
            let (_held, s) = self.guard()?;
            for h in existing {
                s.destroy_object(h)
                    .map_err(|e| Error::pkcs11("C_DestroyObject failed", e))?;
            }
        }
        self.keys.remove(label);

        let mut id = vec![0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| Error::new(ErrorKind::Pkcs11, "the host's random generator failed"))?;

        let common = |private: bool| {
            vec![
                Attribute::Token(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.clone()),
                Attribute::Private(private),
            ]
        };
        let mut public = common(false);
        public.push(Attribute::Verify(true));
        let mut private = common(true);
        private.extend([
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
        ]);
        let mechanism = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                let curve = if key_type == KeyType::EcP256 {
                    encoding::OID_SECP256R1
                } else {
                    encoding::OID_SECP384R1
                };
                public.push(Attribute::EcParams(encoding::oid_der(curve)?));
                Mechanism::EccKeyPairGen
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                let bits = u64::from(key_type.rsa_bits().unwrap_or(2048));
                public.push(Attribute::ModulusBits(bits.into()));
                public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
                Mechanism::RsaPkcsKeyPairGen
            }
            KeyType::Ed25519 => {
                public.push(Attribute::EcParams(encoding::oid_der(
                    encoding::OID_ED25519,
                )?));
                Mechanism::EccEdwardsKeyPairGen
            }
        };
        let started = std::time::Instant::now();
        {
            let (_held, s) = self.guard()?;
            s.generate_key_pair(&mechanism, &public, &private)
                .map_err(|e| {
                    Error::pkcs11(format!("generating a {key_type} key pair failed"), e)
                })?;
        }
        tracing::info!(label, %key_type, elapsed_ms = started.elapsed().as_millis() as u64, "key pair generated");
        Ok(KeyInfo {
            label: label.to_string(),
            id,
            key_type: Some(key_type),
            has_public: true,
        })
    }

    fn key_type_of(&self, private: ObjectHandle) -> Result<Option<KeyType>> {
        let attrs = self.attributes(
            private,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::Modulus,
            ],
        )?;
        let mut kt = None;
        let mut params = None;
        let mut modulus_len = 0usize;
        for a in attrs {
            match a {
                Attribute::KeyType(k) => kt = Some(k),
                Attribute::EcParams(p) => params = Some(p),
                Attribute::Modulus(m) => modulus_len = m.iter().skip_while(|b| **b == 0).count(),
                _ => {}
            }
        }
        Ok(match kt {
            Some(k) if k == CkKeyType::EC => {
                match params.as_deref().and_then(encoding::parse_oid) {
                    Some(o) if o == encoding::OID_SECP256R1 => Some(KeyType::EcP256),
                    Some(o) if o == encoding::OID_SECP384R1 => Some(KeyType::EcP384),
                    _ => None,
                }
            }
            Some(k) if k == CkKeyType::RSA => match modulus_len * 8 {
                2048 => Some(KeyType::Rsa2048),
                3072 => Some(KeyType::Rsa3072),
                4096 => Some(KeyType::Rsa4096),
                _ => None,
            },
            Some(k) if k == CkKeyType::EC_EDWARDS => Some(KeyType::Ed25519),
            _ => None,
        })
    }

    fn label_and_id(&self, object: ObjectHandle) -> Result<(String, Vec<u8>)> {
        let mut label = String::new();
        let mut id = Vec::new();
        for a in self.attributes(object, &[AttributeType::Label, AttributeType::Id])? {
            match a {
                Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                Attribute::Id(i) => id = i,
                _ => {}
            }
        }
        Ok((label, id))
    }

    fn public_of(&self, id: &[u8]) -> Result<Option<ObjectHandle>> {
        if id.is_empty() {
            return Ok(None);
        }
        Ok(self
            .find(&[
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::Id(id.to_vec()),
            ])?
            .into_iter()
            .next())
    }

    fn load_key(&self, what: &str, template: &[Attribute]) -> Result<Key> {
        let found = self.find(template)?;
        let private = match found.as_slice() {
            [] => {
                return Err(Error::new(
                    ErrorKind::KeyNotFound,
                    format!(
                        "no private key with {what} on token with {}",
                        self.token.inner.selector
                    ),
                ));
            }
            [one] => *one,
            _ => {
                return Err(Error::new(
                    ErrorKind::KeyAmbiguous,
                    format!("{} private keys with {what} on the token", found.len()),
                ));
            }
        };
        let (label, id) = self.label_and_id(private)?;
        let key_type = self.key_type_of(private)?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotSupported,
                format!("the key with {what} has a type this layer does not handle"),
            )
        })?;
        let public = self.public_of(&id)?;
        Ok(Key {
            label,
            id,
            key_type,
            private,
            public,
            session_epoch: self.epoch,
        })
    }

    fn cached(&mut self, label: &str) -> Result<&Key> {
        if !self.keys.contains_key(label) {
            let key = self.load_key(
                &format!("label {label:?}"),
                &[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::Label(label.as_bytes().to_vec()),
                ],
            )?;
            self.keys.insert(label.to_string(), key);
        }
        self.keys
            .get(label)
            .ok_or_else(|| Error::new(ErrorKind::KeyNotFound, "key vanished from the cache"))
    }

    /// The private key labelled `label` (looked up once per session, then cached).
    pub fn find_key(&mut self, label: &str) -> Result<Key> {
        self.cached(label).cloned()
    }

    /// Forgets the cached handle of the key labelled `label`, so that the next use looks it up again: after
    /// the token answered that the handle is invalid ([`Error::is_stale_handle`], an HSM cluster that failed
    /// over). The session itself stays.
    pub fn forget_key(&mut self, label: &str) {
        self.keys.remove(label);
    }

    /// The private key with CKA_ID `id`.
    pub fn find_key_by_id(&mut self, id: &[u8]) -> Result<Key> {
        let key = self.load_key(
            &format!("id {}", hex_string(id)),
            &[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(id.to_vec()),
            ],
        )?;
        self.keys.insert(key.label.clone(), key.clone());
        Ok(key)
    }

    /// The key pairs on the token (one entry per private key).
    /// A key destroyed by another session (or process) between the search and the reading of its
    /// attributes is left out.
    pub fn list_keys(&mut self) -> Result<Vec<KeyInfo>> {
        let mut out = Vec::new();
        for h in self.find(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])? {
            let read = || -> Result<KeyInfo> {
                let (label, id) = self.label_and_id(h)?;
                let key_type = self.key_type_of(h)?;
                let has_public = self.public_of(&id)?.is_some();
                Ok(KeyInfo {
                    label,
                    id,
                    key_type,
                    has_public,
                })
            };
            match read() {
                Ok(info) => out.push(info),
                Err(e) if e.rv() == Some(RvError::ObjectHandleInvalid) => {
                    tracing::debug!("a key vanished while the keys were listed");
                }
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.label.cmp(&b.label));
        Ok(out)
    }

    /// The public key of the pair labelled `label`, as SubjectPublicKeyInfo DER.
    pub fn public_key_der(&mut self, label: &str) -> Result<Vec<u8>> {
        let key = self.cached(label)?.clone();
        let public = key.public.ok_or_else(|| {
            Error::new(
                ErrorKind::KeyNotFound,
                format!("the public half of key {label:?} is not on the token"),
            )
        })?;
        let attrs = self.attributes(
            public,
            &[
                AttributeType::EcPoint,
                AttributeType::Modulus,
                AttributeType::PublicExponent,
            ],
        )?;
        let (mut point, mut modulus, mut exponent) = (None, None, None);
        for a in attrs {
            match a {
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Modulus(m) => modulus = Some(m),
                Attribute::PublicExponent(e) => exponent = Some(e),
                _ => {}
            }
        }
        let missing = || {
            Error::new(
                ErrorKind::Pkcs11,
                format!("the token did not return the public key of {label:?}"),
            )
        };
        match key.key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                let curve = if key.key_type == KeyType::EcP256 {
                    encoding::OID_SECP256R1
                } else {
                    encoding::OID_SECP384R1
                };
                encoding::spki_ec(
                    curve,
                    &encoding::unwrap_ec_point(&point.ok_or_else(missing)?),
                )
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => encoding::spki_rsa(
                &modulus.ok_or_else(missing)?,
                &exponent.ok_or_else(missing)?,
            ),
            KeyType::Ed25519 => {
                encoding::spki_ed25519(&encoding::unwrap_ec_point(&point.ok_or_else(missing)?))
            }
        }
    }

    /// Tries to read the private key's value (CKA_VALUE / private exponent). On a correctly generated
    /// key the token refuses: a `Sensitive` error. Exists to prove that keys cannot leave the token.
    pub fn export_private_key(&mut self, label: &str) -> Result<Vec<u8>> {
        let key = self.cached(label)?.clone();
        let value_types = [AttributeType::Value, AttributeType::PrivateExponent];
        for a in self.attributes(key.private, &value_types)? {
            if let Attribute::Value(v) | Attribute::PrivateExponent(v) = a
                && !v.is_empty()
            {
                return Ok(v);
            }
        }
        Err(Error::new(
            ErrorKind::Sensitive,
            format!("the token refuses to export private key {label:?} (sensitive, unextractable)"),
        ))
    }

    /// Destroys every object (both halves) labelled `label`.
    pub fn destroy_key(&mut self, label: &str) -> Result<()> {
        let found = self.find(&[Attribute::Label(label.as_bytes().to_vec())])?;
        if found.is_empty() {
            return Err(Error::new(
                ErrorKind::KeyNotFound,
                format!("no key labelled {label:?} on the token"),
            ));
        }
        self.keys.remove(label);
        let (_held, s) = self.guard()?;
        for h in found {
            s.destroy_object(h)
                .map_err(|e| Error::pkcs11("C_DestroyObject failed", e))?;
        }
        Ok(())
    }

    /// Signs `message`: hashes it on the host (ring) and has the token sign the digest, or, for
    /// Ed25519, has the token sign the message. ECDSA results are raw r||s
    /// (see [`ecdsa_raw_to_der`](crate::ecdsa_raw_to_der)).
    pub fn sign(&self, key: &Key, alg: SignAlgorithm, message: &[u8]) -> Result<Vec<u8>> {
        alg.check_key(key.key_type, &key.label)?;
        match alg.hash() {
            None => self.token_sign(
                key,
                &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                message,
            ),
            Some(h) => self.sign_digest(key, alg, h.digest(message).as_ref()),
        }
    }

    /// Signs a digest the caller computed (e.g. SPIRE's KeyManager hands over digests). The digest's
    /// length must match `alg`'s hash. Not possible for Ed25519 (`InvalidInput`).
    pub fn sign_digest(&self, key: &Key, alg: SignAlgorithm, digest: &[u8]) -> Result<Vec<u8>> {
        alg.check_key(key.key_type, &key.label)?;
        let Some(hash) = alg.hash() else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "Ed25519 signs messages, not digests",
            ));
        };
        if digest.len() != hash.output_len() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "a {hash:?} digest has {} bytes, got {}",
                    hash.output_len(),
                    digest.len()
                ),
            ));
        }
        match alg.family() {
            Family::Ec => self.token_sign(key, &Mechanism::Ecdsa, digest),
            Family::Rsa
                if matches!(
                    alg,
                    SignAlgorithm::RsaPkcs1Sha256
                        | SignAlgorithm::RsaPkcs1Sha384
                        | SignAlgorithm::RsaPkcs1Sha512
                ) =>
            {
                self.token_sign(
                    key,
                    &Mechanism::RsaPkcs,
                    &encoding::digest_info(hash, digest)?,
                )
            }
            Family::Rsa => {
                let (hash_alg, mgf) = match hash {
                    HashAlg::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
                    HashAlg::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
                    HashAlg::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
                };
                let params = PkcsPssParams {
                    hash_alg,
                    mgf,
                    s_len: (hash.output_len() as u64).into(),
                };
                self.token_sign(key, &Mechanism::RsaPkcsPss(params), digest)
            }
            Family::Ed25519 => Err(Error::new(
                ErrorKind::InvalidInput,
                "Ed25519 signs messages, not digests",
            )),
        }
    }

    /// Looks the key up (cached) and signs `message` with it.
    pub fn sign_by_label(
        &mut self,
        label: &str,
        alg: SignAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>> {
        self.cached(label)?;
        let key = self
            .keys
            .get(label)
            .ok_or_else(|| Error::new(ErrorKind::KeyNotFound, "key vanished from the cache"))?;
        self.sign(key, alg, message)
    }

    fn token_sign(&self, key: &Key, mechanism: &Mechanism<'_>, data: &[u8]) -> Result<Vec<u8>> {
        if key.session_epoch != self.epoch {
            return Err(Error::new(
                ErrorKind::Stale,
                format!(
                    "key {:?} was found on another session (or before a reopen): look it up again",
                    key.label
                ),
            ));
        }
        let (_held, s) = self.guard()?;
        s.sign(mechanism, key.private, data)
            .map_err(|e| Error::pkcs11(format!("signing with key {:?} failed", key.label), e))
    }
}

impl Drop for TokenSession {
    fn drop(&mut self) {
        self.close_inner();
    }
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    fn assert_send<T: Send>() {}
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}

    #[test]
    fn ownership_model() {
        assert_send::<super::TokenSession>();
        assert_send_sync_clone::<crate::Token>();
    }
}
