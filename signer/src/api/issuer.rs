//! signet's own API: `signet.v1.Issuer` (X509-SVIDs in batches, JWT-SVIDs, the bundle) and `signet.v1.Admin`.
//!
//! `BatchMintX509SVID` answers each CSR on its own, in request order: a CSR refused by the policy or the issuance
//! checks gets a `Failure` with the status code and reason, the others are issued. A SPIFFE ID no caller could get
//! (another trust domain, or the bare trust domain ID) is INVALID_ARGUMENT before the policy is asked, for
//! X509-SVIDs and JWT-SVIDs alike; one the policy keeps from this caller is PERMISSION_DENIED. The batch is bounded
//! (`server.max_batch`); the caller's rate limit is charged one token per CSR. All of a batch's audit lines are
//! written with one flush before the answer goes out.
//!
//! Lifetimes follow the TTL rule written in `signet.proto` (above the Issuer service), the same for X509-SVIDs,
//! JWT-SVIDs and `MintX509CA`, in direct and delegated mode: 0 is the default, negative INVALID_ARGUMENT, above the
//! caller's policy maximum cut to it ([`Grant::x509_ttl`](crate::policy::Grant::x509_ttl)), and the NotAfter cut at
//! the issuing CA's (in [`Authority`](crate::x509::Authority)); huge values are cut, never an overflow.

use std::sync::Arc;
use std::time::Duration;

use signet_proto::signet::v1 as pb;
use tonic::{Code, Request, Response, Status};

use super::{AppState, Caller, Subject, cert_facts, cert_ski, code_name, jwt_status, svid_status};
use crate::audit::{AuditRecord, Outcome};
use crate::pipeline::{PipelineError, SvidError, with_deadline};
use crate::policy::Service;
use crate::spiffe::{SpiffeId, TrustDomain};

/// The Issuer service.
#[derive(Debug, Clone)]
pub struct IssuerService {
    state: Arc<AppState>,
}

impl IssuerService {
    /// The service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

fn failure(code: Code, message: String) -> pb::X509svidResult {
    pb::X509svidResult {
        result: Some(pb::x509svid_result::Result::Failure(pb::Failure {
            code: code as i32,
            message,
        })),
    }
}

fn refused(caller: &Caller, id: Option<String>, status: &Status) -> AuditRecord {
    let mut r = caller.record(Outcome::Refused);
    r.spiffe_id = id;
    r.code = Some(code_name(status.code()));
    r.reason = Some(status.message().to_string());
    r
}

/// A request's `ttl_seconds` (the TTL rule, see `signet.proto`): negative is INVALID_ARGUMENT; 0 (the default) and
/// every positive value, however large, go on to the policy, which cuts them to the caller's maximum.
pub(super) fn ttl_of(secs: i64) -> Result<Duration, Status> {
    u64::try_from(secs)
        .map(Duration::from_secs)
        .map_err(|_| Status::invalid_argument(format!("ttl_seconds {secs} is negative")))
}

#[tonic::async_trait]
impl pb::issuer_server::Issuer for IssuerService {
    async fn batch_mint_x509svid(
        &self,
        request: Request<pb::BatchMintX509svidRequest>,
    ) -> Result<Response<pb::BatchMintX509svidResponse>, Status> {
        let st = &self.state;
        let caller = st
            .admit(&request, Service::Issuer, "BatchMintX509SVID")
            .await?;
        let reqs = request.into_inner().requests;
        if reqs.is_empty() {
            let s = Status::invalid_argument("the batch is empty: send at least one CSR");
            return Err(st.refuse(&caller, s, None).await);
        }
        if reqs.len() > st.max_batch {
            let s = Status::invalid_argument(format!(
                "the batch holds {} CSRs, more than the limit of {}: split it",
                reqs.len(),
                st.max_batch
            ));
            return Err(st.refuse(&caller, s, None).await);
        }
        let grant = match st.grant(&caller) {
            Ok(g) => g,
            Err(s) => return Err(st.refuse(&caller, s, None).await),
        };
        if let Err(d) = grant.take(u32::try_from(reqs.len()).unwrap_or(u32::MAX)) {
            return Err(st.refuse(&caller, super::denied_status(&d), None).await);
        }
        // The SPIFFE IDs, for the policy (the CSR's signature is verified when it is issued). A few are read here: a
        // DER parse takes microseconds, less than a trip to the CPU pool and back; a larger batch goes to the pool.
        let ids: Vec<Result<SpiffeId, String>> = if reqs.len() <= INLINE_ID_READS {
            reqs.iter().map(|r| csr_spiffe_id(&r.csr)).collect()
        } else {
            let csrs: Vec<Vec<u8>> = reqs.iter().map(|r| r.csr.clone()).collect();
            let read = st
                .pipeline
                .cpu()
                .run(move || csrs.iter().map(|c| csr_spiffe_id(c)).collect())
                .await;
            match read {
                Ok(ids) => ids,
                // The CPU pool refuses the batch (Overloaded, ShuttingDown): refused as a whole, and audited.
                Err(e) => {
                    return Err(st.refuse(&caller, super::pipeline_status(&e), None).await);
                }
            }
        };
        let deadline = caller.deadline;
        let signers = st.signers();
        let mut pending = Vec::with_capacity(reqs.len());
        let mut admitted = Vec::with_capacity(reqs.len());
        for (req, id) in reqs.into_iter().zip(ids) {
            let checked = (|| {
                let id = id.map_err(|m| (None, Status::invalid_argument(m)))?;
                let id = issuable(&st.trust_domain, &id, "CSR URI SAN")
                    .map_err(|s| (Some(id.as_str().to_string()), s))
                    .map(|()| id.as_str().to_string())?;
                let ttl = ttl_of(req.ttl_seconds).map_err(|s| (Some(id.clone()), s))?;
                match grant.check_id(&id) {
                    Ok(()) => Ok((id, grant.x509_ttl(ttl))),
                    Err(d) => Err((Some(id), super::denied_status(&d))),
                }
            })();
            match checked {
                Ok((id, ttl)) => {
                    admitted.push((req.csr, ttl));
                    pending.push(Ok(id));
                }
                Err(e) => pending.push(Err(e)),
            }
        }
        // Queued now (all of the batch runs in parallel on the CPU pool); dropped if the caller goes.
        let mut issued = signers
            .x509
            .issue_x509_svids(admitted, deadline)
            .await
            .into_iter();
        let mut results = Vec::with_capacity(pending.len());
        let mut records = Vec::with_capacity(pending.len());
        for p in pending {
            match p {
                Err((id, status)) => {
                    records.push(refused(&caller, id, &status));
                    results.push(failure(status.code(), status.message().to_string()));
                }
                Ok(id) => {
                    let issued = issued
                        .next()
                        .unwrap_or(Err(SvidError::Pipeline(PipelineError::ShuttingDown)))
                        .map_err(|e| svid_status(&e));
                    match issued {
                        Ok(svid) => {
                            let (serial, authority) = cert_facts(&svid.cert_der);
                            let mut r = caller.record(Outcome::Issued);
                            r.spiffe_id = Some(id.clone());
                            r.serial = Some(serial.clone());
                            r.authority = authority;
                            r.expires_at = Some(svid.not_after.unix_timestamp());
                            records.push(r);
                            let mut cert_chain = vec![svid.cert_der];
                            cert_chain.extend(svid.chain);
                            results.push(pb::X509svidResult {
                                result: Some(pb::x509svid_result::Result::Svid(pb::X509svid {
                                    spiffe_id: id,
                                    cert_chain,
                                    expires_at: svid.not_after.unix_timestamp(),
                                    serial,
                                })),
                            });
                        }
                        Err(status) => {
                            let mut r = refused(&caller, Some(id), &status);
                            if !matches!(status.code(), Code::InvalidArgument) {
                                r.outcome = Outcome::Failed;
                            }
                            records.push(r);
                            results.push(failure(status.code(), status.message().to_string()));
                        }
                    }
                }
            }
        }
        st.audit(&records).await?;
        Ok(Response::new(pb::BatchMintX509svidResponse { results }))
    }

    async fn mint_jwtsvid(
        &self,
        request: Request<pb::MintJwtsvidRequest>,
    ) -> Result<Response<pb::MintJwtsvidResponse>, Status> {
        let st = &self.state;
        let caller = st.admit(&request, Service::Issuer, "MintJWTSVID").await?;
        let req = request.into_inner();
        let subject = || Some(Subject::SpiffeId(req.spiffe_id.clone()));
        let id = match SpiffeId::parse(&req.spiffe_id) {
            Ok(id) => id,
            Err(e) => {
                let s = Status::invalid_argument(format!("spiffe_id: {e}"));
                return Err(st.refuse(&caller, s, subject()).await);
            }
        };
        if let Err(s) = issuable(&st.trust_domain, &id, "spiffe_id") {
            return Err(st.refuse(&caller, s, subject()).await);
        }
        if let Err(e) = crate::jwt::check_audience(&req.audience) {
            let s = Status::invalid_argument(e.to_string());
            return Err(st.refuse(&caller, s, subject()).await);
        }
        let grant = match st.grant(&caller) {
            Ok(g) => g,
            Err(s) => return Err(st.refuse(&caller, s, subject()).await),
        };
        let ttl = match ttl_of(req.ttl_seconds) {
            Ok(t) => t,
            Err(s) => return Err(st.refuse(&caller, s, subject()).await),
        };
        let jwt = st.signers().jwt.clone();
        // The TTL rule: 0 is the default, cut at the policy's jwt_max_ttl and at the JWT authority's max_ttl.
        let ttl = match grant
            .check_id(id.as_str())
            .map(|()| grant.jwt_ttl(ttl).min(jwt.max_ttl()))
            .and_then(|ttl| grant.take(1).map(|()| ttl))
        {
            Ok(t) => t,
            Err(d) => {
                return Err(st
                    .refuse(&caller, super::denied_status(&d), subject())
                    .await);
            }
        };
        let kid = jwt.kid().to_string();
        let deadline = caller.deadline;
        let audience = req.audience.clone();
        let now = time::OffsetDateTime::now_utc();
        let issued = st
            .pipeline
            .cpu()
            .run(move || with_deadline(deadline, || jwt.issue(&id, &audience, ttl, now)))
            .await;
        let token = match issued {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let s = jwt_status(&e);
                let mut r = refused(&caller, Some(req.spiffe_id.clone()), &s);
                if !matches!(s.code(), Code::InvalidArgument) {
                    r.outcome = Outcome::Failed;
                }
                st.audit(&[r]).await?;
                return Err(s);
            }
            Err(e) => {
                return Err(st
                    .refuse(&caller, super::pipeline_status(&e), subject())
                    .await);
            }
        };
        let expires_at = now.unix_timestamp() + i64::try_from(ttl.as_secs()).unwrap_or(0);
        let mut r = caller.record(Outcome::Issued);
        r.spiffe_id = Some(req.spiffe_id.clone());
        r.authority = Some(kid);
        r.expires_at = Some(expires_at);
        st.audit(&[r]).await?;
        Ok(Response::new(pb::MintJwtsvidResponse { token, expires_at }))
    }

    async fn renew_x509svid(
        &self,
        request: Request<pb::RenewX509svidRequest>,
    ) -> Result<Response<pb::RenewX509svidResponse>, Status> {
        super::join::renew_x509_svid(&self.state, request).await
    }

    async fn get_bundle(
        &self,
        request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        let st = &self.state;
        let caller = st.admit(&request, Service::Issuer, "GetBundle").await?;
        let b = st.bundle.current();
        let doc = match b.document().and_then(|mut d| {
            d.refresh_hint_secs = Some(st.bundle.refresh_hint_secs());
            d.to_json()
        }) {
            Ok(d) => d,
            Err(e) => {
                let s = Status::internal(format!("cannot render the bundle: {e}"));
                return Err(st.refuse(&caller, s, None).await);
            }
        };
        Ok(Response::new(pb::GetBundleResponse {
            spiffe_bundle: doc.into_bytes(),
            x509_authorities: b.x509_roots.clone(),
            sequence: b.sequence,
        }))
    }
}

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: Arc<AppState>,
}

impl AdminService {
    /// The service over `state`.
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let st = &self.state;
        st.admit(&request, Service::Admin, "GetStatus").await?;
        let token_names: Vec<String> = st
            .pipeline
            .token_status()
            .into_iter()
            .map(|t| t.name)
            .collect();
        let first_token = token_names.first().cloned().unwrap_or_default();
        let signers = st.signers();
        let mut authorities = Vec::new();
        match &st.authorities {
            Some(a) => {
                for r in a.list().await {
                    if r.destroyed_at.is_some() || r.state == crate::ca::AuthorityState::Retired {
                        continue;
                    }
                    authorities.push(pb::AuthorityStatus {
                        kind: r.kind.name().into(),
                        state: r.state.name().into(),
                        id: authority_id(&r),
                        not_after: r.not_after.unwrap_or(0),
                        tainted: r.tainted,
                        token: r.token.clone(),
                    });
                }
            }
            None => {
                authorities.push(pb::AuthorityStatus {
                    kind: "x509".into(),
                    state: "active".into(),
                    id: cert_ski(signers.root.cert_der()).unwrap_or_default(),
                    not_after: signers.root.not_after().unix_timestamp(),
                    tainted: false,
                    token: first_token.clone(),
                });
                authorities.push(pb::AuthorityStatus {
                    kind: "jwt".into(),
                    state: "active".into(),
                    id: signers.jwt.kid().to_string(),
                    not_after: 0,
                    tainted: false,
                    token: first_token,
                });
            }
        }
        if let Some(inter) = signers.x509.current_intermediate() {
            let not_after = x509_parser::parse_x509_certificate(&inter)
                .map(|(_, c)| c.validity().not_after.timestamp())
                .unwrap_or_default();
            authorities.push(pb::AuthorityStatus {
                kind: "x509-issuing".into(),
                state: "active".into(),
                id: cert_ski(&inter).unwrap_or_default(),
                not_after,
                tainted: false,
                token: "memory".into(),
            });
        }
        let tokens = st
            .pipeline
            .token_status()
            .into_iter()
            .map(|t| pb::TokenStatus {
                sessions: st.token_sessions(&t.name),
                name: t.name,
                healthy: t.healthy,
                last_error: match (&t.reason, t.failures) {
                    (Some(why), _) => format!("out of rotation: {why}"),
                    (None, 0) => String::new(),
                    (None, n) => format!("{n} transient failures so far"),
                },
            })
            .collect();
        Ok(Response::new(pb::GetStatusResponse {
            trust_domain: st.trust_domain.to_string(),
            authorities,
            tokens,
            bundle_sequence: st.bundle.current().sequence,
            process_cpu_seconds: process_cpu_seconds().unwrap_or(0.0),
            peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
            replica_id: st.replication.id.clone(),
            rotation_leader: st.replication.is_leader(),
            replicas: st
                .replication
                .live()
                .into_iter()
                .map(|r| pb::ReplicaStatus {
                    id: r.id,
                    address: r.address,
                    started_at: r.started_at,
                    seen_at: r.seen_at,
                })
                .collect(),
            datastore: st.replication.engine.to_string(),
        }))
    }

    async fn get_rotation(
        &self,
        request: Request<pb::GetRotationRequest>,
    ) -> Result<Response<pb::GetRotationResponse>, Status> {
        self.rotation(request).await
    }

    async fn rotate(
        &self,
        request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        self.rotate_step(request).await
    }

    async fn list_federated_bundles(
        &self,
        request: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        self.federated_bundles(request).await
    }

    async fn install_authority(
        &self,
        request: Request<pb::InstallAuthorityRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        self.install_step(request).await
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        super::join::create_join_token(&self.state, request).await
    }
}

fn authority_id(r: &crate::ca::AuthorityRecord) -> String {
    match (&r.kid, &r.certificate) {
        (Some(kid), _) => kid.clone(),
        (None, Some(cert)) => cert_ski(cert).unwrap_or_default(),
        (None, None) => String::new(),
    }
}

async fn rotation_view(
    st: &AppState,
    a: &crate::ca::Authorities,
) -> Result<pb::GetRotationResponse, Status> {
    let (orphaned_keys, lost_keys) = a.orphans().await.map_err(|e| rotation_status(&e))?;
    let awaited = a.awaited_certificate().await;
    let authorities = a
        .list()
        .await
        .into_iter()
        .map(|r| {
            let awaiting = awaited.as_ref().filter(|(l, _)| *l == r.label);
            pb::RotationAuthority {
                awaiting_certificate: awaiting.is_some(),
                certificate_awaited_by: awaiting
                    .and_then(|(_, by)| *by)
                    .map_or(0, |t| t.unix_timestamp()),
                kind: r.kind.name().into(),
                id: authority_id(&r),
                label: r.label,
                generation: r.generation,
                state: r.state.name().into(),
                token: r.token,
                not_after: r.not_after.unwrap_or(0),
                published_at: r.published_at.unwrap_or(0),
                activated_at: r.activated_at.unwrap_or(0),
                issued_until: r.issued_until.unwrap_or(0),
                retired_at: r.retired_at.unwrap_or(0),
                tainted: r.tainted,
                destroyed: r.destroyed_at.is_some(),
            }
        })
        .collect();
    Ok(pb::GetRotationResponse {
        authorities,
        bundle_sequence: st.bundle.current().sequence,
        publish_lead_seconds: i64::try_from(a.policy().publish_lead.as_secs()).unwrap_or(i64::MAX),
        orphaned_keys,
        lost_keys,
    })
}

/// The gRPC status of a refused or failed rotation step.
pub fn rotation_status(e: &crate::ca::RotationError) -> Status {
    use crate::ca::RotationError as E;
    match e {
        E::Precondition(_) | E::TooEarly { .. } => Status::failed_precondition(e.to_string()),
        E::NotFound(_) => Status::not_found(e.to_string()),
        E::Refused(_) => Status::invalid_argument(e.to_string()),
        E::Token(_) => Status::unavailable(format!("{e}; nothing was changed")),
        E::Store(_) | E::NotRecorded(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// Writes a Rotate call's audit line just before its step commits ([`crate::ca::StepWitness`]).
struct AuditWitness<'a> {
    st: &'a AppState,
    caller: &'a Caller,
    step: String,
    recorded: std::sync::atomic::AtomicBool,
}

impl crate::ca::StepWitness for AuditWitness<'_> {
    async fn before_commit(&self, _step: &'static str, label: &str) -> Result<(), String> {
        let mut r = self.caller.record(Outcome::Rotated);
        r.key_id = Some(label.to_string());
        r.reason = Some(self.step.clone());
        self.st
            .audit(&[r])
            .await
            .map_err(|s| s.message().to_string())?;
        self.recorded
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

fn rotation_of(st: &AppState) -> Result<std::sync::Arc<crate::ca::Authorities>, Status> {
    st.authorities.clone().ok_or_else(|| {
        Status::unimplemented("this appliance runs without a datastore: no rotation")
    })
}

impl AdminService {
    async fn rotation(
        &self,
        request: Request<pb::GetRotationRequest>,
    ) -> Result<Response<pb::GetRotationResponse>, Status> {
        let st = &self.state;
        let caller = st.admit(&request, Service::Admin, "GetRotation").await?;
        let a = match rotation_of(st) {
            Ok(a) => a,
            Err(s) => return Err(st.refuse(&caller, s, None).await),
        };
        Ok(Response::new(rotation_view(st, &a).await?))
    }

    async fn rotate_step(
        &self,
        request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        let caller = self.state.admit(&request, Service::Admin, "Rotate").await?;
        self.rotate_as(caller, request.into_inner(), None).await
    }

    async fn install_step(
        &self,
        request: Request<pb::InstallAuthorityRequest>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        let caller = self
            .state
            .admit(&request, Service::Admin, "InstallAuthority")
            .await?;
        let r = request.into_inner();
        let step = pb::RotateRequest {
            step: "install".into(),
            kind: "x509".into(),
            label: String::new(),
        };
        self.rotate_as(caller, step, Some((r.certificate_pem, r.chain_pem)))
            .await
    }

    /// A rotation step for `caller`; `install` carries the certificate and chain PEM of an install.
    async fn rotate_as(
        &self,
        caller: Caller,
        req: pb::RotateRequest,
        install: Option<(String, String)>,
    ) -> Result<Response<pb::RotateResponse>, Status> {
        use crate::ca::AuthorityKind;
        let st = &self.state;
        let a = match rotation_of(st) {
            Ok(a) => a,
            Err(s) => return Err(st.refuse(&caller, s, None).await),
        };
        let kind = match req.kind.as_str() {
            "" | "x509" => AuthorityKind::X509,
            "jwt" => AuthorityKind::Jwt,
            other => {
                let s = Status::invalid_argument(format!("kind {other:?}: use x509 or jwt"));
                return Err(st.refuse(&caller, s, None).await);
            }
        };
        let need_label = || {
            if req.label.is_empty() {
                Err(Status::invalid_argument(format!(
                    "{} needs the authority's label (see GetRotation)",
                    req.step
                )))
            } else {
                Ok(req.label.clone())
            }
        };
        // The step's audit line is written just before it commits; if it cannot be, the step does not happen.
        let w = AuditWitness {
            st,
            caller: &caller,
            step: req.step.clone(),
            recorded: std::sync::atomic::AtomicBool::new(false),
        };
        let mut csr_pem = String::new();
        let done = match req.step.as_str() {
            "prepare" => {
                let done = a.prepare_with(kind, &w).await;
                // Below an offline root the new X.509 authority's CSR goes back to the caller for the ceremony.
                if done.is_ok() && kind == AuthorityKind::X509 && a.policy().external.is_some() {
                    match a.certificate_request().await {
                        Ok((_, pem)) => csr_pem = pem,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot make the prepared authority's CSR")
                        }
                    }
                }
                done
            }
            "csr" => match a.certificate_request().await {
                Ok((label, pem)) => {
                    csr_pem = pem;
                    Ok(label)
                }
                Err(e) => Err(e),
            },
            "install" => {
                let (cert_pem, chain_pem) = install.clone().unwrap_or_default();
                let parsed = crate::ca::external::pem_certificates(cert_pem.as_bytes(), "certificate_pem")
                    .and_then(|c| match <[Vec<u8>; 1]>::try_from(c) {
                        Ok([one]) => Ok(one),
                        Err(c) => Err(format!(
                            "certificate_pem holds {} certificates: give signet's certificate alone, and the CA \
                             certificates above it in chain_pem",
                            c.len()
                        )),
                    })
                    .and_then(|cert| {
                        crate::ca::external::pem_certificates(chain_pem.as_bytes(), "chain_pem")
                            .map(|chain| (cert, chain))
                    });
                match parsed {
                    Ok((cert, chain)) => a.install_with(cert, chain, &w).await,
                    Err(m) => {
                        return Err(st.refuse(&caller, Status::invalid_argument(m), None).await);
                    }
                }
            }
            "publish" => a.publish_with(kind, &w).await,
            "activate" => a.activate_with(kind, &w).await,
            "retire" => a.retire_with(kind, &w).await,
            "taint" => match need_label() {
                Ok(l) => a.taint_with(&l, &w).await.map(|()| l),
                Err(s) => return Err(st.refuse(&caller, s, None).await),
            },
            "destroy" => match need_label() {
                Ok(l) => a.destroy_with(&l, &w).await.map(|()| l),
                Err(s) => return Err(st.refuse(&caller, s, None).await),
            },
            other => {
                let s = Status::invalid_argument(format!(
                    "step {other:?}: use prepare, publish, activate, retire, taint, destroy or csr"
                ));
                return Err(st.refuse(&caller, s, None).await);
            }
        };
        let recorded = w.recorded.load(std::sync::atomic::Ordering::SeqCst);
        let label = match done {
            Ok(l) => l,
            // The step was recorded as about to commit and then failed: the failure follows its line.
            Err(e) if recorded => {
                let s = rotation_status(&e);
                let mut r = caller.record(Outcome::Failed);
                r.key_id = (!req.label.is_empty()).then(|| req.label.clone());
                r.code = Some(code_name(s.code()));
                r.reason = Some(format!("{}: {}", req.step, s.message()));
                st.audit(&[r]).await?;
                return Err(s);
            }
            Err(e) => return Err(st.refuse(&caller, rotation_status(&e), None).await),
        };
        if !recorded {
            // Nothing was committed (tainting a tainted authority, destroying a destroyed key): recorded now.
            let mut r = caller.record(Outcome::Rotated);
            r.key_id = Some(label.clone());
            r.reason = Some(if req.step == "csr" {
                "csr".to_string()
            } else {
                format!("{} (already done)", req.step)
            });
            st.audit(&[r]).await?;
        }
        Ok(Response::new(pb::RotateResponse {
            label,
            rotation: Some(rotation_view(st, &a).await?),
            csr_pem,
        }))
    }

    async fn federated_bundles(
        &self,
        request: Request<pb::ListFederatedBundlesRequest>,
    ) -> Result<Response<pb::ListFederatedBundlesResponse>, Status> {
        let st = &self.state;
        let caller = st
            .admit(&request, Service::Admin, "ListFederatedBundles")
            .await?;
        let wanted = request.get_ref().trust_domain.trim();
        let entries = if wanted.is_empty() {
            st.federated.all()
        } else {
            let found = TrustDomain::parse(wanted)
                .map_err(|e| Status::invalid_argument(format!("trust_domain {wanted:?}: {e}")))
                .and_then(|td| {
                    st.federated.get(&td).ok_or_else(|| {
                        Status::not_found(format!(
                            "{td} is not a federated trust domain (see [[federation.trust_domains]])"
                        ))
                    })
                });
            match found {
                Ok(e) => vec![e],
                Err(s) => return Err(st.refuse(&caller, s, None).await),
            }
        };
        let mut bundles = Vec::with_capacity(entries.len());
        for e in entries {
            let (spiffe_bundle, sequence, source, stored_at) = match &e.bundle {
                Some(b) => (
                    b.document
                        .to_json()
                        .map_err(|err| Status::internal(err.to_string()))?
                        .into_bytes(),
                    b.document.sequence,
                    b.source.to_string(),
                    b.stored_at,
                ),
                None => (Vec::new(), 0, String::new(), 0),
            };
            let (last_error_reason, last_error, last_error_at) = match &e.last_failure {
                Some(f) => (f.reason.to_string(), f.message.clone(), f.at),
                None => (String::new(), String::new(), 0),
            };
            bundles.push(pb::FederatedBundle {
                trust_domain: e.trust_domain.to_string(),
                endpoint: e.endpoint,
                spiffe_bundle,
                sequence,
                source,
                stored_at,
                last_error_reason,
                last_error,
                last_error_at,
                fetches: e.fetches,
                failures: e.failures,
            });
        }
        Ok(Response::new(pb::ListFederatedBundlesResponse { bundles }))
    }
}

/// CPU seconds (user + system) of this process, from /proc/self/stat (Linux; clock ticks of 1/100 s, the kernel's
/// fixed USER_HZ).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Peak resident set size of this process (VmHWM in /proc/self/status), bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Batches up to this many CSRs have their SPIFFE IDs read on the request's own thread.
const INLINE_ID_READS: usize = 4;

/// The SPIFFE ID a CSR asks for (its signature is not checked here).
pub(super) fn csr_spiffe_id(csr: &[u8]) -> Result<SpiffeId, String> {
    let csr = crate::x509::parse_csr_unverified(csr).map_err(|e| e.to_string())?;
    csr.spiffe_id()
        .cloned()
        .ok_or_else(|| "the CSR has no URI SAN: an X509-SVID needs exactly one SPIFFE ID".into())
}

/// An SVID can be issued for `id` only if it is a workload ID (with a path) of this trust domain: whoever asks, so
/// this is checked before the policy and answered INVALID_ARGUMENT, not PERMISSION_DENIED. `what` names the field.
pub(super) fn issuable(td: &TrustDomain, id: &SpiffeId, what: &str) -> Result<(), Status> {
    id.require_trust_domain(td)
        .and_then(|()| id.require_workload())
        .map_err(|e| Status::invalid_argument(format!("{what} {id}: {e}", id = id.as_str())))
}
