//! JWT-SVID issuance (JWT-SVID §1–§3): JWS compact serialization signed by an [`AuthorityKey`].
//!
//! The header holds exactly `alg`, `kid` and `typ` (`JWT`); the claims exactly `sub` (the SPIFFE ID), `aud` (a
//! non-empty array of at most 64 non-empty values, 4096 bytes together: [`check_audience`]), `exp` and `iat`. The
//! algorithm follows the key: ES256 (P-256), ES384 (P-384), RS256 for RSA by default with PS256 selectable. Ed25519
//! keys are refused (EdDSA is not a JWT-SVID algorithm). As for X.509, the exact header and claims bytes are linted
//! before the key signs, and the signature is verified with ring before the token leaves.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::keys::{AuthorityKey, KeyError, KeyType, SignatureScheme, verify_signature};
use crate::lint::{LintFailure, ensure};
use crate::spiffe::{JwtAuthority, SpiffeId, SpiffeIdError, TrustDomain};

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

    /// The default algorithm for a key type (RSA defaults to RS256); Ed25519 has none.
    pub fn default_for(key_type: KeyType) -> Result<Self, JwtError> {
        match key_type {
            KeyType::EcP256 => Ok(JwsAlgorithm::Es256),
            KeyType::EcP384 => Ok(JwsAlgorithm::Es384),
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => Ok(JwsAlgorithm::Rs256),
            other => Err(JwtError::UnsupportedKey(format!(
                "{other} keys cannot sign JWT-SVIDs (EdDSA is not a JWT-SVID algorithm): use EC P-256/P-384 or RSA"
            ))),
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "ES256" => Some(JwsAlgorithm::Es256),
            "ES384" => Some(JwsAlgorithm::Es384),
            "RS256" => Some(JwsAlgorithm::Rs256),
            "PS256" => Some(JwsAlgorithm::Ps256),
            _ => None,
        }
    }
}

/// Why a JWT-SVID was not issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The subject is not a valid workload SPIFFE ID of the trust domain.
    #[error("JWT-SVID subject rejected: {0}")]
    SpiffeId(#[from] SpiffeIdError),
    /// The audience is empty or has an empty value.
    #[error("invalid audience: {0}")]
    Audience(String),
    /// The TTL is zero or beyond the allowed maximum.
    #[error("invalid TTL: {0}")]
    Ttl(String),
    /// The key cannot sign JWT-SVIDs with the chosen algorithm.
    #[error("unsupported key or algorithm: {0}")]
    UnsupportedKey(String),
    /// The header or claims failed the pre-issuance lint; nothing was signed.
    #[error(transparent)]
    Lint(#[from] LintFailure),
    /// The key failed to sign.
    #[error("authority key failed: {0}")]
    Key(#[from] KeyError),
    /// The key returned a signature that does not verify.
    #[error(
        "post-sign check failed: the signature returned by the authority key does not verify ({0}); the key or \
         token is faulty, nothing was issued"
    )]
    PostSignCheck(String),
    /// JSON encoding failed.
    #[error("JSON encoding failed: {0}")]
    Json(String),
}

/// Most audience values a JWT-SVID carries (JWT-SVID §3 recommends one).
pub const MAX_AUDIENCES: usize = 64;
/// Most bytes of all audience values together: with the other claims and the signature the token stays within the
/// 8 KiB that HTTP servers commonly allow for a header, where JWT-SVIDs travel.
pub const MAX_AUDIENCE_BYTES: usize = 4096;

/// Checks an audience before anything is signed for it: at least one value, none empty, at most [`MAX_AUDIENCES`]
/// values of at most [`MAX_AUDIENCE_BYTES`] together.
pub fn check_audience(audience: &[String]) -> Result<(), JwtError> {
    if audience.is_empty() || audience.iter().any(String::is_empty) {
        return Err(JwtError::Audience(
            "give at least one audience, none empty".into(),
        ));
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(JwtError::Audience(format!(
            "{} audience values: at most {MAX_AUDIENCES} are issued (one per token is recommended)",
            audience.len()
        )));
    }
    let bytes: usize = audience.iter().map(String::len).sum();
    if bytes > MAX_AUDIENCE_BYTES {
        return Err(JwtError::Audience(format!(
            "{bytes} bytes of audience: at most {MAX_AUDIENCE_BYTES} are issued"
        )));
    }
    Ok(())
}

impl JwtError {
    /// A short stable name of the rule broken.
    pub fn rule(&self) -> &'static str {
        match self {
            JwtError::SpiffeId(e) => e.rule(),
            JwtError::Audience(_) => "jwt.aud",
            JwtError::Ttl(_) => "jwt.exp",
            JwtError::UnsupportedKey(_) => "jwt.alg",
            JwtError::Lint(l) => l.rule,
            JwtError::Key(_) => "key",
            JwtError::PostSignCheck(_) => "post-sign-check",
            JwtError::Json(_) => "json",
        }
    }
}

/// A key id derived from a public key: base64url of the first 24 bytes of SHA-256 over the SPKI DER (32 chars).
pub fn kid_for_spki(spki_der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, spki_der);
    URL_SAFE_NO_PAD.encode(&d.as_ref()[..24])
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

/// Issues JWT-SVIDs for one trust domain with one key.
#[derive(Debug)]
pub struct JwtIssuer {
    key: Arc<dyn AuthorityKey>,
    kid: String,
    alg: JwsAlgorithm,
    trust_domain: TrustDomain,
    max_ttl: Duration,
}

impl JwtIssuer {
    /// A JWT-SVID issuer. `kid` defaults to [`kid_for_spki`]; `alg` to the key type's default; `max_ttl` bounds
    /// every token's lifetime.
    pub fn new(
        key: Arc<dyn AuthorityKey>,
        trust_domain: TrustDomain,
        kid: Option<String>,
        alg: Option<JwsAlgorithm>,
        max_ttl: Duration,
    ) -> Result<Self, JwtError> {
        let alg = match alg {
            Some(a) => a,
            None => JwsAlgorithm::default_for(key.key_type())?,
        };
        if !key.key_type().supports(alg.scheme()) {
            return Err(JwtError::UnsupportedKey(format!(
                "a {} key cannot sign {}",
                key.key_type(),
                alg.name()
            )));
        }
        if max_ttl.is_zero() {
            return Err(JwtError::Ttl("the maximum TTL must be positive".into()));
        }
        let kid = kid.unwrap_or_else(|| kid_for_spki(key.spki_der()));
        if kid.is_empty() {
            return Err(JwtError::UnsupportedKey(
                "the key id must not be empty".into(),
            ));
        }
        Ok(Self {
            key,
            kid,
            alg,
            trust_domain,
            max_ttl,
        })
    }

    /// The key id (`kid`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The longest lifetime [`issue`](Self::issue) accepts (the authority's `max_ttl`): the API cuts a request to
    /// it, as it cuts one to the policy's maximum, before it gets here.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// The algorithm.
    pub fn algorithm(&self) -> JwsAlgorithm {
        self.alg
    }

    /// The bundle entry that verifies this issuer's tokens.
    pub fn authority(&self) -> Result<JwtAuthority, JwtError> {
        JwtAuthority::new(self.kid.clone(), self.key.spki_der().to_vec())
            .map_err(|e| JwtError::UnsupportedKey(e.to_string()))
    }

    /// Issue a JWT-SVID for `subject` (a workload ID of the trust domain) to `audience`, valid for `ttl`.
    pub fn issue(
        &self,
        subject: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<String, JwtError> {
        subject.require_trust_domain(&self.trust_domain)?;
        subject.require_workload()?;
        check_audience(audience)?;
        if ttl.is_zero() {
            return Err(JwtError::Ttl("the TTL must be positive".into()));
        }
        if ttl > self.max_ttl {
            return Err(JwtError::Ttl(format!(
                "{} s exceeds the maximum of {} s",
                ttl.as_secs(),
                self.max_ttl.as_secs()
            )));
        }
        let iat = now.unix_timestamp();
        let ttl_secs = i64::try_from(ttl.as_secs())
            .map_err(|_| JwtError::Ttl("the TTL is too large".into()))?;
        let exp = iat
            .checked_add(ttl_secs)
            .ok_or_else(|| JwtError::Ttl("exp out of range".into()))?;

        let header = serde_json::json!({ "alg": self.alg.name(), "kid": self.kid, "typ": "JWT" });
        let claims =
            serde_json::json!({ "sub": subject.as_str(), "aud": audience, "exp": exp, "iat": iat });
        let header = serde_json::to_vec(&header).map_err(|e| JwtError::Json(e.to_string()))?;
        let claims = serde_json::to_vec(&claims).map_err(|e| JwtError::Json(e.to_string()))?;
        self.sign_parts(&header, &claims)
    }

    /// Lint, sign and verify a token from raw header and claims JSON. [`Self::issue`] builds both; this is the
    /// path for callers that need to build them themselves, and the lint still decides whether anything is signed.
    pub fn sign_parts(&self, header_json: &[u8], claims_json: &[u8]) -> Result<String, JwtError> {
        let ctx = JwtLintContext {
            alg: self.alg,
            kid: &self.kid,
            trust_domain: &self.trust_domain,
            max_ttl_secs: self.max_ttl.as_secs(),
        };
        lint_jwt(header_json, claims_json, &ctx)?;
        let mut token = URL_SAFE_NO_PAD.encode(header_json);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(claims_json));
        let scheme = self.alg.scheme();
        let sig = self.key.sign(scheme, token.as_bytes())?;
        // Fail closed: a public key that does not parse fails the check like a signature that does not verify.
        let checked = verify_signature(self.key.spki_der(), scheme, token.as_bytes(), &sig);
        self.key.post_sign_checked(&sig, checked.is_ok());
        checked.map_err(|e| JwtError::PostSignCheck(e.to_string()))?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(&sig));
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_bounded() {
        let v = |n: usize, len: usize| vec!["a".repeat(len); n];
        assert!(check_audience(&v(1, 1)).is_ok());
        assert!(check_audience(&v(MAX_AUDIENCES, 1)).is_ok());
        assert!(check_audience(&v(1, MAX_AUDIENCE_BYTES)).is_ok());
        assert!(check_audience(&[]).is_err());
        assert!(check_audience(&v(1, 0)).is_err());
        assert!(check_audience(&v(MAX_AUDIENCES + 1, 1)).is_err());
        assert!(check_audience(&v(2, MAX_AUDIENCE_BYTES / 2 + 1)).is_err());
    }
}
