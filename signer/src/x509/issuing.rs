//! What tells signet's own issuing intermediates from every other CA below its roots.
//!
//! signet's trust boundary (see `api::tls`) accepts a caller only when its leaf was signed by one of signet's own
//! issuing keys: a root of the bundle, or the short-lived issuing intermediate of delegated mode. The CA that
//! `MintX509CA` signs for a SPIRE server is also directly below a root, and it may sign any SPIFFE ID of the trust
//! domain; what it signs must never act on signet. The two differ by one thing signet alone decides: delegated mode's
//! intermediates carry a certificate policy ([`ISSUING_POLICY`]) in a non-critical certificatePolicies extension,
//! and the pre-issuance lint refuses that extension on every other certificate signet signs (a SPIRE CA's CSR cannot
//! ask for it: CSR extensions are never copied). A certificate directly below a root that carries the policy was
//! therefore made by signet as an issuing intermediate. Replicas recognise each other's intermediates by it, with no
//! shared registry.
//!
//! The OID is a UUID-derived one (ITU-T X.667, arc `2.25`), which needs no registration.

use der::Encode as _;
use der::asn1::AnyRef;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;

pub use crate::lint::x509::ISSUING_POLICY;
use crate::lint::x509::{ISSUING_POLICY_OID, is_issuing_policy};

/// id-ce-certificatePolicies, as rcgen takes OIDs.
const CERTIFICATE_POLICIES: &[u64] = &[2, 5, 29, 32];

/// The DER of `certificatePolicies` holding [`ISSUING_POLICY`] alone (a SEQUENCE OF PolicyInformation, each a
/// SEQUENCE of its policyIdentifier).
fn policies_der() -> Result<Vec<u8>, der::Error> {
    let oid = AnyRef::new(der::Tag::ObjectIdentifier, &ISSUING_POLICY_OID)?;
    vec![vec![oid]].to_der()
}

/// The issuing policy could not be DER-encoded.
#[derive(Debug, thiserror::Error)]
#[error("encoding the issuing policy: {0}")]
pub struct PolicyEncodingError(#[source] der::Error);

/// The extension an issuing intermediate carries (non-critical).
pub(crate) fn issuing_extension() -> Result<rcgen::CustomExtension, PolicyEncodingError> {
    let der = policies_der().map_err(PolicyEncodingError)?;
    Ok(rcgen::CustomExtension::from_oid_content(
        CERTIFICATE_POLICIES,
        der,
    ))
}

/// True when `cert` carries a certificatePolicies extension naming [`ISSUING_POLICY`].
pub fn carries_issuing_policy(cert: &X509Certificate<'_>) -> bool {
    cert.iter_extensions().any(|e| match e.parsed_extension() {
        ParsedExtension::CertificatePolicies(p) => p.iter().any(is_issuing_policy),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(ext: Option<rcgen::CustomExtension>) -> Vec<u8> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.custom_extensions.extend(ext);
        p.self_signed(&kp).unwrap().der().to_vec()
    }

    #[test]
    fn the_encoded_oid_is_the_documented_one() {
        let (first, rest) = ISSUING_POLICY_OID.split_first().unwrap();
        assert_eq!(*first, 2 * 40 + 25, "arcs 2.25");
        let mut arc: u128 = 0;
        for (i, b) in rest.iter().enumerate() {
            arc = (arc << 7) | u128::from(b & 0x7f);
            assert_eq!(b & 0x80 == 0, i == rest.len() - 1, "continuation bits");
        }
        assert_eq!(format!("2.25.{arc}"), ISSUING_POLICY);
    }

    #[test]
    fn the_policy_is_found_where_it_is_and_only_there() {
        let marked = cert_with(Some(issuing_extension().unwrap()));
        let (_, c) = x509_parser::parse_x509_certificate(&marked).unwrap();
        assert!(carries_issuing_policy(&c));
        let ext = c
            .iter_extensions()
            .find(|e| e.oid.to_id_string() == "2.5.29.32")
            .unwrap();
        assert!(!ext.critical, "the policy extension is not critical");

        let plain = cert_with(None);
        let (_, c) = x509_parser::parse_x509_certificate(&plain).unwrap();
        assert!(!carries_issuing_policy(&c));

        // Another policy OID is not the marker.
        let other = vec![vec![der::asn1::ObjectIdentifier::new("2.25.1").unwrap()]]
            .to_der()
            .unwrap();
        let foreign = cert_with(Some(rcgen::CustomExtension::from_oid_content(
            CERTIFICATE_POLICIES,
            other,
        )));
        let (_, c) = x509_parser::parse_x509_certificate(&foreign).unwrap();
        assert!(!carries_issuing_policy(&c));
    }
}
