//! JWT-SVIDs verified by the `spiffe` crate with a bundle built from our own bundle document.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use signet::jwt::{JwsAlgorithm, JwtIssuer};
use signet::keys::KeyType;
use signet::spiffe::{BundleDocument, SpiffeId};
use spiffe::{JwtBundle, JwtBundleSet, JwtSvid};

use crate::common::*;

fn bundle_set(doc: &BundleDocument) -> JwtBundleSet {
    let json = doc.to_json().unwrap();
    let parsed = BundleDocument::parse(json.as_bytes()).unwrap();
    let jwks = parsed.jwt_authorities_jwks().unwrap();
    let bundle = JwtBundle::from_jwt_authorities(
        spiffe::TrustDomain::new("example.org").unwrap(),
        jwks.as_bytes(),
    )
    .unwrap();
    let mut set = JwtBundleSet::new();
    set.add_bundle(bundle);
    set
}

/// Every JWT-capable key type and algorithm: issue, publish in a bundle, verify with the spiffe crate.
pub fn jwt_suite(factory: &dyn KeyFactory) {
    let cases = [
        (KeyType::EcP256, None, "ES256"),
        (KeyType::EcP384, None, "ES384"),
        (KeyType::Rsa2048, None, "RS256"),
        (KeyType::Rsa2048, Some(JwsAlgorithm::Ps256), "PS256"),
        (KeyType::Rsa3072, None, "RS256"),
    ];
    let mut doc = BundleDocument {
        sequence: 1,
        refresh_hint_secs: Some(300),
        ..Default::default()
    };
    let mut issued = Vec::new();
    for (kt, alg, name) in cases {
        let Some(key) = factory.make(kt) else {
            continue;
        };
        let kid = Some(format!("{name}-{}", kt.name()));
        let issuer = JwtIssuer::new(key, td(), kid, alg, Duration::from_secs(3600)).unwrap();
        assert_eq!(issuer.algorithm().name(), name);
        doc.jwt_authorities.push(issuer.authority().unwrap());
        let sub = SpiffeId::parse(&format!("spiffe://example.org/jwt/{}", kt.name())).unwrap();
        let token = issuer
            .issue(
                &sub,
                &["aud-a".into(), "aud-b".into()],
                Duration::from_secs(300),
                now(),
            )
            .unwrap();
        issued.push((token, sub, issuer.kid().to_string(), name));
    }
    let set = bundle_set(&doc);
    for (token, sub, kid, alg) in issued {
        let svid = JwtSvid::parse_and_validate(&token, &set, &["aud-a"])
            .unwrap_or_else(|e| panic!("{alg}: spiffe crate rejects the JWT-SVID: {e}"));
        assert_eq!(svid.spiffe_id().to_string(), sub.to_string());
        assert_eq!(svid.audience(), &["aud-a".to_string(), "aud-b".to_string()]);
        assert_eq!(svid.key_id(), kid);
        // The oracle can say no: a wrong audience and a tampered token are rejected.
        assert!(JwtSvid::parse_and_validate(&token, &set, &["other"]).is_err());
        let mut tampered = token.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(
            JwtSvid::parse_and_validate(&tampered, &set, &["aud-a"]).is_err(),
            "{alg}: tampered token accepted"
        );
        // Header is exactly alg/kid/typ.
        let header = token.split('.').next().unwrap();
        let header: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .unwrap(),
        )
        .unwrap();
        let keys: Vec<_> = header.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert_eq!(header["alg"], alg);
        assert_eq!(header["typ"], "JWT");
    }
}

#[test]
fn software_keys_issue_jwt_svids_the_spiffe_crate_accepts() {
    jwt_suite(&SoftwareKeys);
}

#[test]
fn softhsm2_keys_issue_jwt_svids_the_spiffe_crate_accepts() {
    let Some(keys) = SoftHsmKeys::new() else {
        return;
    };
    jwt_suite(&keys);
}

#[test]
fn ed25519_cannot_sign_jwt_svids() {
    let key = SoftwareKeys.make(KeyType::Ed25519).unwrap();
    let err =
        JwtIssuer::new(Arc::clone(&key), td(), None, None, Duration::from_secs(60)).unwrap_err();
    assert_eq!(err.rule(), "jwt.alg");
    assert!(err.to_string().contains("EdDSA"), "{err}");
}
