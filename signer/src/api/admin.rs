//! `signet.v1.Admin`: status, rotation steps, join tokens, federated bundles, process figures. Every call needs the
//! `admin` grant ([`crate::policy::Service::Admin`]); each step is audited before it takes effect.

use std::sync::Arc;

use signet_proto::signet::v1 as pb;
use tonic::{Request, Response, Status};

use super::{AppState, Caller, code_name, rotation_status};
use crate::audit::Outcome;
use crate::policy::Service;
use crate::spiffe::TrustDomain;
use crate::x509::cert_ski;

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
        let signers = st.signers();
        let mut authorities = Vec::new();
        for r in st.authorities.list().await {
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

/// Writes a Rotate call's audit line just before its step commits ([`crate::ca::StepWitness`]).
struct AuditWitness<'a> {
    st: &'a AppState,
    caller: &'a Caller,
    step: String,
    recorded: std::sync::atomic::AtomicBool,
}

impl crate::ca::StepWitness for AuditWitness<'_> {
    async fn before_commit(
        &self,
        _step: &'static str,
        label: &str,
    ) -> Result<(), crate::audit::AuditError> {
        let mut r = self.caller.record(Outcome::Rotated);
        r.key_id = Some(label.to_string());
        r.reason = Some(self.step.clone());
        let records = [r];
        super::count(&records);
        self.st.audit.record(&records).await?;
        self.recorded
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl AdminService {
    async fn rotation(
        &self,
        request: Request<pb::GetRotationRequest>,
    ) -> Result<Response<pb::GetRotationResponse>, Status> {
        let st = &self.state;
        st.admit(&request, Service::Admin, "GetRotation").await?;
        Ok(Response::new(rotation_view(st, &st.authorities).await?))
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
        let a = &st.authorities;
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
                // Every failure here is the request's (INVALID_ARGUMENT), said in its message.
                let parsed = crate::ca::external::pem_certificates(cert_pem.as_bytes(), "certificate_pem")
                    .map_err(|e| e.to_string())
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
                            .map_err(|e| e.to_string())
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
            rotation: Some(rotation_view(st, a).await?),
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
