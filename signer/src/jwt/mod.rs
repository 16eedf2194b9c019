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
use time::OffsetDateTime;

use crate::keys::KeySchemes as _;
use crate::keys::{AuthorityKey, KeyError, verify_signature};
use crate::lint::LintFailure;
pub use crate::lint::jwt::{JwsAlgorithm, JwtLintContext, lint_jwt};
use crate::spiffe::{JwtAuthority, SpiffeId, SpiffeIdError, TrustDomain};

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
            None => JwsAlgorithm::default_for(key.key_type()).ok_or_else(|| {
                JwtError::UnsupportedKey(format!(
                    "{} keys cannot sign JWT-SVIDs (EdDSA is not a JWT-SVID algorithm): use EC P-256/P-384 or RSA",
                    key.key_type()
                ))
            })?,
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
