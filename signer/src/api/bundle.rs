//! The trust domain's bundle as the APIs serve it: X.509 roots and JWT keys, with a sequence number that increases
//! on every change, fanned out to subscribers through a `tokio::sync::watch` channel.
//!
//! Whatever changes the bundle (root rotation, a SPIRE server publishing its JWT key) calls the methods here;
//! every open `MintX509CAAndSubscribe`, `PublishJWTKeyAndSubscribe` and `SubscribeToLocalBundle` stream sees the
//! change. The authorities' life cycle ([`crate::ca`]) commits each change to the datastore first and then hands the
//! bundle the new version ([`TrustBundle::replace`]), so the sequence number survives restarts. Keys published by
//! SPIRE servers are stored first ([`crate::ca::Authorities::store_published_jwt_key`]) and then join the live
//! bundle ([`TrustBundle::publish_jwt_key`]), so a restart still publishes them.
//!
//! **Every JWT key has an owner** ([`KeyOwner`]): signet's own authorities (from rotation) belong to signet and
//! change only through rotation, never through [`TrustBundle::publish_jwt_key`]; a key a SPIRE server published
//! belongs to that server (the caller's SPIFFE ID) and only it may publish it again, change its expiry or taint it.
//! Nobody else removes it either: only its own expiry does. [`check_publishable`] holds the rules for what a caller
//! may put into the bundle at all (key id, expiry, key type). No RPC puts anything else into the bundle: X.509 roots
//! and their `tainted` flag are signet's authorities and move only through rotation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::spiffe::{BundleDocument, JwtAuthority, X509Authority};

/// Whom a JWT key in the bundle belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyOwner {
    /// signet's own JWT authority (rotation): never changed through the UpstreamAuthority API.
    Signet,
    /// The SPIFFE ID of the caller that published it.
    Publisher(String),
    /// Published before owners were recorded: it stays until it expires, and nobody may change it.
    Unknown,
}

impl KeyOwner {
    /// The owner as stored with a published key (`""`: unknown).
    pub fn stored(&self) -> &str {
        match self {
            KeyOwner::Publisher(id) => id,
            KeyOwner::Signet | KeyOwner::Unknown => "",
        }
    }

    /// The owner of a published key as the datastore holds it (`""`: unknown).
    pub fn from_stored(owner: String) -> Self {
        if owner.is_empty() {
            KeyOwner::Unknown
        } else {
            KeyOwner::Publisher(owner)
        }
    }
}

impl std::fmt::Display for KeyOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyOwner::Signet => f.write_str("signet (its own JWT authority)"),
            KeyOwner::Publisher(id) => write!(f, "{id}"),
            KeyOwner::Unknown => f.write_str("an unrecorded publisher"),
        }
    }
}

/// Longest key id accepted from a publisher, in bytes.
pub const MAX_KID_LEN: usize = 256;

/// A JWT signing key in the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// The key id (`kid`).
    pub kid: String,
    /// SubjectPublicKeyInfo DER.
    pub spki: Vec<u8>,
    /// Expiry (Unix seconds); 0: none.
    pub expires_at: i64,
    /// Whether it is tainted.
    pub tainted: bool,
    /// Whom it belongs to.
    pub owner: KeyOwner,
}

/// One version of the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSnapshot {
    /// `spiffe_sequence`.
    pub sequence: u64,
    /// The X.509 roots (DER).
    pub x509_roots: Vec<Vec<u8>>,
    /// Those of the roots that are tainted (DER): SPIRE moves off them at once.
    pub x509_tainted: Vec<Vec<u8>>,
    /// The JWT keys.
    pub jwt_keys: Vec<JwtKey>,
}

/// How often relying parties should refresh the bundle, in seconds (published as `spiffe_refresh_hint`), unless
/// the configuration says otherwise (`authority.bundle_refresh_hint`).
pub const REFRESH_HINT_SECS: u64 = 300;

impl BundleSnapshot {
    /// The SPIFFE bundle document.
    pub fn document(&self) -> Result<BundleDocument, crate::spiffe::BundleError> {
        Ok(BundleDocument {
            sequence: self.sequence,
            refresh_hint_secs: Some(REFRESH_HINT_SECS),
            x509_authorities: self
                .x509_roots
                .iter()
                .map(|d| X509Authority::new(d.clone()))
                .collect::<Result<_, _>>()?,
            jwt_authorities: self
                .jwt_keys
                .iter()
                .map(|k| JwtAuthority::new(k.kid.clone(), k.spki.clone()))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Why a JWT key was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The key id is taken by a different key of the same publisher.
    #[error(
        "key id {0:?} is already in the bundle with a different public key: use a fresh key id"
    )]
    KidConflict(String),
    /// The key id belongs to signet's own JWT authorities.
    #[error(
        "key id {0:?} is one of signet's own JWT authorities: they change only through rotation"
    )]
    SignetKey(String),
    /// The key id is in the bundle under another owner.
    #[error("key id {kid:?} belongs to {owner}: only its owner may publish, expire or taint it")]
    NotOwner {
        /// The key id.
        kid: String,
        /// Its owner.
        owner: KeyOwner,
    },
    /// The key id is empty, too long or not printable ASCII.
    #[error("key_id {0}")]
    BadKid(String),
    /// The expiry is not in the future.
    #[error(
        "expires_at {expires_at} is not in the future (now {now}): give the key's expiry in Unix seconds"
    )]
    Expired {
        /// The expiry asked for.
        expires_at: i64,
        /// Now.
        now: i64,
    },
    /// The key is unusable.
    #[error("the JWT key is invalid: {0}")]
    Invalid(String),
}

impl PublishError {
    /// Whether the caller asked to change what is not its own (PERMISSION_DENIED), rather than sent something
    /// unusable (INVALID_ARGUMENT) or clashing with its own key (ALREADY_EXISTS).
    pub fn is_denied(&self) -> bool {
        matches!(self, Self::SignetKey(_) | Self::NotOwner { .. })
    }
}

/// Checks what a caller asks to publish, before anything else: a key id of 1 to [`MAX_KID_LEN`] bytes of printable
/// ASCII, an expiry after `now` (Unix seconds), and a public key that is a SubjectPublicKeyInfo (DER, nothing
/// after it) of a JWT key type signet accepts: EC P-256 or P-384 (a point on the curve) or RSA of at least 2048
/// bits.
pub fn check_publishable(kid: &str, spki: &[u8], expires_at: i64, now: i64) -> Result<(), PublishError> {
    if kid.is_empty() {
        return Err(PublishError::BadKid("is empty".into()));
    }
    if kid.len() > MAX_KID_LEN {
        return Err(PublishError::BadKid(format!(
            "is {} bytes long, more than {MAX_KID_LEN}",
            kid.len()
        )));
    }
    if let Some(b) = kid.bytes().find(|b| !(0x21..=0x7e).contains(b)) {
        return Err(PublishError::BadKid(format!(
            "holds byte 0x{b:02x}: use printable ASCII without spaces"
        )));
    }
    if expires_at <= now {
        return Err(PublishError::Expired { expires_at, now });
    }
    check_jwt_spki(spki)
}

/// Checks that `spki` is a JWT key signet accepts (see [`check_publishable`]).
pub fn check_jwt_spki(spki: &[u8]) -> Result<(), PublishError> {
    use crate::spki::{SubjectKey, SubjectKeyKind};
    let key = SubjectKey::from_spki_der(spki).map_err(|e| PublishError::Invalid(e.to_string()))?;
    let on_curve = match key.kind() {
        SubjectKeyKind::EcP256 => p256::PublicKey::from_sec1_bytes(key.raw()).is_ok(),
        SubjectKeyKind::EcP384 => p384::PublicKey::from_sec1_bytes(key.raw()).is_ok(),
        SubjectKeyKind::Rsa(_) => true,
        _ => {
            return Err(PublishError::Invalid(
                "the key type is not accepted for JWT keys: use EC P-256, EC P-384 or RSA (2048 bits or more)"
                    .into(),
            ));
        }
    };
    if !on_curve {
        return Err(PublishError::Invalid(
            "the EC public key is not a point on its curve".into(),
        ));
    }
    Ok(())
}

/// The live bundle (cheap to clone).
#[derive(Debug, Clone)]
pub struct TrustBundle {
    tx: Arc<watch::Sender<Arc<BundleSnapshot>>>,
    refresh_hint_secs: Arc<AtomicU64>,
}

impl TrustBundle {
    /// A bundle with `x509_roots` and `jwt_keys`. The first sequence number is the current Unix time, so that it
    /// keeps increasing across restarts while the bundle lives in memory only.
    pub fn new(x509_roots: Vec<Vec<u8>>, jwt_keys: Vec<JwtKey>) -> Self {
        let sequence = u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(1);
        Self::from_snapshot(BundleSnapshot {
            sequence,
            x509_roots,
            x509_tainted: Vec::new(),
            jwt_keys,
        })
    }

    /// A bundle starting at `snapshot` (as the datastore holds it).
    pub fn from_snapshot(snapshot: BundleSnapshot) -> Self {
        let (tx, _) = watch::channel(Arc::new(snapshot));
        Self {
            tx: Arc::new(tx),
            refresh_hint_secs: Arc::new(AtomicU64::new(REFRESH_HINT_SECS)),
        }
    }

    /// Sets the `spiffe_refresh_hint` the bundle is published with (seconds, at least 1).
    pub fn set_refresh_hint(&self, hint: std::time::Duration) {
        self.refresh_hint_secs
            .store(hint.as_secs().max(1), Ordering::Relaxed);
    }

    /// The `spiffe_refresh_hint` the bundle is published with, in seconds.
    pub fn refresh_hint_secs(&self) -> u64 {
        self.refresh_hint_secs.load(Ordering::Relaxed)
    }

    /// Replaces the bundle with `snapshot` (built from the datastore after a committed change) if its content or
    /// sequence differs, and tells every subscriber. A snapshot older than the current one is ignored. Returns
    /// whether the bundle changed.
    pub fn replace(&self, snapshot: BundleSnapshot) -> bool {
        self.tx.send_if_modified(|cur| {
            if snapshot.sequence < cur.sequence || **cur == snapshot {
                return false;
            }
            *cur = Arc::new(snapshot);
            true
        })
    }

    /// The current version.
    pub fn current(&self) -> Arc<BundleSnapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<BundleSnapshot>> {
        self.tx.subscribe()
    }

    fn modify(&self, f: impl FnOnce(&mut BundleSnapshot) -> bool) -> bool {
        self.tx.send_if_modified(|cur| {
            let mut next = (**cur).clone();
            if !f(&mut next) {
                return false;
            }
            next.sequence = cur.sequence.saturating_add(1);
            *cur = Arc::new(next);
            true
        })
    }

    /// Adds an X.509 root (a no-op if present). Returns whether the bundle changed.
    pub fn add_x509_root(&self, der: Vec<u8>) -> bool {
        self.modify(|b| {
            if b.x509_roots.contains(&der) {
                return false;
            }
            b.x509_roots.push(der);
            true
        })
    }

    /// Removes an X.509 root. Returns whether the bundle changed.
    pub fn remove_x509_root(&self, der: &[u8]) -> bool {
        self.modify(|b| {
            let before = b.x509_roots.len();
            b.x509_roots.retain(|r| r != der);
            b.x509_roots.len() != before
        })
    }

    /// Whether publishing `key` (owned by `key.owner`) would be allowed by the keys in the bundle now: see
    /// [`publish_jwt_key`](Self::publish_jwt_key). Lets a caller refuse (and audit) before doing anything.
    pub fn may_publish(&self, key: &JwtKey) -> Result<(), PublishError> {
        Self::ownership(&self.current(), key)
    }

    fn ownership(b: &BundleSnapshot, key: &JwtKey) -> Result<(), PublishError> {
        if !matches!(key.owner, KeyOwner::Publisher(_)) {
            return Err(PublishError::Invalid(
                "only a caller publishes JWT keys; signet's own change through rotation".into(),
            ));
        }
        match b.jwt_keys.iter().find(|k| k.kid == key.kid) {
            None => Ok(()),
            Some(k) if k.owner == KeyOwner::Signet => Err(PublishError::SignetKey(key.kid.clone())),
            Some(k) if k.owner != key.owner => Err(PublishError::NotOwner {
                kid: key.kid.clone(),
                owner: k.owner.clone(),
            }),
            Some(k) if k.spki != key.spki => Err(PublishError::KidConflict(key.kid.clone())),
            Some(_) => Ok(()),
        }
    }

    /// Adds a JWT key published by `key.owner` (a [`KeyOwner::Publisher`]), or lets its owner change its expiry or
    /// taint. Refused, with the bundle unchanged: a key id of signet's own authorities ([`PublishError::SignetKey`]),
    /// one in the bundle under another owner ([`PublishError::NotOwner`]), the owner's own key id with another
    /// public key ([`PublishError::KidConflict`]), a key that is not a usable JWT authority. Published keys that
    /// have expired are dropped at the same time; signet's own never are. The check and the change are one atomic
    /// step on the live bundle. Returns whether the bundle changed.
    pub fn publish_jwt_key(&self, key: JwtKey) -> Result<bool, PublishError> {
        JwtAuthority::new(key.kid.clone(), key.spki.clone())
            .map_err(|e| PublishError::Invalid(e.to_string()))?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut refused = None;
        let changed = self.modify(|b| {
            if let Err(e) = Self::ownership(b, &key) {
                refused = Some(e);
                return false;
            }
            let before = b.jwt_keys.clone();
            b.jwt_keys.retain(|k| {
                k.owner == KeyOwner::Signet
                    || k.expires_at == 0
                    || k.expires_at > now
                    || k.kid == key.kid
            });
            match b.jwt_keys.iter_mut().find(|k| k.kid == key.kid) {
                Some(k) => {
                    k.expires_at = key.expires_at;
                    k.tainted = key.tainted;
                }
                None => b.jwt_keys.push(key),
            }
            b.jwt_keys != before
        });
        match refused {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_bumps_the_sequence_and_reaches_subscribers() {
        let b = TrustBundle::new(vec![vec![1]], Vec::new());
        let mut rx = b.subscribe();
        let s0 = b.current().sequence;
        assert!(b.add_x509_root(vec![2]));
        assert!(!b.add_x509_root(vec![2]));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().sequence, s0 + 1);
        assert!(b.remove_x509_root(&[1]));
        assert_eq!(b.current().x509_roots, vec![vec![2]]);
        assert_eq!(b.current().sequence, s0 + 2);
    }
}
