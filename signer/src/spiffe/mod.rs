//! SPIFFE identities and trust: the SPIFFE ID and trust-domain types ([`id`]) and the SPIFFE bundle document
//! ([`bundle`]).

pub mod bundle;
pub mod id;

pub use bundle::{BundleDocument, BundleError, EntryError, JwtAuthority, X509Authority};
pub use id::{SpiffeId, SpiffeIdError, TrustDomain};
