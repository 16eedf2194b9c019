use cryptoki::object::{Attribute, AttributeInfo, AttributeType};
use signet_pkcs11::{ErrorKind, KeyGenOptions, KeyType, SignAlgorithm, Token};

use crate::common::fixture;

#[test]
fn find_by_label_and_id_after_reopening_the_token() {
    let Some(f) = fixture() else { return };
    let (id, spki) = {
        let mut s = f.token.session().unwrap();
        let info = s
            .generate_key("persist", KeyType::EcP256, KeyGenOptions::default())
            .unwrap();
        assert_eq!(info.id.len(), 16);
        (info.id, s.public_key_der("persist").unwrap())
    };
    drop(f.token);
    // A new Token on the same module (the module stays loaded and initialised once per process).
    let token = Token::open(&f.hsm.config()).unwrap();
    let mut s = token.session().unwrap();
    let key = s.find_key("persist").unwrap();
    assert_eq!(key.id(), &id[..]);
    assert_eq!(key.key_type(), KeyType::EcP256);
    assert!(key.public_handle().is_some());
    assert_eq!(s.public_key_der("persist").unwrap(), spki);
    let by_id = s.find_key_by_id(&id).unwrap();
    assert_eq!(by_id.label(), "persist");
    // And after re-opening the session itself.
    s.reopen().unwrap();
    let sig = s
        .sign_by_label("persist", SignAlgorithm::EcdsaSha256, b"x")
        .unwrap();
    assert_eq!(sig.len(), 64);
}

#[test]
fn private_keys_refuse_export_and_have_the_right_attributes() {
    let Some(f) = fixture() else { return };
    let mut s = f.token.session().unwrap();
    for (label, kt) in [("ec", KeyType::EcP256), ("rsa", KeyType::Rsa2048)] {
        s.generate_key(label, kt, KeyGenOptions::default()).unwrap();
        let e = s.export_private_key(label).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Sensitive, "{e}");
        let key = s.find_key(label).unwrap();
        s.with_raw_session(|raw| {
            // C_GetAttributeValue on the secret value is refused.
            let value = if kt == KeyType::EcP256 {
                AttributeType::Value
            } else {
                AttributeType::PrivateExponent
            };
            let info = raw
                .get_attribute_info(key.private_handle(), &[value])
                .unwrap();
            assert!(
                matches!(
                    info[0],
                    AttributeInfo::Sensitive | AttributeInfo::Unavailable
                ),
                "{info:?}"
            );
            let attrs = raw
                .get_attributes(
                    key.private_handle(),
                    &[
                        AttributeType::Token,
                        AttributeType::Private,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::Sign,
                    ],
                )
                .unwrap();
            for a in attrs {
                match a {
                    Attribute::Token(v)
                    | Attribute::Private(v)
                    | Attribute::Sensitive(v)
                    | Attribute::Sign(v) => assert!(v),
                    Attribute::Extractable(v) => assert!(!v),
                    _ => {}
                }
            }
        })
        .unwrap();
    }
}

#[test]
fn duplicate_labels_list_and_destroy() {
    let Some(f) = fixture() else { return };
    let mut s = f.token.session().unwrap();
    let first = s
        .generate_key("dup", KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let e = s
        .generate_key("dup", KeyType::EcP384, KeyGenOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyExists, "{e}");
    let second = s
        .generate_key("dup", KeyType::EcP384, KeyGenOptions { replace: true })
        .unwrap();
    assert_ne!(first.id, second.id);
    assert_eq!(s.find_key("dup").unwrap().key_type(), KeyType::EcP384);
    s.generate_key("other", KeyType::Rsa2048, KeyGenOptions::default())
        .unwrap();

    let keys = s.list_keys().unwrap();
    let labels: Vec<_> = keys
        .iter()
        .map(|k| (k.label.as_str(), k.key_type, k.has_public))
        .collect();
    assert_eq!(
        labels,
        [
            ("dup", Some(KeyType::EcP384), true),
            ("other", Some(KeyType::Rsa2048), true)
        ]
    );

    s.destroy_key("dup").unwrap();
    assert_eq!(
        s.find_key("dup").unwrap_err().kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        s.destroy_key("dup").unwrap_err().kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(s.list_keys().unwrap().len(), 1);
}

#[test]
fn spki_parses_as_x509_public_keys() {
    let Some(f) = fixture() else { return };
    let mut s = f.token.session().unwrap();
    s.generate_key("p256", KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let spki = s.public_key_der("p256").unwrap();
    // 30 59 30 13 06 07 2a8648ce3d0201 06 08 2a8648ce3d030107 03 42 00 04 ...
    assert_eq!(spki.len(), 91);
    assert_eq!(&spki[..2], &[0x30, 0x59]);
    assert_eq!(spki[26], 0x04);
    s.generate_key("rsa", KeyType::Rsa2048, KeyGenOptions::default())
        .unwrap();
    let spki = s.public_key_der("rsa").unwrap();
    assert_eq!(&spki[..4], &[0x30, 0x82, 0x01, 0x22]); // the classic 294-byte RSA-2048 SPKI
}
