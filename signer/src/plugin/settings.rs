//! The plug-in's configuration: the `plugin_data` block of SPIRE's `server.conf`, which SPIRE hands over as HCL
//! text in `Configure` and `Validate`.
//!
//! ```hcl
//! plugin_data {
//!   endpoint          = "signet.example.org:8443"      # the appliance (host:port)
//!   # or, with replicas sharing one datastore, all of them (tried in order; a replica that cannot be reached
//!   # hands its calls and streams to the next):
//!   # endpoints       = ["signet-a.example.org:8443", "signet-b.example.org:8443"]
//!   server_name       = "signet.example.org"           # name its certificate carries; default: the (first) endpoint's host
//!   trust_bundle_path = "/etc/spire/signet-bundle.pem" # roots that verify the appliance (PEM)
//!   client_cert_path  = "/etc/spire/signet-client.pem" # this SPIRE server's X509-SVID chain (PEM, leaf first)
//!   client_key_path   = "/etc/spire/signet-client.key" # its key (PKCS#8 PEM)
//!   connect_timeout   = "10s"
//!   request_timeout   = "30s"                          # per RPC, retries included
//!   max_backoff       = "30s"                          # longest wait between reconnections of a stream
//! }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigDuration;

/// `plugin_data`, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    endpoint: Option<String>,
    endpoints: Option<Vec<String>>,
    server_name: Option<String>,
    trust_bundle_path: Option<PathBuf>,
    client_cert_path: Option<PathBuf>,
    client_key_path: Option<PathBuf>,
    workload_api_socket: Option<String>,
    connect_timeout: Option<ConfigDuration>,
    request_timeout: Option<ConfigDuration>,
    max_backoff: Option<ConfigDuration>,
}

/// The checked configuration, with the files it names read.
#[derive(Clone)]
pub struct PluginSettings {
    /// `https://host:port` of the appliance, or of each of its replicas (in the order of preference).
    pub endpoints: Vec<String>,
    /// The name the appliance's certificate must carry.
    pub server_name: String,
    /// Roots that verify the appliance (PEM).
    pub trust_bundle_pem: Vec<u8>,
    /// The client's X509-SVID chain (PEM).
    pub client_cert_pem: Vec<u8>,
    /// The client's key (PKCS#8 PEM).
    pub client_key_pem: Vec<u8>,
    /// The client's SPIFFE ID (from its certificate).
    pub client_id: String,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// Per-RPC timeout, retries included.
    pub request_timeout: Duration,
    /// Longest wait between two reconnection attempts.
    pub max_backoff: Duration,
}

impl std::fmt::Debug for PluginSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSettings")
            .field("endpoints", &self.endpoints)
            .field("server_name", &self.server_name)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field} = {:?}: cannot read it: {e}", path.display()))
}

fn required<T>(v: Option<T>, field: &str, what: &str) -> Result<T, String> {
    v.ok_or_else(|| format!("plugin_data needs {field}: {what}"))
}

impl PluginSettings {
    /// Parses `hcl` (the `plugin_data` block's body) and reads the files it names. `trust_domain` is SPIRE's
    /// (from the core configuration): the client certificate must belong to it. Every error names the field and
    /// says what is wrong.
    pub fn parse(hcl: &str, trust_domain: &str) -> Result<Self, String> {
        let raw: Raw = hcl::from_str(hcl).map_err(|e| format!("plugin_data: {e}"))?;
        if raw.workload_api_socket.is_some() {
            return Err(
                "workload_api_socket is not supported yet: give client_cert_path and \
                        client_key_path (an X509-SVID for this SPIRE server issued by signet)"
                    .into(),
            );
        }
        let (field, given) = match (raw.endpoint, raw.endpoints) {
            (Some(_), Some(_)) => {
                return Err(
                    "give endpoint (one appliance) or endpoints (its replicas), not both".into(),
                );
            }
            (Some(e), None) => ("endpoint", Some(vec![e])),
            (None, list) => ("endpoints", list),
        };
        let given = required(
            given,
            "endpoint",
            "the appliance's address, e.g. \"signet.example.org:8443\" (or endpoints = [...], its replicas)",
        )?;
        if given.is_empty() {
            return Err("endpoints is empty: list the replicas' addresses (host:port)".into());
        }
        let mut endpoints = Vec::with_capacity(given.len());
        let mut host = String::new();
        for endpoint in given {
            let host_port = endpoint
                .strip_prefix("https://")
                .unwrap_or(&endpoint)
                .trim_end_matches('/')
                .to_string();
            if host_port.contains("://") || !host_port.contains(':') {
                return Err(format!(
                    "{field}: {endpoint:?} is not host:port (e.g. \"127.0.0.1:8443\"); signet speaks gRPC over TLS"
                ));
            }
            if host.is_empty() {
                host = host_port
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                    .unwrap_or_default()
                    .to_string();
            }
            endpoints.push(format!("https://{host_port}"));
        }
        let bundle_path = required(
            raw.trust_bundle_path,
            "trust_bundle_path",
            "the PEM roots that verify the appliance (its bundle.pem)",
        )?;
        let cert_path = required(
            raw.client_cert_path,
            "client_cert_path",
            "this SPIRE server's X509-SVID chain (PEM) issued by signet",
        )?;
        let key_path = required(
            raw.client_key_path,
            "client_key_path",
            "the key of client_cert_path (PKCS#8 PEM)",
        )?;
        let trust_bundle_pem = read(&bundle_path, "trust_bundle_path")?;
        let client_cert_pem = read(&cert_path, "client_cert_path")?;
        let client_key_pem = read(&key_path, "client_key_path")?;
        let roots = pem::parse_many(&trust_bundle_pem)
            .map_err(|e| format!("trust_bundle_path: not PEM: {e}"))?;
        if !roots.iter().any(|p| p.tag() == "CERTIFICATE") {
            return Err("trust_bundle_path holds no CERTIFICATE".into());
        }
        let chain = pem::parse_many(&client_cert_pem)
            .map_err(|e| format!("client_cert_path: not PEM: {e}"))?;
        let leaf = chain
            .iter()
            .find(|p| p.tag() == "CERTIFICATE")
            .ok_or("client_cert_path holds no CERTIFICATE")?;
        let client_id =
            spiffe_id_of(leaf.contents()).map_err(|e| format!("client_cert_path: {e}"))?;
        let key =
            pem::parse(&client_key_pem).map_err(|e| format!("client_key_path: not PEM: {e}"))?;
        if key.tag() != "PRIVATE KEY" {
            return Err(format!(
                "client_key_path holds a {:?} block: give the key as PKCS#8 (\"PRIVATE KEY\")",
                key.tag()
            ));
        }
        if !trust_domain.is_empty() {
            let td = client_id
                .strip_prefix("spiffe://")
                .and_then(|r| r.split('/').next())
                .unwrap_or_default();
            if td != trust_domain {
                return Err(format!(
                    "client_cert_path is an SVID of trust domain {td:?} but this SPIRE server's is \
                     {trust_domain:?}: signet must serve SPIRE's own trust domain"
                ));
            }
        }
        let secs = |d: Option<ConfigDuration>, default: u64, field: &str| {
            let d = d.map_or(Duration::from_secs(default), |d| d.0);
            if d.is_zero() {
                Err(format!("{field} must be longer than 0"))
            } else {
                Ok(d)
            }
        };
        Ok(Self {
            endpoints,
            server_name: raw.server_name.unwrap_or(host),
            trust_bundle_pem,
            client_cert_pem,
            client_key_pem,
            client_id,
            connect_timeout: secs(raw.connect_timeout, 10, "connect_timeout")?,
            request_timeout: secs(raw.request_timeout, 30, "request_timeout")?,
            max_backoff: secs(raw.max_backoff, 30, "max_backoff")?,
        })
    }
}

/// The SPIFFE ID of the first certificate in `pem_text`.
pub fn spiffe_id_of_pem(pem_text: &[u8]) -> Result<String, String> {
    let chain = pem::parse_many(pem_text).map_err(|e| format!("not PEM: {e}"))?;
    let leaf = chain
        .iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .ok_or("no CERTIFICATE in the PEM")?;
    spiffe_id_of(leaf.contents())
}

fn spiffe_id_of(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad SAN extension: {e}"))?
        .ok_or("the certificate has no SPIFFE ID (no URI SAN): it must be an X509-SVID")?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                Some(u.to_string())
            }
            _ => None,
        })
        .ok_or_else(|| "the certificate has no SPIFFE ID: it must be an X509-SVID".into())
}

impl PluginSettings {
    /// Applies the timeouts of `hcl` (the only settings `plugin_data` may hold when the appliance runs inside the
    /// plug-in with `--embedded`).
    pub fn tune(&mut self, hcl: &str) -> Result<(), String> {
        let raw: Raw = hcl::from_str(hcl).map_err(|e| format!("plugin_data: {e}"))?;
        if raw.endpoint.is_some()
            || raw.endpoints.is_some()
            || raw.server_name.is_some()
            || raw.trust_bundle_path.is_some()
            || raw.client_cert_path.is_some()
            || raw.client_key_path.is_some()
            || raw.workload_api_socket.is_some()
        {
            return Err(
                "with --embedded the plug-in runs the appliance itself: plugin_data may set \
                        connect_timeout, request_timeout and max_backoff only"
                    .into(),
            );
        }
        for (d, field, slot) in [
            (
                raw.connect_timeout,
                "connect_timeout",
                &mut self.connect_timeout,
            ),
            (
                raw.request_timeout,
                "request_timeout",
                &mut self.request_timeout,
            ),
            (raw.max_backoff, "max_backoff", &mut self.max_backoff),
        ] {
            if let Some(d) = d {
                if d.0.is_zero() {
                    return Err(format!("{field} must be longer than 0"));
                }
                *slot = d.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcl_errors_name_the_field() {
        let e = PluginSettings::parse("endpoint = ", "example.org").unwrap_err();
        assert!(e.starts_with("plugin_data: "), "{e}");
        let e = PluginSettings::parse("endpoint = \"x:1\"", "example.org").unwrap_err();
        assert!(e.contains("trust_bundle_path"), "{e}");
        let e = PluginSettings::parse("endpoint = \"x:1\"\nbogus = 1", "example.org").unwrap_err();
        assert!(e.contains("bogus"), "{e}");
        let e = PluginSettings::parse("endpoint = \"nohost\"", "example.org").unwrap_err();
        assert!(e.contains("host:port"), "{e}");
        let e =
            PluginSettings::parse("endpoints = [\"a:1\", \"nohost\"]", "example.org").unwrap_err();
        assert!(
            e.starts_with("endpoints: ") && e.contains("host:port"),
            "{e}"
        );
        let e = PluginSettings::parse("endpoints = []", "example.org").unwrap_err();
        assert!(e.contains("endpoints is empty"), "{e}");
        let e = PluginSettings::parse("endpoint = \"a:1\"\nendpoints = [\"b:1\"]", "example.org")
            .unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = PluginSettings::parse("server_name = \"x\"", "example.org").unwrap_err();
        assert!(e.contains("plugin_data needs endpoint"), "{e}");
        let e = PluginSettings::parse("workload_api_socket = \"/x\"", "example.org").unwrap_err();
        assert!(e.contains("not supported yet"), "{e}");
        let e = PluginSettings::parse(
            "endpoint = \"x:1\"\ntrust_bundle_path = \"/nonexistent/b.pem\"\nclient_cert_path = \"/c\"\nclient_key_path = \"/k\"",
            "example.org",
        )
        .unwrap_err();
        assert!(
            e.contains("trust_bundle_path") && e.contains("cannot read"),
            "{e}"
        );
    }
}
