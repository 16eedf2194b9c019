//! Pre-issuance lint of a to-be-signed certificate (TBSCertificate DER) against the X509-SVID profile it claims:
//! a leaf X509-SVID, a CA certificate (the signing CA minted for SPIRE, or another intermediate), or a root.
//!
//! It runs inside the signing adapter on the exact bytes the key is about to sign, so whatever built the template
//! (rcgen today) is checked rather than trusted. Rule names are stable: they label the
//! `signet_lint_failures_total` metric and appear in every error.

use std::collections::HashSet;

use x509_parser::certificate::TbsCertificate;
use x509_parser::extensions::{GeneralName, ParsedExtension, PolicyInformation};
use x509_parser::oid_registry as oids;
use x509_parser::prelude::FromDer as _;

use crate::keys::spki::{SubjectKeyKind, classify};
use crate::lint::{LintFailure, ensure};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Which certificate profile a TBS must satisfy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Profile {
    /// A leaf X509-SVID: one URI SAN with a workload path, CA=false, digitalSignature, EKU server+client auth.
    Leaf,
    /// A CA below a root (the signing CA minted for SPIRE, or an issuing intermediate): CA=true, keyCertSign, no
    /// path in the URI SAN, AKI and SKI.
    IntermediateCa,
    /// A self-signed root: CA=true, keyCertSign, SKI, URI SAN `spiffe://<td>`, and no pathlen 0.
    Root,
}

/// What the issuer contributes to the checks (absent for a self-signed root).
#[derive(Debug, Clone, Copy)]
pub struct IssuerFacts<'a> {
    /// The issuer certificate's subject, DER (the TBS issuer name must equal it byte for byte).
    pub subject_der: &'a [u8],
    /// The issuer's SubjectKeyIdentifier (the TBS AKI must equal it).
    pub key_id: &'a [u8],
    /// The issuer's NotAfter, Unix seconds.
    pub not_after: i64,
}

/// Everything the lint needs besides the TBS itself.
#[derive(Debug, Clone, Copy)]
pub struct LintContext<'a> {
    /// The profile.
    pub profile: Profile,
    /// The trust domain the certificate must name.
    pub trust_domain: &'a TrustDomain,
    /// The subject public key the certificate must carry (SPKI DER).
    pub subject_spki: &'a [u8],
    /// The signature algorithm OID (dotted) the issuer key signs with.
    pub signature_oid: &'a str,
    /// Issuer facts; `None` for a root.
    pub issuer: Option<IssuerFacts<'a>>,
    /// The pathLenConstraint a CA must carry (`None`: absent).
    pub path_len: Option<u32>,
    /// The exact subject DER the certificate must carry, when it is copied from a request (SPIRE's CA subject).
    pub subject_der: Option<&'a [u8]>,
    /// True for signet's own issuing intermediates (delegated mode): they, and only they, carry the issuing
    /// certificate policy (see [`super::issuing`]).
    pub issuing: bool,
}

/// Lint a TBSCertificate DER for `ctx`.
pub fn lint_tbs(tbs_der: &[u8], ctx: &LintContext<'_>) -> Result<(), LintFailure> {
    let parsed = TbsCertificate::from_der(tbs_der);
    let (rest, tbs) = parsed.map_err(|e| {
        LintFailure::record("x509.der", format!("TBSCertificate does not parse: {e}"))
    })?;
    ensure(rest.is_empty(), "x509.der", || {
        "trailing bytes after the TBSCertificate".into()
    })?;
    let is_ca = ctx.profile != Profile::Leaf;

    ensure(tbs.version.0 == 2, "x509.version", || {
        format!("version must be v3, is v{}", tbs.version.0 + 1)
    })?;

    // Serial: positive, non-zero, at least 64 bits, at most 20 octets.
    let serial = tbs.raw_serial();
    let serial_trimmed: &[u8] = match serial.iter().position(|b| *b != 0) {
        Some(i) => &serial[i..],
        None => &[],
    };
    ensure(serial.len() <= 20, "x509.serial", || {
        format!("serial is {} octets, at most 20 allowed", serial.len())
    })?;
    ensure(
        serial.first().is_none_or(|b| b & 0x80 == 0),
        "x509.serial",
        || "serial is negative".into(),
    )?;
    ensure(serial_trimmed.len() >= 8, "x509.serial", || {
        "serial must carry at least 64 random bits and must not be 0".into()
    })?;

    let sig_oid = tbs.signature.algorithm.to_id_string();
    ensure(
        sig_oid == ctx.signature_oid,
        "x509.signature-algorithm",
        || {
            format!(
                "TBS names signature algorithm {sig_oid}, the issuer key signs with {}",
                ctx.signature_oid
            )
        },
    )?;

    // Issuer name and validity.
    let nb = tbs.validity.not_before.timestamp();
    let na = tbs.validity.not_after.timestamp();
    ensure(nb < na, "x509.validity", || {
        "NotBefore is not before NotAfter".into()
    })?;
    match ctx.issuer {
        Some(issuer) => {
            ensure(
                tbs.issuer.as_raw() == issuer.subject_der,
                "x509.issuer-name",
                || {
                    "the issuer name is not byte-identical to the issuer certificate's subject (chain building would \
                 fail in strict verifiers)"
                    .into()
                },
            )?;
            ensure(
                na <= issuer.not_after,
                "x509.not-after-beyond-issuer",
                || {
                    format!(
                        "NotAfter {na} is after the issuer's NotAfter {}",
                        issuer.not_after
                    )
                },
            )?;
        }
        None => {
            ensure(
                tbs.issuer.as_raw() == tbs.subject.as_raw(),
                "x509.issuer-name",
                || "a self-signed root must have issuer == subject".into(),
            )?;
        }
    }

    if let Some(expected) = ctx.subject_der {
        ensure(tbs.subject.as_raw() == expected, "x509.subject", || {
            "the subject is not byte-identical to the requested subject".into()
        })?;
    }

    // Subject key.
    ensure(
        tbs.subject_pki.raw == ctx.subject_spki,
        "x509.subject-key",
        || "the certificate's public key is not the requested one".into(),
    )?;
    let kind = classify(&tbs.subject_pki)
        .map_err(|e| LintFailure::record("x509.subject-key", e.to_string()))?;

    // Extensions: each known, each once.
    let mut seen = HashSet::new();
    let allowed = [
        oids::OID_X509_EXT_SUBJECT_ALT_NAME,
        oids::OID_X509_EXT_KEY_USAGE,
        oids::OID_X509_EXT_EXTENDED_KEY_USAGE,
        oids::OID_X509_EXT_BASIC_CONSTRAINTS,
        oids::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
        oids::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        oids::OID_X509_EXT_CERTIFICATE_POLICIES,
    ];
    let mut san = None;
    let mut ku = None;
    let mut eku = None;
    let mut bc = None;
    let mut ski = None;
    let mut aki = None;
    let mut policies = false;
    for ext in tbs.extensions() {
        let oid = ext.oid.to_id_string();
        ensure(seen.insert(oid.clone()), "x509.extension-duplicate", || {
            format!("extension {oid} appears twice")
        })?;
        ensure(
            allowed.contains(&ext.oid),
            "x509.extension-unexpected",
            || format!("extension {oid} is not part of the X509-SVID profile signet issues"),
        )?;
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(v) => san = Some((v, ext.critical)),
            ParsedExtension::KeyUsage(v) => ku = Some((v, ext.critical)),
            ParsedExtension::ExtendedKeyUsage(v) => eku = Some(v),
            ParsedExtension::BasicConstraints(v) => bc = Some((v, ext.critical)),
            ParsedExtension::SubjectKeyIdentifier(v) => ski = Some(v.0),
            ParsedExtension::AuthorityKeyIdentifier(v) => {
                aki = Some(v.key_identifier.as_ref().map(|k| k.0))
            }
            ParsedExtension::CertificatePolicies(p) => {
                // Only signet's issuing intermediates carry a policy, and exactly the issuing one: it is what the
                // trust boundary tells them apart by, so nothing else signet signs may carry it.
                let only_issuing = p.len() == 1 && is_issuing_policy(&p[0]);
                ensure(
                    ctx.issuing
                        && ctx.profile == Profile::IntermediateCa
                        && only_issuing
                        && !ext.critical,
                    "x509.certificate-policies",
                    || {
                        "certificatePolicies is carried only by signet's issuing intermediates"
                            .into()
                    },
                )?;
                policies = true;
            }
            _ => {
                return Err(LintFailure::record(
                    "x509.der",
                    format!("extension {oid} does not parse"),
                ));
            }
        }
    }
    ensure(
        policies || !ctx.issuing,
        "x509.certificate-policies",
        || "an issuing intermediate must carry signet's issuing policy".into(),
    )?;

    // SAN: exactly one URI SAN, a SPIFFE ID of the trust domain, with or without a path per profile.
    let (san, san_critical) = san.ok_or_else(|| {
        LintFailure::record(
            "x509.uri-san-count",
            "no SubjectAlternativeName: exactly one URI SAN is required",
        )
    })?;
    let mut uris = Vec::new();
    for name in &san.general_names {
        match name {
            GeneralName::URI(u) => uris.push(*u),
            GeneralName::DNSName(d) => {
                ensure(!is_ca, "x509.san-type", || {
                    format!("CA certificates carry no DNS SAN ({d})")
                })?;
                ensure(valid_dns_name(d), "x509.san-type", || {
                    format!("DNS SAN {d:?} is not valid")
                })?;
            }
            other => {
                return Err(LintFailure::record(
                    "x509.san-type",
                    format!("SAN {other:?} is not issued"),
                ));
            }
        }
    }
    ensure(uris.len() == 1, "x509.uri-san-count", || {
        format!("{} URI SANs, exactly one is required", uris.len())
    })?;
    let id = SpiffeId::parse(uris[0])
        .map_err(|e| LintFailure::record("x509.spiffe-id", e.to_string()))?;
    ensure(
        id.trust_domain_name() == ctx.trust_domain.as_str(),
        "x509.trust-domain",
        || format!("SPIFFE ID {id} is not in trust domain {}", ctx.trust_domain),
    )?;
    if is_ca {
        ensure(id.is_trust_domain_id(), "x509.ca.uri-san-path", || {
            format!(
                "a CA's SPIFFE ID must be spiffe://{} exactly, got {id}",
                ctx.trust_domain
            )
        })?;
    } else {
        ensure(!id.is_trust_domain_id(), "x509.leaf.uri-san-path", || {
            format!("a leaf's SPIFFE ID must have a path, got {id}")
        })?;
    }
    if tbs.subject.iter().next().is_none() {
        ensure(san_critical, "x509.san-critical", || {
            "the subject is empty, so the SAN extension must be critical".into()
        })?;
    }

    // BasicConstraints.
    let (bc, bc_critical) = bc.ok_or_else(|| {
        LintFailure::record("x509.basic-constraints", "BasicConstraints is missing")
    })?;
    ensure(bc_critical, "x509.basic-constraints", || {
        "BasicConstraints must be critical".into()
    })?;
    ensure(bc.ca == is_ca, "x509.basic-constraints", || {
        format!("cA is {}, the profile requires {is_ca}", bc.ca)
    })?;
    if is_ca {
        ensure(
            bc.path_len_constraint == ctx.path_len,
            "x509.path-len",
            || {
                format!(
                    "pathLenConstraint is {:?}, expected {:?}",
                    bc.path_len_constraint, ctx.path_len
                )
            },
        )?;
        if ctx.profile == Profile::Root {
            ensure(bc.path_len_constraint != Some(0), "x509.path-len", || {
                "a root must not carry pathlen 0 (pathlen 0 belongs only on the CA that signs leaves)".into()
            })?;
        }
    } else {
        ensure(bc.path_len_constraint.is_none(), "x509.path-len", || {
            "a leaf carries no pathLenConstraint".into()
        })?;
    }

    // KeyUsage.
    let (ku, ku_critical) =
        ku.ok_or_else(|| LintFailure::record("x509.key-usage", "KeyUsage is missing"))?;
    ensure(ku_critical, "x509.key-usage", || {
        "KeyUsage must be critical".into()
    })?;
    let extra =
        ku.non_repudiation() || ku.data_encipherment() || ku.encipher_only() || ku.decipher_only();
    ensure(!extra, "x509.key-usage", || {
        format!("KeyUsage {ku} holds bits the profile does not allow")
    })?;
    if is_ca {
        ensure(ku.key_cert_sign(), "x509.key-usage", || {
            "a CA needs keyCertSign".into()
        })?;
        ensure(
            !ku.digital_signature() && !ku.key_encipherment() && !ku.key_agreement(),
            "x509.key-usage",
            || format!("a CA's KeyUsage is keyCertSign (and cRLSign) only, got {ku}"),
        )?;
    } else {
        ensure(ku.digital_signature(), "x509.key-usage", || {
            "a leaf needs digitalSignature".into()
        })?;
        ensure(
            !ku.key_cert_sign() && !ku.crl_sign(),
            "x509.key-usage",
            || "a leaf must not have keyCertSign or cRLSign".into(),
        )?;
        ensure(
            !ku.key_encipherment() || kind.is_rsa(),
            "x509.key-usage",
            || "keyEncipherment is for RSA subject keys only".into(),
        )?;
        ensure(
            !ku.key_agreement() || matches!(kind, SubjectKeyKind::EcP256 | SubjectKeyKind::EcP384),
            "x509.key-usage",
            || "keyAgreement is for EC subject keys only".into(),
        )?;
    }

    // ExtendedKeyUsage.
    match (is_ca, eku) {
        (true, Some(_)) => {
            return Err(LintFailure::record(
                "x509.eku",
                "a CA certificate must not carry ExtendedKeyUsage",
            ));
        }
        (false, None) => {
            return Err(LintFailure::record(
                "x509.eku",
                "a leaf must carry EKU serverAuth+clientAuth",
            ));
        }
        (false, Some(eku)) => {
            ensure(eku.server_auth && eku.client_auth, "x509.eku", || {
                "a leaf's EKU must hold both serverAuth and clientAuth".into()
            })?;
            ensure(
                !eku.any
                    && eku.other.is_empty()
                    && !eku.code_signing
                    && !eku.email_protection
                    && !eku.time_stamping
                    && !eku.ocsp_signing,
                "x509.eku",
                || "a leaf's EKU holds purposes beyond serverAuth and clientAuth".into(),
            )?;
        }
        (true, None) => {}
    }

    // Key identifiers.
    if is_ca {
        let ski = ski.ok_or_else(|| {
            LintFailure::record(
                "x509.ski",
                "a CA certificate must carry SubjectKeyIdentifier",
            )
        })?;
        ensure(!ski.is_empty(), "x509.ski", || {
            "SubjectKeyIdentifier is empty".into()
        })?;
    }
    match ctx.issuer {
        Some(issuer) => {
            let aki = aki.flatten().ok_or_else(|| {
                LintFailure::record(
                    "x509.aki",
                    "AuthorityKeyIdentifier (keyIdentifier) is missing",
                )
            })?;
            ensure(aki == issuer.key_id, "x509.aki", || {
                "AuthorityKeyIdentifier does not equal the issuer's SubjectKeyIdentifier".into()
            })?;
        }
        None => {
            if let (Some(Some(aki)), Some(ski)) = (aki, ski) {
                ensure(aki == ski, "x509.aki", || {
                    "a root's AuthorityKeyIdentifier must equal its SKI".into()
                })?;
            }
        }
    }
    Ok(())
}

/// The certificate policy of signet's issuing intermediates (`2.25.<uuid>`), for people and documents.
pub const ISSUING_POLICY: &str = "2.25.179879812387938072244352974979413002308";

/// [`ISSUING_POLICY`] as the content octets of its DER OBJECT IDENTIFIER (the UUID arc is 128 bits, beyond what
/// the `der` crate's OID type holds, so it is carried and compared as its encoding; a unit test decodes it back).
pub(crate) const ISSUING_POLICY_OID: [u8; 20] = [
    0x69, 0x82, 0x8e, 0xd3, 0xcb, 0xde, 0xc3, 0x9f, 0x92, 0xbd, 0xef, 0x94, 0xb2, 0x8d, 0xa1, 0xd7,
    0x86, 0xcd, 0x90, 0x44,
];

/// True when `policy` is [`ISSUING_POLICY`] with no qualifiers.
pub(crate) fn is_issuing_policy(policy: &PolicyInformation<'_>) -> bool {
    policy.policy_id.as_bytes() == ISSUING_POLICY_OID && policy.policy_qualifiers.is_none()
}

/// A DNS name as a certificate may carry it: LDH labels (a leading `*.` wildcard allowed), 1..=253 bytes.
pub fn valid_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}
