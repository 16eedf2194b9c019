//! The plug-in services with `--embedded`: SPIRE's calls go straight to the appliance's services in this process
//! ([`crate::api::InProcess`]): no TLS, no TCP, no second gRPC server, no retry loop or stream relay (there is no
//! connection to lose). Admission, policy, limits and audit are the appliance's own: the request carries the data
//! directory's admin X509-SVID, checked against the live bundle like a client certificate, and SPIRE's metadata
//! (its `grpc-timeout`) is passed on unchanged.
//!
//! Until SPIRE has called `Configure`, every call is FAILED_PRECONDITION, as with a remote appliance.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use tonic::{Request, Response, Status};

use crate::api::InProcess;
use crate::api::keymanager::KeyManagerService;
use crate::api::upstream::UpstreamAuthorityService;

/// Whether SPIRE has configured the plug-in (set by `Configure`).
pub type Configured = Arc<AtomicBool>;

fn ready(configured: &Configured) -> Result<(), Status> {
    if configured.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(Status::failed_precondition(
            "the signet plug-in is not configured: SPIRE calls Configure first",
        ))
    }
}

/// SPIRE's KeyManager served by the appliance in this process.
#[derive(Debug, Clone)]
pub struct InProcessKeyManager {
    inner: KeyManagerService,
    caller: InProcess,
    configured: Configured,
}

impl InProcessKeyManager {
    /// Calls the appliance's KeyManager as `caller` once `configured` is set.
    pub fn new(caller: InProcess, configured: Configured) -> Self {
        Self {
            inner: KeyManagerService::new(caller.state().clone()),
            caller,
            configured,
        }
    }
}

#[tonic::async_trait]
impl km::key_manager_server::KeyManager for InProcessKeyManager {
    async fn generate_key(
        &self,
        request: Request<km::GenerateKeyRequest>,
    ) -> Result<Response<km::GenerateKeyResponse>, Status> {
        ready(&self.configured)?;
        self.inner.generate_key(self.caller.request(request)).await
    }

    async fn get_public_key(
        &self,
        request: Request<km::GetPublicKeyRequest>,
    ) -> Result<Response<km::GetPublicKeyResponse>, Status> {
        ready(&self.configured)?;
        self.inner
            .get_public_key(self.caller.request(request))
            .await
    }

    async fn get_public_keys(
        &self,
        request: Request<km::GetPublicKeysRequest>,
    ) -> Result<Response<km::GetPublicKeysResponse>, Status> {
        ready(&self.configured)?;
        self.inner
            .get_public_keys(self.caller.request(request))
            .await
    }

    async fn sign_data(
        &self,
        request: Request<km::SignDataRequest>,
    ) -> Result<Response<km::SignDataResponse>, Status> {
        ready(&self.configured)?;
        self.inner.sign_data(self.caller.request(request)).await
    }
}

/// SPIRE's UpstreamAuthority served by the appliance in this process.
#[derive(Debug, Clone)]
pub struct InProcessUpstreamAuthority {
    inner: UpstreamAuthorityService,
    caller: InProcess,
    configured: Configured,
}

impl InProcessUpstreamAuthority {
    /// Calls the appliance's UpstreamAuthority as `caller` once `configured` is set.
    pub fn new(caller: InProcess, configured: Configured) -> Self {
        Self {
            inner: UpstreamAuthorityService::new(caller.state().clone()),
            caller,
            configured,
        }
    }
}

#[tonic::async_trait]
impl ua::upstream_authority_server::UpstreamAuthority for InProcessUpstreamAuthority {
    type MintX509CAAndSubscribeStream =
        <UpstreamAuthorityService as ua::upstream_authority_server::UpstreamAuthority>::MintX509CAAndSubscribeStream;
    type PublishJWTKeyAndSubscribeStream =
        <UpstreamAuthorityService as ua::upstream_authority_server::UpstreamAuthority>::PublishJWTKeyAndSubscribeStream;
    type SubscribeToLocalBundleStream =
        <UpstreamAuthorityService as ua::upstream_authority_server::UpstreamAuthority>::SubscribeToLocalBundleStream;

    async fn mint_x509ca_and_subscribe(
        &self,
        request: Request<ua::MintX509caRequest>,
    ) -> Result<Response<Self::MintX509CAAndSubscribeStream>, Status> {
        ready(&self.configured)?;
        self.inner
            .mint_x509ca_and_subscribe(self.caller.request(request))
            .await
    }

    async fn publish_jwt_key_and_subscribe(
        &self,
        request: Request<ua::PublishJwtKeyRequest>,
    ) -> Result<Response<Self::PublishJWTKeyAndSubscribeStream>, Status> {
        ready(&self.configured)?;
        self.inner
            .publish_jwt_key_and_subscribe(self.caller.request(request))
            .await
    }

    async fn subscribe_to_local_bundle(
        &self,
        request: Request<ua::SubscribeToLocalBundleRequest>,
    ) -> Result<Response<Self::SubscribeToLocalBundleStream>, Status> {
        ready(&self.configured)?;
        self.inner
            .subscribe_to_local_bundle(self.caller.request(request))
            .await
    }
}
