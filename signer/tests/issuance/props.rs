//! Property tests: the CSR, SPIFFE ID and bundle parsers never panic, on random bytes or near-valid inputs.

use proptest::prelude::*;
use signet::keys::KeyType;
use signet::spiffe::{BundleDocument, SpiffeId};
use signet::x509::parse_and_verify_csr;

use crate::common::*;

fn sample_csr() -> &'static [u8] {
    static CSR: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    CSR.get_or_init(|| {
        csr(
            &workload_key(KeyType::EcP256),
            &["spiffe://example.org/w"],
            &["a.example.org"],
            spire_subject(),
        )
    })
}

fn sample_bundle() -> &'static str {
    static B: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let root = root(&SoftwareKeys, KeyType::EcP256).unwrap();
        let doc = BundleDocument {
            sequence: 7,
            refresh_hint_secs: Some(5),
            x509_authorities: vec![
                signet::spiffe::X509Authority::new(root.cert_der().to_vec()).unwrap(),
            ],
            jwt_authorities: vec![],
        };
        doc.to_json().unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn csr_parser_survives_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_and_verify_csr(&bytes);
    }

    #[test]
    fn csr_parser_survives_mutations(pos in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut der = sample_csr().to_vec();
        let i = pos.index(der.len());
        der[i] = val;
        let _ = parse_and_verify_csr(&der);
        let _ = parse_and_verify_csr(&der[..cut.index(der.len())]);
    }

    #[test]
    fn spiffe_id_parser_survives_anything(s in ".{0,300}") {
        let _ = SpiffeId::parse(&s);
    }

    #[test]
    fn spiffe_id_parser_agrees_on_near_valid(td in "[a-zA-Z0-9.\\-_:@%]{0,20}", path in "(/[a-zA-Z0-9.\\-_%?#]{0,6}){0,4}/?") {
        let s = format!("spiffe://{td}{path}");
        if let Ok(id) = SpiffeId::parse(&s) {
            // Whatever we accept, the spiffe crate accepts too, and round-trips.
            prop_assert_eq!(id.as_str(), s.as_str());
            prop_assert!(spiffe::SpiffeId::new(&s).is_ok(), "spiffe crate rejects {}", s);
        }
    }

    #[test]
    fn bundle_parser_survives_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = BundleDocument::parse(&bytes);
    }

    #[test]
    fn bundle_parser_survives_mutations(pos in any::<prop::sample::Index>(), c in any::<char>()) {
        let mut s: Vec<char> = sample_bundle().chars().collect();
        let i = pos.index(s.len());
        s[i] = c;
        let s: String = s.into_iter().collect();
        let _ = BundleDocument::parse(s.as_bytes());
    }
}
