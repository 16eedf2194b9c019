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
    /// signet's own X.509 authorities when they are intermediates below offline roots (DER; empty when its
    /// authorities are the roots): not part of the bundle, but what they sign is signet's (see `api::tls`).
    pub own_cas: Vec<Vec<u8>>,
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
pub fn check_publishable(
    kid: &str,
    spki: &[u8],
    expires_at: i64,
    now: i64,
) -> Result<(), PublishError> {
    check_kid(kid)?;
    if expires_at <= now {
        return Err(PublishError::Expired { expires_at, now });
    }
    check_jwt_spki(spki)
}

/// Checks a key id from a publisher: 1 to [`MAX_KID_LEN`] bytes of printable ASCII without spaces.
pub fn check_kid(kid: &str) -> Result<(), PublishError> {
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
    Ok(())
}

/// Checks that `spki` is a JWT key signet accepts (see [`check_publishable`]).
pub fn check_jwt_spki(spki: &[u8]) -> Result<(), PublishError> {
    use crate::keys::spki::{SubjectKey, SubjectKeyKind};
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
            own_cas: Vec::new(),
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

    const RSA_1024_SPKI: &str = "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC77TgcM4zQRhCSFWCeRSWCwz4OT20F4+AZRic5aD/3QYzY5jkwGcKvUDGn+hhDEwROMDC4qBwwOEqJsSc2pSir/hSK4w5JfFj2Iqe/bODGA8s/auXMWfZUQWMlqT03USCumHIiaUJieqeLTtdFCaiMC7peKNI5ilDyy7jvhhv/wwIDAQAB";
    const RSA_2048_SPKI: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAojVXIyaXR5s2c+H5dc8bS4FRLHNzaNqoekcVLQremDKEIKUtwdUsOGJ25030Fp4lRz+Kvn0vR7cKiP2su+QE+bfVWklgHajF//hJiNrAe5XvBwyrnTx6pftbkb4BTWTlm9Id0gyw09uuVrcBfZO1SPCw4anECMBxBR0EnBobrwLccmEjx4PwWN8sxqCoUTpkUab4C/8Qy7oFX1HzoKF7rz3Ln4m8//lC/dtRtMyC/nvSUMFL04YYNoJdrFjqfQbHy5aO4YJyg1KKSZdj2sZYLcJjMiXYlcegkd078QkeWN8bxovIUjElcKMEFKIAJAAsWYhAA3u60ycEUoFM45N0PQIDAQAB";

    fn spki() -> Vec<u8> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        rcgen::PublicKeyData::subject_public_key_info(&kp)
    }

    fn now() -> i64 {
        OffsetDateTime::now_utc().unix_timestamp()
    }

    fn key(kid: &str, spki: Vec<u8>, owner: &str) -> JwtKey {
        JwtKey {
            kid: kid.into(),
            spki,
            expires_at: now() + 3600,
            tainted: false,
            owner: KeyOwner::Publisher(owner.into()),
        }
    }

    /// A bundle with signet's own JWT key `signet-kid`.
    fn with_signet_key() -> (TrustBundle, JwtKey) {
        let own = JwtKey {
            kid: "signet-kid".into(),
            spki: spki(),
            expires_at: 0,
            tainted: false,
            owner: KeyOwner::Signet,
        };
        (TrustBundle::new(vec![vec![1]], vec![own.clone()]), own)
    }

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

    #[test]
    fn signets_own_key_cannot_be_expired_or_tainted_by_a_publisher() {
        let (b, own) = with_signet_key();
        let before = b.current();
        // The attack: signet's own kid and public key, with an expiry in the past and tainted.
        let mut attack = key("signet-kid", own.spki.clone(), "spiffe://td/spire/a");
        attack.expires_at = 1;
        attack.tainted = true;
        assert_eq!(
            b.publish_jwt_key(attack.clone()),
            Err(PublishError::SignetKey("signet-kid".into()))
        );
        assert!(b.may_publish(&attack).unwrap_err().is_denied());
        // Even the same key with a valid expiry is not taken over.
        assert!(
            b.publish_jwt_key(key("signet-kid", own.spki.clone(), "x"))
                .is_err()
        );
        assert_eq!(b.current(), before, "nothing changed");
        // Another key's publication leaves signet's key in place.
        assert!(
            b.publish_jwt_key(key("other", spki(), "spiffe://td/spire/a"))
                .unwrap()
        );
        assert!(b.current().jwt_keys.contains(&own));
    }

    #[test]
    fn signets_key_is_never_dropped_as_expired_and_nobody_publishes_as_signet() {
        let mut own = with_signet_key().1;
        own.expires_at = 1;
        let b = TrustBundle::new(Vec::new(), vec![own.clone()]);
        assert!(b.publish_jwt_key(key("k", spki(), "a")).unwrap());
        assert!(b.current().jwt_keys.contains(&own));
        let mut forged = key("k2", spki(), "a");
        forged.owner = KeyOwner::Signet;
        assert!(matches!(
            b.publish_jwt_key(forged),
            Err(PublishError::Invalid(_))
        ));
    }

    #[test]
    fn only_the_owner_changes_its_key() {
        let b = TrustBundle::new(Vec::new(), Vec::new());
        let k = key("spire-a-1", spki(), "spiffe://td/spire/a");
        assert!(b.publish_jwt_key(k.clone()).unwrap());
        // Another caller cannot expire, taint or re-publish it, even with the same public key.
        for change in [
            JwtKey {
                expires_at: 1,
                ..k.clone()
            },
            JwtKey {
                tainted: true,
                ..k.clone()
            },
            k.clone(),
        ] {
            let by_b = JwtKey {
                owner: KeyOwner::Publisher("spiffe://td/spire/b".into()),
                ..change
            };
            assert_eq!(
                b.publish_jwt_key(by_b),
                Err(PublishError::NotOwner {
                    kid: "spire-a-1".into(),
                    owner: KeyOwner::Publisher("spiffe://td/spire/a".into()),
                })
            );
        }
        assert_eq!(b.current().jwt_keys, vec![k.clone()]);
        // The owner re-publishes (no change), then taints and changes its expiry.
        assert!(!b.publish_jwt_key(k.clone()).unwrap());
        let tainted = JwtKey {
            tainted: true,
            expires_at: k.expires_at + 60,
            ..k.clone()
        };
        assert!(b.publish_jwt_key(tainted.clone()).unwrap());
        assert_eq!(b.current().jwt_keys, vec![tainted]);
        // Its own key id with another public key is a conflict, not a replacement.
        assert_eq!(
            b.publish_jwt_key(key("spire-a-1", spki(), "spiffe://td/spire/a")),
            Err(PublishError::KidConflict("spire-a-1".into()))
        );
    }

    #[test]
    fn keys_without_a_recorded_owner_are_changed_by_nobody() {
        let legacy = JwtKey {
            owner: KeyOwner::Unknown,
            ..key("old", spki(), "")
        };
        let b = TrustBundle::new(Vec::new(), vec![legacy.clone()]);
        let r = b.publish_jwt_key(JwtKey {
            owner: KeyOwner::Publisher("spiffe://td/spire/a".into()),
            expires_at: 1,
            ..legacy.clone()
        });
        assert!(r.unwrap_err().is_denied());
        assert_eq!(b.current().jwt_keys, vec![legacy]);
    }

    #[test]
    fn expired_published_keys_leave_at_the_next_publication() {
        let b = TrustBundle::new(Vec::new(), Vec::new());
        let mut k = key("short", spki(), "a");
        k.expires_at = now() - 1;
        // Accepted by the bundle itself (the API refuses it first: check_publishable), then dropped.
        assert!(b.publish_jwt_key(k).unwrap());
        assert!(b.publish_jwt_key(key("next", spki(), "b")).unwrap());
        let kids: Vec<String> = b.current().jwt_keys.iter().map(|k| k.kid.clone()).collect();
        assert_eq!(kids, vec!["next".to_string()]);
    }

    #[test]
    fn what_a_caller_may_publish() {
        let t = now();
        let good = spki();
        assert_eq!(check_publishable("k", &good, t + 60, t), Ok(()));
        for (kid, why) in [
            ("", "is empty"),
            ("has space", "0x20"),
            ("tab\t", "0x09"),
            ("é", "0xc3"),
        ] {
            let e = check_publishable(kid, &good, t + 60, t).unwrap_err();
            assert!(matches!(e, PublishError::BadKid(_)), "{kid:?}: {e}");
            assert!(e.to_string().contains(why), "{kid:?}: {e}");
        }
        let long = "k".repeat(MAX_KID_LEN + 1);
        assert!(matches!(
            check_publishable(&long, &good, t + 60, t),
            Err(PublishError::BadKid(_))
        ));
        assert_eq!(
            check_publishable(&"k".repeat(MAX_KID_LEN), &good, t + 60, t),
            Ok(())
        );
        for exp in [t, t - 1, 1, 0, -5] {
            assert!(
                matches!(
                    check_publishable("k", &good, exp, t),
                    Err(PublishError::Expired { .. })
                ),
                "{exp}"
            );
        }
        // Garbage, trailing bytes, Ed25519, a P-256 point off the curve, RSA 1024: refused; P-384 and RSA 2048 fine.
        let mut trailing = good.clone();
        trailing.push(0);
        let ed = rcgen::PublicKeyData::subject_public_key_info(
            &rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        );
        let mut off_curve = good.clone();
        let n = off_curve.len();
        off_curve[n - 1] ^= 1;
        let p384 = rcgen::PublicKeyData::subject_public_key_info(
            &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        );
        // RSA public keys made with `openssl genpkey` (generating RSA keys in a test is slow).
        let rsa = |bits: usize| {
            use base64::Engine as _;
            let b64 = if bits == 1024 {
                RSA_1024_SPKI
            } else {
                RSA_2048_SPKI
            };
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap()
        };
        for bad in [
            b"garbage".to_vec(),
            Vec::new(),
            trailing,
            ed,
            off_curve,
            rsa(1024),
        ] {
            assert!(
                matches!(
                    check_publishable("k", &bad, t + 60, t),
                    Err(PublishError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(check_publishable("k", &p384, t + 60, t), Ok(()));
        assert_eq!(check_publishable("k", &rsa(2048), t + 60, t), Ok(()));
    }
}
