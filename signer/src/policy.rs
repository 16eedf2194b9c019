//! Authorisation: which callers (by the SPIFFE ID of their verified client certificate) may use which service, for
//! which SPIFFE IDs, for how long, and how often.
//!
//! Rules are tried in configuration order; the first whose `caller` matches applies (an exact SPIFFE ID, or a
//! prefix written `spiffe://td/agents/*`). A caller no rule matches is refused. Rate limits are token buckets, one
//! per caller (not per rule), refilled continuously; a request costs one token per credential or signature.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::units::{ConfigDuration, Rate};

/// The SPIFFE ID path of the appliance's own server certificate.
pub const SERVER_ID_PATH: &str = "/signet/server";
/// The SPIFFE ID path of the admin client credential made for the CLI.
pub const ADMIN_ID_PATH: &str = "/signet/admin";

/// One `[[policy]]` rule (see [`crate::policy`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// The caller's SPIFFE ID, exactly, or a prefix ending in `/*`.
    pub caller: String,
    /// Services it may use: `upstream-authority`, `key-manager`, `issuer`, `admin`.
    pub may: Vec<String>,
    /// SPIFFE ID prefixes it may request SVIDs for (issuer).
    #[serde(default)]
    pub ids: Vec<String>,
    /// Longest X509-SVID (and, for upstream-authority, SPIRE CA) lifetime: a longer request is cut to it.
    #[serde(default)]
    pub max_ttl: Option<ConfigDuration>,
    /// Longest JWT-SVID lifetime (defaults to `max_ttl`, then to `authority.jwt.max_ttl`): a longer request is cut
    /// to it.
    #[serde(default)]
    pub jwt_max_ttl: Option<ConfigDuration>,
    /// Credentials or signatures per unit of time for each caller matching this rule (token bucket).
    #[serde(default)]
    pub rate: Option<Rate>,
    /// Bucket size (default: one second of `rate`, at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Also admit this rule's callers when their X509-SVID was signed by a CA below signet (a SPIRE server's CA
    /// from `MintX509CA`) rather than by signet itself. Off by default; only for rules that grant `issuer` alone
    /// (admin, key-manager and upstream-authority only ever accept credentials signet issued).
    #[serde(default)]
    pub downstream_credentials: bool,
    /// pathLenConstraint of the CA minted for a SPIRE server with `upstream-authority` (`MintX509CA`): how many CAs
    /// may follow it, such as downstream SPIRE servers (SPIRE's `spire` UpstreamAuthority). Absent: none is written,
    /// as SPIRE's own upstream authorities do (below a signing CA that has a constraint, the most it allows). A CSR
    /// that asks for a longer path is refused.
    #[serde(default)]
    pub spire_ca_path_len: Option<u8>,
}

/// The services a rule can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Service {
    /// SPIRE's UpstreamAuthority v1.
    UpstreamAuthority,
    /// SPIRE's KeyManager v1.
    KeyManager,
    /// signet's Issuer.
    Issuer,
    /// signet's Admin.
    Admin,
}

impl Service {
    /// The name used in the configuration and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Service::UpstreamAuthority => "upstream-authority",
            Service::KeyManager => "key-manager",
            Service::Issuer => "issuer",
            Service::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "upstream-authority" => Service::UpstreamAuthority,
            "key-manager" => Service::KeyManager,
            "issuer" => Service::Issuer,
            "admin" => Service::Admin,
            _ => return None,
        })
    }
}

/// Why a request was refused by the policy.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// No rule names the caller.
    #[error("caller {caller} is not in the policy: add a [[policy]] rule for it")]
    UnknownCaller {
        /// The caller.
        caller: String,
    },
    /// The caller's rule does not allow the service.
    #[error("caller {caller} may not use the {service} service (allowed: {allowed})")]
    Service {
        /// The caller.
        caller: String,
        /// The service.
        service: &'static str,
        /// What it may use.
        allowed: String,
    },
    /// The requested SPIFFE ID is outside the caller's prefixes.
    #[error("caller {caller} may not request {id}: allowed prefixes are [{allowed}]")]
    Id {
        /// The caller.
        caller: String,
        /// The requested SPIFFE ID.
        id: String,
        /// The allowed prefixes.
        allowed: String,
    },
    /// The requested SPIFFE ID is one of signet's own (`spiffe://<td>/signet/...`): only signet issues those, to
    /// itself, at start.
    #[error(
        "{id} is reserved for signet's own credentials: they are issued only by signet, to itself"
    )]
    Reserved {
        /// The requested SPIFFE ID.
        id: String,
    },
    /// The caller's credential was signed by a CA below signet (for example a SPIRE server's), not by signet.
    #[error(
        "the credential of {caller} was signed by {signer}, a CA below signet (such as a SPIRE server's), not by \
         signet itself: only credentials signet issued may call the {service} service"
    )]
    Downstream {
        /// The caller.
        caller: String,
        /// The subject of the CA that signed its credential.
        signer: String,
        /// The service.
        service: &'static str,
    },
    /// One request asks for more credentials than the caller's bucket can ever hold.
    #[error(
        "a request for {cost} credentials exceeds the burst of {burst} allowed to caller {caller}: split it"
    )]
    BeyondBurst {
        /// The caller.
        caller: String,
        /// What the request costs.
        cost: u32,
        /// The bucket size.
        burst: u32,
    },
    /// The caller's rate limit is spent.
    #[error(
        "rate limit of {rate}/s (burst {burst}) for caller {caller} exceeded: retry in {retry_after_ms} ms"
    )]
    RateLimited {
        /// The caller.
        caller: String,
        /// The rate, per second.
        rate: f64,
        /// The bucket size.
        burst: u32,
        /// When enough tokens will be back.
        retry_after_ms: u64,
    },
}

/// A policy that could not be built.
#[derive(Debug, Clone, thiserror::Error)]
#[error("policy rule {index} ({caller}): {message}")]
pub struct PolicyError {
    index: usize,
    caller: String,
    message: String,
}

#[derive(Debug)]
struct Rule {
    exact: Option<String>,
    prefix: Option<String>,
    services: Vec<Service>,
    ids: Vec<String>,
    max_ttl: Option<Duration>,
    jwt_max_ttl: Duration,
    rate: Option<(f64, u32)>,
    downstream: bool,
    spire_ca_path_len: Option<u8>,
}

impl Rule {
    fn matches(&self, caller: &str) -> bool {
        match (&self.exact, &self.prefix) {
            (Some(e), _) => e == caller,
            (None, Some(p)) => caller.starts_with(p.as_str()),
            (None, None) => false,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The compiled policy with its rate-limit state.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// How many replicas share the rate limits (each grants this fraction of them); 1 alone.
    share: std::sync::atomic::AtomicU32,
}

/// The rule that admitted a caller to a service: what it may do there.
#[derive(Debug, Clone, Copy)]
pub struct Grant<'a> {
    policy: &'a Policy,
    rule: &'a Rule,
    caller: &'a str,
}

/// Most callers whose buckets are tracked; beyond it full buckets are forgotten.
const MAX_BUCKETS: usize = 100_000;

impl Policy {
    /// Compiles `rules`; `jwt_default_max` bounds JWT-SVIDs when a rule sets no maximum.
    pub fn from_rules(
        rules: &[PolicyRule],
        jwt_default_max: Duration,
    ) -> Result<Self, PolicyError> {
        let mut out = Vec::with_capacity(rules.len());
        for (index, r) in rules.iter().enumerate() {
            let err = |message: String| PolicyError {
                index,
                caller: r.caller.clone(),
                message,
            };
            let (exact, prefix) = match r.caller.strip_suffix('*') {
                Some(p) if p.ends_with('/') => (None, Some(p.to_string())),
                Some(_) => {
                    return Err(err(
                        "a wildcard must follow a '/' (write spiffe://td/agents/*)".into(),
                    ));
                }
                None => (Some(r.caller.clone()), None),
            };
            let check = exact.clone().unwrap_or_else(|| {
                prefix
                    .clone()
                    .unwrap_or_default()
                    .trim_end_matches('/')
                    .to_string()
            });
            crate::spiffe::SpiffeId::parse(&check)
                .map_err(|e| err(format!("caller is not a SPIFFE ID: {e}")))?;
            let mut services = Vec::new();
            for m in &r.may {
                services.push(Service::parse(m).ok_or_else(|| {
                    err(format!(
                        "unknown service {m:?} (use upstream-authority, key-manager, issuer, admin)"
                    ))
                })?);
            }
            if r.downstream_credentials && services.iter().any(|s| *s != Service::Issuer) {
                return Err(err(
                    "downstream_credentials admits credentials that a CA below signet signed (a SPIRE server's), \
                     which may only call the issuer service: grant nothing else in this rule"
                        .into(),
                ));
            }
            if r.spire_ca_path_len.is_some() && !services.contains(&Service::UpstreamAuthority) {
                return Err(err(
                    "spire_ca_path_len is the path length of the CA minted for a SPIRE server: it needs \
                     upstream-authority in this rule's `may`"
                        .into(),
                ));
            }
            for id in &r.ids {
                if !id.starts_with("spiffe://") {
                    return Err(err(format!("ids entry {id:?} is not a spiffe:// prefix")));
                }
            }
            let rate = match r.rate {
                Some(rate) => {
                    let burst = r.burst.unwrap_or_else(|| {
                        rate.per_second.ceil().clamp(1.0, u32::MAX.into()) as u32
                    });
                    if burst == 0 {
                        return Err(err("burst must be at least 1".into()));
                    }
                    Some((rate.per_second, burst))
                }
                None if r.burst.is_some() => return Err(err("burst needs a rate".into())),
                None => None,
            };
            let max_ttl = r.max_ttl.map(|d| d.0);
            if max_ttl.is_some_and(|d| d.is_zero()) {
                return Err(err("max_ttl must be positive".into()));
            }
            let jwt_max_ttl = r
                .jwt_max_ttl
                .map(|d| d.0)
                .or(max_ttl)
                .unwrap_or(jwt_default_max)
                .min(jwt_default_max);
            out.push(Rule {
                exact,
                prefix,
                services,
                ids: r.ids.clone(),
                max_ttl,
                jwt_max_ttl,
                rate,
                downstream: r.downstream_credentials,
                spire_ca_path_len: r.spire_ca_path_len,
            });
        }
        Ok(Self {
            rules: out,
            buckets: Mutex::new(HashMap::new()),
            share: std::sync::atomic::AtomicU32::new(1),
        })
    }

    /// Checks every rule's `spire_ca_path_len` against the pathLenConstraint of the authority that signs SPIRE's
    /// CAs (`None`: it has none): a CA below one with pathLen `p` can have at most `p - 1`, and one with pathLen 0
    /// signs no CA at all.
    pub fn check_spire_path_lens(&self, authority: Option<u32>) -> Result<(), PolicyError> {
        let Some(p) = authority else { return Ok(()) };
        for (index, r) in self.rules.iter().enumerate() {
            if !r.services.contains(&Service::UpstreamAuthority) {
                continue;
            }
            let caller = r
                .exact
                .clone()
                .or_else(|| r.prefix.clone().map(|p| format!("{p}*")));
            let err = |message: String| PolicyError {
                index,
                caller: caller.clone().unwrap_or_default(),
                message,
            };
            if p == 0 {
                return Err(err(
                    "the signing authority has pathLen 0, so it can sign no CA for a SPIRE server: grant \
                     upstream-authority to no one, or give the authority a longer path"
                        .into(),
                ));
            }
            if let Some(n) = r.spire_ca_path_len
                && u32::from(n) >= p
            {
                return Err(err(format!(
                    "spire_ca_path_len = {n} is longer than the signing authority allows (its pathLen is {p}, so \
                     at most {} below it)",
                    p - 1
                )));
            }
        }
        Ok(())
    }

    /// Sets how many replicas share the rate limits: each bucket then refills at `rate / n` and holds `burst / n`
    /// (see [`crate::replica`] for the bound this gives). Returns whether it changed.
    pub fn set_share(&self, n: u32) -> bool {
        self.share
            .swap(n.max(1), std::sync::atomic::Ordering::Relaxed)
            != n.max(1)
    }

    /// Whether `caller`, whose credential a CA below signet signed (`signer`, that CA's subject), may use `service`:
    /// only the issuer service, and only when the caller's rule opts in with `downstream_credentials`.
    pub fn admit_downstream(
        &self,
        caller: &str,
        signer: &str,
        service: Service,
    ) -> Result<(), Denied> {
        let rule = self.rules.iter().find(|r| r.matches(caller));
        if service == Service::Issuer && rule.is_some_and(|r| r.downstream) {
            return Ok(());
        }
        Err(Denied::Downstream {
            caller: caller.to_string(),
            signer: signer.to_string(),
            service: service.name(),
        })
    }

    /// The grant of `caller`'s rule whatever services it allows: for what every caller in the policy may do for
    /// itself (renew its own X509-SVID), and for the lifetime of a first credential obtained with a join token.
    pub fn own<'a>(&'a self, caller: &'a str) -> Result<Grant<'a>, Denied> {
        let rule = self
            .rules
            .iter()
            .find(|r| r.matches(caller))
            .ok_or_else(|| Denied::UnknownCaller {
                caller: caller.to_string(),
            })?;
        Ok(Grant {
            policy: self,
            rule,
            caller,
        })
    }

    /// The grant of `caller` for `service`, or why there is none.
    pub fn authorize<'a>(&'a self, caller: &'a str, service: Service) -> Result<Grant<'a>, Denied> {
        let rule = self
            .rules
            .iter()
            .find(|r| r.matches(caller))
            .ok_or_else(|| Denied::UnknownCaller {
                caller: caller.to_string(),
            })?;
        if !rule.services.contains(&service) {
            return Err(Denied::Service {
                caller: caller.to_string(),
                service: service.name(),
                allowed: rule
                    .services
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(Grant {
            policy: self,
            rule,
            caller,
        })
    }
}

impl Grant<'_> {
    /// Whether the caller may request `id` (a SPIFFE ID string).
    pub fn check_id(&self, id: &str) -> Result<(), Denied> {
        if is_reserved(id) {
            return Err(Denied::Reserved { id: id.to_string() });
        }
        if self.rule.ids.iter().any(|p| id_has_prefix(id, p)) {
            Ok(())
        } else {
            Err(Denied::Id {
                caller: self.caller.to_string(),
                id: id.to_string(),
                allowed: self.rule.ids.join(", "),
            })
        }
    }

    /// The X.509 lifetime to issue (the TTL rule; see the Issuer API's protos): `requested`, 0 meaning the default
    /// (1 h), capped at the policy's `max_ttl`. A request above the maximum is cut to it, not refused, as
    /// `MintX509CA`'s `preferred_ttl` is; the issuing authority then cuts the NotAfter at its own.
    pub fn x509_ttl(&self, requested: Duration) -> Duration {
        pick_ttl(
            requested,
            Duration::from_secs(3600),
            self.rule.max_ttl.unwrap_or(Duration::MAX),
        )
    }

    /// The JWT lifetime to issue: `requested`, 0 meaning the default (5 minutes), capped at the policy's
    /// `jwt_max_ttl` (the same rule as [`x509_ttl`](Self::x509_ttl)).
    pub fn jwt_ttl(&self, requested: Duration) -> Duration {
        pick_ttl(requested, Duration::from_secs(300), self.rule.jwt_max_ttl)
    }

    /// The most an upstream CA minted for this caller may live (SPIRE asks for its `ca_ttl`; it is capped here).
    pub fn max_ttl(&self) -> Option<Duration> {
        self.rule.max_ttl
    }

    /// The pathLenConstraint of the CA minted for this caller (`spire_ca_path_len`; `None`: no constraint).
    pub fn spire_ca_path_len(&self) -> Option<u8> {
        self.rule.spire_ca_path_len
    }

    /// Takes `cost` tokens from the caller's bucket, or says when to retry.
    pub fn take(&self, cost: u32) -> Result<(), Denied> {
        let Some((full_rate, burst)) = self.rule.rate else {
            return Ok(());
        };
        // This replica's share of the limit: the rate divided among the live replicas, and so the bucket; a request
        // costing more than the shared bucket holds is let through only when it is full (the bucket then runs into
        // debt), so the long-run rate stays within the share.
        let share = f64::from(
            self.policy
                .share
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1),
        );
        let rate = full_rate / share;
        let capacity = (f64::from(burst) / share).max(1.0);
        let denied = |retry_after_ms: u64| Denied::RateLimited {
            caller: self.caller.to_string(),
            rate: full_rate,
            burst,
            retry_after_ms,
        };
        if cost > burst {
            return Err(Denied::BeyondBurst {
                caller: self.caller.to_string(),
                cost,
                burst,
            });
        }
        let now = Instant::now();
        let mut buckets = self
            .policy
            .buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(self.caller) {
            // Forget callers whose buckets have refilled: they behave exactly like new callers.
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < capacity);
        }
        let b = buckets
            .entry(self.caller.to_string())
            .or_insert_with(|| Bucket {
                tokens: capacity,
                at: now,
            });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(capacity);
        b.at = now;
        let cost = f64::from(cost);
        let needed = cost.min(capacity);
        if b.tokens >= needed {
            b.tokens -= cost;
            Ok(())
        } else {
            let wait = (needed - b.tokens) / rate;
            Err(denied((wait * 1000.0).ceil() as u64))
        }
    }
}

/// The TTL rule's policy step: 0 is `default`; anything (the default included) above `max` is `max`.
fn pick_ttl(requested: Duration, default: Duration, max: Duration) -> Duration {
    if requested.is_zero() {
        default.min(max)
    } else {
        requested.min(max)
    }
}

/// signet's own SPIFFE IDs (`spiffe://<td>/signet` and below: its server and admin credentials), which no caller may
/// obtain whatever its prefixes. `id` is compared as the caller wrote it: a path that only normalises to this one is
/// refused as an invalid SPIFFE ID before it could be issued.
pub(crate) fn is_reserved(id: &str) -> bool {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, path)| path == "signet" || path.starts_with("signet/"))
}

/// `id` is under `prefix`: equal to it, or (for a prefix not ending in `/`) continuing with a `/` segment, so
/// `spiffe://td/web` admits `spiffe://td/web/a` but not `spiffe://td/webmail`.
fn id_has_prefix(id: &str, prefix: &str) -> bool {
    match id.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(caller: &str, may: &[&str], ids: &[&str]) -> PolicyRule {
        PolicyRule {
            caller: caller.into(),
            may: may.iter().map(|s| s.to_string()).collect(),
            ids: ids.iter().map(|s| s.to_string()).collect(),
            max_ttl: Some(ConfigDuration(Duration::from_secs(3600))),
            jwt_max_ttl: None,
            rate: None,
            burst: None,
            downstream_credentials: false,
            spire_ca_path_len: None,
        }
    }

    #[test]
    fn signets_own_ids_are_reserved_whatever_the_prefixes() {
        let p = Policy::from_rules(
            &[rule("spiffe://td/admin", &["issuer"], &["spiffe://td/"])],
            Duration::from_secs(3600),
        )
        .unwrap();
        let g = p.authorize("spiffe://td/admin", Service::Issuer).unwrap();
        for id in [
            "spiffe://td/signet",
            "spiffe://td/signet/admin",
            "spiffe://td/signet/server",
            "spiffe://td/signet/x/y",
        ] {
            assert!(
                matches!(g.check_id(id), Err(Denied::Reserved { .. })),
                "{id}"
            );
        }
        for id in [
            "spiffe://td/signets",
            "spiffe://td/web/signet",
            "spiffe://td/signetwork/a",
        ] {
            assert!(g.check_id(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn downstream_credentials_are_an_issuer_only_opt_in() {
        let mut opted = rule("spiffe://td/down/*", &["issuer"], &["spiffe://td/w/"]);
        opted.downstream_credentials = true;
        let p = Policy::from_rules(
            &[
                opted,
                rule("spiffe://td/agents/*", &["issuer"], &["spiffe://td/w/"]),
            ],
            Duration::from_secs(3600),
        )
        .unwrap();
        assert!(
            p.admit_downstream("spiffe://td/down/a", "O=SPIRE", Service::Issuer)
                .is_ok()
        );
        for (caller, service) in [
            ("spiffe://td/down/a", Service::Admin),
            ("spiffe://td/down/a", Service::KeyManager),
            ("spiffe://td/agents/a", Service::Issuer),
            ("spiffe://td/nobody", Service::Issuer),
        ] {
            let e = p.admit_downstream(caller, "O=SPIRE", service).unwrap_err();
            assert!(
                matches!(e, Denied::Downstream { .. }),
                "{caller} {service:?}"
            );
            assert!(e.to_string().contains("O=SPIRE"), "{e}");
        }
        for may in [
            &["issuer", "admin"][..],
            &["key-manager"],
            &["upstream-authority"],
        ] {
            let mut r = rule("spiffe://td/down/*", may, &[]);
            r.downstream_credentials = true;
            let e = Policy::from_rules(&[r], Duration::from_secs(3600)).unwrap_err();
            assert!(e.to_string().contains("downstream_credentials"), "{e}");
        }
    }

    #[test]
    fn spire_ca_path_len_needs_upstream_authority_and_fits_the_authority() {
        let mut r = rule("spiffe://td/spire", &["upstream-authority"], &[]);
        r.spire_ca_path_len = Some(2);
        let p = Policy::from_rules(std::slice::from_ref(&r), Duration::MAX).unwrap();
        let g = p
            .authorize("spiffe://td/spire", Service::UpstreamAuthority)
            .unwrap();
        assert_eq!(g.spire_ca_path_len(), Some(2));
        assert!(p.check_spire_path_lens(None).is_ok());
        assert!(p.check_spire_path_lens(Some(3)).is_ok());
        let e = p.check_spire_path_lens(Some(2)).unwrap_err().to_string();
        assert!(
            e.contains("spire_ca_path_len = 2") && e.contains("at most 1"),
            "{e}"
        );
        let e = p.check_spire_path_lens(Some(0)).unwrap_err().to_string();
        assert!(e.contains("pathLen 0"), "{e}");
        // Absent: no constraint of its own, capped only by a constrained authority at minting.
        r.spire_ca_path_len = None;
        let p = Policy::from_rules(std::slice::from_ref(&r), Duration::MAX).unwrap();
        assert!(p.check_spire_path_lens(Some(1)).is_ok());
        // Only on a rule that mints SPIRE CAs.
        let mut r = rule("spiffe://td/agents/*", &["issuer"], &["spiffe://td/w/"]);
        r.spire_ca_path_len = Some(0);
        let e = Policy::from_rules(&[r], Duration::MAX)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs upstream-authority"), "{e}");
    }

    #[test]
    fn first_matching_rule_decides() {
        let p = Policy::from_rules(
            &[
                rule("spiffe://td/agents/special", &["admin"], &[]),
                rule("spiffe://td/agents/*", &["issuer"], &["spiffe://td/web"]),
            ],
            Duration::from_secs(600),
        )
        .unwrap();
        assert!(
            p.authorize("spiffe://td/agents/special", Service::Issuer)
                .is_err()
        );
        let g = p
            .authorize("spiffe://td/agents/a", Service::Issuer)
            .unwrap();
        assert!(g.check_id("spiffe://td/web/x").is_ok());
        assert!(g.check_id("spiffe://td/web").is_ok());
        assert!(g.check_id("spiffe://td/webmail").is_err());
        assert!(matches!(
            p.authorize("spiffe://td/other", Service::Issuer),
            Err(Denied::UnknownCaller { .. })
        ));
        // The TTL rule: 0 is the default, above the maximum is cut to it, huge values too.
        assert_eq!(
            g.x509_ttl(Duration::from_secs(7200)),
            Duration::from_secs(3600)
        );
        assert_eq!(g.x509_ttl(Duration::MAX), Duration::from_secs(3600));
        assert_eq!(g.x509_ttl(Duration::from_secs(60)), Duration::from_secs(60));
        assert_eq!(g.x509_ttl(Duration::ZERO), Duration::from_secs(3600));
        assert_eq!(g.jwt_ttl(Duration::ZERO), Duration::from_secs(300));
        assert_eq!(
            g.jwt_ttl(Duration::from_secs(601)),
            Duration::from_secs(600)
        );
        assert_eq!(g.jwt_ttl(Duration::MAX), Duration::from_secs(600));
    }

    #[test]
    fn token_bucket_refuses_beyond_burst() {
        let mut r = rule("spiffe://td/a", &["issuer"], &["spiffe://td/"]);
        r.rate = Some(Rate { per_second: 0.001 });
        r.burst = Some(3);
        let p = Policy::from_rules(&[r], Duration::from_secs(600)).unwrap();
        let g = p.authorize("spiffe://td/a", Service::Issuer).unwrap();
        assert!(g.take(2).is_ok());
        assert!(g.take(1).is_ok());
        assert!(matches!(g.take(1), Err(Denied::RateLimited { .. })));
        assert!(matches!(g.take(4), Err(Denied::BeyondBurst { .. })));
    }

    #[test]
    fn replicas_share_the_limit() {
        let mut r = rule("spiffe://td/a", &["issuer"], &["spiffe://td/"]);
        r.rate = Some(Rate { per_second: 0.001 });
        r.burst = Some(6);
        // Three replicas, each with its own policy state: together they grant the burst once, not three times.
        let replicas: Vec<Policy> = (0..3)
            .map(|_| {
                let p =
                    Policy::from_rules(std::slice::from_ref(&r), Duration::from_secs(600)).unwrap();
                assert!(p.set_share(3));
                assert!(!p.set_share(3));
                p
            })
            .collect();
        let mut granted = 0;
        for p in &replicas {
            let g = p.authorize("spiffe://td/a", Service::Issuer).unwrap();
            while g.take(1).is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 6);
        // A request costing more than a replica's share of the bucket (but within the burst) passes once the
        // share is full, and the bucket then owes it.
        let p = Policy::from_rules(std::slice::from_ref(&r), Duration::from_secs(600)).unwrap();
        p.set_share(3);
        let g = p.authorize("spiffe://td/a", Service::Issuer).unwrap();
        assert!(g.take(5).is_ok());
        assert!(matches!(g.take(1), Err(Denied::RateLimited { .. })));
        assert!(matches!(g.take(7), Err(Denied::BeyondBurst { .. })));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(
            Policy::from_rules(&[rule("spiffe://td/a*", &["issuer"], &[])], Duration::MAX).is_err()
        );
        assert!(
            Policy::from_rules(&[rule("spiffe://td/a", &["signer"], &[])], Duration::MAX).is_err()
        );
        assert!(
            Policy::from_rules(&[rule("https://td/a", &["issuer"], &[])], Duration::MAX).is_err()
        );
    }
}
