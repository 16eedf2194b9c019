//! `signet doctor [--config FILE] [--data-dir DIR]`: offline checks of an appliance's configuration and
//! environment, for day one (does it start?) and day ninety (what will break soon?). It needs no running server.
//!
//! One line per check, `ok`, `warn` or `FAIL`, then what was checked and, when it is not ok, what to do:
//!
//! ```text
//! ok    config: signet.toml parses and validates (trust domain example.org)
//! FAIL  token hsm: login with the PIN from file /etc/signet/pin refused: the PIN is incorrect; fix the PIN source
//! warn  authority x509 signet-x509-root-2: expires 2026-12-09T10:00:00Z (in 3 d), 1 % of its life left; ...
//! ```
//!
//! Checks, in order: the configuration parses and validates; the data directory (or that signet has never been
//! started there); the datastore opens (a SQLite file, or a PostgreSQL URL: an unreachable server is a failure with
//! its error) and the clock skew against it (PostgreSQL's clock; SQLite is this host's); per token: the PKCS#11
//! module loads, the token is found by label or serial, login with the configured PIN works (the PIN is never
//! printed), the configured number of sessions open, the mechanisms the key types need are supported (ECDSA,
//! RSA-PKCS, EdDSA and their key-pair generation), and the authority keys are on it with the right type (the labels
//! of the datastore's live authorities, else the configured ones); the expiry of every authority and of signet's
//! own credentials (server and admin certificates in the data directory, the bundle endpoint's certificate): a
//! failure when expired, a warning in the alert window (under a quarter of the life or under 7 days left); and the
//! policy's obvious mistakes, as warnings.
//!
//! It changes nothing: the datastore is opened without migrations (SQLite read-only, never created; an older schema
//! is reported as migrated by the next start, a newer one as a failure), the tokens are only logged into and
//! searched, no key is generated.
//!
//! Exit status 0 when no check failed (warnings allowed), 1 otherwise. With the embedded token (no `[[tokens]]`)
//! the token is read from the data directory as `signet serve` provisions it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use signet::config::{Config, KeyTypeSetting, PolicyRule};
use signet::datadir::DataPaths;
use signet::store::{AuthorityRecord, AuthorityState, Store};
use signet_pkcs11::cryptoki::mechanism::MechanismType;
use signet_pkcs11::{ErrorKind, KeyType, Token};

use super::CliError;
use super::when::{now_unix, when_at};

/// Options of `signet doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The configuration file; without it, the embedded default (data in ./signet-data, as `signet serve`).
    #[arg(long, env = "SIGNET_CONFIG")]
    config: Option<PathBuf>,
    /// The data directory (overrides the configuration's data_dir, as for `signet serve`).
    #[arg(long, env = "SIGNET_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

/// The lines printed so far and the count of failures.
#[derive(Debug, Default)]
struct Report {
    fails: usize,
    warns: usize,
}

impl Report {
    fn line(&mut self, level: Level, check: &str, message: impl AsRef<str>) {
        let tag = match level {
            Level::Ok => "ok",
            Level::Warn => {
                self.warns += 1;
                "warn"
            }
            Level::Fail => {
                self.fails += 1;
                "FAIL"
            }
        };
        println!("{tag:<5} {check}: {}", message.as_ref());
    }
    fn ok(&mut self, check: &str, message: impl AsRef<str>) {
        self.line(Level::Ok, check, message);
    }
    fn warn(&mut self, check: &str, message: impl AsRef<str>) {
        self.line(Level::Warn, check, message);
    }
    fn fail(&mut self, check: &str, message: impl AsRef<str>) {
        self.line(Level::Fail, check, message);
    }
}

/// Less than this much left is always in the alert window.
const ALERT_LEFT: i64 = 7 * 86_400;

/// Where a certificate or authority valid from `not_before` to `not_after` stands at `now`: `Fail` when expired,
/// `Warn` in the alert window (under a quarter of its life or under 7 days left), `Ok` otherwise.
fn expiry_level(not_before: i64, not_after: i64, now: i64) -> Level {
    let left = not_after.saturating_sub(now);
    if left <= 0 {
        return Level::Fail;
    }
    let life = not_after.saturating_sub(not_before).max(1);
    if left < ALERT_LEFT || left.saturating_mul(4) < life {
        Level::Warn
    } else {
        Level::Ok
    }
}

/// The PKCS#11 mechanisms a key type needs: signing, and key-pair generation (the next rotation generates a key).
fn required_mechanisms(kt: KeyType) -> [MechanismType; 2] {
    match kt {
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => [
            MechanismType::RSA_PKCS,
            MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        ],
        KeyType::Ed25519 => [
            MechanismType::EDDSA,
            MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
        ],
        _ => [MechanismType::ECDSA, MechanismType::ECC_KEY_PAIR_GEN],
    }
}

/// The mechanisms `kt` needs that `has` (the token's mechanism list) lacks.
fn missing_mechanisms(kt: KeyType, has: impl Fn(MechanismType) -> bool) -> Vec<MechanismType> {
    required_mechanisms(kt)
        .into_iter()
        .filter(|m| !has(*m))
        .collect()
}

/// The obvious mistakes of a policy, one message per finding (rules numbered from 1, in the file's order).
fn policy_findings(rules: &[PolicyRule], trust_domain: &str) -> Vec<String> {
    let mut out = Vec::new();
    if rules.is_empty() {
        out.push("no [[policy]] rule: every caller is refused".into());
    }
    let td_root = format!("spiffe://{trust_domain}");
    let wildcard = |c: &str| {
        c.strip_suffix('*')
            .filter(|p| p.ends_with('/'))
            .map(str::to_string)
    };
    for (i, r) in rules.iter().enumerate() {
        let n = i + 1;
        let name = format!("rule {n} (caller {})", r.caller);
        let prefix = wildcard(&r.caller);
        if prefix.is_some() && r.may.iter().any(|m| m == "admin") {
            out.push(format!(
                "{name} grants admin to every caller under a wildcard: name the admin caller exactly"
            ));
        }
        if prefix.is_some()
            && r.ids
                .iter()
                .any(|id| id.trim_end_matches('/') == td_root.as_str())
        {
            out.push(format!(
                "{name} lets every caller under a wildcard obtain any ID of the trust domain: narrow its ids"
            ));
        }
        if r.max_ttl.is_none() {
            out.push(format!(
                "{name} has no max_ttl: its callers may ask for any lifetime up to the authority's; set max_ttl"
            ));
        }
        let in_td = r.caller == td_root || r.caller.starts_with(&format!("{td_root}/"));
        if !in_td {
            out.push(format!(
                "{name} can match no request: callers authenticate with X509-SVIDs of {trust_domain}"
            ));
        }
        for (j, earlier) in rules[..i].iter().enumerate() {
            if earlier.caller == r.caller {
                out.push(format!(
                    "{name} duplicates rule {}: the first matching rule applies, so this one never does",
                    j + 1
                ));
                break;
            }
            if let Some(p) = wildcard(&earlier.caller)
                && r.caller.starts_with(p.as_str())
            {
                out.push(format!(
                    "{name} can match no request: rule {} ({}) comes first and matches all its callers",
                    j + 1,
                    earlier.caller
                ));
                break;
            }
        }
    }
    out
}

/// A key type from its configuration name (`ec-p256`, ...), as stored in the datastore.
fn key_type_named(name: &str) -> Option<KeyType> {
    KeyType::ALL.into_iter().find(|k| k.name() == name)
}

/// Whether an authority in `state` needs its key on the token.
fn needs_key(a: &AuthorityRecord) -> bool {
    a.destroyed_at.is_none()
        && matches!(
            a.state,
            AuthorityState::Prepared
                | AuthorityState::Published
                | AuthorityState::Active
                | AuthorityState::Superseded
        )
}

/// Which key labels each X.509 token must hold, with their types, and whether a missing one is generated at start.
struct WantedKey {
    label: String,
    what: String,
    key_type: KeyType,
    generated_at_start: bool,
}

/// Runs `signet doctor`.
pub fn run(args: DoctorArgs) -> Result<(), CliError> {
    let mut r = Report::default();
    let (mut cfg, source) = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => (c, path.display().to_string()),
            Err(e) => {
                r.fail(
                    "config",
                    format!("{e}; fix the file (see signet.example.toml)"),
                );
                return finish(&r);
            }
        },
        None => (
            Config::embedded_default(),
            "the embedded default (no --config)".to_string(),
        ),
    };
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    r.ok(
        "config",
        format!(
            "{source} parses and validates (trust domain {})",
            cfg.trust_domain
        ),
    );
    let started = data_dir_check(&mut r, &cfg);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let authorities = runtime.block_on(datastore_checks(&mut r, &cfg, started));
    token_checks(&mut r, &cfg, started, authorities.as_deref());
    expiry_checks(&mut r, &cfg, started, authorities.as_deref());
    let findings = policy_findings(&cfg.policy, &cfg.trust_domain);
    if findings.is_empty() {
        r.ok(
            "policy",
            format!("{} rule(s), no obvious mistake", cfg.policy.len()),
        );
    }
    for f in findings {
        r.warn("policy", f);
    }
    finish(&r)
}

fn finish(r: &Report) -> Result<(), CliError> {
    if r.fails > 0 {
        Err(CliError::new(format!(
            "{} check(s) failed, {} warning(s)",
            r.fails, r.warns
        )))
    } else {
        Ok(())
    }
}

/// Whether the data directory holds a started appliance (its server certificate).
fn data_dir_check(r: &mut Report, cfg: &Config) -> bool {
    let dir = &cfg.data_dir;
    if !dir.is_dir() {
        r.ok(
            "data directory",
            format!(
                "{} does not exist: signet has never been started here (`signet serve` creates it)",
                dir.display()
            ),
        );
        return false;
    }
    let paths = DataPaths::new(dir);
    if paths.server_cert.exists() {
        r.ok("data directory", format!("{}", dir.display()));
        true
    } else {
        r.ok(
            "data directory",
            format!(
                "{} holds no server certificate: signet has never been started with it",
                dir.display()
            ),
        );
        false
    }
}

/// Opens the datastore, measures the clock skew, and returns the trust domain's authorities (none when the
/// datastore was never created; `None` when it could not be read).
async fn datastore_checks(
    r: &mut Report,
    cfg: &Config,
    started: bool,
) -> Option<Vec<AuthorityRecord>> {
    let url = cfg.datastore.as_str();
    let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let shown = if postgres {
        "PostgreSQL".to_string()
    } else {
        url.to_string()
    };
    if let Some(path) = url.strip_prefix("sqlite://") {
        let file = cfg.data_dir.join(path);
        if !file.exists() {
            let msg = format!(
                "{} does not exist yet (created at first start)",
                file.display()
            );
            if started {
                r.warn(
                    "datastore",
                    format!("{msg}, but the data directory was used: was it moved?"),
                );
                return None;
            }
            r.ok("datastore", msg);
            // Nothing stored yet: no authority.
            return Some(Vec::new());
        }
    }
    if let Err(e) = Store::probe(url, Duration::from_secs(10)).await {
        r.fail(
            "datastore",
            format!("{shown} is unreachable: {e}; check the URL, the server and the network"),
        );
        return None;
    }
    let store = match Store::open_to_inspect(url, &cfg.data_dir).await {
        Ok(s) => s,
        Err(e) => {
            r.fail("datastore", format!("{shown} does not open: {e}"));
            return None;
        }
    };
    let expected = store.expected_schema_version();
    let mut older = false;
    let schema_ok = match store.schema_version().await {
        Ok(v) if v == expected => {
            r.ok(
                "datastore",
                format!("{shown} opens ({}, schema version {v})", store.engine()),
            );
            true
        }
        Ok(v) if v < expected => {
            r.ok(
                "datastore",
                format!(
                    "{shown} opens ({}, schema version {v}; the next `signet serve` migrates it to {expected})",
                    store.engine()
                ),
            );
            older = true;
            v > 0
        }
        Ok(v) => {
            r.fail(
                "datastore",
                format!(
                    "{shown} has schema version {v}, newer than this signet's {expected}: a newer signet wrote it; \
                     run that version"
                ),
            );
            false
        }
        Err(_) if !started => {
            r.ok(
                "datastore",
                format!("{shown} opens and holds no signet schema yet (made at first start)"),
            );
            false
        }
        Err(e) => {
            r.fail(
                "datastore",
                format!(
                    "{shown} opens but holds no signet schema: {e}; is this the right database?"
                ),
            );
            false
        }
    };
    match store.database_now().await {
        Ok(None) => r.ok("clock", "local (SQLite keeps this host's time)"),
        Ok(Some(db)) => {
            let local = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let skew = local - db;
            let msg = format!("this host is {skew:+.1} s from the datastore's clock");
            if skew.abs() > 60.0 {
                r.fail(
                    "clock",
                    format!("{msg}: synchronise the clocks (NTP) before serving"),
                );
            } else if skew.abs() > 2.0 {
                r.warn("clock", format!("{msg}: check NTP on both"));
            } else {
                r.ok("clock", msg);
            }
        }
        Err(e) => r.warn("clock", format!("cannot read the datastore's clock: {e}")),
    }
    if !schema_ok {
        store.close().await;
        return (!started).then(Vec::new);
    }
    let out = match store.authorities(&cfg.trust_domain).await {
        Ok(a) => Some(a),
        Err(e) if older => {
            r.warn(
                "datastore",
                format!("cannot read the authorities before the schema is migrated: {e}"),
            );
            None
        }
        Err(e) => {
            r.fail("datastore", format!("cannot read the authorities: {e}"));
            None
        }
    };
    store.close().await;
    out
}

/// The tokens: module, token, login, sessions, mechanisms, keys.
fn token_checks(
    r: &mut Report,
    cfg: &Config,
    started: bool,
    authorities: Option<&[AuthorityRecord]>,
) {
    let settings = if cfg.tokens.is_empty() {
        let dir = &cfg.data_dir;
        if !dir.join("token.pin").exists() {
            r.ok(
                "token embedded",
                format!(
                    "the embedded hsm-sim token is made in {} at first start",
                    dir.display()
                ),
            );
            return;
        }
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
        let config = hsm_sim::Config {
            dir: Some(dir.join("hsm-sim")),
            ..hsm_sim::Config::default()
        };
        let _ = hsm_sim::set_embedded_config(config);
        vec![signet::serve::embedded_token_settings(
            PathBuf::from(signet_pkcs11::BUILTIN_MODULE),
            &dir,
        )]
    } else {
        cfg.tokens.clone()
    };
    let x509_names: Vec<String> = if cfg.authority.x509.tokens.is_empty() || cfg.tokens.is_empty() {
        settings.iter().map(|s| s.name.clone()).collect()
    } else {
        cfg.authority.x509.tokens.clone()
    };
    let single = x509_names.len() == 1;
    let wanted = wanted_keys(cfg, authorities, single);
    for s in &settings {
        let check = format!("token {}", s.name);
        let Some(token) = open_token(r, &check, s) else {
            continue;
        };
        // The configured number of sessions, open at once.
        let mut sessions = Vec::new();
        let mut failed = None;
        for _ in 0..s.sessions {
            match token.session() {
                Ok(sess) => sessions.push(sess),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            None => r.ok(&check, format!("{} session(s) open at once", s.sessions)),
            Some(e) => r.fail(
                &check,
                format!(
                    "only {} of the {} configured sessions open: {e}; lower `sessions` or raise the token's limit",
                    sessions.len(),
                    s.sessions
                ),
            ),
        }
        drop(sessions);
        if !x509_names.contains(&s.name) {
            continue;
        }
        let mut types: Vec<KeyType> = vec![
            cfg.authority.x509.key_type.token_key_type(),
            cfg.authority.jwt.key_type.token_key_type(),
        ];
        types.extend(wanted.iter().map(|w| w.key_type));
        types.dedup();
        let mut seen = Vec::new();
        for kt in types {
            if seen.contains(&kt) {
                continue;
            }
            seen.push(kt);
            let missing = missing_mechanisms(kt, |m| token.has_mechanism(m));
            if !missing.is_empty() {
                let names: Vec<String> = missing.iter().map(|m| m.to_string()).collect();
                r.fail(
                    &check,
                    format!(
                        "{} keys need {}, which the token does not support: choose another key_type or token",
                        kt.name(),
                        names.join(" and ")
                    ),
                );
            } else if let Some(why) = token.unsupported_reason(kt) {
                r.fail(&check, format!("{} keys: {why}", kt.name()));
            } else {
                let names: Vec<String> = required_mechanisms(kt)
                    .iter()
                    .map(|m| m.to_string())
                    .collect();
                r.ok(
                    &check,
                    format!(
                        "mechanisms for {} supported ({})",
                        kt.name(),
                        names.join(", ")
                    ),
                );
            }
        }
        key_checks(r, &check, &token, &wanted, started);
    }
}

/// The authority keys an X.509 token must hold: the datastore's live authorities, or the configured labels when
/// the datastore has none yet.
fn wanted_keys(
    cfg: &Config,
    authorities: Option<&[AuthorityRecord]>,
    single: bool,
) -> Vec<WantedKey> {
    let live: Vec<&AuthorityRecord> = authorities
        .unwrap_or_default()
        .iter()
        .filter(|a| needs_key(a))
        .collect();
    if !live.is_empty() {
        return live
            .into_iter()
            .filter_map(|a| {
                Some(WantedKey {
                    label: a.label.clone(),
                    what: format!("{} authority ({})", a.kind.name(), a.state.name()),
                    key_type: key_type_named(&a.key_type)?,
                    generated_at_start: false,
                })
            })
            .collect();
    }
    let fresh = authorities.is_none_or(|a| a.is_empty());
    let kt = |k: KeyTypeSetting| k.token_key_type();
    vec![
        WantedKey {
            label: cfg.authority.x509.key_label.clone(),
            what: "configured X.509 root key".into(),
            key_type: kt(cfg.authority.x509.key_type),
            generated_at_start: single && fresh,
        },
        WantedKey {
            label: cfg.authority.jwt.key_label.clone(),
            what: "configured JWT key".into(),
            key_type: kt(cfg.authority.jwt.key_type),
            generated_at_start: single && fresh,
        },
    ]
}

/// Module, token, login; the opened token when all three pass.
fn open_token(r: &mut Report, check: &str, s: &signet::config::TokenSettings) -> Option<Token> {
    let tc = match s.token_config() {
        Ok(c) => c,
        Err(e) => {
            r.fail(check, e.to_string());
            return None;
        }
    };
    let module = s.module.display().to_string();
    let slots = match signet_pkcs11::list_slots(&s.module) {
        Ok(slots) => {
            r.ok(check, format!("PKCS#11 module {module} loads"));
            slots
        }
        Err(e) => {
            let hint = if e.kind() == ErrorKind::ModuleLoad {
                "check the path and that the library is installed for this machine"
            } else {
                "check the module's own configuration"
            };
            r.fail(check, format!("PKCS#11 module {module}: {e}; {hint}"));
            return None;
        }
    };
    let found = slots
        .iter()
        .filter_map(|sl| sl.token.as_ref())
        .find(|t| match &tc.token {
            signet_pkcs11::TokenSelector::Label(l) => &t.label == l,
            signet_pkcs11::TokenSelector::Serial(n) => &t.serial == n,
        });
    match found {
        Some(t) => r.ok(
            check,
            format!(
                "token with {} found (serial {:?}, {} {})",
                tc.token, t.serial, t.manufacturer, t.model
            ),
        ),
        None => {
            let labels: Vec<String> = slots
                .iter()
                .filter_map(|sl| sl.token.as_ref().map(|t| format!("{:?}", t.label)))
                .collect();
            r.fail(
                check,
                format!(
                    "no token with {} on {module} (tokens there: {}); fix `token`/`serial` or initialise it with \
                     `signet token init`",
                    tc.token,
                    if labels.is_empty() { "none".to_string() } else { labels.join(", ") }
                ),
            );
            return None;
        }
    }
    let pin_from = match &s.pin {
        signet::config::PinConfig::Env(v) => format!("environment variable {v}"),
        signet::config::PinConfig::File(f) => format!("file {}", f.display()),
        _ => "its source".to_string(),
    };
    match Token::open(&tc) {
        Ok(t) => {
            r.ok(check, format!("login with the PIN from {pin_from} works"));
            Some(t)
        }
        Err(e) => {
            let msg = match e.kind() {
                ErrorKind::PinIncorrect => format!(
                    "login with the PIN from {pin_from} refused: the PIN is incorrect; fix the PIN source (the token \
                     locks the PIN after a few more failures)"
                ),
                ErrorKind::PinLocked => {
                    "login refused: the user PIN is locked or expired; the token's security officer must reset it"
                        .to_string()
                }
                ErrorKind::PinUnavailable => {
                    format!("the PIN cannot be read from {pin_from}: {e}")
                }
                _ => format!("cannot log in: {e}"),
            };
            r.fail(check, msg);
            None
        }
    }
}

/// The authority keys on one token, with their types.
fn key_checks(r: &mut Report, check: &str, token: &Token, wanted: &[WantedKey], started: bool) {
    let mut session = match token.session() {
        Ok(s) => s,
        Err(e) => {
            r.fail(
                check,
                format!("cannot open a session to look for the keys: {e}"),
            );
            return;
        }
    };
    for w in wanted {
        match session.find_key(&w.label) {
            Ok(k) if k.key_type() == w.key_type => r.ok(
                check,
                format!("key {:?} ({}) is on the token, {}", w.label, w.what, w.key_type.name()),
            ),
            Ok(k) => r.fail(
                check,
                format!(
                    "key {:?} ({}) is {} but {} is expected: fix key_type or the label",
                    w.label,
                    w.what,
                    k.key_type().name(),
                    w.key_type.name()
                ),
            ),
            Err(e) if e.kind() == ErrorKind::KeyNotFound && w.generated_at_start && !started => r.ok(
                check,
                format!(
                    "key {:?} ({}) is not on the token yet: signet generates it at first start",
                    w.label, w.what
                ),
            ),
            Err(e) if e.kind() == ErrorKind::KeyNotFound => r.fail(
                check,
                format!(
                    "key {:?} ({}) is not on the token: restore it from the token's backup, or generate it \
                     (`signet token generate`) and fix the label",
                    w.label, w.what
                ),
            ),
            Err(e) => r.fail(check, format!("looking for key {:?}: {e}", w.label)),
        }
    }
}

/// Expiry of the authorities and of signet's own credentials.
fn expiry_checks(
    r: &mut Report,
    cfg: &Config,
    started: bool,
    authorities: Option<&[AuthorityRecord]>,
) {
    let now = now_unix();
    match authorities {
        Some(list) if !list.is_empty() => {
            for a in list {
                let check = format!("authority {} {}", a.kind.name(), a.label);
                let Some(not_after) = a.not_after else {
                    r.ok(&check, format!("{}, no expiry recorded", a.state.name()));
                    continue;
                };
                let at = when_at(not_after, now);
                match a.state {
                    AuthorityState::Retired | AuthorityState::Preparing => {
                        r.ok(&check, format!("{}; expires {at}", a.state.name()));
                        continue;
                    }
                    AuthorityState::Superseded => {
                        r.ok(
                            &check,
                            format!("superseded (leaves the bundle at retire); expires {at}"),
                        );
                        continue;
                    }
                    _ => {}
                }
                let level = expiry_level(a.created_at, not_after, now);
                let state = a.state.name();
                let taint = if a.tainted { " (TAINTED)" } else { "" };
                match level {
                    Level::Fail => r.fail(
                        &check,
                        format!(
                            "{state}{taint}, expired {at}: rotate now (`signet rotate prepare`, publish, activate)"
                        ),
                    ),
                    Level::Warn => r.warn(
                        &check,
                        format!(
                            "{state}{taint}, expires {at}, within the alert window (under a quarter of its life or \
                             7 days): check that the rotation schedule runs, or rotate (`signet rotate status`)"
                        ),
                    ),
                    Level::Ok if a.tainted => r.warn(&check, format!("{state}, TAINTED; expires {at}: rotate it")),
                    Level::Ok => r.ok(&check, format!("{state}, expires {at}")),
                }
            }
        }
        Some(_) if !started => r.ok(
            "authorities",
            "none yet: the root and the JWT key are made at first start",
        ),
        Some(_) => r.warn(
            "authorities",
            "the datastore holds no authority for this trust domain although the data directory was used",
        ),
        None => r.warn("authorities", "not checked: the datastore could not be read"),
    }
    let paths = DataPaths::new(&cfg.data_dir);
    let mut creds = vec![
        ("server certificate", paths.server_cert.clone(), true),
        ("admin certificate", paths.admin_cert.clone(), true),
    ];
    if let Some(c) = &cfg.federation.cert {
        creds.push(("bundle endpoint certificate", cfg.in_data_dir(c), false));
    }
    for (what, path, own) in creds {
        if own && !started {
            r.ok(what, "not issued yet (made at first start)");
            continue;
        }
        cert_expiry(r, what, &path, now, own);
    }
}

/// One certificate file's expiry.
fn cert_expiry(r: &mut Report, what: &str, path: &Path, now: i64, renewed_by_signet: bool) {
    let parsed = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| pem::parse(b).map_err(|e| e.to_string()))
        .and_then(|p| {
            let (_, c) =
                x509_parser::parse_x509_certificate(p.contents()).map_err(|e| e.to_string())?;
            Ok((
                c.validity().not_before.timestamp(),
                c.validity().not_after.timestamp(),
            ))
        });
    let (nb, na) = match parsed {
        Ok(v) => v,
        Err(e) => {
            r.fail(what, format!("{}: {e}", path.display()));
            return;
        }
    };
    let at = when_at(na, now);
    let fix = if renewed_by_signet {
        "signet serve re-issues it at start and renews it at half its life: start it, or look for failed renewals in its log"
    } else {
        "replace it before then"
    };
    match expiry_level(nb, na, now) {
        Level::Fail => r.fail(what, format!("{} expired {at}: {fix}", path.display())),
        Level::Warn => r.warn(
            what,
            format!(
                "{} expires {at}, within the alert window (under a quarter of its life or 7 days): {fix}",
                path.display()
            ),
        ),
        Level::Ok => r.ok(what, format!("{} expires {at}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signet::config::ConfigDuration;

    #[test]
    fn expiry_window() {
        let day = 86_400;
        assert_eq!(expiry_level(0, 365 * day, 10 * day), Level::Ok);
        assert_eq!(
            expiry_level(0, 365 * day, 300 * day),
            Level::Warn,
            "under a quarter"
        );
        assert_eq!(
            expiry_level(0, 10 * day, 4 * day),
            Level::Warn,
            "under 7 days"
        );
        assert_eq!(expiry_level(0, 10 * day, 2 * day), Level::Ok);
        assert_eq!(expiry_level(0, 10 * day, 10 * day), Level::Fail);
        assert_eq!(expiry_level(0, 10 * day, 11 * day), Level::Fail);
    }

    #[test]
    fn mechanism_check_names_what_is_missing() {
        let ec_only = [MechanismType::ECDSA, MechanismType::ECC_KEY_PAIR_GEN];
        let has = |m: MechanismType| ec_only.contains(&m);
        assert!(missing_mechanisms(KeyType::EcP256, has).is_empty());
        assert_eq!(
            missing_mechanisms(KeyType::Rsa2048, has),
            vec![
                MechanismType::RSA_PKCS,
                MechanismType::RSA_PKCS_KEY_PAIR_GEN
            ]
        );
        assert_eq!(
            missing_mechanisms(KeyType::Ed25519, |m| m
                == MechanismType::ECC_EDWARDS_KEY_PAIR_GEN),
            vec![MechanismType::EDDSA]
        );
    }

    fn rule(caller: &str, may: &[&str], ids: &[&str], ttl: bool) -> PolicyRule {
        PolicyRule {
            caller: caller.into(),
            may: may.iter().map(|s| s.to_string()).collect(),
            ids: ids.iter().map(|s| s.to_string()).collect(),
            max_ttl: ttl.then_some(ConfigDuration(Duration::from_secs(3600))),
            jwt_max_ttl: None,
            rate: None,
            burst: None,
            downstream_credentials: false,
            spire_ca_path_len: None,
        }
    }

    #[test]
    fn policy_mistakes_are_found() {
        let td = "example.org";
        assert!(policy_findings(&Config::embedded_default().policy, td).is_empty());
        let rules = vec![
            rule(
                "spiffe://example.org/agents/*",
                &["issuer", "admin"],
                &["spiffe://example.org/"],
                true,
            ),
            rule(
                "spiffe://example.org/agents/a1",
                &["issuer"],
                &["spiffe://example.org/w"],
                true,
            ),
            rule(
                "spiffe://example.org/spire",
                &["upstream-authority"],
                &[],
                false,
            ),
            rule("spiffe://example.org/spire", &["key-manager"], &[], true),
            rule(
                "spiffe://other.org/x",
                &["issuer"],
                &["spiffe://example.org/w"],
                true,
            ),
        ];
        let f = policy_findings(&rules, td).join("\n");
        assert!(
            f.contains("rule 1 (caller spiffe://example.org/agents/*) grants admin"),
            "{f}"
        );
        assert!(
            f.contains("rule 1 (caller spiffe://example.org/agents/*) lets every caller"),
            "{f}"
        );
        assert!(
            f.contains(
                "rule 2 (caller spiffe://example.org/agents/a1) can match no request: rule 1"
            ),
            "{f}"
        );
        assert!(
            f.contains("rule 3 (caller spiffe://example.org/spire) has no max_ttl"),
            "{f}"
        );
        assert!(
            f.contains("rule 4 (caller spiffe://example.org/spire) duplicates rule 3"),
            "{f}"
        );
        assert!(
            f.contains("rule 5 (caller spiffe://other.org/x) can match no request"),
            "{f}"
        );
        assert_eq!(f.lines().count(), 6, "{f}");
        assert_eq!(policy_findings(&[], td).len(), 1);
    }
}
