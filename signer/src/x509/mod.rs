//! X.509 issuance: CSR checks ([`csr`]), certificate templates and signing ([`issue`]), and the pre-issuance lint
//! ([`lint`]) that every to-be-signed certificate passes before an authority key signs it.

pub mod csr;
pub mod inspect;
pub mod issue;
pub mod issuing;
pub mod names;

pub use crate::lint::x509::{LintContext, Profile, lint_tbs};
pub use csr::{CsrError, RequestedCa, VerifiedCsr, parse_and_verify_csr, parse_csr_unverified};
pub use inspect::{cert_facts, cert_ski, root_id};
pub use issue::{
    Authority, IntermediateRequest, IssueError, IssuedCertificate, LeafRequest, MintedCa,
    RootRequest, UnsignedCertificate, certificate_request,
};

/// Why a certificate is not an X509-SVID with one SPIFFE ID.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidIdError {
    /// The DER is not a certificate.
    #[error("{what} does not parse: {source}")]
    Parse {
        /// Which certificate ("the client certificate").
        what: &'static str,
        /// The parser's error.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// Zero or several URI SANs.
    #[error("{what} has {count} URI SANs: an X509-SVID has exactly one SPIFFE ID")]
    UriSans {
        /// Which certificate.
        what: &'static str,
        /// How many URI SANs it has.
        count: usize,
    },
    /// The one URI SAN is not a SPIFFE ID.
    #[error("{what}'s URI SAN is not a SPIFFE ID: {source}")]
    NotSpiffeId {
        /// Which certificate.
        what: &'static str,
        /// The SPIFFE rule it breaks.
        #[source]
        source: crate::spiffe::SpiffeIdError,
    },
}

/// The SPIFFE ID of the X509-SVID `der`: exactly one URI SAN, a valid SPIFFE ID. `what` names the certificate in
/// the error ("the client certificate").
pub fn svid_spiffe_id(
    der: &[u8],
    what: &'static str,
) -> Result<crate::spiffe::SpiffeId, SvidIdError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|source| SvidIdError::Parse { what, source })?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n {
                uris.push(*u);
            }
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(SvidIdError::UriSans {
            what,
            count: uris.len(),
        });
    };
    crate::spiffe::SpiffeId::parse(uri).map_err(|source| SvidIdError::NotSpiffeId { what, source })
}
