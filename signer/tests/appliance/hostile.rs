//! Hostile callers over the real wire (gRPC + mTLS on 127.0.0.1, the appliance on SoftHSM2): forged and malformed
//! CSRs, SPIFFE IDs that break SPIFFE-ID §2, TTLs out of range, JWT audiences, KeyManager and UpstreamAuthority
//! abuse, oversize batches, and callers that must not act on signet.
//!
//! Every case is a row of a table: who calls, what it sends, the status code it must get and a telling part of the
//! message. [`run`] plays each row and checks, besides the answer, that nothing was issued or changed (no audit line
//! with outcome `issued`, `key_used`, `published` or `rotated`, the same bundle sequence) and that the refusal left
//! exactly one audit line: outcome `refused`, the code, the caller (empty when unauthenticated), the method, the
//! reason, and the SPIFFE ID or key id it was about. Rows call as callers of their own (a SPIFFE ID per row), so they
//! do not share rate limits or keys; every row runs even when one fails, and the failures are listed together.
//!
//! What [`bad_input`](super::bad_input) already checks for its status only (a CSR that is not DER, an empty batch,
//! a CSR without a URI SAN, a 10,000-CSR batch) is checked here again with the message, the audit line and the
//! proof that nothing was issued.

use std::collections::HashSet;
use std::time::Duration;

use signet::config::{ConfigDuration, PolicyRule};
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::bed::*;
use crate::support::pem_chain;

/// Callers under this prefix may use every service, for `workloads/` and `web` IDs, X509-SVIDs up to
/// [`X509_MAX`] and JWT-SVIDs up to [`JWT_MAX`].
const HOSTILE: &str = "spiffe://example.org/hostile/";
/// Callers under this prefix may use the Issuer only.
const ISSUER_ONLY: &str = "spiffe://example.org/hostile-issuer/";
/// Callers under this prefix may use the UpstreamAuthority and the KeyManager only (as a SPIRE server).
const SPIRE_ONLY: &str = "spiffe://example.org/hostile-spire/";
/// No rule names callers under this prefix.
const STRANGER: &str = "spiffe://example.org/stranger/";
const X509_MAX: i64 = 3600;
const JWT_MAX: i64 = 600;
const TD_ID: &str = "spiffe://example.org";

fn rule(caller: &str, may: &[&str], ids: &[&str]) -> PolicyRule {
    PolicyRule {
        caller: format!("{caller}*"),
        may: may.iter().map(|s| s.to_string()).collect(),
        ids: ids.iter().map(|s| s.to_string()).collect(),
        max_ttl: Some(ConfigDuration(Duration::from_secs(X509_MAX as u64))),
        jwt_max_ttl: Some(ConfigDuration(Duration::from_secs(JWT_MAX as u64))),
        rate: None,
        burst: None,
        downstream_credentials: false,
        spire_ca_path_len: None,
    }
}

/// The common bed with the hostile callers' rules added, in direct or delegated mode.
async fn bed(delegated: bool) -> Option<Bed> {
    Bed::start_with(|c| {
        if delegated {
            c.authority.x509.mode = signet::config::ModeSetting::Delegated;
        }
        let all = ["issuer", "admin", "upstream-authority", "key-manager"];
        c.policy.push(rule(
            HOSTILE,
            &all,
            &[
                "spiffe://example.org/workloads/",
                "spiffe://example.org/web",
            ],
        ));
        c.policy
            .push(rule(ISSUER_ONLY, &["issuer"], &["spiffe://example.org/"]));
        c.policy.push(rule(
            SPIRE_ONLY,
            &["upstream-authority", "key-manager"],
            &[],
        ));
    })
    .await
}

/// Who calls.
enum By {
    /// An X509-SVID that signet issued for this SPIFFE ID.
    Svid(String),
    /// A certificate for this SPIFFE ID signed by a SPIRE server under the CA signet minted for it (MintX509CA).
    SpireCa(String),
}

impl By {
    /// The caller the audit line names.
    fn audited(&self) -> &str {
        match self {
            // A credential a SPIRE CA signed is authenticated (it chains to the roots), then refused a role.
            By::Svid(id) | By::SpireCa(id) => id,
        }
    }
}

/// A caller of the hostile rule, of its own for the case `name`.
fn me(name: &str) -> By {
    By::Svid(format!("{HOSTILE}{name}"))
}

/// What is sent.
enum Call {
    Batch(Vec<pb::X509svidRequest>),
    Jwt(pb::MintJwtsvidRequest),
    GenerateKey(km::GenerateKeyRequest),
    /// SignData; with `own_key`, the caller first generates an EC P-256 key of that id (before the counts).
    SignData {
        req: km::SignDataRequest,
        own_key: bool,
    },
    MintCa(ua::MintX509caRequest),
    Status,
    Rotate(pb::RotateRequest),
}

impl Call {
    fn method(&self) -> &'static str {
        match self {
            Call::Batch(_) => "BatchMintX509SVID",
            Call::Jwt(_) => "MintJWTSVID",
            Call::GenerateKey(_) => "GenerateKey",
            Call::SignData { .. } => "SignData",
            Call::MintCa(_) => "MintX509CAAndSubscribe",
            Call::Status => "GetStatus",
            Call::Rotate(_) => "Rotate",
        }
    }
}

struct Case {
    name: String,
    by: By,
    call: Call,
    code: Code,
    says: &'static str,
    /// The audit line's `spiffe_id` or `key_id` (field, value); `None`: not checked.
    about: Option<(&'static str, String)>,
}

fn case(name: impl Into<String>, by: By, call: Call, code: Code, says: &'static str) -> Case {
    Case {
        name: name.into(),
        by,
        call,
        code,
        says,
        about: None,
    }
}

impl Case {
    fn about_id(mut self, id: &str) -> Self {
        self.about = Some(("spiffe_id", id.to_string()));
        self
    }
    fn about_key(mut self, id: &str) -> Self {
        self.about = Some(("key_id", id.to_string()));
        self
    }
}

fn x509(csr: Vec<u8>, ttl_seconds: i64) -> Call {
    Call::Batch(vec![pb::X509svidRequest { csr, ttl_seconds }])
}

fn jwt(id: &str, audience: &[&str], ttl_seconds: i64) -> Call {
    Call::Jwt(pb::MintJwtsvidRequest {
        spiffe_id: id.into(),
        audience: audience.iter().map(|s| s.to_string()).collect(),
        ttl_seconds,
    })
}

/// A CSR (empty subject, P-256) with these SANs.
fn csr_with(sans: Vec<rcgen::SanType>) -> Vec<u8> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(&kp).unwrap().der().to_vec()
}

fn uri(s: &str) -> rcgen::SanType {
    rcgen::SanType::URI(s.to_string().try_into().unwrap())
}

/// A CSR for `id` (whatever it holds: rcgen checks only that it is ASCII).
fn csr_of(id: &str) -> Vec<u8> {
    csr_with(vec![uri(id)])
}

/// A SPIRE server's CA CSR (subject O=SPIFFE) with the URI SAN `id`.
fn ca_csr(id: &str) -> (Vec<u8>, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "SPIFFE");
    params.subject_alt_names = vec![uri(id)];
    (params.serialize_request(&kp).unwrap().der().to_vec(), kp)
}

/// `csr` with the last byte of its signature flipped. A PKCS#10 request ends with its signature BIT STRING, so the
/// last byte is the signature's (for ECDSA, the last byte of `s`): the request still parses, its proof of
/// possession fails.
fn bad_signature(mut csr: Vec<u8>) -> Vec<u8> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer as _;
    let (_, parsed) = X509CertificationRequest::from_der(&csr).unwrap();
    assert!(
        parsed.signature_value.data.len() > 8,
        "a CSR with a signature"
    );
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    csr
}

/// A client credential for `by`.
async fn credential(bed: &Bed, by: &By) -> Option<Credential> {
    match by {
        By::Svid(id) => Some(bed.credential_for(id).await),
        By::SpireCa(id) => {
            // A SPIRE server gets its CA from signet, then signs what it likes under it.
            let spire = bed.credential_for(SPIRE_A).await;
            let mut u = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
            let (csr, key) = ca_csr(TD_ID);
            let mut s = u
                .mint_x509ca_and_subscribe(ua::MintX509caRequest {
                    csr,
                    preferred_ttl: 3600,
                })
                .await
                .unwrap()
                .into_inner();
            let first = next(&mut s).await;
            let ca = first.x509_ca_chain[0].asn1.clone();
            let issuer = rcgen::Issuer::from_ca_cert_der(&ca.clone().into(), key).unwrap();
            Some(client_cert_under(&issuer, id, Some(&ca)))
        }
    }
}

/// A client X509-SVID for `id` signed by `issuer`, with `ca` appended to the chain.
fn client_cert_under(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    id: &str,
    ca: Option<&[u8]>,
) -> Credential {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![uri(id)];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let leaf = p.signed_by(&kp, issuer).unwrap();
    let mut chain_pem = leaf.pem();
    if let Some(ca) = ca {
        chain_pem.push_str(&pem_chain(&[ca.to_vec()]));
    }
    Credential {
        chain_pem,
        key_pem: kp.serialize_pem(),
    }
}

/// Audit lines that record a change: something issued, a key used or made, a key published, a rotation step.
fn changes(audit: &[serde_json::Value]) -> usize {
    audit
        .iter()
        .filter(|l| {
            matches!(
                l["outcome"].as_str(),
                Some("issued" | "key_used" | "published" | "rotated")
            )
        })
        .count()
}

/// Sends `call` and returns the refusal's code and message: the RPC's status, or the failure of the one CSR of a
/// batch. Anything issued is an error.
async fn answer(ch: Channel, call: Call) -> Result<(Code, String), String> {
    let refused = |s: tonic::Status| (s.code(), s.message().to_string());
    Ok(match call {
        Call::Batch(requests) => {
            let n = requests.len();
            match IssuerClient::new(ch)
                .batch_mint_x509svid(pb::BatchMintX509svidRequest { requests })
                .await
            {
                Err(s) => refused(s),
                Ok(r) => {
                    let results = r.into_inner().results;
                    if results.len() != 1 || n != 1 {
                        return Err(format!(
                            "{} results for {n} CSRs: {results:?}",
                            results.len()
                        ));
                    }
                    match &results[0].result {
                        Some(pb::x509svid_result::Result::Failure(f)) => {
                            (Code::from_i32(f.code), f.message.clone())
                        }
                        other => return Err(format!("issued: {other:?}")),
                    }
                }
            }
        }
        Call::Jwt(req) => match IssuerClient::new(ch).mint_jwtsvid(req).await {
            Err(s) => refused(s),
            Ok(r) => return Err(format!("a JWT-SVID was issued: {:?}", r.into_inner())),
        },
        Call::GenerateKey(req) => match KeyManagerClient::new(ch).generate_key(req).await {
            Err(s) => refused(s),
            Ok(r) => return Err(format!("a key was generated: {:?}", r.into_inner())),
        },
        Call::SignData { req, .. } => match KeyManagerClient::new(ch).sign_data(req).await {
            Err(s) => refused(s),
            Ok(r) => return Err(format!("data was signed: {:?}", r.into_inner())),
        },
        Call::MintCa(req) => match UpstreamAuthorityClient::new(ch)
            .mint_x509ca_and_subscribe(req)
            .await
        {
            Err(s) => refused(s),
            Ok(_) => return Err("a CA was minted".into()),
        },
        Call::Status => match AdminClient::new(ch)
            .get_status(pb::GetStatusRequest {})
            .await
        {
            Err(s) => refused(s),
            Ok(_) => return Err("the status was answered".into()),
        },
        Call::Rotate(req) => match AdminClient::new(ch).rotate(req).await {
            Err(s) => refused(s),
            Ok(_) => return Err("a rotation step ran".into()),
        },
    })
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

/// Plays one case on `bed`.
async fn run_one(bed: &Bed, c: Case) -> Result<(), String> {
    let cred = credential(bed, &c.by).await;
    let ch = bed.channel(cred.as_ref()).await;
    if let Call::SignData { req, own_key: true } = &c.call {
        KeyManagerClient::new(ch.clone())
            .generate_key(km::GenerateKeyRequest {
                key_id: req.key_id.clone(),
                key_type: km::KeyType::EcP256 as i32,
            })
            .await
            .map_err(|e| format!("set-up GenerateKey: {e:?}"))?;
    }
    let method = c.call.method();
    let before = bed.audit();
    let sequence = bed.app.bundle().current().sequence;

    let (code, message) = answer(ch, c.call).await?;

    ensure(code == c.code, || {
        format!("status {code:?} ({message}), expected {:?}", c.code)
    })?;
    ensure(message.contains(c.says), || {
        format!("message {message:?} does not say {:?}", c.says)
    })?;
    let after = bed.audit();
    ensure(changes(&after) == changes(&before), || {
        format!(
            "something was issued or changed: {:?}",
            &after[before.len()..]
        )
    })?;
    ensure(bed.app.bundle().current().sequence == sequence, || {
        "the bundle changed".into()
    })?;
    let new = &after[before.len()..];
    ensure(new.len() == 1, || {
        format!("expected one audit line, got {new:?}")
    })?;
    let l = &new[0];
    let code_name = signet::api::code_name(c.code);
    ensure(
        l["outcome"] == "refused"
            && l["code"] == code_name
            && l["caller"] == c.by.audited()
            && l["method"] == method
            && l["reason"].as_str().is_some_and(|r| r.contains(c.says)),
        || {
            format!(
                "audit line {l} is not: refused, {code_name}, caller {:?}, {method}, reason saying {:?}",
                c.by.audited(),
                c.says
            )
        },
    )?;
    if let Some((field, value)) = &c.about {
        ensure(l[*field] == value.as_str(), || {
            format!("audit line {l}: {field} is not {value:?}")
        })?;
    }
    Ok(())
}

/// Plays every case and fails with the list of those that failed.
async fn run(bed: &Bed, cases: Vec<Case>) {
    let mut names = HashSet::new();
    let mut failed = Vec::new();
    let total = cases.len();
    for c in cases {
        assert!(
            names.insert(c.name.clone()),
            "two cases are named {}",
            c.name
        );
        let name = c.name.clone();
        if let Err(e) = run_one(bed, c).await {
            failed.push(format!("  {name}: {e}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {total} hostile cases failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_csrs_are_refused_by_the_rule_they_break() {
    let Some(bed) = bed(false).await else {
        return;
    };
    let w = |n: &str| format!("spiffe://example.org/workloads/{n}");
    let (good, _) = csr_for(&w("bad-sig"));
    let mut trailing = csr_of(&w("trailing"));
    trailing.push(0);
    let cases = vec![
        case(
            "csr-bad-signature",
            me("csr-bad-signature"),
            x509(bad_signature(good), 60),
            Code::InvalidArgument,
            "CSR signature does not verify against its own public key",
        )
        .about_id(&w("bad-sig")),
        case(
            "csr-two-spiffe-uri-sans",
            me("csr-two-spiffe-uri-sans"),
            x509(csr_with(vec![uri(&w("one")), uri(&w("two"))]), 60),
            Code::InvalidArgument,
            "CSR requests 2 URI SANs: an X509-SVID carries exactly one",
        ),
        case(
            "csr-spiffe-and-https-uri-sans",
            me("csr-spiffe-and-https-uri-sans"),
            x509(
                csr_with(vec![uri(&w("three")), uri("https://example.org/x")]),
                60,
            ),
            Code::InvalidArgument,
            "CSR requests 2 URI SANs",
        ),
        case(
            "csr-https-uri-san",
            me("csr-https-uri-san"),
            x509(csr_of("https://example.org/workloads/x"), 60),
            Code::InvalidArgument,
            "is not a SPIFFE ID",
        ),
        case(
            "csr-no-uri-san",
            me("csr-no-uri-san"),
            x509(
                csr_with(vec![rcgen::SanType::DnsName(
                    "a.example.org".try_into().unwrap(),
                )]),
                60,
            ),
            Code::InvalidArgument,
            "the CSR has no URI SAN",
        ),
        case(
            "csr-no-san-at-all",
            me("csr-no-san-at-all"),
            x509(csr_with(vec![]), 60),
            Code::InvalidArgument,
            "the CSR has no URI SAN",
        ),
        case(
            "csr-email-san",
            me("csr-email-san"),
            x509(
                csr_with(vec![
                    uri(&w("mail")),
                    rcgen::SanType::Rfc822Name("a@example.org".try_into().unwrap()),
                ]),
                60,
            ),
            Code::InvalidArgument,
            "CSR requests a email SAN",
        ),
        case(
            "csr-trailing-bytes",
            me("csr-trailing-bytes"),
            x509(trailing, 60),
            Code::InvalidArgument,
            "trailing bytes",
        ),
        case(
            "csr-not-der",
            me("csr-not-der"),
            x509(b"-----BEGIN CERTIFICATE REQUEST-----".to_vec(), 60),
            Code::InvalidArgument,
            "not a valid DER PKCS#10 request",
        ),
    ];
    run(&bed, cases).await;
    bed.assert_serving().await;
    bed.stop().await;
}

/// SPIFFE IDs that break SPIFFE-ID §2, asked for in a CSR (X509-SVID) and as a JWT-SVID subject.
fn bad_ids() -> Vec<(&'static str, String, Code, &'static str)> {
    let ia = Code::InvalidArgument;
    let long = format!("spiffe://example.org/workloads/{}", "a".repeat(2100));
    vec![
        (
            "uppercase-trust-domain",
            "spiffe://EXAMPLE.org/workloads/u".into(),
            ia,
            "trust domains are lowercase only",
        ),
        (
            "percent-2e",
            "spiffe://example.org/workloads/%2e%2e/x".into(),
            ia,
            "percent-encoding",
        ),
        (
            "percent-2f",
            "spiffe://example.org/workloads%2Fx".into(),
            ia,
            "percent-encoding",
        ),
        (
            "dot-segment",
            "spiffe://example.org/workloads/./x".into(),
            ia,
            "dot segments are not allowed",
        ),
        (
            "dot-dot-segment",
            "spiffe://example.org/workloads/../signet/admin".into(),
            ia,
            "dot segments are not allowed",
        ),
        (
            "empty-segment",
            "spiffe://example.org/workloads//x".into(),
            ia,
            "empty segment",
        ),
        (
            "trailing-slash",
            "spiffe://example.org/workloads/x/".into(),
            ia,
            "trailing slashes are not allowed",
        ),
        (
            "query",
            "spiffe://example.org/workloads/x?admin=1".into(),
            ia,
            "SPIFFE IDs carry no query",
        ),
        (
            "fragment",
            "spiffe://example.org/workloads/x#admin".into(),
            ia,
            "SPIFFE IDs carry no fragment",
        ),
        (
            "port",
            "spiffe://example.org:8443/workloads/x".into(),
            ia,
            "SPIFFE IDs carry no port",
        ),
        (
            "userinfo",
            "spiffe://admin@example.org/workloads/x".into(),
            ia,
            "SPIFFE IDs carry no userinfo",
        ),
        ("over-long", long, ia, "at most 2048 bytes are allowed"),
        (
            "foreign-trust-domain",
            "spiffe://other.org/workloads/x".into(),
            ia,
            "is in trust domain \"other.org\", expected \"example.org\"",
        ),
        (
            "bare-trust-domain",
            TD_ID.into(),
            ia,
            "expected a workload SPIFFE ID with a path",
        ),
        (
            "outside-prefixes",
            "spiffe://example.org/agents/a".into(),
            Code::PermissionDenied,
            "may not request spiffe://example.org/agents/a",
        ),
        (
            "signets-own-admin-id",
            ADMIN.into(),
            Code::PermissionDenied,
            "is reserved for signet's own credentials",
        ),
        (
            "prefix-boundary",
            "spiffe://example.org/webmail/x".into(),
            Code::PermissionDenied,
            "may not request spiffe://example.org/webmail/x",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_spiffe_ids_are_refused_for_x509_and_jwt() {
    let Some(bed) = bed(false).await else {
        return;
    };
    let mut cases = Vec::new();
    for (name, id, code, says) in bad_ids() {
        let (x, j) = (format!("x509-{name}"), format!("jwt-{name}"));
        let mut xc = case(&x, me(&x), x509(csr_of(&id), 60), code, says);
        // An ID that parses is named on the audit line; one that does not is not an ID to name.
        if code == Code::PermissionDenied {
            xc = xc.about_id(&id);
        }
        cases.push(xc);
        cases.push(case(&j, me(&j), jwt(&id, &["db"], 60), code, says).about_id(&id));
    }
    run(&bed, cases).await;
    bed.assert_serving().await;
    bed.stop().await;
}

/// TTLs out of range; the same answers in direct and delegated mode. Negative TTLs are INVALID_ARGUMENT. (A TTL
/// beyond the caller's policy maximum, i64::MAX included, is cut to the maximum, which `ttl.rs` checks.)
fn ttl_cases(mode: &str) -> Vec<Case> {
    let w = |n: &str| format!("spiffe://example.org/workloads/ttl-{mode}-{n}");
    let name = |n: &str| format!("{mode}-{n}");
    let mut cases = Vec::new();
    for (n, ttl, code, says) in [
        (
            "x509-ttl-minus-one",
            -1,
            Code::InvalidArgument,
            "is negative",
        ),
        (
            "x509-ttl-i64-min",
            i64::MIN,
            Code::InvalidArgument,
            "is negative",
        ),
    ] {
        let n = name(n);
        cases.push(case(&n, me(&n), x509(csr_of(&w(&n)), ttl), code, says).about_id(&w(&n)));
    }
    for (n, ttl, code, says) in [
        (
            "jwt-ttl-minus-one",
            -1,
            Code::InvalidArgument,
            "is negative",
        ),
        (
            "jwt-ttl-i64-min",
            i64::MIN,
            Code::InvalidArgument,
            "is negative",
        ),
    ] {
        let n = name(n);
        cases.push(case(&n, me(&n), jwt(&w(&n), &["db"], ttl), code, says).about_id(&w(&n)));
    }
    let n = name("mint-ca-negative-preferred-ttl");
    cases.push(
        case(
            &n,
            me(&n),
            Call::MintCa(ua::MintX509caRequest {
                csr: ca_csr(TD_ID).0,
                preferred_ttl: -1,
            }),
            Code::InvalidArgument,
            "preferred_ttl -1 is negative",
        )
        .about_id(TD_ID),
    );
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ttls_direct_mode() {
    let Some(bed) = bed(false).await else {
        return;
    };
    run(&bed, ttl_cases("direct")).await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ttls_delegated_mode() {
    let Some(bed) = bed(true).await else {
        return;
    };
    run(&bed, ttl_cases("delegated")).await;
    // The current rule where the modes differ: within the policy but beyond the issuing intermediate's remaining life
    // (4 h by default), delegated mode caps the leaf at the intermediate's NotAfter (direct mode issues it whole, as
    // its root outlives any policy maximum).
    let mut c = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    let (csr, _) = csr_for("spiffe://example.org/workloads/ttl-delegated-cap");
    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![pb::X509svidRequest {
                csr,
                ttl_seconds: 20 * 3600,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let svid = expect_svid(r.results[0].clone());
    let (_, inter) = x509_parser::parse_x509_certificate(&svid.cert_chain[1]).unwrap();
    let inter_end = inter.validity().not_after.timestamp();
    assert!(
        svid.expires_at <= inter_end && svid.expires_at > inter_end - 60,
        "current rule: capped at the issuing intermediate ({} against {inter_end})",
        svid.expires_at
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_jwt_audiences_are_refused() {
    let Some(bed) = bed(false).await else {
        return;
    };
    let w = |n: &str| format!("spiffe://example.org/workloads/aud-{n}");
    let many: Vec<String> = (0..100_000).map(|i| format!("aud-{i}")).collect();
    let huge = "a".repeat(1 << 20);
    let aud = |n: &str, audience: Vec<String>| {
        Call::Jwt(pb::MintJwtsvidRequest {
            spiffe_id: w(n),
            audience,
            ttl_seconds: 60,
        })
    };
    let cases = vec![
        case(
            "jwt-no-audience",
            me("jwt-no-audience"),
            aud("none", vec![]),
            Code::InvalidArgument,
            "give at least one audience",
        )
        .about_id(&w("none")),
        case(
            "jwt-empty-audience",
            me("jwt-empty-audience"),
            aud("empty", vec![String::new()]),
            Code::InvalidArgument,
            "none empty",
        )
        .about_id(&w("empty")),
        case(
            "jwt-one-empty-audience-among-others",
            me("jwt-one-empty-audience-among-others"),
            aud("among", vec!["db".into(), String::new()]),
            Code::InvalidArgument,
            "none empty",
        )
        .about_id(&w("among")),
        case(
            "jwt-100000-audiences",
            me("jwt-100000-audiences"),
            aud("many", many),
            Code::InvalidArgument,
            "audience values",
        )
        .about_id(&w("many")),
        case(
            "jwt-one-mebibyte-audience",
            me("jwt-one-mebibyte-audience"),
            aud("huge", vec![huge]),
            Code::InvalidArgument,
            "bytes of audience",
        )
        .about_id(&w("huge")),
    ];
    run(&bed, cases).await;
    bed.assert_serving().await;
    bed.stop().await;
}

fn sign(key_id: &str, data: Vec<u8>, own_key: bool) -> Call {
    Call::SignData {
        req: km::SignDataRequest {
            key_id: key_id.into(),
            data,
            signer_opts: Some(km::sign_data_request::SignerOpts::HashAlgorithm(
                km::HashAlgorithm::Sha256 as i32,
            )),
        },
        own_key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_key_manager_requests_are_refused() {
    let Some(bed) = bed(false).await else {
        return;
    };
    let cases = vec![
        case(
            "km-unknown-key-type-99",
            me("km-unknown-key-type-99"),
            Call::GenerateKey(km::GenerateKeyRequest {
                key_id: "k99".into(),
                key_type: 99,
            }),
            Code::InvalidArgument,
            "unknown key type 99",
        )
        .about_key("k99"),
        case(
            "km-negative-key-type",
            me("km-negative-key-type"),
            Call::GenerateKey(km::GenerateKeyRequest {
                key_id: "kneg".into(),
                key_type: -1,
            }),
            Code::InvalidArgument,
            "unknown key type -1",
        )
        .about_key("kneg"),
        case(
            "km-key-id-with-slashes",
            me("km-key-id-with-slashes"),
            Call::GenerateKey(km::GenerateKeyRequest {
                key_id: "../other/x509-CA-A".into(),
                key_type: km::KeyType::EcP256 as i32,
            }),
            Code::InvalidArgument,
            "key_id must be 1 to 128 characters",
        )
        .about_key("../other/x509-CA-A"),
        case(
            "km-sign-unknown-key",
            me("km-sign-unknown-key"),
            sign("never-generated", vec![0; 32], false),
            Code::NotFound,
            "no key \"never-generated\" for this caller",
        )
        .about_key("never-generated"),
        case(
            "km-sign-empty-digest",
            me("km-sign-empty-digest"),
            sign("k-empty", vec![], true),
            Code::InvalidArgument,
            "data must be a 32-byte digest of the named hash, got 0 bytes",
        )
        .about_key("k-empty"),
        case(
            "km-sign-33-byte-digest",
            me("km-sign-33-byte-digest"),
            sign("k-33", vec![7; 33], true),
            Code::InvalidArgument,
            "data must be a 32-byte digest of the named hash, got 33 bytes",
        )
        .about_key("k-33"),
        case(
            "km-sign-without-signer-opts",
            me("km-sign-without-signer-opts"),
            Call::SignData {
                req: km::SignDataRequest {
                    key_id: "k-noopts".into(),
                    data: vec![1; 32],
                    signer_opts: None,
                },
                own_key: true,
            },
            Code::InvalidArgument,
            "signer_opts is required",
        )
        .about_key("k-noopts"),
    ];
    run(&bed, cases).await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_upstream_authority_requests_are_refused() {
    let Some(bed) = bed(false).await else {
        return;
    };
    let mint = |csr: Vec<u8>| {
        Call::MintCa(ua::MintX509caRequest {
            csr,
            preferred_ttl: 0,
        })
    };
    let (good, _) = ca_csr(TD_ID);
    let dns = {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "SPIFFE");
        params.subject_alt_names = vec![
            uri(TD_ID),
            rcgen::SanType::DnsName("ca.example.org".try_into().unwrap()),
        ];
        params.serialize_request(&kp).unwrap().der().to_vec()
    };
    let cases = vec![
        case(
            "ua-empty-csr",
            me("ua-empty-csr"),
            mint(vec![]),
            Code::InvalidArgument,
            "csr is empty",
        )
        .about_id(TD_ID),
        case(
            "ua-garbage-csr",
            me("ua-garbage-csr"),
            mint(vec![0x30, 0x82, 0xff, 0xff, 0, 1, 2, 3]),
            Code::InvalidArgument,
            "not a valid DER PKCS#10 request",
        )
        .about_id(TD_ID),
        case(
            "ua-csr-bad-signature",
            me("ua-csr-bad-signature"),
            mint(bad_signature(good)),
            Code::InvalidArgument,
            "CSR signature does not verify",
        )
        .about_id(TD_ID),
        case(
            "ua-csr-of-another-trust-domain",
            me("ua-csr-of-another-trust-domain"),
            mint(ca_csr("spiffe://other.org").0),
            Code::InvalidArgument,
            "is in trust domain \"other.org\", expected \"example.org\"",
        )
        .about_id(TD_ID),
        case(
            "ua-csr-for-a-workload-key",
            me("ua-csr-for-a-workload-key"),
            mint(csr_of("spiffe://other.org/workloads/w")),
            Code::InvalidArgument,
            "is in trust domain \"other.org\"",
        )
        .about_id(TD_ID),
        case(
            "ua-csr-with-a-dns-san",
            me("ua-csr-with-a-dns-san"),
            mint(dns),
            Code::InvalidArgument,
            "DNS (on a CA request)",
        )
        .about_id(TD_ID),
    ];
    run(&bed, cases).await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_batches_are_bounded() {
    let Some(bed) = bed(false).await else {
        return;
    };
    let (csr, _) = csr_for("spiffe://example.org/workloads/batch-over");
    let over = vec![
        pb::X509svidRequest {
            csr,
            ttl_seconds: 60,
        };
        1001
    ];
    // One million empty entries: two bytes each on the wire, under the 4 MiB message limit, so the server decodes
    // them and the batch limit refuses them.
    let million = vec![pb::X509svidRequest::default(); 1_000_000];
    let peak_before = peak_rss();
    let cases = vec![
        case(
            "batch-empty",
            me("batch-empty"),
            Call::Batch(vec![]),
            Code::InvalidArgument,
            "the batch is empty: send at least one CSR",
        ),
        case(
            "batch-max-plus-one",
            me("batch-max-plus-one"),
            Call::Batch(over),
            Code::InvalidArgument,
            "the batch holds 1001 CSRs, more than the limit of 1000",
        ),
        case(
            "batch-one-million-empty-csrs",
            me("batch-one-million-empty-csrs"),
            Call::Batch(million),
            Code::InvalidArgument,
            "the batch holds 1000000 CSRs, more than the limit of 1000",
        ),
    ];
    run(&bed, cases).await;
    // Memory stays bounded (client and server share this process: the request, its encoding and its decoding).
    let grown = peak_rss().saturating_sub(peak_before);
    assert!(
        grown < 512 << 20,
        "peak RSS grew by {grown} bytes for a 2 MB request"
    );
    bed.assert_serving().await;
    bed.stop().await;
}

/// Peak resident set size of this process (VmHWM), bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_callers_are_refused() {
    let Some(bed) = bed(false).await else {
        return;
    };
    let w = |n: &str| format!("spiffe://example.org/workloads/caller-{n}");
    let new_key = |id: &str| {
        Call::GenerateKey(km::GenerateKeyRequest {
            key_id: id.into(),
            key_type: km::KeyType::EcP256 as i32,
        })
    };
    let denied = Code::PermissionDenied;
    let cases = vec![
        case(
            "not-in-the-policy",
            By::Svid(format!("{STRANGER}s1")),
            jwt(&w("stranger"), &["db"], 60),
            denied,
            "is not in the policy",
        ),
        case(
            "not-in-the-policy-key-manager",
            By::Svid(format!("{STRANGER}s2")),
            sign("x509-CA-A", vec![0; 32], false),
            denied,
            "is not in the policy",
        ),
        case(
            "issuer-caller-calls-admin",
            By::Svid(format!("{ISSUER_ONLY}i1")),
            Call::Status,
            denied,
            "may not use the admin service (allowed: issuer)",
        ),
        case(
            "issuer-caller-rotates",
            By::Svid(format!("{ISSUER_ONLY}i2")),
            Call::Rotate(pb::RotateRequest {
                step: "prepare".into(),
                kind: "x509".into(),
                label: String::new(),
            }),
            denied,
            "may not use the admin service",
        ),
        case(
            "issuer-caller-calls-key-manager",
            By::Svid(format!("{ISSUER_ONLY}i3")),
            new_key("k"),
            denied,
            "may not use the key-manager service",
        ),
        case(
            "issuer-caller-calls-upstream-authority",
            By::Svid(format!("{ISSUER_ONLY}i4")),
            Call::MintCa(ua::MintX509caRequest {
                csr: ca_csr(TD_ID).0,
                preferred_ttl: 0,
            }),
            denied,
            "may not use the upstream-authority service",
        ),
        case(
            "spire-caller-calls-issuer",
            By::Svid(format!("{SPIRE_ONLY}s1")),
            x509(csr_of(&w("spire")), 60),
            denied,
            "may not use the issuer service (allowed: upstream-authority, key-manager)",
        ),
        case(
            "spire-caller-calls-admin",
            By::Svid(format!("{SPIRE_ONLY}s2")),
            Call::Status,
            denied,
            "may not use the admin service",
        ),
    ];
    run(&bed, cases).await;
    bed.assert_serving().await;
    bed.stop().await;
}

/// DESIGN.md, "Trust model": a SPIRE server that got a CA from MintX509CA can sign any SPIFFE ID of the trust
/// domain, `signet/admin` included; what it signs must never act on signet. (Peers without a certificate, or with
/// one of another CA, do not get this far: the handshake refuses them, see `boundary.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_svids_signed_under_a_minted_spire_ca_do_not_act_on_signet() {
    let Some(bed) = bed(false).await else {
        return;
    };
    let says = "a CA below signet";
    let cases = vec![
        case(
            "spire-signed-admin-calls-admin",
            By::SpireCa(ADMIN.into()),
            Call::Status,
            Code::PermissionDenied,
            says,
        ),
        case(
            "spire-signed-admin-rotates",
            By::SpireCa(ADMIN.into()),
            Call::Rotate(pb::RotateRequest {
                step: "prepare".into(),
                kind: "x509".into(),
                label: String::new(),
            }),
            Code::PermissionDenied,
            says,
        ),
        case(
            "spire-signed-admin-mints-a-ca",
            By::SpireCa(ADMIN.into()),
            Call::MintCa(ua::MintX509caRequest {
                csr: ca_csr(TD_ID).0,
                preferred_ttl: 0,
            }),
            Code::PermissionDenied,
            says,
        ),
        case(
            "spire-signed-hostile-generates-a-key",
            By::SpireCa(format!("{HOSTILE}spire-signed")),
            Call::GenerateKey(km::GenerateKeyRequest {
                key_id: "spire-signed".into(),
                key_type: km::KeyType::EcP256 as i32,
            }),
            Code::PermissionDenied,
            says,
        ),
        case(
            "spire-signed-issuer-caller-mints",
            By::SpireCa(format!("{ISSUER_ONLY}spire-signed")),
            jwt("spiffe://example.org/workloads/from-spire", &["db"], 60),
            Code::PermissionDenied,
            says,
        ),
    ];
    run(&bed, cases).await;
    bed.stop().await;
}
