//! The trust domain's bundle as the APIs serve it: X.509 roots and JWT keys, with a sequence number that increases
//! on every change, fanned out to subscribers through a `tokio::sync::watch` channel.
//!
//! Whatever changes the bundle (root rotation, a SPIRE server publishing its JWT key) calls the methods here;
//! every open `MintX509CAAndSubscribe`, `PublishJWTKeyAndSubscribe` and `SubscribeToLocalBundle` stream sees the
//! change. The authorities' life cycle ([`crate::ca`]) commits each change to the datastore first and then hands the
//! bundle the new version ([`TrustBundle::replace`]), so the sequence number survives restarts. Keys published by
//! SPIRE servers change the live bundle first and are then stored
//! ([`crate::ca::Authorities::keep_published_jwt_keys`]), so a restart still publishes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use time::OffsetDateTime;
use tokio::sync::watch;

use crate::spiffe::{BundleDocument, JwtAuthority, X509Authority};

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
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The key id is taken by a different key.
    #[error(
        "key id {0:?} is already in the bundle with a different public key: use a fresh key id"
    )]
    KidConflict(String),
    /// The key is unusable.
    #[error("the JWT key is invalid: {0}")]
    Invalid(String),
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

    /// Adds a JWT key; the same kid with the same key is a no-op (its expiry is refreshed). Expired keys are
    /// dropped at the same time. Returns whether the bundle changed.
    pub fn publish_jwt_key(&self, key: JwtKey) -> Result<bool, PublishError> {
        JwtAuthority::new(key.kid.clone(), key.spki.clone())
            .map_err(|e| PublishError::Invalid(e.to_string()))?;
        if let Some(existing) = self.current().jwt_keys.iter().find(|k| k.kid == key.kid)
            && existing.spki != key.spki
        {
            return Err(PublishError::KidConflict(key.kid));
        }
        let now = OffsetDateTime::now_utc().unix_timestamp();
        Ok(self.modify(|b| {
            let before = b.jwt_keys.clone();
            b.jwt_keys
                .retain(|k| k.expires_at == 0 || k.expires_at > now || k.kid == key.kid);
            match b.jwt_keys.iter_mut().find(|k| k.kid == key.kid) {
                Some(k) if k.spki == key.spki => {
                    k.expires_at = key.expires_at;
                    k.tainted = key.tainted;
                }
                Some(_) => {}
                None => b.jwt_keys.push(key),
            }
            b.jwt_keys != before
        }))
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
