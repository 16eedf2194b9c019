//! The JWT-SVID lint: the exact header and claims JSON about to be signed, checked against the JWT-SVID rules
//! (rules `jwt.*` in [`crate::lint`]), and the JWS algorithms signet signs with.

use serde_json::{Map, Value};

use crate::keys::{KeyType, SignatureScheme};
use crate::lint::{LintFailure, ensure};
use crate::spiffe::{SpiffeId, TrustDomain};

/// A JWS algorithm signet issues JWT-SVIDs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JwsAlgorithm {
    /// ECDSA P-256 SHA-256.
    Es256,
    /// ECDSA P-384 SHA-384.
    Es384,
    /// RSASSA-PKCS1-v1_5 SHA-256.
    Rs256,
    /// RSASSA-PSS SHA-256.
    Ps256,
}

impl JwsAlgorithm {
    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            JwsAlgorithm::Es256 => "ES256",
            JwsAlgorithm::Es384 => "ES384",
            JwsAlgorithm::Rs256 => "RS256",
            JwsAlgorithm::Ps256 => "PS256",
        }
    }

    /// The signature scheme the key signs with.
    pub fn scheme(self) -> SignatureScheme {
        match self {
            JwsAlgorithm::Es256 => SignatureScheme::EcdsaP256Sha256,
            JwsAlgorithm::Es384 => SignatureScheme::EcdsaP384Sha384,
            JwsAlgorithm::Rs256 => SignatureScheme::RsaPkcs1Sha256,
            JwsAlgorithm::Ps256 => SignatureScheme::RsaPssSha256,
        }
    }

    /// The default algorithm for a key type (RSA defaults to RS256); Ed25519 has none (EdDSA is not a JWT-SVID
    /// algorithm).
    pub fn default_for(key_type: KeyType) -> Option<Self> {
        match key_type {
            KeyType::EcP256 => Some(JwsAlgorithm::Es256),
            KeyType::EcP384 => Some(JwsAlgorithm::Es384),
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => Some(JwsAlgorithm::Rs256),
            _ => None,
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "ES256" => Some(JwsAlgorithm::Es256),
            "ES384" => Some(JwsAlgorithm::Es384),
            "RS256" => Some(JwsAlgorithm::Rs256),
            "PS256" => Some(JwsAlgorithm::Ps256),
            _ => None,
        }
    }
}

/// What the JWT lint checks header and claims against.
#[derive(Debug, Clone, Copy)]
pub struct JwtLintContext<'a> {
    /// The algorithm the key signs with.
    pub alg: JwsAlgorithm,
    /// The key id that must be in the header.
    pub kid: &'a str,
    /// The trust domain `sub` must be in.
    pub trust_domain: &'a TrustDomain,
    /// Longest allowed `exp - iat`, seconds.
    pub max_ttl_secs: u64,
}

fn object(json: &[u8], what: &'static str) -> Result<Map<String, Value>, LintFailure> {
    match serde_json::from_slice::<Value>(json) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(LintFailure::record(
            "jwt.json",
            format!("the {what} is not a JSON object"),
        )),
    }
}

/// Lint a JWT-SVID's header and claims JSON (the exact bytes about to be encoded and signed).
pub fn lint_jwt(
    header_json: &[u8],
    claims_json: &[u8],
    ctx: &JwtLintContext<'_>,
) -> Result<(), LintFailure> {
    let header = object(header_json, "header")?;
    for k in header.keys() {
        ensure(
            matches!(k.as_str(), "alg" | "kid" | "typ"),
            "jwt.header-members",
            || format!("header member {k:?} is not allowed: only alg, kid and typ"),
        )?;
    }
    let alg = header.get("alg").and_then(Value::as_str);
    ensure(
        alg.and_then(JwsAlgorithm::from_name) == Some(ctx.alg),
        "jwt.alg",
        || format!("alg is {alg:?}, the key signs with {}", ctx.alg.name()),
    )?;
    let kid = header.get("kid").and_then(Value::as_str);
    ensure(
        kid.is_some_and(|k| !k.is_empty() && k == ctx.kid),
        "jwt.kid",
        || {
            format!(
                "kid must be set to the authority's key id {:?}, is {kid:?}",
                ctx.kid
            )
        },
    )?;
    let typ = header.get("typ").and_then(Value::as_str);
    ensure(matches!(typ, Some("JWT") | Some("JOSE")), "jwt.typ", || {
        format!("typ must be JWT or JOSE, is {typ:?}")
    })?;

    let claims = object(claims_json, "claims set")?;
    for k in claims.keys() {
        ensure(
            matches!(k.as_str(), "sub" | "aud" | "exp" | "iat"),
            "jwt.claims-members",
            || format!("claim {k:?} is not issued: only sub, aud, exp and iat"),
        )?;
    }
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let id =
        SpiffeId::parse(sub).map_err(|e| LintFailure::record("jwt.sub", format!("sub: {e}")))?;
    ensure(
        id.trust_domain_name() == ctx.trust_domain.as_str() && !id.is_trust_domain_id(),
        "jwt.sub",
        || format!("sub {id} must be a workload ID in {}", ctx.trust_domain),
    )?;
    let aud = claims.get("aud").and_then(Value::as_array);
    ensure(
        aud.is_some_and(|a| {
            !a.is_empty() && a.iter().all(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        }),
        "jwt.aud",
        || "aud must be a non-empty array of non-empty strings".into(),
    )?;
    let exp = claims.get("exp").and_then(Value::as_i64);
    let iat = claims.get("iat").and_then(Value::as_i64);
    let (Some(exp), Some(iat)) = (exp, iat) else {
        return Err(LintFailure::record(
            "jwt.exp",
            "exp and iat must be present as integers",
        ));
    };
    ensure(exp > iat, "jwt.exp", || "exp must be after iat".into())?;
    ensure(
        exp.saturating_sub(iat).unsigned_abs() <= ctx.max_ttl_secs,
        "jwt.exp",
        || {
            format!(
                "exp - iat = {} s exceeds the maximum of {} s",
                exp - iat,
                ctx.max_ttl_secs
            )
        },
    )?;
    Ok(())
}
