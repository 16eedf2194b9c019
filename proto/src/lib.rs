//! gRPC definitions for signet, generated at build time from the `.proto` files under `proto/`:
//!
//! - SPIRE's plug-in API, wire-compatible with the SPIRE plug-in SDK (same packages, message names and field
//!   numbers): [`spire::plugin::server::upstreamauthority::v1`], [`spire::plugin::server::keymanager::v1`],
//!   the shared [`spire::plugin::types`], and the [`spire::service`] plumbing every plug-in serves (`Init`,
//!   `Config`);
//! - HashiCorp go-plugin's broker, controller and stdio services ([`plugin`]), which SPIRE uses to load external
//!   plug-ins;
//! - SPIRE's server API ([`spire::api`]: Agent, SVID, Entry, Bundle; clients only), vendored from spire-api-sdk,
//!   which `signet bench --target spire` drives as SPIRE's agents do;
//! - signet's own API, [`signet::v1`]: `Issuer` (batch X509-SVIDs, JWT-SVIDs, the bundle) and `Admin`.
//!
//! [`connect`] builds the clients' channels to the appliance (checked by its SPIFFE ID).
//!
//! [`FILE_DESCRIPTOR_SET`] holds the encoded descriptors of all of them, for gRPC server reflection.
#![forbid(unsafe_code)]
// Generated code: its shape is prost's and tonic's, not ours.
#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

/// The X.509 part of the SPIFFE Workload API (no package: `/SpiffeWorkloadAPI/...`), for tests that stand in
/// for a SPIRE agent. signet does not serve it.
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

/// Client connections to the appliance (rustls, the appliance checked by its SPIFFE ID).
#[warn(clippy::all)]
pub mod connect;

/// The encoded `FileDescriptorSet` of every service and message in this crate.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/signet_descriptor.bin"));

/// SPIRE's plug-in API, and the part of SPIRE's server API that `signet bench --target spire` drives (clients only).
pub mod spire {
    /// SPIRE's server API (spiffe/spire-api-sdk at the version SPIRE v1.15.3 requires).
    pub mod api {
        /// Services of the SPIRE server.
        pub mod server {
            /// Agents: node attestation, join tokens.
            pub mod agent {
                /// Version 1.
                pub mod v1 {
                    tonic::include_proto!("spire.api.server.agent.v1");
                }
            }
            /// SVIDs for agents and workloads.
            pub mod svid {
                /// Version 1.
                pub mod v1 {
                    tonic::include_proto!("spire.api.server.svid.v1");
                }
            }
            /// Registration entries.
            pub mod entry {
                /// Version 1.
                pub mod v1 {
                    tonic::include_proto!("spire.api.server.entry.v1");
                }
            }
            /// The trust bundle.
            pub mod bundle {
                /// Version 1.
                pub mod v1 {
                    tonic::include_proto!("spire.api.server.bundle.v1");
                }
            }
        }
        /// Types shared by the server API.
        pub mod types {
            tonic::include_proto!("spire.api.types");
        }
    }
    /// Plug-in services.
    pub mod plugin {
        /// Server-side plug-in types.
        pub mod server {
            /// The UpstreamAuthority plug-in type.
            pub mod upstreamauthority {
                /// Version 1.
                pub mod v1 {
                    tonic::include_proto!("spire.plugin.server.upstreamauthority.v1");
                }
            }
            /// The KeyManager plug-in type.
            pub mod keymanager {
                /// Version 1.
                pub mod v1 {
                    tonic::include_proto!("spire.plugin.server.keymanager.v1");
                }
            }
        }
        /// Types shared by the plug-in services.
        pub mod types {
            tonic::include_proto!("spire.plugin.types");
        }
    }
    /// Services every plug-in serves.
    pub mod service {
        /// Services common to all plug-ins.
        pub mod common {
            /// Plug-in configuration.
            pub mod config {
                /// Version 1.
                pub mod v1 {
                    tonic::include_proto!("spire.service.common.config.v1");
                }
            }
        }
        /// Services private to SPIRE's plug-in loader.
        pub mod private {
            /// The initialisation handshake.
            pub mod init {
                /// Version 1.
                pub mod v1 {
                    tonic::include_proto!("spire.service.private.init.v1");
                }
            }
        }
    }
}

/// go-plugin's plumbing: broker, controller, stdio.
pub mod plugin {
    tonic::include_proto!("plugin");
}

/// signet's own API.
pub mod signet {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("signet.v1");
    }
}
