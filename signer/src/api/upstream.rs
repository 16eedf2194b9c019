//! SPIRE's `UpstreamAuthority` v1: signet as the upstream CA of a SPIRE server.
//!
//! `MintX509CAAndSubscribe` signs the SPIRE server's intermediate with the root (through the pipeline, on the CPU
//! pool), answers with the chain and the roots, then keeps the stream open and pushes the roots (without a chain)
//! whenever they change. The intermediate's pathLenConstraint is the caller's policy rule's `spire_ca_path_len`
//! (none by default, so downstream SPIRE servers can chain below it); a CSR that asks for a longer path than the rule
//! allows is PERMISSION_DENIED, and a rule value the signing root cannot give is FAILED_PRECONDITION. `PublishJWTKeyAndSubscribe` adds the server's JWT key to the bundle and streams the JWT
//! keys (and keeps them in the datastore, when there is one, so a restart still publishes them). The key belongs to
//! its publisher (see [`super::bundle`]): a key id of signet's own authorities or of another publisher is
//! PERMISSION_DENIED; an empty, over-long or unprintable key id, an expiry not in the future, or a public key that is
//! not EC P-256/P-384 or RSA >= 2048 is INVALID_ARGUMENT. The `published` audit line is written before the key is
//! stored or joins the bundle, and if it cannot be written nothing changes (UNAVAILABLE);
//! `SubscribeToLocalBundle` streams both. The streams end only when the client goes away or the appliance shuts
//! down; nothing transient ends them.

use std::pin::Pin;
use std::sync::Arc;

use signet_proto::spire::plugin::server::upstreamauthority::v1 as pb;
use signet_proto::spire::plugin::types::{JwtKey as PbJwtKey, X509Certificate};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{AppState, Subject, cert_facts, issue_status, pipeline_status};
use crate::audit::Outcome;
use crate::bundle::{BundleSnapshot, JwtKey, KeyOwner, PublishError, check_kid, check_publishable};
use crate::ca::RotationError;
use crate::pipeline::with_deadline;
use crate::policy::Service;
use crate::store::StoreError;

/// The gRPC status of a refused publication: PERMISSION_DENIED for a key that is not the caller's to change,
/// ALREADY_EXISTS for the caller's own key id with another public key, INVALID_ARGUMENT for the rest.
fn publish_status(e: &PublishError) -> Status {
    if e.is_denied() {
        Status::permission_denied(e.to_string())
    } else if matches!(e, PublishError::KidConflict(_)) {
        Status::already_exists(e.to_string())
    } else {
        Status::invalid_argument(e.to_string())
    }
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The UpstreamAuthority service.
#[derive(Debug, Clone)]
pub struct UpstreamAuthorityService {
    state: Arc<AppState>,
}

impl UpstreamAuthorityService {
    /// The service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

fn roots(b: &BundleSnapshot) -> Vec<X509Certificate> {
    b.x509_roots
        .iter()
        .map(|r| X509Certificate {
            asn1: r.clone(),
            tainted: b.x509_tainted.contains(r),
        })
        .collect()
}

fn jwt_keys(b: &BundleSnapshot) -> Vec<PbJwtKey> {
    b.jwt_keys
        .iter()
        .map(|k| PbJwtKey {
            public_key: k.spki.clone(),
            key_id: k.kid.clone(),
            expires_at: k.expires_at,
            tainted: k.tainted,
        })
        .collect()
}

/// Sends `first(snapshot)`, then follows the bundle and sends `make(snapshot)` whenever `changed(previous, snapshot)`
/// says so, until the client goes away or the appliance shuts down. The first message is built from the version the
/// subscription starts at, so no change can fall between the two.
fn follow<T: Send + 'static>(
    state: &AppState,
    first: impl FnOnce(&BundleSnapshot) -> T,
    changed: fn(&BundleSnapshot, &BundleSnapshot) -> bool,
    make: fn(&BundleSnapshot) -> T,
) -> Stream2<T> {
    let (tx, rx) = mpsc::channel(4);
    let mut bundle = state.bundle.subscribe();
    let mut shutdown = state.shutdown.clone();
    let mut last = bundle.borrow_and_update().clone();
    let first = first(&last);
    tokio::spawn(async move {
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                r = bundle.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let now = bundle.borrow_and_update().clone();
                    if changed(&last, &now) {
                        if tx.send(Ok(make(&now))).await.is_err() {
                            return;
                        }
                        last = now;
                    }
                }
                () = crate::shutdown::until_shutdown(&mut shutdown) => return,
                () = tx.closed() => return,
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::upstream_authority_server::UpstreamAuthority for UpstreamAuthorityService {
    type MintX509CAAndSubscribeStream = Stream2<pb::MintX509caResponse>;
    type PublishJWTKeyAndSubscribeStream = Stream2<pb::PublishJwtKeyResponse>;
    type SubscribeToLocalBundleStream = Stream2<pb::SubscribeToLocalBundleResponse>;

    async fn mint_x509ca_and_subscribe(
        &self,
        request: Request<pb::MintX509caRequest>,
    ) -> Result<Response<Self::MintX509CAAndSubscribeStream>, Status> {
        let st = &self.state;
        let caller = st
            .admit(
                &request,
                Service::UpstreamAuthority,
                "MintX509CAAndSubscribe",
            )
            .await?;
        let req = request.into_inner();
        let td_id = st.trust_domain.id().as_str().to_string();
        let subject = || Some(Subject::SpiffeId(td_id.clone()));
        if req.csr.is_empty() {
            let s =
                Status::invalid_argument("csr is empty: send the SPIRE server's PKCS#10 CSR (DER)");
            return Err(st.refuse(&caller, s, subject()).await);
        }
        let grant = match st.grant(&caller) {
            Ok(g) => g,
            Err(s) => return Err(st.refuse(&caller, s, subject()).await),
        };
        if let Err(d) = grant.take(1) {
            return Err(st
                .refuse(&caller, super::denied_status(&d), subject())
                .await);
        }
        // The TTL rule (signet.proto): SPIRE asks for its ca_ttl; 0 is the default (1 h), the policy's max_ttl caps
        // it (SPIRE accepts a shorter CA), a negative one is refused and the root's NotAfter cuts the CA's
        // (`mint_spire_ca`).
        let mut ttl = match req.preferred_ttl {
            0 => 3600,
            n => i64::from(n),
        };
        if let Some(max) = grant.max_ttl() {
            ttl = ttl.min(i64::try_from(max.as_secs()).unwrap_or(i64::MAX));
        }
        let ttl = i32::try_from(ttl).unwrap_or(i32::MAX);
        let path_len = grant.spire_ca_path_len();
        let root = st.signers().root.clone();
        let deadline = caller.deadline;
        let csr = req.csr;
        let minted = st
            .pipeline
            .cpu()
            .run(move || {
                with_deadline(deadline, || {
                    root.mint_spire_ca(&csr, ttl, path_len, time::OffsetDateTime::now_utc())
                })
            })
            .await;
        let minted = match minted {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(st.refuse(&caller, issue_status(&e), subject()).await),
            Err(e) => return Err(st.refuse(&caller, pipeline_status(&e), subject()).await),
        };
        let ca = minted.x509_ca_chain.first().cloned().unwrap_or_default();
        let (serial, authority) = cert_facts(&ca);
        let mut r = caller.record(Outcome::Issued);
        r.spiffe_id = Some(td_id.clone());
        r.serial = Some(serial);
        r.authority = authority;
        r.expires_at = Some(minted.not_after.unix_timestamp());
        st.audit(&[r]).await?;
        let chain: Vec<X509Certificate> = minted
            .x509_ca_chain
            .into_iter()
            .map(|asn1| X509Certificate {
                asn1,
                tainted: false,
            })
            .collect();
        let first = move |b: &BundleSnapshot| pb::MintX509caResponse {
            x509_ca_chain: chain,
            upstream_x509_roots: roots(b),
        };
        Ok(Response::new(follow(
            st,
            first,
            |a, b| a.x509_roots != b.x509_roots || a.x509_tainted != b.x509_tainted,
            |b| pb::MintX509caResponse {
                x509_ca_chain: Vec::new(),
                upstream_x509_roots: roots(b),
            },
        )))
    }

    async fn publish_jwt_key_and_subscribe(
        &self,
        request: Request<pb::PublishJwtKeyRequest>,
    ) -> Result<Response<Self::PublishJWTKeyAndSubscribeStream>, Status> {
        let st = &self.state;
        let caller = st
            .admit(
                &request,
                Service::UpstreamAuthority,
                "PublishJWTKeyAndSubscribe",
            )
            .await?;
        let Some(key) = request.into_inner().jwt_key else {
            let s = Status::invalid_argument("jwt_key is required");
            return Err(st.refuse(&caller, s, None).await);
        };
        let subject = || Some(Subject::KeyId(key.key_id.clone()));
        if let Err(e) = check_kid(&key.key_id) {
            return Err(st.refuse(&caller, publish_status(&e), subject()).await);
        }
        let taken = match st.grant(&caller) {
            Ok(g) => g.take(1).map_err(|d| super::denied_status(&d)),
            Err(s) => Err(s),
        };
        if let Err(s) = taken {
            return Err(st.refuse(&caller, s, subject()).await);
        }
        let jwt = JwtKey {
            kid: key.key_id.clone(),
            spki: key.public_key.clone(),
            expires_at: key.expires_at,
            tainted: key.tainted,
            owner: KeyOwner::Publisher(caller.id.clone()),
        };
        // signet's own key ids, in the bundle or not (the active one, prepared and retired ones), are never taken.
        let own = st.signers().jwt.kid() == jwt.kid || st.authorities.is_own_kid(&jwt.kid).await;
        let allowed = if own {
            Err(PublishError::SignetKey(jwt.kid.clone()))
        } else {
            st.bundle.may_publish(&jwt)
        };
        // Whose the key id is comes first (an attempt on another's key is PERMISSION_DENIED whatever it asks), then
        // whether what is asked is usable.
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Err(e) = allowed
            .and_then(|()| check_publishable(&key.key_id, &key.public_key, key.expires_at, now))
        {
            return Err(st.refuse(&caller, publish_status(&e), subject()).await);
        }
        // The audit line is written before the key is stored or joins the bundle: if it cannot be, nothing changes.
        let mut r = caller.record(Outcome::Published);
        r.key_id = Some(key.key_id.clone());
        r.expires_at = Some(key.expires_at);
        if key.tainted {
            r.reason = Some("tainted".into());
        }
        st.audit(&[r]).await?;
        if !st.bundle.current().jwt_keys.contains(&jwt) {
            // Stored first (so a restart, and every replica, still publishes it), then live.
            if let Err(e) = st.authorities.store_published_jwt_key(&jwt).await {
                let s = match &e {
                    RotationError::Store(StoreError::NotOwner(_)) => {
                        Status::permission_denied(format!(
                            "key id {:?} is stored under another owner: only its owner may publish, expire or \
                             taint it",
                            jwt.kid
                        ))
                    }
                    RotationError::Precondition(_) => Status::permission_denied(
                        PublishError::SignetKey(jwt.kid.clone()).to_string(),
                    ),
                    _ => Status::unavailable(format!(
                        "the JWT key could not be stored ({e}); it was not published"
                    )),
                };
                return Err(st.refuse(&caller, s, subject()).await);
            }
            if let Err(e) = st.bundle.publish_jwt_key(jwt) {
                return Err(st.refuse(&caller, publish_status(&e), subject()).await);
            }
        }
        let first = |b: &BundleSnapshot| pb::PublishJwtKeyResponse {
            upstream_jwt_keys: jwt_keys(b),
        };
        Ok(Response::new(follow(
            st,
            first,
            |a, b| a.jwt_keys != b.jwt_keys,
            |b| pb::PublishJwtKeyResponse {
                upstream_jwt_keys: jwt_keys(b),
            },
        )))
    }

    async fn subscribe_to_local_bundle(
        &self,
        request: Request<pb::SubscribeToLocalBundleRequest>,
    ) -> Result<Response<Self::SubscribeToLocalBundleStream>, Status> {
        let st = &self.state;
        st.admit(
            &request,
            Service::UpstreamAuthority,
            "SubscribeToLocalBundle",
        )
        .await?;
        let make = |b: &BundleSnapshot| pb::SubscribeToLocalBundleResponse {
            upstream_x509_roots: roots(b),
            upstream_jwt_keys: jwt_keys(b),
        };
        Ok(Response::new(follow(
            st,
            make,
            |a, b| {
                a.x509_roots != b.x509_roots
                    || a.x509_tainted != b.x509_tainted
                    || a.jwt_keys != b.jwt_keys
            },
            make,
        )))
    }
}
