//! The token on disk. `token.json` holds the label, the salted PIN hashes and the token key wrapped under a key
//! derived from each PIN; `objects/<id>.json` holds one token object each. Public objects are stored in the clear
//! (a client lists them before logging in, as on any token); private objects (private keys above all) are sealed
//! with AES-256-GCM under the token key, so without a correct PIN the files reveal nothing but their count.
//! Files are replaced atomically (write to a temporary file, fsync, rename).
//!
//! Key derivation: PBKDF2-HMAC-SHA256 over the PIN with a random salt, once with a "verify" context (the stored
//! hash) and once with a "wrap" context (the key that wraps the token key, never stored).

use crate::rv::{CkResult, Rv};
use cryptoki_sys::CKR_GENERAL_ERROR;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Why the token directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file or directory could not be read or written.
    #[error("token storage {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file is not in the expected format.
    #[error("token file {path} is damaged: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<StoreError> for Rv {
    fn from(_: StoreError) -> Rv {
        Rv(cryptoki_sys::CKR_DEVICE_ERROR)
    }
}

/// Bytes stored as hex in JSON.
mod hexbytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// Ciphertext sealed with AES-256-GCM.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sealed {
    #[serde(with = "hexbytes")]
    nonce: Vec<u8>,
    #[serde(with = "hexbytes")]
    ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed({} bytes)", self.ciphertext.len())
    }
}

/// A 256-bit AEAD key (the token key, or a key derived from a PIN).
pub type AeadKey = Zeroizing<[u8; 32]>;

/// Fresh random bytes from the OS.
pub fn random_bytes<const N: usize>() -> CkResult<[u8; N]> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Rv(CKR_GENERAL_ERROR))?;
    Ok(b)
}

/// Seals `plaintext` under `key`, bound to `aad` (the object's id, so files cannot be swapped).
pub fn seal(key: &AeadKey, aad: &[u8], plaintext: &[u8]) -> CkResult<Sealed> {
    let unbound = UnboundKey::new(&AES_256_GCM, key.as_ref()).map_err(|_| Rv(CKR_GENERAL_ERROR))?;
    let nonce_bytes = random_bytes::<12>()?;
    let mut buf = plaintext.to_vec();
    LessSafeKey::new(unbound)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(aad),
            &mut buf,
        )
        .map_err(|_| Rv(CKR_GENERAL_ERROR))?;
    Ok(Sealed {
        nonce: nonce_bytes.to_vec(),
        ciphertext: buf,
    })
}

/// Opens what [`seal`] sealed; `None` if the key or the binding is wrong or the data was altered.
pub fn open(key: &AeadKey, aad: &[u8], sealed: &Sealed) -> Option<Zeroizing<Vec<u8>>> {
    let unbound = UnboundKey::new(&AES_256_GCM, key.as_ref()).ok()?;
    let nonce = Nonce::try_assume_unique_for_key(&sealed.nonce).ok()?;
    let mut buf = Zeroizing::new(sealed.ciphertext.clone());
    let len = LessSafeKey::new(unbound)
        .open_in_place(nonce, Aad::from(aad), buf.as_mut_slice())
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

/// A PIN as stored: a salted hash to check it, and the token key wrapped under a key derived from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinRecord {
    #[serde(with = "hexbytes")]
    salt: Vec<u8>,
    iterations: u32,
    #[serde(with = "hexbytes")]
    verifier: Vec<u8>,
    wrapped_token_key: Sealed,
    /// Wrong PINs in a row.
    pub failures: u32,
}

fn pbkdf2(pin: &[u8], salt: &[u8], context: &[u8], iterations: u32, out: &mut [u8]) {
    let mut full_salt = salt.to_vec();
    full_salt.extend_from_slice(context);
    let iterations = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &full_salt,
        pin,
        out,
    );
}

impl PinRecord {
    /// Hashes `pin` and wraps `token_key` under a key derived from it.
    pub fn new(pin: &[u8], token_key: &AeadKey, iterations: u32) -> CkResult<PinRecord> {
        let salt = random_bytes::<16>()?.to_vec();
        let mut verifier = vec![0u8; 32];
        pbkdf2(pin, &salt, b"hsm-sim pin verify", iterations, &mut verifier);
        let mut kek = Zeroizing::new([0u8; 32]);
        pbkdf2(pin, &salt, b"hsm-sim pin wrap", iterations, kek.as_mut());
        let wrapped_token_key = seal(&kek, b"token key", token_key.as_ref())?;
        Ok(PinRecord {
            salt,
            iterations,
            verifier,
            wrapped_token_key,
            failures: 0,
        })
    }

    /// Checks `pin` (in constant time) and, if right, unwraps the token key.
    pub fn unlock(&self, pin: &[u8]) -> Option<AeadKey> {
        let iterations = NonZeroU32::new(self.iterations).unwrap_or(NonZeroU32::MIN);
        let mut salt = self.salt.clone();
        salt.extend_from_slice(b"hsm-sim pin verify");
        ring::pbkdf2::verify(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            pin,
            &self.verifier,
        )
        .ok()?;
        let mut kek = Zeroizing::new([0u8; 32]);
        pbkdf2(
            pin,
            &self.salt,
            b"hsm-sim pin wrap",
            self.iterations,
            kek.as_mut(),
        );
        let key = open(&kek, b"token key", &self.wrapped_token_key)?;
        let arr: [u8; 32] = key.as_slice().try_into().ok()?;
        Some(Zeroizing::new(arr))
    }
}

/// The token's own record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Format version.
    pub version: u32,
    /// Token label (CKA_LABEL of C_InitToken, without padding).
    pub label: String,
    /// Serial number shown in CK_TOKEN_INFO.
    pub serial: String,
    /// The Security Officer's PIN.
    pub so: PinRecord,
    /// The user's PIN, once C_InitPIN set it.
    pub user: Option<PinRecord>,
}

/// Attribute values by attribute type.
pub type Attributes = BTreeMap<cryptoki_sys::CK_ATTRIBUTE_TYPE, Vec<u8>>;

/// What a sealed object holds.
#[derive(Serialize, Deserialize)]
pub struct ObjectPayload {
    /// Attribute values, hex-encoded.
    pub attributes: BTreeMap<String, String>,
    /// Key kind and secret (see [`crate::crypto::KeyMaterial::secret_bytes`]), for private keys.
    pub key: Option<(String, String)>,
}

impl std::fmt::Debug for ObjectPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log.
        f.debug_struct("ObjectPayload")
            .field("attributes", &self.attributes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectPayload {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let Some((_, secret)) = &mut self.key {
            secret.zeroize();
        }
    }
}

/// One token object as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoredObject {
    /// A public object: its attributes in the clear (hex values).
    Public {
        /// Attribute values, hex-encoded.
        attributes: BTreeMap<String, String>,
    },
    /// A private object sealed under the token key (an [`ObjectPayload`] in JSON).
    Sealed {
        /// The ciphertext.
        sealed: Sealed,
    },
}

/// Encodes attributes for storage: the attribute type in hex ("0x3" for CKA_LABEL), the value in hex.
pub fn encode_attributes(attrs: &Attributes) -> BTreeMap<String, String> {
    attrs
        .iter()
        .map(|(k, v)| (format!("{k:#x}"), hex::encode(v)))
        .collect()
}

/// Decodes stored attributes.
pub fn decode_attributes(map: &BTreeMap<String, String>) -> Option<Attributes> {
    map.iter()
        .map(|(k, v)| {
            let t =
                cryptoki_sys::CK_ATTRIBUTE_TYPE::from_str_radix(k.strip_prefix("0x")?, 16).ok()?;
            hex::decode(v).ok().map(|b| (t, b))
        })
        .collect()
}

/// The token directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// Opens (creating if needed) a token directory.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let objects = dir.join("objects");
        std::fs::create_dir_all(&objects).map_err(io(&objects))?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(
            ".{file_name}.{}.tmp",
            hex::encode(random_bytes::<6>().unwrap_or_default())
        ));
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    /// Reads the token record; `None` if the token was never initialised.
    pub fn load_token(&self) -> Result<Option<TokenRecord>, StoreError> {
        let path = self.dir.join("token.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Format {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Writes the token record.
    pub fn save_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let path = self.dir.join("token.json");
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.write_atomic(&path, &bytes)
    }

    fn object_path(&self, id: &str) -> PathBuf {
        self.dir.join("objects").join(format!("{id}.json"))
    }

    /// Reads every stored object, by id.
    pub fn load_objects(&self) -> Result<Vec<(String, StoredObject)>, StoreError> {
        let dir = self.dir.join("objects");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if id.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let obj = serde_json::from_slice(&bytes).map_err(|e| StoreError::Format {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            out.push((id.to_string(), obj));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Writes one object.
    pub fn save_object(&self, id: &str, obj: &StoredObject) -> Result<(), StoreError> {
        let path = self.object_path(id);
        let bytes = serde_json::to_vec(obj).map_err(|e| StoreError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.write_atomic(&path, &bytes)
    }

    /// Deletes one object.
    pub fn delete_object(&self, id: &str) -> Result<(), StoreError> {
        let path = self.object_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Deletes every object (C_InitToken).
    pub fn delete_all_objects(&self) -> Result<(), StoreError> {
        for (id, _) in self.load_objects()? {
            self.delete_object(&id)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let key: AeadKey = Zeroizing::new(random_bytes::<32>().unwrap());
        let s = seal(&key, b"id-1", b"secret").unwrap();
        assert_eq!(open(&key, b"id-1", &s).unwrap().as_slice(), b"secret");
        assert!(open(&key, b"id-2", &s).is_none(), "bound to its id");
        let other: AeadKey = Zeroizing::new(random_bytes::<32>().unwrap());
        assert!(open(&other, b"id-1", &s).is_none(), "wrong key");
        let mut bad = s.clone();
        bad.ciphertext[0] ^= 1;
        assert!(open(&key, b"id-1", &bad).is_none(), "altered ciphertext");
    }

    #[test]
    fn pin_record_checks_and_unwraps() {
        let key: AeadKey = Zeroizing::new(random_bytes::<32>().unwrap());
        let rec = PinRecord::new(b"1234", &key, 10).unwrap();
        assert_eq!(rec.unlock(b"1234").unwrap().as_ref(), key.as_ref());
        assert!(rec.unlock(b"1235").is_none());
        assert!(rec.unlock(b"").is_none());
        let json = serde_json::to_string(&rec).unwrap();
        assert!(
            !json.contains(&hex::encode(key.as_ref())),
            "the token key is never stored in the clear"
        );
    }
}
