//! The authorities as the configuration describes them: the rotation policy, the life cycle opened on the
//! datastore ([`Authorities`]), and the issuers of its active set ([`Signers`]).

use std::sync::Arc;
use std::time::Duration;

use super::bootstrap::Bootstrapped;
use super::error::ServeError;
use crate::api::Signers;
use crate::ca::{ActiveSet, Authorities, Initial, RotationPolicy, Schedule, TokenKeyring};
use crate::config::Config;
use crate::jwt::JwtIssuer;
use crate::pipeline::{Pipeline, SigningMode, X509SvidIssuer};
use crate::spiffe::TrustDomain;
use crate::store::Store;
use crate::x509::Authority;

/// The rotation policy the configuration describes.
pub(super) fn rotation_policy(cfg: &Config, single_token: bool) -> RotationPolicy {
    let x = &cfg.authority.x509;
    let r = &cfg.authority.rotation;
    let mut p = RotationPolicy::new(x.key_label.clone(), cfg.authority.jwt.key_label.clone());
    p.x509_key_type = x.key_type.token_key_type();
    p.jwt_key_type = cfg.authority.jwt.key_type.token_key_type();
    p.root_ttl = x.root_ttl.0;
    p.publish_lead = r.publish_lead.0;
    // The longest life of anything a root signs: SPIRE CAs and X509-SVIDs (capped by the policy's max_ttl),
    // issuing intermediates, and signet's own credentials unless they are renewed while running (then they are
    // re-issued right after activate, and `retire` waits for that through the holds and the replicas' heartbeats
    // instead).
    let policy_max = cfg
        .policy
        .iter()
        .filter_map(|p| p.max_ttl.map(|t| t.0))
        .max()
        .unwrap_or(Duration::from_secs(24 * 3600));
    p.max_x509_issued_ttl = policy_max.max(x.intermediate_ttl.0);
    if !cfg.server.renew_own_credentials {
        p.max_x509_issued_ttl = p.max_x509_issued_ttl.max(cfg.server.service_svid_ttl.0);
    }
    p.max_jwt_issued_ttl = cfg.authority.jwt.max_ttl.0;
    // A new key is generated on one token; with several tokens sharing the load it must be made on each first.
    if !single_token {
        p.cannot_prepare = Some(
            "the X.509 authority signs with several tokens: rotating across several tokens is not supported yet (a \
             new key would be on one token only)"
                .into(),
        );
    }
    p.schedule = (r.schedule && single_token).then_some(Schedule {
        prepare_at: r.prepare_at,
        activate_at: r.activate_at,
    });
    p
}

pub(super) async fn open_authorities(
    cfg: &Config,
    boot: &Bootstrapped,
    store: Store,
    clock: Arc<dyn crate::ca::Clock>,
) -> Result<Authorities, ServeError> {
    let keyring = Arc::new(TokenKeyring::new(
        boot.authority_token.0.clone(),
        boot.authority_token.1.clone(),
        Some(boot.pipeline.clone()),
    ));
    Authorities::open(
        boot.td.clone(),
        store,
        keyring,
        clock,
        RotationPolicy {
            external: boot.external.clone(),
            ..rotation_policy(cfg, boot.single)
        },
        Initial {
            x509_label: boot.root_label.clone(),
            x509_root: boot.root_der.clone(),
            x509_chain: boot.root_chain.clone(),
            jwt_label: boot.jwt_label.clone(),
        },
    )
    .await
    .map_err(ServeError::Authorities)
}

/// The issuers for `set`.
pub(super) async fn signers_of(
    set: &ActiveSet,
    td: &TrustDomain,
    mode: SigningMode,
    pipeline: &Pipeline,
    jwt_max_ttl: Duration,
) -> Result<Signers, ServeError> {
    let a = &set.x509;
    let authority = |a: &Authority| {
        Authority::new(
            a.cert_der().to_vec(),
            a.key().clone(),
            td.clone(),
            a.intermediates().to_vec(),
            a.roots().to_vec(),
        )
        .map_err(|source| ServeError::Issue {
            what: "the X.509 authority".into(),
            source,
        })
    };
    let x509 = X509SvidIssuer::start(authority(a)?, mode, pipeline.cpu().clone())
        .await
        .map_err(ServeError::X509Issuer)?;
    let (_, jwt_key) = set.jwt.clone().ok_or(ServeError::NoJwtKey)?;
    let jwt =
        JwtIssuer::new(jwt_key, td.clone(), None, None, jwt_max_ttl).map_err(ServeError::Jwt)?;
    Ok(Signers {
        root: Arc::new(authority(a)?),
        x509,
        jwt: Arc::new(jwt),
    })
}
