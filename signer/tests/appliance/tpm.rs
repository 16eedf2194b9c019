//! End-to-end issuance with a TPM 2.0 token (swtpm + tpm2-abrmd + tpm2-pkcs11, started by `scripts/tpm-rig`): the
//! appliance on the TPM with a P-256 root and with an RSA-2048 root, in direct and delegated mode, issuing
//! X509-SVIDs from CSRs and JWT-SVIDs over gRPC, each verified by `openssl verify -x509_strict` and the `spiffe`
//! crate. Without a rig the test prints SKIP (it fails instead when `SIGNET_REQUIRE_TPM` is set, as the test
//! script does). The TPM signs about 100-200 times a second and serialises everything: the counts stay small. A timed
//! batch of 40 prints what each mode sustains (`-- --nocapture`).

use signet::config::{KeyTypeSetting, ModeSetting};
use signet::spiffe::BundleDocument;
use signet_pkcs11::testing::{TokenBed as _, Tpm};
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use spiffe::{JwtBundle, JwtBundleSet, JwtSvid};

use crate::support::bed::*;
use crate::support::openssl_verify;

async fn issue_and_verify(tpm: &Tpm, key_type: KeyTypeSetting, mode: ModeSetting) {
    let prefix = format!("{}{key_type:?}-{mode:?}-", tpm.key_prefix());
    let (module, label) = (tpm.module().to_path_buf(), tpm.label().to_string());
    let pin = std::env::var("TPM_RIG_USER_PIN").unwrap();
    let bed = Bed::start_on(Box::new(tpm.clone()), |dir| {
        let mut cfg = config_on("tpm", &module, &label, &pin, dir);
        cfg.authority.x509.key_type = key_type;
        cfg.authority.x509.mode = mode;
        cfg.authority.x509.key_label = format!("{prefix}root");
        cfg.authority.jwt.key_type = key_type;
        cfg.authority.jwt.key_label = format!("{prefix}jwt");
        cfg
    })
    .await;
    let what = format!("TPM, {key_type:?} root, {mode:?} mode");
    let mut c = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    let roots = bed.app.bundle().current().x509_roots.clone();
    assert_eq!(roots.len(), 1, "{what}: one root");

    // X509-SVIDs from CSRs, in one batch.
    let ids: Vec<String> = (0..3)
        .map(|i| format!("spiffe://example.org/workloads/tpm-{i}"))
        .collect();
    let mut keys = Vec::new();
    let mut requests = Vec::new();
    for id in &ids {
        let (csr, kp) = csr_for(id);
        keys.push(kp);
        requests.push(pb::X509svidRequest {
            csr,
            ttl_seconds: 600,
        });
    }
    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest { requests })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), ids.len());
    for ((result, id), kp) in r.results.into_iter().zip(&ids).zip(&keys) {
        let svid = expect_svid(result);
        assert_eq!(&svid.spiffe_id, id);
        let expected_chain = match mode {
            ModeSetting::Delegated => 2,
            _ => 1,
        };
        assert_eq!(
            svid.cert_chain.len(),
            expected_chain,
            "{what}: chain length"
        );
        openssl_verify(&roots, &svid.cert_chain[1..], &svid.cert_chain[0])
            .unwrap_or_else(|e| panic!("{what}: openssl rejects the SVID: {e}"));
        let parsed =
            spiffe::X509Svid::parse_from_der(&svid.cert_chain.concat(), &kp.serialize_der())
                .unwrap_or_else(|e| panic!("{what}: the spiffe crate rejects the SVID: {e}"));
        assert_eq!(&parsed.spiffe_id().to_string(), id);
        // The chain ends at the token's root: its key type is the one asked for.
        let (_, root) = x509_parser::parse_x509_certificate(&roots[0]).unwrap();
        let alg = root.public_key().algorithm.algorithm.to_id_string();
        let want = match key_type {
            KeyTypeSetting::EcP256 => "1.2.840.10045.2.1",
            _ => "1.2.840.113549.1.1.1",
        };
        assert_eq!(alg, want, "{what}: root key algorithm");
    }

    // A timed batch (printed, not asserted): what direct mode costs on a TPM.
    let (csr, _) = csr_for("spiffe://example.org/workloads/tpm-timed");
    let n = 40;
    let started = std::time::Instant::now();
    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![
                pb::X509svidRequest {
                    csr,
                    ttl_seconds: 600
                };
                n
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let secs = started.elapsed().as_secs_f64();
    for result in r.results {
        expect_svid(result);
    }
    println!(
        "{what}: a batch of {n} X509-SVIDs in {:.0} ms = {:.0}/s",
        secs * 1000.0,
        n as f64 / secs
    );

    // JWT-SVIDs, verified against the served bundle.
    let bundle = c
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let doc = BundleDocument::parse(&bundle.spiffe_bundle).unwrap();
    let mut set = JwtBundleSet::new();
    set.add_bundle(
        JwtBundle::from_jwt_authorities(
            spiffe::TrustDomain::new(TD).unwrap(),
            doc.jwt_authorities_jwks().unwrap().as_bytes(),
        )
        .unwrap(),
    );
    for i in 0..2 {
        let id = format!("spiffe://example.org/workloads/tpm-jwt-{i}");
        let minted = c
            .mint_jwtsvid(pb::MintJwtsvidRequest {
                spiffe_id: id.clone(),
                audience: vec!["tpm".into()],
                ttl_seconds: 300,
            })
            .await
            .unwrap()
            .into_inner();
        let svid = JwtSvid::parse_and_validate(&minted.token, &set, &["tpm"])
            .unwrap_or_else(|e| panic!("{what}: the spiffe crate rejects the JWT-SVID: {e}"));
        assert_eq!(svid.spiffe_id().to_string(), id);
        let header = minted.token.split('.').next().unwrap();
        let header: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                .unwrap(),
        )
        .unwrap();
        let alg = match key_type {
            KeyTypeSetting::EcP256 => "ES256",
            _ => "RS256",
        };
        assert_eq!(header["alg"], alg, "{what}: JWS algorithm");
    }
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_issues_verifiable_svids_p256_and_rsa2048_direct_and_delegated() {
    let Some(tpm) =
        Tpm::from_env("tpm_issues_verifiable_svids_p256_and_rsa2048_direct_and_delegated")
    else {
        return;
    };
    for key_type in [KeyTypeSetting::EcP256, KeyTypeSetting::Rsa2048] {
        for mode in [ModeSetting::Direct, ModeSetting::Delegated] {
            issue_and_verify(&tpm, key_type, mode).await;
        }
    }
}
