//! signet's own API: `signet.v1.Issuer` (X509-SVIDs in batches, JWT-SVIDs, the bundle); `signet.v1.Admin` is in
//! [`super::admin`].
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

use super::{AppState, Caller, Subject, cert_facts, code_name, jwt_status, svid_status};
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
        let ids: Vec<Result<SpiffeId, CsrIdError>> = if reqs.len() <= INLINE_ID_READS {
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
                let id = id.map_err(|e| (None, super::status::csr_id_status(&e)))?;
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

/// Batches up to this many CSRs have their SPIFFE IDs read on the request's own thread.
const INLINE_ID_READS: usize = 4;

/// Why the SPIFFE ID a CSR asks for cannot be read.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CsrIdError {
    /// The CSR does not parse or breaks a rule.
    #[error(transparent)]
    Csr(#[from] crate::x509::CsrError),
    /// The CSR asks for no SPIFFE ID.
    #[error("the CSR has no URI SAN: an X509-SVID needs exactly one SPIFFE ID")]
    NoSpiffeId,
}

/// The SPIFFE ID a CSR asks for (its signature is not checked here).
pub(super) fn csr_spiffe_id(csr: &[u8]) -> Result<SpiffeId, CsrIdError> {
    let csr = crate::x509::parse_csr_unverified(csr)?;
    csr.spiffe_id().cloned().ok_or(CsrIdError::NoSpiffeId)
}

/// An SVID can be issued for `id` only if it is a workload ID (with a path) of this trust domain: whoever asks, so
/// this is checked before the policy and answered INVALID_ARGUMENT, not PERMISSION_DENIED. `what` names the field.
pub(super) fn issuable(td: &TrustDomain, id: &SpiffeId, what: &str) -> Result<(), Status> {
    id.require_trust_domain(td)
        .and_then(|()| id.require_workload())
        .map_err(|e| Status::invalid_argument(format!("{what} {id}: {e}", id = id.as_str())))
}
