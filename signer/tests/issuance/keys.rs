//! The AuthorityKey seam and SoftwareKey: every key type signs, the raw signature verifies, and ECDSA r||s is
//! re-encoded as minimal DER.

use signet::jwt::JwtIssuer;
use signet::keys::{
    AuthorityKey, KeyType, SignatureScheme, SoftwareKey, ecdsa_raw_to_der, verify_signature,
};
use signet::x509::Authority;

use crate::common::*;

#[test]
fn software_keys_sign_and_verify_every_scheme() {
    let cases = [
        (KeyType::EcP256, SignatureScheme::EcdsaP256Sha256, 64),
        (KeyType::EcP384, SignatureScheme::EcdsaP384Sha384, 96),
        (KeyType::Ed25519, SignatureScheme::Ed25519, 64),
        (KeyType::Rsa2048, SignatureScheme::RsaPkcs1Sha256, 256),
        (KeyType::Rsa2048, SignatureScheme::RsaPssSha256, 256),
        (KeyType::Rsa3072, SignatureScheme::RsaPkcs1Sha384, 384),
        (KeyType::Rsa4096, SignatureScheme::RsaPssSha384, 512),
    ];
    for (kt, scheme, len) in cases {
        let key = SoftwareKeys.make(kt).unwrap();
        assert_eq!(key.key_type(), kt);
        let sig = key.sign(scheme, b"message").unwrap();
        assert_eq!(sig.len(), len, "{kt} {scheme:?}");
        verify_signature(key.spki_der(), scheme, b"message", &sig).unwrap();
        assert!(
            verify_signature(key.spki_der(), scheme, b"messagf", &sig).is_err(),
            "{kt}: wrong message verifies"
        );
    }
    // An openssl-made EC key (PKCS#8) loads too, as the same type.
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ec.pem");
    let der = dir.path().join("ec.der");
    run_openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-out",
        pem.to_str().unwrap(),
    ]);
    run_openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        pem.to_str().unwrap(),
        "-outform",
        "DER",
        "-out",
        der.to_str().unwrap(),
    ]);
    let k = SoftwareKey::from_pkcs8(&std::fs::read(der).unwrap()).unwrap();
    assert_eq!(k.key_type(), KeyType::EcP384);
}

#[test]
fn ecdsa_raw_signatures_become_minimal_der() {
    // r with a leading zero byte and s with its high bit set.
    let mut raw = vec![0u8; 64];
    raw[1] = 0x7f;
    raw[31] = 1;
    raw[32] = 0x80;
    raw[63] = 2;
    let der = ecdsa_raw_to_der(&raw).unwrap();
    // SEQUENCE { INTEGER (31 bytes, leading zero dropped), INTEGER (33 bytes, 0x00 pad) }
    assert_eq!(der[0], 0x30);
    assert_eq!(&der[2..4], &[0x02, 31]);
    assert_eq!(der[4], 0x7f);
    assert_eq!(&der[35..38], &[0x02, 33, 0x00]);
    assert_eq!(der[38], 0x80);
    assert_eq!(der.len(), 2 + 2 + 31 + 2 + 33);
    assert!(ecdsa_raw_to_der(&[1, 2, 3]).is_err(), "odd length");
    assert!(ecdsa_raw_to_der(&[]).is_err(), "empty");
}

#[test]
fn issuers_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Authority>();
    assert_send_sync::<JwtIssuer>();
    assert_send_sync::<SoftwareKey>();
}
