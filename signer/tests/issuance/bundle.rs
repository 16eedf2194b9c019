//! Bundle document round-trips: ours -> JSON -> ours, and ours -> the spiffe crate -> the same keys.

use signet::jwt::JwtIssuer;
use signet::keys::KeyType;
use signet::spiffe::{BundleDocument, X509Authority};

use crate::common::*;

pub fn bundle_suite(factory: &dyn KeyFactory) {
    let mut doc = BundleDocument {
        sequence: 42,
        refresh_hint_secs: Some(60),
        ..Default::default()
    };
    for kt in KeyType::ALL {
        let Some(root) = root(factory, kt) else {
            continue;
        };
        doc.x509_authorities
            .push(X509Authority::new(root.cert_der().to_vec()).unwrap());
        let key = factory.make(kt).unwrap();
        let kid = format!("kid-{}", kt.name());
        // Ed25519 keys are published as OKP even though they do not sign JWT-SVIDs.
        let authority = signet::spiffe::JwtAuthority::new(kid, key.spki_der().to_vec()).unwrap();
        doc.jwt_authorities.push(authority);
        if kt == KeyType::EcP256 {
            let issuer =
                JwtIssuer::new(key, td(), None, None, std::time::Duration::from_secs(60)).unwrap();
            assert_eq!(issuer.authority().unwrap().kid(), issuer.kid());
        }
    }
    let json = doc.to_json().unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["spiffe_sequence"], 42);
    assert_eq!(value["spiffe_refresh_hint"], 60);
    for k in value["keys"].as_array().unwrap() {
        let k = k.as_object().unwrap();
        match k["use"].as_str().unwrap() {
            "x509-svid" => {
                assert!(!k.contains_key("kid"));
                assert_eq!(k["x5c"].as_array().unwrap().len(), 1);
            }
            "jwt-svid" => assert!(k.contains_key("kid") && !k.contains_key("x5c")),
            other => panic!("unexpected use {other}"),
        }
        let allowed = ["use", "kid", "x5c", "kty", "crv", "x", "y", "n", "e"];
        assert!(
            k.keys().all(|m| allowed.contains(&m.as_str())),
            "extra members in {k:?}"
        );
    }
    // Ours -> ours.
    let back = BundleDocument::parse(json.as_bytes()).unwrap();
    assert_eq!(back, doc);
    // Ours -> spiffe crate: same X.509 authorities, same JWT kids and key material.
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let ders: Vec<&[u8]> = back.x509_authorities.iter().map(|a| a.cert_der()).collect();
    let x = spiffe::X509Bundle::from_x509_authorities(td.clone(), &ders).unwrap();
    let got: Vec<Vec<u8>> = x
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let want: Vec<Vec<u8>> = doc
        .x509_authorities
        .iter()
        .map(|a| a.cert_der().to_vec())
        .collect();
    assert_eq!(got, want);
    let jwks = back.jwt_authorities_jwks().unwrap();
    let j = spiffe::JwtBundle::from_jwt_authorities(td, jwks.as_bytes()).unwrap();
    for a in &doc.jwt_authorities {
        let found = j
            .find_jwt_authority(a.kid())
            .unwrap_or_else(|| panic!("kid {} lost", a.kid()));
        // The JWK the spiffe crate holds re-parses to the same public key.
        let single = format!(
            r#"{{"keys":[{}]}}"#,
            String::from_utf8(found.jwk_json().to_vec()).unwrap()
        );
        let reparsed = BundleDocument::parse(single.as_bytes()).unwrap();
        assert_eq!(reparsed.jwt_authorities[0].spki_der(), a.spki_der());
    }
    // PEM output holds every root.
    let pem_text = doc.x509_roots_pem();
    let blocks = pem::parse_many(pem_text).unwrap();
    assert_eq!(blocks.len(), doc.x509_authorities.len());
    assert_eq!(blocks[0].contents(), doc.x509_authorities[0].cert_der());
}

#[test]
fn software_keys_bundle_round_trip() {
    bundle_suite(&SoftwareKeys);
}

#[test]
fn softhsm2_keys_bundle_round_trip() {
    let Some(keys) = SoftHsmKeys::new() else {
        return;
    };
    bundle_suite(&keys);
}

#[test]
fn empty_bundle_keeps_keys_array() {
    let json = BundleDocument::default().to_json().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["keys"].as_array().unwrap().is_empty());
    assert!(v.get("spiffe_refresh_hint").is_none());
}
