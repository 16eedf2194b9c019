//! gRPC definitions for signet: SPIRE's plug-in API (UpstreamAuthority v1, KeyManager v1, the shared
//! `spire.plugin.types`) and signet's own `signet.v1` API.
//!
//! Not yet populated: the generated code arrives together with the appliance's gRPC services.
#![forbid(unsafe_code)]
