//! The SPIFFE bundle document (SPIFFE Trust Domain and Bundle §4): an RFC 7517 JWK Set with `spiffe_sequence` and
//! `spiffe_refresh_hint`, holding the trust domain's X.509 authorities (`use` = `x509-svid`, one CA certificate in
//! `x5c`, no `kid`) and JWT authorities (`use` = `jwt-svid`, `kid` set).
//!
//! [`BundleDocument::to_json`] emits exactly the members the two specs define; [`BundleDocument::parse`] validates
//! strictly (key parameters must match the certificate, `x5c` holds exactly one CA certificate, `kid`s are unique)
//! and ignores entries whose `use` it does not know, as the standard asks of consumers.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value};
use x509_parser::prelude::FromDer as _;

use crate::keys::KeyType;
use crate::keys::spki::{SubjectKey, SubjectKeyKind};

const USE_X509: &str = "x509-svid";
const USE_JWT: &str = "jwt-svid";

/// Why a bundle document could not be built or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not JSON, or not a JSON object.
    #[error("bundle is not a JSON object: {0}")]
    Json(String),
    /// `keys` is missing or not an array.
    #[error(
        "bundle has no \"keys\" array (an empty array is required even when there are no keys)"
    )]
    MissingKeys,
    /// `spiffe_sequence` / `spiffe_refresh_hint` has the wrong type.
    #[error("bundle member {0:?} must be a non-negative integer")]
    BadMember(&'static str),
    /// A key entry breaks a rule.
    #[error("bundle key #{index}: {rule}")]
    Entry {
        /// Position in `keys`.
        index: usize,
        /// The rule broken.
        #[source]
        rule: EntryError,
    },
    /// A CA certificate given to the builder cannot be an X.509 authority.
    #[error("authority key cannot be published: {0}")]
    Authority(#[source] EntryError),
    /// A key given to the builder cannot be represented as a JWK.
    #[error("authority key cannot be published: {0}")]
    Key(String),
}

/// The rule a bundle's key entry (a JWK) or an X.509 authority's certificate breaks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The entry is not an object.
    #[error("entry is not a JSON object")]
    NotObject,
    /// No `use`.
    #[error("\"use\" is missing")]
    UseMissing,
    /// `use` is not a string.
    #[error("\"use\" is not a string")]
    UseNotString,
    /// Two JWT entries with one `kid`.
    #[error("kid {0:?} is used by an earlier entry")]
    KidReused(String),
    /// An x509-svid entry with a `kid`.
    #[error("an x509-svid entry must not carry \"kid\"")]
    X509WithKid,
    /// No `x5c` array.
    #[error("\"x5c\" is missing or not an array")]
    X5cMissing,
    /// Not exactly one certificate in `x5c`.
    #[error("\"x5c\" must hold exactly one certificate, it holds {0}")]
    X5cCount(usize),
    /// `x5c[0]` is not a string.
    #[error("\"x5c\"[0] is not a string")]
    X5cNotString,
    /// `x5c[0]` is not standard base64.
    #[error("\"x5c\"[0] is not standard base64")]
    X5cNotBase64(#[source] base64::DecodeError),
    /// The JWK's key is not the certificate's.
    #[error("the key parameters do not match the certificate's public key")]
    KeyMismatch,
    /// A jwt-svid entry with an `x5c`.
    #[error("a jwt-svid entry must not carry \"x5c\"")]
    JwtWithX5c,
    /// A member that must be a string is missing or is not one.
    #[error("\"{0}\" is missing or not a string")]
    MissingString(&'static str),
    /// `kid` is empty.
    #[error("\"kid\" is empty")]
    KidEmpty,
    /// A member is not unpadded base64url.
    #[error("\"{name}\" is not unpadded base64url")]
    NotBase64Url {
        /// The member.
        name: &'static str,
        /// The decoder's error.
        #[source]
        source: base64::DecodeError,
    },
    /// An EC curve signet does not take.
    #[error("EC curve {0:?} is not supported (P-256, P-384)")]
    EcCurve(String),
    /// EC coordinates of the wrong length.
    #[error("\"x\"/\"y\" must be {len} bytes each for {curve}")]
    EcLength {
        /// The length the curve needs.
        len: usize,
        /// The curve.
        curve: String,
    },
    /// RSA integers with leading zero bytes.
    #[error("\"n\"/\"e\" must not have leading zero bytes")]
    LeadingZero,
    /// RSA integers that are not valid.
    #[error("\"n\"/\"e\" are not valid integers")]
    RsaIntegers,
    /// An OKP curve other than Ed25519.
    #[error("OKP curve {0:?} is not supported (Ed25519)")]
    OkpCurve(String),
    /// A key type other than EC, RSA, OKP.
    #[error("key type {0:?} is not supported (EC, RSA, OKP)")]
    KeyType(String),
    /// The public key is not one signet accepts.
    #[error(transparent)]
    Key(#[from] crate::keys::spki::SubjectKeyError),
    /// The certificate does not parse.
    #[error("certificate does not parse: {0}")]
    CertParse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// Bytes after the certificate.
    #[error("trailing bytes after the certificate")]
    TrailingBytes,
    /// The certificate is not a CA.
    #[error("the certificate is not a CA (BasicConstraints cA=true is required)")]
    NotCa,
}

/// An X.509 authority: a CA certificate (DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Authority {
    cert_der: Vec<u8>,
}

impl X509Authority {
    /// Wrap a CA certificate; it must parse, be a CA, and carry an accepted public key.
    pub fn new(cert_der: Vec<u8>) -> Result<Self, BundleError> {
        check_ca_cert(&cert_der).map_err(BundleError::Authority)?;
        Ok(Self { cert_der })
    }

    /// The certificate DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
}

/// A JWT authority: a key id and a public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    kid: String,
    spki_der: Vec<u8>,
}

impl JwtAuthority {
    /// A JWT authority from its key id and SPKI DER (EC P-256/P-384, RSA, or Ed25519).
    pub fn new(kid: impl Into<String>, spki_der: Vec<u8>) -> Result<Self, BundleError> {
        let kid = kid.into();
        if kid.is_empty() {
            return Err(BundleError::Key(
                "a JWT authority needs a non-empty kid".into(),
            ));
        }
        SubjectKey::from_spki_der(&spki_der).map_err(|e| BundleError::Key(e.to_string()))?;
        Ok(Self { kid, spki_der })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key (SPKI DER).
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }
}

/// A SPIFFE bundle document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BundleDocument {
    /// `spiffe_sequence`: increases whenever the content changes.
    pub sequence: u64,
    /// `spiffe_refresh_hint` in seconds (omitted when `None`).
    pub refresh_hint_secs: Option<u64>,
    /// X.509 authorities.
    pub x509_authorities: Vec<X509Authority>,
    /// JWT authorities.
    pub jwt_authorities: Vec<JwtAuthority>,
}

impl BundleDocument {
    /// The JSON document.
    pub fn to_json(&self) -> Result<String, BundleError> {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for a in &self.x509_authorities {
            let (_, cert) = x509_parser::parse_x509_certificate(&a.cert_der)
                .map_err(|e| BundleError::Key(format!("X.509 authority: {e}")))?;
            let mut jwk = key_params(cert.public_key().raw)?;
            jwk.insert("use".into(), Value::from(USE_X509));
            jwk.insert(
                "x5c".into(),
                Value::Array(vec![Value::from(STANDARD.encode(&a.cert_der))]),
            );
            keys.push(Value::Object(jwk));
        }
        self.check_unique_kids()?;
        for a in &self.jwt_authorities {
            keys.push(Value::Object(jwt_jwk(a)?));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        if let Some(hint) = self.refresh_hint_secs {
            doc.insert("spiffe_refresh_hint".into(), Value::from(hint));
        }
        doc.insert("spiffe_sequence".into(), Value::from(self.sequence));
        serde_json::to_string(&Value::Object(doc)).map_err(|e| BundleError::Json(e.to_string()))
    }

    /// A JWK Set of the JWT authorities only (what a JWT-SVID verifier's bundle holds).
    pub fn jwt_authorities_jwks(&self) -> Result<String, BundleError> {
        self.check_unique_kids()?;
        let keys = self
            .jwt_authorities
            .iter()
            .map(|a| jwt_jwk(a).map(Value::Object))
            .collect::<Result<Vec<_>, _>>()?;
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        serde_json::to_string(&Value::Object(doc)).map_err(|e| BundleError::Json(e.to_string()))
    }

    /// The X.509 authorities as concatenated PEM `CERTIFICATE` blocks.
    pub fn x509_roots_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|a| pem::encode(&pem::Pem::new("CERTIFICATE", a.cert_der.clone())))
            .collect()
    }

    fn check_unique_kids(&self) -> Result<(), BundleError> {
        let mut seen = std::collections::HashSet::new();
        for a in &self.jwt_authorities {
            if !seen.insert(a.kid.as_str()) {
                return Err(BundleError::Key(format!(
                    "two JWT authorities share kid {:?}",
                    a.kid
                )));
            }
        }
        Ok(())
    }

    /// Parse and strictly validate a bundle document.
    pub fn parse(json: &[u8]) -> Result<Self, BundleError> {
        let value: Value =
            serde_json::from_slice(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let Value::Object(doc) = value else {
            return Err(BundleError::Json("the top level is not an object".into()));
        };
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(BundleError::MissingKeys)?;
        let sequence = match doc.get("spiffe_sequence") {
            None => 0,
            Some(v) => v
                .as_u64()
                .ok_or(BundleError::BadMember("spiffe_sequence"))?,
        };
        let refresh_hint_secs = match doc.get("spiffe_refresh_hint") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or(BundleError::BadMember("spiffe_refresh_hint"))?,
            ),
        };
        let mut out = BundleDocument {
            sequence,
            refresh_hint_secs,
            ..Default::default()
        };
        for (index, key) in keys.iter().enumerate() {
            let err = |rule: EntryError| BundleError::Entry { index, rule };
            let Value::Object(jwk) = key else {
                return Err(err(EntryError::NotObject));
            };
            let use_ = jwk.get("use").ok_or_else(|| err(EntryError::UseMissing))?;
            let use_ = use_.as_str().ok_or_else(|| err(EntryError::UseNotString))?;
            match use_ {
                USE_X509 => out
                    .x509_authorities
                    .push(parse_x509_entry(jwk).map_err(err)?),
                USE_JWT => {
                    let a = parse_jwt_entry(jwk).map_err(err)?;
                    if out.jwt_authorities.iter().any(|b| b.kid == a.kid) {
                        return Err(err(EntryError::KidReused(a.kid.clone())));
                    }
                    out.jwt_authorities.push(a);
                }
                // The standard tells consumers to ignore entries whose use they do not know.
                _ => {}
            }
        }
        Ok(out)
    }
}

fn jwt_jwk(a: &JwtAuthority) -> Result<Map<String, Value>, BundleError> {
    let mut jwk = key_params(&a.spki_der)?;
    jwk.insert("use".into(), Value::from(USE_JWT));
    jwk.insert("kid".into(), Value::from(a.kid.clone()));
    Ok(jwk)
}

/// kty/crv/x/y, kty/n/e or kty(OKP)/crv/x of an SPKI.
fn key_params(spki_der: &[u8]) -> Result<Map<String, Value>, BundleError> {
    let key = SubjectKey::from_spki_der(spki_der).map_err(|e| BundleError::Key(e.to_string()))?;
    let b64 = |b: &[u8]| Value::from(URL_SAFE_NO_PAD.encode(b));
    let mut m = Map::new();
    match key.kind() {
        SubjectKeyKind::EcP256 | SubjectKeyKind::EcP384 => {
            let point = &key.raw()[1..];
            let (x, y) = point.split_at(point.len() / 2);
            m.insert("kty".into(), Value::from("EC"));
            m.insert(
                "crv".into(),
                Value::from(if key.kind() == SubjectKeyKind::EcP256 {
                    "P-256"
                } else {
                    "P-384"
                }),
            );
            m.insert("x".into(), b64(x));
            m.insert("y".into(), b64(y));
        }
        SubjectKeyKind::Rsa(_) => {
            let (n, e) = crate::keys::spki::rsa_components(key.raw())
                .ok_or_else(|| BundleError::Key("malformed RSA public key".into()))?;
            m.insert("kty".into(), Value::from("RSA"));
            m.insert("n".into(), b64(n));
            m.insert("e".into(), b64(e));
        }
        SubjectKeyKind::Ed25519 => {
            m.insert("kty".into(), Value::from("OKP"));
            m.insert("crv".into(), Value::from("Ed25519"));
            m.insert("x".into(), b64(key.raw()));
        }
    }
    Ok(m)
}

fn b64_member(jwk: &Map<String, Value>, name: &'static str) -> Result<Vec<u8>, EntryError> {
    let s = jwk
        .get(name)
        .and_then(Value::as_str)
        .ok_or(EntryError::MissingString(name))?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|source| EntryError::NotBase64Url { name, source })
}

/// The SPKI DER described by a JWK's key parameters.
fn spki_from_jwk(jwk: &Map<String, Value>) -> Result<Vec<u8>, EntryError> {
    let kty = jwk
        .get("kty")
        .and_then(Value::as_str)
        .ok_or(EntryError::MissingString("kty"))?;
    let spki = match kty {
        "EC" => {
            let crv = jwk
                .get("crv")
                .and_then(Value::as_str)
                .ok_or(EntryError::MissingString("crv"))?;
            let (key_type, len) = match crv {
                "P-256" => (KeyType::EcP256, 32),
                "P-384" => (KeyType::EcP384, 48),
                other => {
                    return Err(EntryError::EcCurve(other.to_string()));
                }
            };
            let x = b64_member(jwk, "x")?;
            let y = b64_member(jwk, "y")?;
            if x.len() != len || y.len() != len {
                return Err(EntryError::EcLength {
                    len,
                    curve: crv.to_string(),
                });
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            crate::keys::spki::ec_spki(key_type, &point)
        }
        "RSA" => {
            let n = b64_member(jwk, "n")?;
            let e = b64_member(jwk, "e")?;
            if n.first() == Some(&0) || e.first() == Some(&0) {
                return Err(EntryError::LeadingZero);
            }
            let rsa =
                crate::keys::spki::rsa_public_key_der(&n, &e).ok_or(EntryError::RsaIntegers)?;
            crate::keys::spki::rsa_spki(&rsa)
        }
        "OKP" => {
            let crv = jwk
                .get("crv")
                .and_then(Value::as_str)
                .ok_or(EntryError::MissingString("crv"))?;
            if crv != "Ed25519" {
                return Err(EntryError::OkpCurve(crv.to_string()));
            }
            crate::keys::spki::ed25519_spki(&b64_member(jwk, "x")?)
        }
        other => {
            return Err(EntryError::KeyType(other.to_string()));
        }
    };
    SubjectKey::from_spki_der(&spki)?;
    Ok(spki)
}

fn parse_x509_entry(jwk: &Map<String, Value>) -> Result<X509Authority, EntryError> {
    if jwk.contains_key("kid") {
        return Err(EntryError::X509WithKid);
    }
    let x5c = jwk
        .get("x5c")
        .and_then(Value::as_array)
        .ok_or(EntryError::X5cMissing)?;
    if x5c.len() != 1 {
        return Err(EntryError::X5cCount(x5c.len()));
    }
    let cert_b64 = x5c[0].as_str().ok_or(EntryError::X5cNotString)?;
    let cert_der = STANDARD
        .decode(cert_b64)
        .map_err(EntryError::X5cNotBase64)?;
    let spki = check_ca_cert(&cert_der)?;
    if spki_from_jwk(jwk)? != spki {
        return Err(EntryError::KeyMismatch);
    }
    Ok(X509Authority { cert_der })
}

fn parse_jwt_entry(jwk: &Map<String, Value>) -> Result<JwtAuthority, EntryError> {
    if jwk.contains_key("x5c") {
        return Err(EntryError::JwtWithX5c);
    }
    let kid = jwk
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(EntryError::MissingString("kid"))?;
    if kid.is_empty() {
        return Err(EntryError::KidEmpty);
    }
    let spki_der = spki_from_jwk(jwk)?;
    Ok(JwtAuthority {
        kid: kid.to_string(),
        spki_der,
    })
}

/// Parse a CA certificate and return its SPKI DER.
fn check_ca_cert(cert_der: &[u8]) -> Result<Vec<u8>, EntryError> {
    let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)
        .map_err(EntryError::CertParse)?;
    if !rest.is_empty() {
        return Err(EntryError::TrailingBytes);
    }
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !is_ca {
        return Err(EntryError::NotCa);
    }
    let spki = cert.public_key().raw.to_vec();
    SubjectKey::from_spki_der(&spki)?;
    Ok(spki)
}
