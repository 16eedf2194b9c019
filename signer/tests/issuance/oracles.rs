//! More independent verifiers, run over the same chains: Go's crypto/x509 (the parser and chain builder SPIRE and
//! go-spiffe use) and Python cryptography's RFC 5280 client verifier (`support::judges`). A judge that is missing
//! fails these tests under its REQUIRE variable (`scripts/test` sets them) and is skipped loudly otherwise; openssl
//! and the spiffe crate in the other modules are always required. The appliance's own output (from a SoftHSM2
//! token, over gRPC) goes before the same judges in the appliance tests (`appliance/judges.rs`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::PublicKeyData as _;
use signet::keys::{AuthorityKey, KeyType, SoftwareKey};
use signet::spiffe::SpiffeId;
use signet::x509::{Authority, LeafRequest};

use crate::common::*;
use crate::support::judges::{Judge, write_case};

fn leaf_under(a: &Authority, path: &str) -> Vec<u8> {
    let wl = workload_key(KeyType::EcP256);
    let id = SpiffeId::parse(&format!("spiffe://example.org/{path}")).unwrap();
    let req = LeafRequest::from_spki(id, &wl.subject_public_key_info(), Duration::from_secs(300))
        .unwrap();
    a.issue_x509_svid(&req, now()).unwrap().der
}

/// Chains for every authority key type: root -> leaf, and root -> SPIRE CA -> leaf. Returns the key type per case.
fn build_cases(factory: &dyn KeyFactory, dir: &Path) -> Vec<KeyType> {
    let mut kinds = Vec::new();
    for kt in KeyType::ALL {
        let Some(root) = root(factory, kt) else {
            continue;
        };
        let leaf = leaf_under(&root, "direct");
        write_case(dir, kinds.len(), root.roots(), &root.chain(), &leaf);
        kinds.push(kt);

        let (spire_key, pkcs8) = SoftwareKey::generate(KeyType::EcP256).unwrap();
        let kp = rcgen::KeyPair::try_from(pkcs8.0.as_slice()).unwrap();
        let csr_der = csr(&kp, &["spiffe://example.org"], &[], spire_subject());
        let minted = root.mint_spire_ca(&csr_der, 3600, None, now()).unwrap();
        let spire = Authority::new(
            minted.x509_ca_chain[0].clone(),
            Arc::new(spire_key) as Arc<dyn AuthorityKey>,
            td(),
            minted.x509_ca_chain[1..].to_vec(),
            minted.upstream_x509_roots.clone(),
        )
        .unwrap();
        let leaf = leaf_under(&spire, "under-spire");
        write_case(dir, kinds.len(), spire.roots(), &spire.chain(), &leaf);
        kinds.push(kt);
    }
    kinds
}

/// One chain whose leaf was issued by a different root than the one presented: every oracle must refuse it.
fn mismatched_case(dir: &Path) {
    let a = root(&SoftwareKeys, KeyType::EcP256).unwrap();
    let b = root(&SoftwareKeys, KeyType::EcP256).unwrap();
    write_case(dir, 0, a.roots(), &[], &leaf_under(&b, "w"));
}

#[test]
fn go_crypto_x509_accepts_every_chain() {
    if !Judge::Go.available("go_crypto_x509_accepts_every_chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build_cases(&SoftwareKeys, dir.path());
    let (ok, text) = Judge::Go.judge(dir.path());
    assert!(ok, "Go crypto/x509 rejects a chain:\n{text}");
    assert_eq!(
        text.matches("ok case-").count(),
        2 * KeyType::ALL.len(),
        "{text}"
    );
    let bad = tempfile::tempdir().unwrap();
    mismatched_case(bad.path());
    let (ok, text) = Judge::Go.judge(bad.path());
    assert!(
        !ok && text.contains("FAIL"),
        "Go accepted a leaf under the wrong root: {text}"
    );
}

#[test]
fn python_cryptography_accepts_every_chain_it_supports() {
    if !Judge::Python.available("python_cryptography_accepts_every_chain_it_supports") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kinds = build_cases(&SoftwareKeys, dir.path());
    // cryptography's verifier implements the Web PKI's algorithm list, which has no Ed25519: leave those out.
    for (i, kt) in kinds.iter().enumerate() {
        if *kt == KeyType::Ed25519 {
            std::fs::remove_dir_all(dir.path().join(format!("case-{i:02}"))).unwrap();
        }
    }
    let (ok, text) = Judge::Python.judge(dir.path());
    assert!(ok, "Python cryptography rejects a chain:\n{text}");
    assert_eq!(
        text.matches("ok case-").count(),
        2 * (KeyType::ALL.len() - 1),
        "{text}"
    );
    let bad = tempfile::tempdir().unwrap();
    mismatched_case(bad.path());
    let (ok, text) = Judge::Python.judge(bad.path());
    assert!(
        !ok && text.contains("FAIL"),
        "Python accepted a leaf under the wrong root: {text}"
    );
}
