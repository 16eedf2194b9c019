//! PKCS#10 certificate signing requests: parse (x509-parser), verify the self-signature (ring), and extract what
//! issuance may use: the subject public key (P-256, P-384, RSA 2048-8192, Ed25519 only), the subject, the URI SANs
//! (at most one, and it must be a valid SPIFFE ID), the DNS SANs, and the path length a CA request asks for in
//! BasicConstraints (which `MintX509CA` holds against the policy). Anything else is rejected with the reason.

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer as _;

use crate::keys::spki::{SubjectKey, SubjectKeyError};
use crate::lint::x509::valid_dns_name;
use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Largest CSR accepted, in bytes.
pub const MAX_CSR_LEN: usize = 64 * 1024;

/// Why a CSR was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Larger than [`MAX_CSR_LEN`].
    #[error("CSR is {0} bytes: at most 65536 are accepted")]
    TooLarge(usize),
    /// Not a DER PKCS#10 request.
    #[error("CSR is not a valid DER PKCS#10 request: {0}")]
    Malformed(String),
    /// Bytes after the request.
    #[error("CSR has trailing bytes after the request")]
    TrailingData,
    /// The self-signature does not verify (or uses an algorithm that cannot be verified).
    #[error(
        "CSR signature does not verify against its own public key: the request was altered or mis-signed"
    )]
    BadSignature,
    /// The subject key is not acceptable.
    #[error("CSR subject key: {0}")]
    SubjectKey(#[from] SubjectKeyError),
    /// More than one URI SAN.
    #[error("CSR requests {0} URI SANs: an X509-SVID carries exactly one")]
    MultipleUriSans(usize),
    /// A URI SAN of another scheme.
    #[error("CSR URI SAN {0:?} is not a SPIFFE ID")]
    NonSpiffeUri(String),
    /// A URI SAN that is not a valid SPIFFE ID.
    #[error("CSR URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(#[from] SpiffeIdError),
    /// A SAN type other than URI and DNS.
    #[error("CSR requests a {0} SAN: only one URI SAN (the SPIFFE ID) and DNS names are issued")]
    UnsupportedSan(&'static str),
    /// A DNS SAN that is not a plain DNS name.
    #[error("CSR DNS SAN {0:?} is not a valid DNS name")]
    BadDnsName(String),
    /// A subject that cannot be carried over exactly.
    #[error("CSR subject cannot be copied exactly: {0}")]
    Subject(String),
}

impl CsrError {
    /// A short stable name of the rule broken.
    pub fn rule(&self) -> &'static str {
        match self {
            CsrError::TooLarge(_) => "csr.too-large",
            CsrError::Malformed(_) => "csr.malformed",
            CsrError::TrailingData => "csr.trailing-data",
            CsrError::BadSignature => "csr.signature",
            CsrError::SubjectKey(_) => "csr.subject-key",
            CsrError::MultipleUriSans(_) => "csr.uri-san-count",
            CsrError::NonSpiffeUri(_) => "csr.uri-san-scheme",
            CsrError::InvalidSpiffeId(e) => e.rule(),
            CsrError::UnsupportedSan(_) => "csr.san-type",
            CsrError::BadDnsName(_) => "csr.dns-name",
            CsrError::Subject(_) => "csr.subject",
        }
    }
}

/// A CSR whose signature verified and whose contents are acceptable.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    subject_key: SubjectKey,
    subject: rcgen::DistinguishedName,
    subject_der: Vec<u8>,
    spiffe_id: Option<SpiffeId>,
    dns_names: Vec<String>,
    requested_ca: Option<RequestedCa>,
}

/// What a CSR asks of a CA through a requested BasicConstraints extension with cA=true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestedCa {
    /// No pathLenConstraint: any number of CAs below it.
    Unconstrained,
    /// At most this many CAs below it.
    PathLen(u32),
}

impl VerifiedCsr {
    /// The subject public key.
    pub fn subject_key(&self) -> &SubjectKey {
        &self.subject_key
    }
    /// The subject, ready to be copied into a certificate.
    pub fn subject(&self) -> &rcgen::DistinguishedName {
        &self.subject
    }
    /// The subject's DER as the CSR carries it.
    pub fn subject_der(&self) -> &[u8] {
        &self.subject_der
    }
    /// The requested SPIFFE ID (the single URI SAN), if any.
    pub fn spiffe_id(&self) -> Option<&SpiffeId> {
        self.spiffe_id.as_ref()
    }
    /// The requested DNS names.
    pub fn dns_names(&self) -> &[String] {
        &self.dns_names
    }
    /// The CA path the request asks for, when it requests BasicConstraints with cA=true (SPIRE's CSRs do not).
    pub fn requested_ca(&self) -> Option<RequestedCa> {
        self.requested_ca
    }
}

/// Parse a DER CSR and check everything but its signature.
pub fn parse_csr_unverified(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    parse(der, false)
}

/// Parse a DER CSR, verify its signature and check its contents.
pub fn parse_and_verify_csr(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    parse(der, true)
}

fn parse(der: &[u8], verify: bool) -> Result<VerifiedCsr, CsrError> {
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge(der.len()));
    }
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingData);
    }
    let info = &csr.certification_request_info;
    let subject_key = SubjectKey::from_spki_der(info.subject_pki.raw)?;
    if verify {
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    }

    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    let mut requested_ca = None;
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::BasicConstraints(bc) = ext {
                if bc.ca {
                    requested_ca = Some(match bc.path_len_constraint {
                        None => RequestedCa::Unconstrained,
                        Some(n) => RequestedCa::PathLen(n),
                    });
                }
                continue;
            }
            let ParsedExtension::SubjectAlternativeName(san) = ext else {
                continue;
            };
            for name in &san.general_names {
                match name {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => {
                        if !valid_dns_name(d) {
                            return Err(CsrError::BadDnsName(d.to_string()));
                        }
                        dns_names.push(d.to_string());
                    }
                    GeneralName::RFC822Name(_) => return Err(CsrError::UnsupportedSan("email")),
                    GeneralName::IPAddress(_) => {
                        return Err(CsrError::UnsupportedSan("IP address"));
                    }
                    GeneralName::OtherName(..) => {
                        return Err(CsrError::UnsupportedSan("otherName"));
                    }
                    GeneralName::DirectoryName(_) => {
                        return Err(CsrError::UnsupportedSan("directoryName"));
                    }
                    GeneralName::RegisteredID(_) => {
                        return Err(CsrError::UnsupportedSan("registeredID"));
                    }
                    _ => return Err(CsrError::UnsupportedSan("unknown")),
                }
            }
        }
    }
    if uris.len() > 1 {
        return Err(CsrError::MultipleUriSans(uris.len()));
    }
    let spiffe_id = match uris.pop() {
        None => None,
        Some(u) if !u.starts_with("spiffe:") => return Err(CsrError::NonSpiffeUri(u)),
        Some(u) => Some(SpiffeId::parse(&u)?),
    };
    let subject =
        super::names::to_rcgen(&info.subject).map_err(|e| CsrError::Subject(e.to_string()))?;
    Ok(VerifiedCsr {
        subject_key,
        subject,
        subject_der: info.subject.as_raw().to_vec(),
        spiffe_id,
        dns_names,
        requested_ca,
    })
}
