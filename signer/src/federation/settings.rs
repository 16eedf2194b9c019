//! `[federation]`: the bundle endpoint signet serves and the foreign bundle endpoints it polls, and the checks of
//! those settings ([`check_settings`]); [`crate::config`] embeds them and calls the check.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::units::ConfigDuration;

/// Why `[federation]` was refused: the message names the setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSettings(pub String);

/// A SPIFFE bundle endpoint profile (SPIFFE Federation §5).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EndpointProfile {
    /// Web PKI: the server certificate carries the endpoint's DNS name or IP address.
    #[default]
    HttpsWeb,
    /// The server certificate is an X509-SVID, authenticated against the trust domain's bundle.
    HttpsSpiffe,
}

impl EndpointProfile {
    /// The name used in the configuration (`https_web`, `https_spiffe`).
    pub fn name(self) -> &'static str {
        match self {
            EndpointProfile::HttpsWeb => "https_web",
            EndpointProfile::HttpsSpiffe => "https_spiffe",
        }
    }
}

/// One `[[federation.trust_domains]]` entry: a foreign trust domain whose bundle signet fetches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedTrustDomain {
    /// The foreign trust domain's name (never our own).
    pub trust_domain: String,
    /// Its bundle endpoint URL (`https://host[:port][/path]`).
    pub endpoint: String,
    /// The endpoint's profile.
    pub profile: EndpointProfile,
    /// https_web: the roots (PEM) that may sign the endpoint's server certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// https_spiffe: the SPIFFE ID the endpoint's X509-SVID must carry.
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    /// https_spiffe: the foreign trust domain's bundle (SPIFFE bundle document, JSON) to authenticate the first
    /// fetch; later fetches are authenticated against the last bundle fetched.
    #[serde(default)]
    pub bootstrap_bundle: Option<PathBuf>,
}

/// `[federation]`: the bundle endpoint signet serves and the foreign bundle endpoints it polls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSettings {
    /// Where the bundle endpoint listens; absent: no endpoint is served.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The endpoint's profile.
    #[serde(default)]
    pub profile: EndpointProfile,
    /// https_web: the endpoint's certificate chain (PEM, leaf first) with its DNS/IP SANs.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// https_web: the certificate's private key (PEM: PKCS#8, SEC1 or PKCS#1).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The `spiffe_refresh_hint` the endpoint publishes.
    #[serde(default = "default_refresh_hint")]
    pub refresh_hint: ConfigDuration,
    /// The shortest interval between two fetches of one foreign endpoint, whatever its hint says; also the first
    /// retry delay after a failed fetch (doubling up to the refresh hint).
    #[serde(default = "default_refresh_floor")]
    pub refresh_floor: ConfigDuration,
    /// The largest bundle accepted from a foreign endpoint, in bytes.
    #[serde(default = "default_max_bundle")]
    pub max_bundle_bytes: usize,
    /// How long one fetch (connect, TLS, request, body) may take.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout: ConfigDuration,
    /// The foreign trust domains.
    #[serde(default)]
    pub trust_domains: Vec<FederatedTrustDomain>,
}

fn default_refresh_hint() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(300))
}
fn default_refresh_floor() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}
fn default_max_bundle() -> usize {
    1024 * 1024
}
fn default_fetch_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}

impl Default for FederationSettings {
    fn default() -> Self {
        Self {
            listen: None,
            profile: EndpointProfile::HttpsWeb,
            cert: None,
            key: None,
            refresh_hint: default_refresh_hint(),
            refresh_floor: default_refresh_floor(),
            max_bundle_bytes: default_max_bundle(),
            fetch_timeout: default_fetch_timeout(),
            trust_domains: Vec::new(),
        }
    }
}

/// Checks `[federation]` beyond what the types say.
pub fn check_settings(f: &FederationSettings, own: &TrustDomain) -> Result<(), InvalidSettings> {
    let bad = |m: String| Err(InvalidSettings(m));
    if f.listen.is_some()
        && f.profile == EndpointProfile::HttpsWeb
        && (f.cert.is_none() || f.key.is_none())
    {
        return bad(
            "federation.profile = \"https_web\" needs federation.cert and federation.key (a certificate with the \
             endpoint's DNS name or IP address)"
                .into(),
        );
    }
    if f.refresh_hint.0.is_zero() || f.refresh_floor.0.is_zero() || f.fetch_timeout.0.is_zero() {
        return bad(
            "federation.refresh_hint, refresh_floor and fetch_timeout must be positive".into(),
        );
    }
    if f.max_bundle_bytes < 1024 {
        return bad("federation.max_bundle_bytes must be at least 1024".into());
    }
    let mut seen = std::collections::HashSet::new();
    for t in &f.trust_domains {
        let td = TrustDomain::parse(&t.trust_domain).map_err(|e| {
            InvalidSettings(format!(
                "federation.trust_domains: {:?}: {e}",
                t.trust_domain
            ))
        })?;
        let name = format!("federation.trust_domains {td}");
        if td == *own {
            return bad(format!(
                "{name}: a trust domain does not federate with itself"
            ));
        }
        if !seen.insert(td.clone()) {
            return bad(format!("{name} is listed twice"));
        }
        super::consumer::EndpointUrl::parse(&t.endpoint)
            .map_err(|e| InvalidSettings(format!("{name}: {e}")))?;
        match t.profile {
            EndpointProfile::HttpsWeb => {
                if t.ca.is_none() {
                    return bad(format!(
                        "{name}: profile https_web needs `ca` (the roots for the endpoint's certificate, PEM)"
                    ));
                }
                if t.endpoint_spiffe_id.is_some() || t.bootstrap_bundle.is_some() {
                    return bad(format!(
                        "{name}: endpoint_spiffe_id and bootstrap_bundle belong to profile https_spiffe"
                    ));
                }
            }
            EndpointProfile::HttpsSpiffe => {
                let Some(id) = &t.endpoint_spiffe_id else {
                    return bad(format!(
                        "{name}: profile https_spiffe needs endpoint_spiffe_id"
                    ));
                };
                SpiffeId::parse(id)
                    .map_err(|e| InvalidSettings(format!("{name}: endpoint_spiffe_id: {e}")))?;
                if t.bootstrap_bundle.is_none() {
                    return bad(format!(
                        "{name}: profile https_spiffe needs bootstrap_bundle (the foreign trust domain's bundle, \
                         JSON, to authenticate the first fetch)"
                    ));
                }
                if t.ca.is_some() {
                    return bad(format!("{name}: `ca` belongs to profile https_web"));
                }
            }
        }
    }
    Ok(())
}
