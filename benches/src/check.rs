//! Every credential a bench receives is checked against the trust bundle, with crates independent of signet's own
//! issuance code: X509-SVID chains with `x509-parser` (signatures through ring), JWT-SVIDs and KeyManager signatures
//! with ring. A credential that fails is a bad credential; one bad credential fails the bench.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use x509_parser::prelude::*;

/// What a bench checks its credentials against.
#[derive(Debug, Default)]
pub struct Checker {
    /// The trust domain's X.509 roots (DER).
    pub roots: Vec<Vec<u8>>,
    /// The JWT authorities of the bundle: (kid, algorithm, uncompressed EC point).
    pub jwt_keys: Vec<(String, &'static str, Vec<u8>)>,
    /// The audience the bench asks JWT-SVIDs for.
    pub audience: String,
    /// The KeyManager key's SubjectPublicKeyInfo (DER), for SignData.
    pub sign_key_spki: Option<Vec<u8>>,
    /// Intermediates (DER) already verified up to a root: each is checked once, not with every leaf.
    pub verified: Mutex<HashSet<Vec<u8>>>,
}

impl Checker {
    /// A checker for the bundle document (JWKS, JSON) and X.509 roots that GetBundle returns.
    pub fn from_bundle(
        spiffe_bundle: &[u8],
        roots: Vec<Vec<u8>>,
        audience: &str,
    ) -> Result<Self, String> {
        let doc: serde_json::Value = serde_json::from_slice(spiffe_bundle)
            .map_err(|e| format!("the bundle document is not JSON: {e}"))?;
        let mut jwt_keys = Vec::new();
        for k in doc["keys"].as_array().into_iter().flatten() {
            if k["use"] != "jwt-svid" || k["kty"] != "EC" {
                continue;
            }
            let alg = match k["crv"].as_str() {
                Some("P-256") => "ES256",
                Some("P-384") => "ES384",
                _ => continue,
            };
            let coord = |name: &str| -> Result<Vec<u8>, String> {
                URL_SAFE_NO_PAD
                    .decode(k[name].as_str().unwrap_or_default())
                    .map_err(|e| format!("JWK {name} is not base64url: {e}"))
            };
            let mut point = vec![4u8];
            point.extend(coord("x")?);
            point.extend(coord("y")?);
            let kid = k["kid"].as_str().unwrap_or_default().to_string();
            jwt_keys.push((kid, alg, point));
        }
        Ok(Checker {
            roots,
            jwt_keys,
            audience: audience.to_string(),
            sign_key_spki: None,
            verified: Mutex::default(),
        })
    }

    /// Checks an X509-SVID chain (leaf first): each certificate signed by the next, the last by a bundle root; the
    /// leaf currently valid, not a CA, for `spiffe_id`, and for the key of the CSR (`spki`: SubjectPublicKeyInfo DER).
    pub fn x509_svid(&self, chain: &[Vec<u8>], spiffe_id: &str, spki: &[u8]) -> Result<(), String> {
        self.x509_chain(chain, Some(spiffe_id), spki)
    }

    /// [`Checker::x509_svid`], the URI SAN checked only when `spiffe_id` is given (a peer CA that issues plain
    /// certificates, such as cfssl, which leaves the CSR's URI SAN out).
    pub fn x509_chain(
        &self,
        chain: &[Vec<u8>],
        spiffe_id: Option<&str>,
        spki: &[u8],
    ) -> Result<(), String> {
        let parsed = chain
            .iter()
            .map(|der| {
                X509Certificate::from_der(der)
                    .map(|(_, c)| c)
                    .map_err(|e| format!("a chain certificate does not parse: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let leaf = parsed.first().ok_or("an empty certificate chain")?;
        if !leaf.validity().is_valid() {
            return Err("the leaf is not valid now".into());
        }
        if leaf.is_ca() {
            return Err("the leaf is a CA certificate".into());
        }
        if leaf.public_key().raw != spki {
            return Err("the leaf's key is not the CSR's key".into());
        }
        let uris: Vec<&str> = leaf
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(spiffe_id) = spiffe_id
            && uris != [spiffe_id]
        {
            return Err(format!(
                "the leaf's URI SANs are {uris:?}, not [{spiffe_id:?}]"
            ));
        }
        if let Some(issuer) = parsed.get(1) {
            leaf.verify_signature(Some(issuer.public_key()))
                .map_err(|e| format!("the leaf's signature does not verify: {e}"))?;
            let known = self
                .verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&chain[1]);
            if known && chain.len() == 2 {
                return Ok(());
            }
        }
        for pair in parsed.windows(2).skip(1) {
            pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .map_err(|e| format!("a chain signature does not verify: {e}"))?;
        }
        let last = parsed.last().ok_or("an empty certificate chain")?;
        let anchored = self.roots.iter().any(|root| {
            X509Certificate::from_der(root).is_ok_and(|(_, r)| {
                r.subject() == last.issuer() && last.verify_signature(Some(r.public_key())).is_ok()
            })
        });
        if !anchored {
            return Err("the chain does not lead to a root of the bundle".into());
        }
        if chain.len() == 2 {
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(chain[1].clone());
        }
        Ok(())
    }

    /// Checks a JWT-SVID: signed by a key of the bundle, `sub` is `spiffe_id`, the audience is the bench's, and it has
    /// not expired.
    pub fn jwt_svid(&self, token: &str, spiffe_id: &str) -> Result<(), String> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS (three parts)".into());
        };
        let json = |part: &str, what: &str| -> Result<serde_json::Value, String> {
            let raw = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|e| format!("the {what} is not base64url: {e}"))?;
            serde_json::from_slice(&raw).map_err(|e| format!("the {what} is not JSON: {e}"))
        };
        let header = json(h, "header")?;
        let claims = json(c, "claims")?;
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|e| format!("the signature is not base64url: {e}"))?;
        let kid = header["kid"].as_str().unwrap_or_default();
        let alg = header["alg"].as_str().unwrap_or_default();
        let (_, key_alg, point) = self
            .jwt_keys
            .iter()
            .find(|(k, _, _)| k == kid)
            .ok_or_else(|| format!("no bundle key has kid {kid:?}"))?;
        if alg != *key_alg {
            return Err(format!("alg {alg} does not match the key's {key_alg}"));
        }
        let verify_alg: &dyn ring::signature::VerificationAlgorithm = match alg {
            "ES256" => &ring::signature::ECDSA_P256_SHA256_FIXED,
            _ => &ring::signature::ECDSA_P384_SHA384_FIXED,
        };
        let signed = &token[..h.len() + 1 + c.len()];
        ring::signature::UnparsedPublicKey::new(verify_alg, point)
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| "the signature does not verify".to_string())?;
        if claims["sub"] != spiffe_id {
            return Err(format!("sub is {}, not {spiffe_id}", claims["sub"]));
        }
        let aud_ok = match &claims["aud"] {
            serde_json::Value::String(a) => *a == self.audience,
            serde_json::Value::Array(a) => a.iter().any(|v| *v == *self.audience),
            _ => false,
        };
        if !aud_ok {
            return Err(format!("aud {} lacks {:?}", claims["aud"], self.audience));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        if claims["exp"].as_i64().is_none_or(|exp| exp <= now) {
            return Err("expired or no exp".into());
        }
        Ok(())
    }

    /// Checks a KeyManager SignData answer: an ECDSA (DER) signature over SHA-256(`message`) by the key.
    pub fn signature(&self, message: &[u8], signature: &[u8]) -> Result<(), String> {
        let spki = self
            .sign_key_spki
            .as_deref()
            .ok_or("no public key to check signatures with")?;
        let key = signet_pkcs11::spki_subject_public_key(spki)
            .map_err(|e| format!("the key's SubjectPublicKeyInfo: {e}"))?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
            .verify(message, signature)
            .map_err(|_| "the signature does not verify".to_string())
    }
}

/// Which credentials to check: all of them while the bench runs below `budget_per_s` checks a second (a token
/// bucket), or a fixed fraction.
#[derive(Debug)]
pub enum Sampling {
    /// Check up to this many credentials a second (every one below that rate).
    Budget {
        /// Checks a second.
        per_s: f64,
        /// (tokens, last refill).
        bucket: Mutex<(f64, Instant)>,
    },
    /// Check this fraction (0..=1) of the credentials, evenly spread.
    Fraction(f64, std::sync::atomic::AtomicU64),
}

impl Sampling {
    /// A budget of `per_s` checks a second.
    pub fn budget(per_s: f64) -> Self {
        Sampling::Budget {
            per_s,
            bucket: Mutex::new((per_s, Instant::now())),
        }
    }

    /// A fixed fraction.
    pub fn fraction(f: f64) -> Self {
        Sampling::Fraction(f.clamp(0.0, 1.0), std::sync::atomic::AtomicU64::new(0))
    }

    /// Whether to check the next credential.
    pub fn take(&self) -> bool {
        match self {
            Sampling::Budget { per_s, bucket } => {
                let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let refill = now
                    .duration_since(b.1)
                    .min(Duration::from_secs(1))
                    .as_secs_f64();
                b.0 = (b.0 + refill * per_s).min(*per_s);
                b.1 = now;
                if b.0 >= 1.0 {
                    b.0 -= 1.0;
                    true
                } else {
                    false
                }
            }
            Sampling::Fraction(f, n) => {
                let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64;
                ((i + 1.0) * f).floor() > (i * f).floor()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_spread_evenly() {
        for (f, want) in [(1.0, 1000), (0.5, 500), (0.01, 10), (0.0, 0)] {
            let s = Sampling::fraction(f);
            let got = (0..1000).filter(|_| s.take()).count();
            assert_eq!(got, want, "fraction {f}");
        }
    }

    #[test]
    fn a_budget_caps_checks() {
        let s = Sampling::budget(100.0);
        let got = (0..10_000).filter(|_| s.take()).count();
        // The bucket starts full (100) and refills at 100/s during the loop's few milliseconds.
        assert!((100..=110).contains(&got), "{got}");
    }

    #[test]
    fn bad_jwts_are_refused() {
        let c = Checker::from_bundle(br#"{"keys":[]}"#, Vec::new(), "bench").unwrap();
        assert!(c.jwt_svid("a.b", "spiffe://example.org/x").is_err());
        assert!(
            c.jwt_svid("e30.e30.AA", "spiffe://example.org/x")
                .unwrap_err()
                .contains("kid")
        );
        assert!(c.x509_svid(&[], "spiffe://example.org/x", &[]).is_err());
        assert!(
            c.x509_svid(&[vec![0x30, 0x00]], "spiffe://example.org/x", &[])
                .is_err()
        );
    }

    /// A root and a leaf for `id` made with rcgen; returns (root DER, leaf DER, leaf SPKI DER).
    fn chain(id: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        use rcgen::{
            BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PublicKeyData as _, SanType,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
        let root = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
        (
            root.der().to_vec(),
            leaf.der().to_vec(),
            leaf_key.subject_public_key_info(),
        )
    }

    #[test]
    fn x509_checks_catch_bad_credentials() {
        let id = "spiffe://example.org/workloads/a";
        let (root, leaf, spki) = chain(id);
        let c = Checker {
            roots: vec![root.clone()],
            ..Checker::default()
        };
        c.x509_svid(std::slice::from_ref(&leaf), id, &spki).unwrap();
        // Another ID, another key, another root, a flipped signature bit: each is a bad credential.
        let e = c.x509_svid(
            std::slice::from_ref(&leaf),
            "spiffe://example.org/workloads/b",
            &spki,
        );
        assert!(e.unwrap_err().contains("URI SAN"));
        let (other_root, other_leaf, other_spki) = chain(id);
        assert!(
            c.x509_svid(std::slice::from_ref(&leaf), id, &other_spki)
                .unwrap_err()
                .contains("key")
        );
        assert!(
            c.x509_svid(&[other_leaf], id, &other_spki)
                .unwrap_err()
                .contains("root")
        );
        let mut flipped = leaf.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(c.x509_svid(&[flipped], id, &spki).is_err());
        let strangers = Checker {
            roots: vec![other_root],
            ..Checker::default()
        };
        assert!(strangers.x509_svid(&[leaf], id, &spki).is_err());
    }
}
