//! What a start finds or makes before anything serves, on a blocking thread: the audit log, the tokens and their
//! keys, the signing pipelines, the X.509 authority's certificate (signet's own root, or below an offline root the
//! installed certificate, [`install_offline`]), signet's server and admin X509-SVIDs, and the KeyManager key store.
//! What the datastore says signs now (after a rotation) comes first ([`prior_of`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{DistinguishedName, DnType};
use signet_pkcs11::{ErrorKind, KeyGenOptions, Token};
use time::OffsetDateTime;

use super::authorities::rotation_policy;
use super::embedded::EmbeddedToken;
use super::error::{ServeError, datastore, io};
use crate::api::keymanager::KeyStore;
use crate::audit::AuditLog;
use crate::ca::external::ExternalParent;
use crate::ca::{AuthorityKind, AuthorityState};
use crate::config::{ADMIN_ID_PATH, Config, ConfigError, SERVER_ID_PATH, TokenSettings};
use crate::datadir::{DataPaths, pem_certs, write_private, write_public};
use crate::jwt::JwtIssuer;
use crate::keys::AuthorityKey;
use crate::pipeline::{Pipeline, TokenMember};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::Store;
use crate::x509::{Authority, LeafRequest, RootRequest};

/// Makes sure a key labelled `label` exists on `token`, generating it when it does not.
fn ensure_key(
    token: &Token,
    name: &str,
    label: &str,
    key_type: signet_pkcs11::KeyType,
    may_generate: bool,
) -> Result<(), ServeError> {
    let failed = |source| ServeError::Token {
        token: name.to_string(),
        source,
    };
    let mut s = token.session().map_err(failed)?;
    match s.find_key(label) {
        Ok(k) if k.key_type() == key_type => Ok(()),
        Ok(k) => Err(ServeError::KeyType {
            token: name.to_string(),
            label: label.to_string(),
            found: k.key_type().name(),
            wanted: key_type.name(),
        }),
        Err(e) if e.kind() == ErrorKind::KeyNotFound && may_generate => {
            s.generate_key(label, key_type, KeyGenOptions::default())
                .map_err(|source| ServeError::KeyGeneration {
                    token: name.to_string(),
                    label: label.to_string(),
                    source,
                })?;
            tracing::info!(token = name, label, "key generated on the token");
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::KeyNotFound => Err(ServeError::KeyMissing {
            token: name.to_string(),
            label: label.to_string(),
        }),
        Err(e) => Err(failed(e)),
    }
}

/// How often a first start below an offline root looks again for the installed certificate.
pub(super) const AWAIT_CERTIFICATE_POLL: Duration = Duration::from_secs(2);

/// The external parent the configuration names, with its upstream roots loaded, or `None` for signet's own roots.
pub(super) fn external_parent(cfg: &Config) -> Result<Option<ExternalParent>, ServeError> {
    let x = &cfg.authority.x509;
    if x.parent != crate::config::ParentSetting::External {
        return Ok(None);
    }
    let path = x.upstream_roots.as_ref().ok_or_else(|| {
        ConfigError::Invalid(
            "authority.x509.parent = \"external\" needs authority.x509.upstream_roots".into(),
        )
    })?;
    let roots = crate::ca::external::load_roots(path).map_err(|e| ServeError::UpstreamRoots {
        reason: e.to_string(),
    })?;
    Ok(Some(ExternalParent {
        roots,
        source: path.display().to_string(),
        path_len_room: PATH_LEN_ROOM,
        least_life: rotation_policy(cfg, true).least_life(),
    }))
}

/// How many levels of CA signet issues below its X.509 authority: SPIRE servers' CAs (pathlen 0) and delegated
/// mode's issuing intermediates are one level.
const PATH_LEN_ROOM: u8 = 1;

/// Below an offline root, the first start's authority: the certificate `signet rotate install --offline` wrote to
/// the data directory (checked again here, against the key on the token), with its chain. Without one, the CSR is
/// written for the ceremony and [`ServeError::AwaitingCertificate`] says what to do.
fn load_installed(
    paths: &DataPaths,
    key: &dyn AuthorityKey,
    td: &TrustDomain,
    label: &str,
    ext: &ExternalParent,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), ServeError> {
    if !paths.authority.exists() {
        let csr =
            crate::x509::certificate_request(key, td, &crate::ca::intermediate_subject(td, 1))
                .map_err(|source| ServeError::Issue {
                    what: "cannot make the authority's CSR".into(),
                    source,
                })?;
        write_public(
            &paths.authority_csr,
            pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)).as_bytes(),
        )?;
        return Err(ServeError::AwaitingCertificate(format!(
            "awaiting the authority's certificate: have the offline root sign {} (a CA certificate for {label}), then \
             run signet rotate install --offline --config FILE --cert FILE [--chain FILE]; signet starts serving once \
             it is installed",
            paths.authority_csr.display()
        )));
    }
    let text = std::fs::read(&paths.authority)
        .map_err(io(format!("reading {}", paths.authority.display())))?;
    let refused = |reason: String| ServeError::CertificateRefused {
        what: paths.authority.display().to_string(),
        reason,
    };
    let mut certs = crate::ca::external::pem_certificates(&text, "the file")
        .map_err(|e| refused(e.to_string()))?;
    if certs.is_empty() {
        return Err(refused("it holds no certificate".into()));
    }
    let cert = certs.remove(0);
    crate::ca::external::check_installed(
        &cert,
        &certs,
        label,
        key.spki_der(),
        ext,
        OffsetDateTime::now_utc(),
    )
    .map_err(|e| refused(e.to_string()))?;
    Ok((cert, certs))
}

/// `signet rotate install --offline`: below an offline root, before the first start, checks the certificate the
/// ceremony returned (`cert_pem`, with `chain_pem` the CA certificates between it and the upstream root) against
/// the CSR the waiting `signet serve` wrote to the data directory and the configured upstream roots, and writes it
/// where the start picks it up (`authority.pem`). The start checks it again against the key on the token.
pub fn install_offline(
    cfg: &Config,
    cert_pem: &[u8],
    chain_pem: &[u8],
) -> Result<PathBuf, ServeError> {
    cfg.validate()?;
    let ext = external_parent(cfg)?.ok_or_else(|| {
        ConfigError::Invalid(
            "install is for an X.509 authority below an offline root: set authority.x509.parent = \"external\"".into(),
        )
    })?;
    let paths = DataPaths::new(&cfg.data_dir);
    let csr_pem = std::fs::read(&paths.authority_csr).map_err(io(format!(
        "reading {} (start signet serve once: it writes the CSR and waits)",
        paths.authority_csr.display()
    )))?;
    let csr_der = pem::parse(&csr_pem)
        .map_err(|source| ServeError::Pem {
            path: paths.authority_csr.clone(),
            source,
        })?
        .contents()
        .to_vec();
    let csr = crate::x509::parse_and_verify_csr(&csr_der).map_err(|source| ServeError::Csr {
        path: paths.authority_csr.clone(),
        source,
    })?;
    let refused = |what: &str, reason: String| ServeError::CertificateRefused {
        what: what.into(),
        reason,
    };
    const CERT: &str = "the ceremony's certificate";
    let mut certs = crate::ca::external::pem_certificates(cert_pem, "the certificate file")
        .map_err(|e| refused(CERT, e.to_string()))?;
    if certs.len() != 1 {
        return Err(refused(
            CERT,
            format!(
                "the certificate file holds {} certificates: give signet's certificate alone (--cert) and the CA \
                 certificates above it with --chain",
                certs.len()
            ),
        ));
    }
    let chain = crate::ca::external::pem_certificates(chain_pem, "the chain file")
        .map_err(|e| refused("the chain", e.to_string()))?;
    crate::ca::external::check_installed(
        &certs[0],
        &chain,
        &cfg.authority.x509.key_label,
        csr.subject_key().spki_der(),
        &ext,
        OffsetDateTime::now_utc(),
    )
    .map_err(|e| refused(CERT, e.to_string()))?;
    certs.extend(chain);
    write_public(&paths.authority, pem_certs(&certs).as_bytes())?;
    Ok(paths.authority)
}

fn load_root(
    paths: &DataPaths,
    key: Arc<dyn AuthorityKey>,
    td: &TrustDomain,
    ttl: Duration,
) -> Result<Vec<u8>, ServeError> {
    if paths.root.exists() {
        let text =
            std::fs::read(&paths.root).map_err(io(format!("reading {}", paths.root.display())))?;
        let block = pem::parse(&text).map_err(|source| ServeError::Pem {
            path: paths.root.clone(),
            source,
        })?;
        let der = block.contents().to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|source| {
            ServeError::Certificate {
                what: paths.root.display().to_string(),
                source,
            }
        })?;
        if cert.public_key().raw != key.spki_der() {
            return Err(ServeError::RootKeyChanged {
                path: paths.root.clone(),
            });
        }
        if !cert.validity().is_valid() {
            return Err(ServeError::RootNotValid {
                path: paths.root.clone(),
            });
        }
        return Ok(der);
    }
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "signet");
    subject.push(DnType::CommonName, format!("signet root {td}"));
    let root = Authority::self_signed_root(
        key,
        &RootRequest {
            trust_domain: td.clone(),
            subject,
            ttl,
            path_len: None,
        },
        OffsetDateTime::now_utc(),
    )
    .map_err(|source| ServeError::Issue {
        what: "cannot create the root".into(),
        source,
    })?;
    let der = root.cert_der().to_vec();
    write_public(
        &paths.root,
        pem_certs(std::slice::from_ref(&der)).as_bytes(),
    )?;
    tracing::info!(path = %paths.root.display(), "root certificate created");
    Ok(der)
}

/// Issues (or keeps, when it is still good) the X509-SVID for `id` at `cert_path`/`key_path`.
fn service_svid(
    root: &Authority,
    id: &SpiffeId,
    dns: &[String],
    ttl: Duration,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<Vec<u8>>, Vec<u8>), ServeError> {
    if let Some(kept) = reuse_svid(root, id, dns, cert_path, key_path, ttl) {
        return Ok(kept);
    }
    let ttl = ttl.min(
        (root.not_after() - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or_default(),
    );
    let kp =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ServeError::OwnKey)?;
    let mut req = LeafRequest::from_spki(
        id.clone(),
        &rcgen::PublicKeyData::subject_public_key_info(&kp),
        ttl,
    )
    .map_err(|source| ServeError::Issue {
        what: format!("the request for {id}"),
        source,
    })?;
    req.dns_names = dns.to_vec();
    let issued = root
        .issue_x509_svid(&req, OffsetDateTime::now_utc())
        .map_err(|source| ServeError::Issue {
            what: format!("cannot issue the SVID for {id}"),
            source,
        })?;
    let mut chain = vec![issued.der];
    chain.extend(root.chain());
    let key = kp.serialize_der();
    write_private(key_path, kp.serialize_pem().as_bytes())?;
    write_public(cert_path, pem_certs(&chain).as_bytes())?;
    Ok((chain, key))
}

fn reuse_svid(
    root: &Authority,
    id: &SpiffeId,
    dns: &[String],
    cert_path: &Path,
    key_path: &Path,
    ttl: Duration,
) -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
    let chain: Vec<Vec<u8>> = pem::parse_many(std::fs::read(cert_path).ok()?)
        .ok()?
        .into_iter()
        .map(|p| p.contents().to_vec())
        .collect();
    let key = pem::parse(std::fs::read(key_path).ok()?)
        .ok()?
        .contents()
        .to_vec();
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let (_, root_cert) = x509_parser::parse_x509_certificate(root.cert_der()).ok()?;
    cert.verify_signature(Some(root_cert.public_key())).ok()?;
    let left = cert.validity().time_to_expiration()?;
    let has_id = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == id.as_str()));
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    let mut wanted = dns.to_vec();
    names.sort();
    wanted.sort();
    if names != wanted {
        return None;
    }
    let kp = rcgen::KeyPair::try_from(key.as_slice()).ok()?;
    let same_key = rcgen::PublicKeyData::subject_public_key_info(&kp) == cert.public_key().raw;
    (has_id && same_key && left.whole_seconds() > i64::try_from(ttl.as_secs() / 2).ok()?)
        .then_some((chain, key))
}

pub(super) struct Bootstrapped {
    pub(super) td: TrustDomain,
    pub(super) paths: DataPaths,
    pub(super) root_label: String,
    pub(super) jwt_label: String,
    pub(super) authority_token: (String, Token),
    pub(super) single: bool,
    pub(super) pipeline: Pipeline,
    pub(super) km_pipeline: Option<Pipeline>,
    pub(super) root_der: Vec<u8>,
    /// Below an offline root: the CA certificates between `root_der` (signet's intermediate) and the upstream root.
    pub(super) root_chain: Vec<Vec<u8>>,
    /// Below an offline root: the upstream roots and what installed certificates are checked against.
    pub(super) external: Option<ExternalParent>,
    pub(super) server: (Vec<Vec<u8>>, Vec<u8>),
    /// The admin's chain (leaf first).
    pub(super) admin: Vec<Vec<u8>>,
    pub(super) keys: KeyStore,
    pub(super) audit: AuditLog,
    pub(super) token_names: Vec<String>,
    pub(super) token_sessions: Vec<(String, u32)>,
}

/// What the datastore says signs now (from an earlier start), if anything.
#[derive(Debug, Default)]
pub(super) struct Prior {
    /// The active root's label and certificate.
    x509: Option<(String, Vec<u8>)>,
    /// Below an offline root: the chain installed with the active intermediate.
    x509_chain: Vec<Vec<u8>>,
    /// The active JWT key's label.
    jwt: Option<String>,
}

pub(super) fn bootstrap(
    cfg: &Config,
    embedded: &dyn EmbeddedToken,
    dir: PathBuf,
    prior: Prior,
    external: Option<&ExternalParent>,
) -> Result<Bootstrapped, ServeError> {
    let td = cfg.trust_domain()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    let paths = DataPaths::new(&dir);
    let audit_path = if cfg.server.audit_log.is_absolute() {
        cfg.server.audit_log.clone()
    } else {
        dir.join(&cfg.server.audit_log)
    };
    let audit = AuditLog::open(&audit_path, cfg.server.audit_sync).map_err(io(format!(
        "opening the audit log {}",
        audit_path.display()
    )))?;
    let settings = if cfg.tokens.is_empty() {
        vec![embedded.provision(&dir)?]
    } else {
        cfg.tokens.clone()
    };
    let mut tokens = Vec::new();
    for s in &settings {
        let token = Token::open(&s.token_config()?).map_err(|source| ServeError::Token {
            token: s.name.clone(),
            source,
        })?;
        tokens.push((s.clone(), token));
    }
    let x509_names: Vec<String> = if cfg.authority.x509.tokens.is_empty() || cfg.tokens.is_empty() {
        settings.iter().map(|s| s.name.clone()).collect()
    } else {
        cfg.authority.x509.tokens.clone()
    };
    let members: Vec<&(TokenSettings, Token)> = tokens
        .iter()
        .filter(|(s, _)| x509_names.contains(&s.name))
        .collect();
    let Some((first_settings, _)) = members.first().copied() else {
        return Err(ServeError::NoX509Token);
    };
    let single = members.len() == 1;
    let x = &cfg.authority.x509;
    let j = &cfg.authority.jwt;
    // After a rotation the active keys are the datastore's, not the configured labels (which name generation 1).
    let root_label = prior
        .x509
        .as_ref()
        .map_or_else(|| x.key_label.clone(), |p| p.0.clone());
    let jwt_label = prior.jwt.clone().unwrap_or_else(|| j.key_label.clone());
    for (s, t) in &members {
        ensure_key(
            t,
            &s.name,
            &root_label,
            x.key_type.token_key_type(),
            single && prior.x509.is_none(),
        )?;
        ensure_key(
            t,
            &s.name,
            &jwt_label,
            j.key_type.token_key_type(),
            single && prior.jwt.is_none(),
        )?;
    }
    // KeyManager keys: on the configured token (the first by default); they share the authority's pipeline when it
    // signs with that token alone, else they get a pipeline of their own.
    let km_name = cfg
        .key_manager
        .token
        .clone()
        .unwrap_or_else(|| first_settings.name.clone());
    let (km_settings, km_token) = tokens
        .iter()
        .find(|(s, _)| s.name == km_name)
        .ok_or_else(|| ServeError::UnknownKeyManagerToken(km_name.clone()))?;
    let pcfg = cfg.pipeline.pipeline_config()?;
    let pipeline = Pipeline::start(
        pcfg.clone(),
        members
            .iter()
            .map(|(s, t)| TokenMember::new(s.name.clone(), t.clone(), s.sessions))
            .collect(),
    )
    .map_err(|source| ServeError::Pipeline {
        what: "cannot start the signing pipeline".into(),
        source,
    })?;
    let started = (|| {
        let root_key: Arc<dyn AuthorityKey> = Arc::new(pipeline.key(&root_label).map_err(
            |source| ServeError::Pipeline {
                what: format!("the root key {root_label:?}"),
                source,
            },
        )?);
        let jwt_key: Arc<dyn AuthorityKey> = Arc::new(pipeline.key(&jwt_label).map_err(
            |source| ServeError::Pipeline {
                what: format!("the JWT key {jwt_label:?}"),
                source,
            },
        )?);
        let root_der = match &prior.x509 {
            Some((label, cert)) => {
                let (_, c) = x509_parser::parse_x509_certificate(cert).map_err(|source| {
                    ServeError::Certificate {
                        what: "the datastore's root".into(),
                        source,
                    }
                })?;
                if c.public_key().raw != root_key.spki_der() {
                    return Err(ServeError::RootKeyMismatch {
                        label: label.clone(),
                    });
                }
                if external.is_some() && c.subject().as_raw() == c.issuer().as_raw() {
                    return Err(ServeError::OwnRootNotExternal {
                        label: label.clone(),
                    });
                }
                if external.is_none() {
                    write_public(
                        &paths.root,
                        pem_certs(std::slice::from_ref(cert)).as_bytes(),
                    )?;
                }
                (cert.clone(), prior.x509_chain.clone())
            }
            None => match external {
                Some(ext) => load_installed(&paths, root_key.as_ref(), &td, &root_label, ext)?,
                None => (
                    load_root(&paths, root_key.clone(), &td, x.root_ttl.0)?,
                    Vec::new(),
                ),
            },
        };
        let (root_der, root_chain) = root_der;
        let root = Arc::new(
            Authority::new(
                root_der.clone(),
                root_key.clone(),
                td.clone(),
                root_chain.clone(),
                external.map(|e| e.roots.clone()).unwrap_or_default(),
            )
            .map_err(|source| ServeError::Issue {
                what: "the X.509 authority".into(),
                source,
            })?,
        );
        let jwt = Arc::new(
            JwtIssuer::new(jwt_key, td.clone(), None, None, j.max_ttl.0)
                .map_err(ServeError::Jwt)?,
        );
        let svid_ttl = cfg.server.service_svid_ttl.0;
        let server_id = td.workload_id(SERVER_ID_PATH).map_err(ServeError::OwnId)?;
        let admin_id = td.workload_id(ADMIN_ID_PATH).map_err(ServeError::OwnId)?;
        let server = service_svid(
            &root,
            &server_id,
            &cfg.server.names,
            svid_ttl,
            &paths.server_cert,
            &paths.server_key,
        )?;
        let (admin, _) = service_svid(
            &root,
            &admin_id,
            &[],
            svid_ttl,
            &paths.admin_cert,
            &paths.admin_key,
        )?;
        write_public(&paths.bundle, pem_certs(root.roots()).as_bytes())?;
        // The JWT key was checked by building its issuer; the running issuers come from the datastore's active set.
        drop(jwt);
        Ok::<_, ServeError>((root_der, root_chain, server, admin))
    })();
    let (root_der, root_chain, server, admin) = match started {
        Ok(v) => v,
        Err(e) => {
            pipeline.shutdown();
            return Err(e);
        }
    };
    let km_pipeline = if single && first_settings.name == km_name {
        None
    } else {
        match Pipeline::start(
            pcfg,
            vec![TokenMember::new(
                km_name.clone(),
                km_token.clone(),
                km_settings.sessions,
            )],
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                pipeline.shutdown();
                return Err(ServeError::Pipeline {
                    what: "cannot start the key manager's pipeline".into(),
                    source: e,
                });
            }
        }
    };
    let keys = match KeyStore::load(
        km_token.clone(),
        km_pipeline.clone().unwrap_or_else(|| pipeline.clone()),
    ) {
        Ok(k) => k,
        Err(e) => {
            pipeline.shutdown();
            if let Some(p) = &km_pipeline {
                p.shutdown();
            }
            return Err(ServeError::KeyStore {
                reason: e.to_string(),
            });
        }
    };
    Ok(Bootstrapped {
        td,
        paths,
        root_label,
        jwt_label,
        authority_token: (first_settings.name.clone(), members[0].1.clone()),
        single,
        pipeline,
        km_pipeline,
        root_der,
        root_chain,
        external: external.cloned(),
        server,
        admin,
        keys,
        audit,
        token_names: settings.iter().map(|s| s.name.clone()).collect(),
        token_sessions: settings
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    u32::try_from(s.sessions).unwrap_or(u32::MAX),
                )
            })
            .collect(),
    })
}

/// The active authorities an earlier start left in the datastore.
pub(super) async fn prior_of(store: &Store, td: &TrustDomain) -> Result<Prior, ServeError> {
    let rows = store
        .authorities(&td.to_string())
        .await
        .map_err(datastore("reading the active authorities"))?;
    let active = |k: AuthorityKind| {
        rows.iter()
            .find(|r| r.kind == k && r.state == AuthorityState::Active)
    };
    Ok(Prior {
        x509: active(AuthorityKind::X509)
            .and_then(|r| Some((r.label.clone(), r.certificate.clone()?))),
        x509_chain: active(AuthorityKind::X509)
            .map(|r| crate::ca::external::split_ders(r.chain.as_deref().unwrap_or_default()))
            .unwrap_or_default(),
        jwt: active(AuthorityKind::Jwt).map(|r| r.label.clone()),
    })
}
