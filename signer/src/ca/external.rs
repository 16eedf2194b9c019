//! An X.509 authority below an offline root (`[authority.x509] parent = "external"`).
//!
//! signet's X.509 authority is then an intermediate: its key is generated on the token as for a root, but instead of
//! a self-signed certificate `prepare` makes a certificate signing request ([`crate::x509::certificate_request`]),
//! the operator has the offline root sign it, and `install` takes the certificate back after [`check_installed`]
//! found it fit. Until then the authority is `prepared` without a certificate and cannot be published.
//!
//! What changes elsewhere:
//! - the bundle holds the upstream roots (from `authority.x509.upstream_roots`), not signet's intermediates; they
//!   stay the same across rotations of the intermediate, so publish, activate and retire change what signs but not
//!   the roots relying parties hold (no cross-certificates are needed: both generations chain to the same root);
//! - credentials are presented with the chain up to, not including, the root: the intermediate, then the chain
//!   installed with it;
//! - the trust boundary ([`crate::api::tls`]) counts leaves signed by signet's own intermediates (those in the
//!   bundle's life: published, active, superseded) as signet's, since the upstream root may also sign CAs that are
//!   not signet's.

use std::time::Duration;

use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

/// What an external parent's certificates are checked against.
#[derive(Debug, Clone)]
pub struct ExternalParent {
    /// The upstream roots (DER): the bundle's X.509 roots.
    pub roots: Vec<Vec<u8>>,
    /// Where they come from, for messages (the configured file).
    pub source: String,
    /// How many levels of CA signet issues below its intermediate (SPIRE servers' CAs, delegated mode's issuing
    /// intermediates): the intermediate's pathLenConstraint must leave room for them.
    pub path_len_room: u8,
    /// The least life an installed certificate must have left: long enough to be published, wait out the publish
    /// lead, and sign credentials of the longest life signet issues.
    pub least_life: Duration,
}

/// The certificates of `ders`, DER concatenated (as the datastore keeps a chain).
pub fn split_ders(mut ders: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !ders.is_empty() {
        match x509_parser::parse_x509_certificate(ders) {
            Ok((rest, _)) => {
                out.push(ders[..ders.len() - rest.len()].to_vec());
                ders = rest;
            }
            Err(_) => break,
        }
    }
    out
}

/// Why a PEM file of certificates (the upstream roots, a certificate or chain to install) is refused; `what` names
/// the file or field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertificatesError {
    /// The file cannot be read.
    #[error("cannot read {what}: {source}")]
    Read {
        /// The file.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not PEM.
    #[error("{what} is not PEM: {source}")]
    Pem {
        /// The file or field.
        what: String,
        /// The parser's error.
        #[source]
        source: pem::PemError,
    },
    /// A PEM block other than CERTIFICATE.
    #[error("{what} holds a {tag} block: only CERTIFICATE blocks are expected")]
    NotCertificate {
        /// The file or field.
        what: String,
        /// The block's label.
        tag: String,
    },
    /// A certificate does not parse.
    #[error("{what}: a certificate does not parse: {source}")]
    Parse {
        /// The file or field.
        what: String,
        /// The parser's error.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// No certificate at all.
    #[error("{what} holds no certificate")]
    Empty {
        /// The file.
        what: String,
    },
    /// An upstream root that is not a self-signed CA.
    #[error("{what}: {subject} is not a self-signed CA certificate")]
    NotRoot {
        /// The file.
        what: String,
        /// The certificate's subject.
        subject: String,
    },
}

/// Every certificate (DER) of the PEM text `pem`, in order; `what` names it in errors.
pub fn pem_certificates(pem: &[u8], what: &str) -> Result<Vec<Vec<u8>>, CertificatesError> {
    let blocks = pem::parse_many(pem).map_err(|source| CertificatesError::Pem {
        what: what.to_string(),
        source,
    })?;
    let mut out = Vec::with_capacity(blocks.len());
    for b in blocks {
        if b.tag() != "CERTIFICATE" {
            return Err(CertificatesError::NotCertificate {
                what: what.to_string(),
                tag: b.tag().to_string(),
            });
        }
        x509_parser::parse_x509_certificate(b.contents()).map_err(|source| {
            CertificatesError::Parse {
                what: what.to_string(),
                source,
            }
        })?;
        out.push(b.contents().to_vec());
    }
    Ok(out)
}

/// The upstream roots of the PEM file `path`: at least one, each a self-signed CA.
pub fn load_roots(path: &std::path::Path) -> Result<Vec<Vec<u8>>, CertificatesError> {
    let what = format!("authority.x509.upstream_roots ({})", path.display());
    let text = std::fs::read(path).map_err(|source| CertificatesError::Read {
        what: what.clone(),
        source,
    })?;
    let roots = pem_certificates(&text, &what)?;
    if roots.is_empty() {
        return Err(CertificatesError::Empty { what });
    }
    for r in &roots {
        let (_, c) =
            x509_parser::parse_x509_certificate(r).map_err(|source| CertificatesError::Parse {
                what: what.clone(),
                source,
            })?;
        let ca = matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !ca || c.subject().as_raw() != c.issuer().as_raw() {
            return Err(CertificatesError::NotRoot {
                what,
                subject: c.subject().to_string(),
            });
        }
    }
    Ok(roots)
}

fn signs(parent: &X509Certificate<'_>, child: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

fn path_len(c: &X509Certificate<'_>) -> Option<u32> {
    match c.basic_constraints() {
        Ok(Some(bc)) => bc.value.path_len_constraint,
        _ => None,
    }
}

/// Why a certificate from the offline ceremony is not installed: what is wrong with it and how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// The certificate does not parse.
    #[error("the certificate does not parse: {0}")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// Bytes follow the certificate.
    #[error("the certificate has trailing bytes")]
    TrailingBytes,
    /// The certificate is self-signed.
    #[error(
        "the certificate is self-signed: install the certificate the offline root signed for the CSR"
    )]
    SelfSigned,
    /// The certificate certifies another key than the authority's.
    #[error(
        "the certificate is for another key, not the key of {label} on the token: have the offline root sign \
         the CSR that `signet rotate prepare` wrote for {label}"
    )]
    OtherKey {
        /// The authority's label.
        label: String,
    },
    /// Not a CA.
    #[error(
        "the certificate is not a CA: it needs basicConstraints critical, CA:TRUE to sign what signet issues"
    )]
    NotCa,
    /// No keyCertSign.
    #[error(
        "the certificate's keyUsage lacks keyCertSign: a CA certificate needs keyUsage critical, keyCertSign, \
         cRLSign"
    )]
    NoKeyCertSign,
    /// No subjectKeyIdentifier.
    #[error(
        "the certificate has no subjectKeyIdentifier: sign it with subjectKeyIdentifier = hash"
    )]
    NoSubjectKeyId,
    /// Its pathLenConstraint leaves no room for what signet issues.
    #[error(
        "the certificate's pathLenConstraint is {found}: signet issues {room} level(s) of CA below its \
         intermediate (SPIRE servers' CAs, delegated mode's issuing intermediates), so it needs pathlen:{room} \
         or more, or none"
    )]
    PathLen {
        /// Its pathLenConstraint.
        found: u32,
        /// The levels signet issues below it.
        room: u32,
    },
    /// Not valid yet.
    #[error("the certificate is not valid yet: notBefore {not_before} is after now ({now})")]
    NotYetValid {
        /// Its notBefore.
        not_before: OffsetDateTime,
        /// Now.
        now: OffsetDateTime,
    },
    /// Expired.
    #[error("the certificate has expired: notAfter {not_after} is before now ({now})")]
    Expired {
        /// Its notAfter.
        not_after: OffsetDateTime,
        /// Now.
        now: OffsetDateTime,
    },
    /// Valid for too short a time.
    #[error(
        "the certificate's notAfter {not_after} is too soon: signet needs it valid until at least {need} \
         ({least_secs} s from now: the publish lead plus the longest life of what it signs)"
    )]
    TooShort {
        /// Its notAfter.
        not_after: OffsetDateTime,
        /// The least notAfter.
        need: OffsetDateTime,
        /// The least life, in seconds.
        least_secs: u64,
    },
    /// A `--chain` certificate does not parse.
    #[error("chain certificate {number} does not parse: {source}")]
    ChainParse {
        /// Its position, from 1.
        number: usize,
        /// The parser's error.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// Nothing signed a certificate of the path.
    #[error(
        "the certificate does not chain to the upstream roots ({roots}): neither an upstream root nor a --chain \
         certificate signed {subject} (issuer {issuer})"
    )]
    NoIssuer {
        /// Where the upstream roots come from.
        roots: String,
        /// The subject of the certificate no one signed.
        subject: String,
        /// Its issuer.
        issuer: String,
    },
    /// A chain certificate is not a CA.
    #[error("the chain certificate {subject} is not a CA")]
    ChainNotCa {
        /// Its subject.
        subject: String,
    },
    /// A chain certificate is not valid now.
    #[error("the chain certificate {subject} is not valid now")]
    ChainNotValid {
        /// Its subject.
        subject: String,
    },
    /// A chain certificate's pathLenConstraint is too small.
    #[error(
        "the chain certificate {subject} has pathLenConstraint {found}: it needs {need} or more for signet's \
         intermediate and what signet issues below it"
    )]
    ChainPathLen {
        /// Its subject.
        subject: String,
        /// Its pathLenConstraint.
        found: u32,
        /// What it needs.
        need: u32,
    },
    /// The chain certificates sign each other in a loop.
    #[error(
        "the certificate does not chain to the upstream roots ({roots}): the --chain certificates loop"
    )]
    ChainLoop {
        /// Where the upstream roots come from.
        roots: String,
    },
}

/// Checks the certificate `cert` (DER) the offline ceremony returned for the authority `label` whose key on the
/// token has the SubjectPublicKeyInfo `token_spki`, with `chain` the CA certificates between it and a root of
/// `parent` (may be empty). The error says what is wrong and how to fix it; the checks, in order: it parses and is
/// not self-signed; it certifies the token's key; it is a CA (basicConstraints cA, keyUsage keyCertSign) with a
/// subjectKeyIdentifier; its pathLenConstraint (and the chain's) leaves room for what signet issues below it; it is
/// valid now and for [`ExternalParent::least_life`] more; it chains to an upstream root through `chain`.
pub fn check_installed(
    cert: &[u8],
    chain: &[Vec<u8>],
    label: &str,
    token_spki: &[u8],
    parent: &ExternalParent,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, InstallError> {
    let (rest, c) = x509_parser::parse_x509_certificate(cert).map_err(InstallError::Parse)?;
    if !rest.is_empty() {
        return Err(InstallError::TrailingBytes);
    }
    if c.subject().as_raw() == c.issuer().as_raw() && signs(&c, &c) {
        return Err(InstallError::SelfSigned);
    }
    if c.public_key().raw != token_spki {
        return Err(InstallError::OtherKey {
            label: label.to_string(),
        });
    }
    if !matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
        return Err(InstallError::NotCa);
    }
    if !matches!(c.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign()) {
        return Err(InstallError::NoKeyCertSign);
    }
    let has_ski = c.iter_extensions().any(|e| {
        matches!(e.parsed_extension(), x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) if !k.0.is_empty())
    });
    if !has_ski {
        return Err(InstallError::NoSubjectKeyId);
    }
    let room = u32::from(parent.path_len_room);
    if let Some(n) = path_len(&c)
        && n < room
    {
        return Err(InstallError::PathLen { found: n, room });
    }
    let not_before = c.validity().not_before.to_datetime();
    let not_after = c.validity().not_after.to_datetime();
    if now < not_before {
        return Err(InstallError::NotYetValid { not_before, now });
    }
    if not_after <= now {
        return Err(InstallError::Expired { not_after, now });
    }
    let least = time::Duration::try_from(parent.least_life).unwrap_or(time::Duration::MAX);
    let need = now.checked_add(least).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    if not_after < need {
        return Err(InstallError::TooShort {
            not_after,
            need,
            least_secs: parent.least_life.as_secs(),
        });
    }
    // Up the chain to an upstream root, each step a CA valid now that leaves room for the levels below it.
    let roots: Vec<X509Certificate<'_>> = parent
        .roots
        .iter()
        .filter_map(|r| x509_parser::parse_x509_certificate(r).ok().map(|(_, c)| c))
        .collect();
    let mut above: Vec<X509Certificate<'_>> = Vec::with_capacity(chain.len());
    for (i, d) in chain.iter().enumerate() {
        let (_, a) =
            x509_parser::parse_x509_certificate(d).map_err(|source| InstallError::ChainParse {
                number: i + 1,
                source,
            })?;
        above.push(a);
    }
    let mut current = c;
    let mut depth = room;
    for _ in 0..=above.len() {
        if roots.iter().any(|r| signs(r, &current)) {
            return Ok(not_after);
        }
        let Some(next) = above.iter().find(|a| signs(a, &current)) else {
            return Err(InstallError::NoIssuer {
                roots: parent.source.to_string(),
                subject: current.subject().to_string(),
                issuer: current.issuer().to_string(),
            });
        };
        depth += 1;
        if !matches!(next.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
            return Err(InstallError::ChainNotCa {
                subject: next.subject().to_string(),
            });
        }
        if !next.validity().is_valid_at(now.into()) {
            return Err(InstallError::ChainNotValid {
                subject: next.subject().to_string(),
            });
        }
        if let Some(n) = path_len(next)
            && n < depth
        {
            return Err(InstallError::ChainPathLen {
                subject: next.subject().to_string(),
                found: n,
                need: depth,
            });
        }
        current = next.clone();
    }
    Err(InstallError::ChainLoop {
        roots: parent.source.to_string(),
    })
}
