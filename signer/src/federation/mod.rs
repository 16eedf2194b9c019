//! SPIFFE federation (SPIFFE Federation §4–§5): the bundle endpoint signet serves for its own trust domain, and the
//! consumer that polls other trust domains' bundle endpoints.
//!
//! - [`endpoint`]: the bundle endpoint server, profile `https_web` (a configured certificate with the endpoint's DNS
//!   or IP SAN) or `https_spiffe` (the appliance's own X509-SVID), no client authentication, Mozilla "intermediate"
//!   TLS (TLS 1.2 and 1.3, ECDHE with AES-GCM or ChaCha20-Poly1305 only). `GET /` returns the latest bundle as
//!   UTF-8 JSON (`application/json`) with an `ETag`; `If-None-Match` with the current tag gets `304 Not Modified`.
//!   A change of the live bundle (its sequence increases) is served at the next request.
//! - [`consumer`]: one poller per `[[federation.trust_domains]]` entry. It fetches at the endpoint's refresh hint
//!   (never more often than `federation.refresh_floor`), retries failures with a doubling backoff, validates every
//!   bundle (a strict bundle document, no authority of another trust domain, none of our own keys) and keeps the
//!   last good one when a fetch fails. Foreign bundles are stored per trust domain, never merged into ours.
//! - [`verify`]: the `https_spiffe` server certificate check: the endpoint's SPIFFE ID and a path to the foreign
//!   trust domain's bundle (rustls-webpki does the path validation).
//!
//! Metrics: `signet_federation_fetches_total{trust_domain, outcome}` where outcome is `ok`, `not_modified`, or the
//! failure reason (`connect`, `tls`, `http`, `status`, `too_large`, `garbage`, `wrong_trust_domain`, `timeout`);
//! `signet_federation_bundle_sequence{trust_domain}`; `signet_federation_endpoint_requests_total{status}`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::spiffe::{BundleDocument, TrustDomain};

pub mod consumer;
pub mod endpoint;
pub mod settings;
pub mod verify;

pub use settings::{
    EndpointProfile, FederatedTrustDomain, FederationSettings, InvalidSettings, check_settings,
};

/// The SPIFFE ID of the appliance's own X509-SVID, which the `https_spiffe` endpoint presents.
pub fn endpoint_spiffe_id(td: &TrustDomain) -> String {
    format!("spiffe://{td}{}", crate::policy::SERVER_ID_PATH)
}

/// A foreign trust domain's bundle as last fetched (or bootstrapped).
#[derive(Debug, Clone)]
pub struct StoredBundle {
    /// The validated document.
    pub document: BundleDocument,
    /// Where it came from: `bootstrap` or `endpoint`.
    pub source: &'static str,
    /// When it was stored (Unix seconds).
    pub stored_at: i64,
    /// The endpoint's `ETag`, for the next conditional request.
    pub etag: Option<String>,
}

/// The last failure of a poller.
#[derive(Debug, Clone)]
pub struct FetchFailure {
    /// The reason label (as in the metric).
    pub reason: &'static str,
    /// What went wrong.
    pub message: String,
    /// When (Unix seconds).
    pub at: i64,
}

/// What the appliance knows of one foreign trust domain.
#[derive(Debug, Clone)]
pub struct FederatedBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint URL.
    pub endpoint: String,
    /// The last good bundle, if any.
    pub bundle: Option<StoredBundle>,
    /// The last failure, cleared by the next success.
    pub last_failure: Option<FetchFailure>,
    /// Successful fetches (including not-modified answers) since start.
    pub fetches: u64,
    /// Of those, the `304 Not Modified` answers to conditional requests.
    pub unchanged: u64,
    /// Failed fetches since start.
    pub failures: u64,
}

/// The foreign bundles, one per trust domain (cheap to clone). They are kept apart: nothing here ever changes the
/// appliance's own bundle.
#[derive(Debug, Clone, Default)]
pub struct FederatedBundles {
    inner: Arc<RwLock<BTreeMap<TrustDomain, FederatedBundle>>>,
}

impl FederatedBundles {
    /// Every foreign trust domain, in name order.
    pub fn all(&self) -> Vec<FederatedBundle> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// One trust domain's entry.
    pub fn get(&self, td: &TrustDomain) -> Option<FederatedBundle> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(td)
            .cloned()
    }

    fn update(&self, td: &TrustDomain, f: impl FnOnce(&mut FederatedBundle)) {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(td) {
            f(e);
        }
    }

    fn insert(&self, entry: FederatedBundle) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry.trust_domain.clone(), entry);
    }
}
