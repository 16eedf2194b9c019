//! The test bed: an appliance on a fresh SoftHSM2 token (or any token a test brings), clients with chosen
//! identities, and oracles. Shared by the appliance binary and the binaries that need an appliance of their own
//! process (`dashboard`, `faults`, `spire_e2e`, `signdata_budget`); a binary takes it as `support::bed`.

use std::any::Any;
use std::path::Path;
use std::time::Duration;

use signet::config::{Config, ConfigDuration, PinConfig, PolicyRule, Rate, TokenSettings};
use signet::serve::Appliance;
use signet_pkcs11::testing::SoftHsm;
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::pem_chain;

pub const TD: &str = "example.org";
pub const ADMIN: &str = "spiffe://example.org/signet/admin";
pub const SPIRE_A: &str = "spiffe://example.org/spire/server-a";
pub const SPIRE_B: &str = "spiffe://example.org/spire/server-b";
pub const AGENT: &str = "spiffe://example.org/agents/a1";
pub const LIMITED: &str = "spiffe://example.org/limited/l1";
pub const OUTSIDER: &str = "spiffe://example.org/outsider";

/// A PEM certificate chain and PKCS#8 key.
#[derive(Clone)]
pub struct Credential {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Whether the credential's private key is the one its leaf certificate certifies.
fn key_matches_leaf(c: &Credential) -> bool {
    use rcgen::PublicKeyData as _;
    let Ok(key) = rcgen::KeyPair::from_pem(&c.key_pem) else {
        return false;
    };
    let Some(leaf) = ::pem::parse_many(&c.chain_pem)
        .ok()
        .and_then(|blocks| blocks.into_iter().next())
    else {
        return false;
    };
    x509_parser::parse_x509_certificate(leaf.contents())
        .is_ok_and(|(_, cert)| cert.public_key().raw == key.subject_public_key_info().as_slice())
}

pub struct Bed {
    pub app: Appliance,
    pub dir: tempfile::TempDir,
    cfg: Config,
    /// The token's test bed (SoftHSM2, hsm-sim, TPM), kept alive as long as the appliance.
    _hsm: Box<dyn Any + Send + Sync>,
}

fn rule(caller: &str, may: &[&str], ids: &[&str], max_ttl: u64) -> PolicyRule {
    PolicyRule {
        caller: caller.into(),
        may: may.iter().map(|s| s.to_string()).collect(),
        ids: ids.iter().map(|s| s.to_string()).collect(),
        max_ttl: Some(ConfigDuration(Duration::from_secs(max_ttl))),
        jwt_max_ttl: None,
        rate: None,
        burst: None,
        downstream_credentials: false,
        spire_ca_path_len: None,
    }
}

/// The configuration every test starts from: the SoftHSM2 test token, an ephemeral port, no metrics endpoint, and a
/// policy with an admin, two SPIRE servers, agents, and a rate-limited caller.
pub fn config(hsm: &SoftHsm, dir: &Path) -> Config {
    config_on(
        "softhsm",
        hsm.module(),
        hsm.label(),
        signet_pkcs11::testing::USER_PIN,
        dir,
    )
}

/// The same configuration on any token: `name` for logs, the module, the token's label and its user PIN.
pub fn config_on(name: &str, module: &Path, label: &str, user_pin: &str, dir: &Path) -> Config {
    let pin = dir.join("pin");
    std::fs::write(&pin, user_pin).unwrap();
    let mut cfg = Config::embedded_default();
    cfg.data_dir = dir.join("data");
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.metrics = None;
    cfg.pipeline.cpu_threads = 3;
    // No bootstrap port unless a test asks for one.
    cfg.server.bootstrap_listen = None;
    cfg.tokens = vec![TokenSettings {
        name: name.into(),
        module: module.to_path_buf(),
        token: Some(label.to_string()),
        serial: None,
        pin: PinConfig::File(pin),
        sessions: 1,
    }];
    let all = ["issuer", "admin", "upstream-authority", "key-manager"];
    let mut limited = rule(LIMITED, &["issuer"], &["spiffe://example.org/"], 3600);
    limited.rate = Some(Rate::parse("1/h").unwrap());
    limited.burst = Some(2);
    cfg.policy = vec![
        rule(ADMIN, &all, &["spiffe://example.org/"], 24 * 3600),
        rule(
            SPIRE_A,
            &["upstream-authority", "key-manager"],
            &[],
            24 * 3600,
        ),
        rule(
            SPIRE_B,
            &["upstream-authority", "key-manager"],
            &[],
            24 * 3600,
        ),
        rule(
            "spiffe://example.org/agents/*",
            &["issuer"],
            &["spiffe://example.org/workloads/"],
            3600,
        ),
        limited,
    ];
    cfg
}

impl Bed {
    /// An appliance on a fresh token, or `None` (test skipped loudly) without SoftHSM2.
    pub async fn start() -> Option<Bed> {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Option<Bed> {
        let hsm = SoftHsm::new()?;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&hsm, dir.path());
        tweak(&mut cfg);
        Some(Self::start_config(cfg, dir, Box::new(hsm)).await)
    }

    /// [`start_with`](Self::start_with) with the rotation life cycle reading `clock` (the test moves it past the
    /// publish lead or the old root's descendants; certificates and TLS keep the system time).
    pub async fn start_clocked(
        tweak: impl FnOnce(&mut Config),
        clock: std::sync::Arc<dyn signet::ca::Clock>,
    ) -> Option<Bed> {
        let hsm = SoftHsm::new()?;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&hsm, dir.path());
        tweak(&mut cfg);
        let app = Appliance::start_with_clock(cfg.clone(), clock)
            .await
            .expect("the appliance starts");
        Some(Bed {
            app,
            dir,
            cfg,
            _hsm: Box::new(hsm),
        })
    }

    /// An appliance on the configuration `make` returns for a fresh directory; `hsm` (the token's test bed) lives
    /// as long as the appliance.
    pub async fn start_on(
        hsm: Box<dyn Any + Send + Sync>,
        make: impl FnOnce(&Path) -> Config,
    ) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let cfg = make(dir.path());
        Self::start_config(cfg, dir, hsm).await
    }

    async fn start_config(
        cfg: Config,
        dir: tempfile::TempDir,
        hsm: Box<dyn Any + Send + Sync>,
    ) -> Bed {
        let app = Appliance::start(cfg.clone())
            .await
            .expect("the appliance starts");
        Bed {
            app,
            dir,
            cfg,
            _hsm: hsm,
        }
    }

    /// A bed around an appliance the test started itself (e.g. one that waited for its certificate).
    pub fn from_started(
        app: Appliance,
        dir: tempfile::TempDir,
        cfg: Config,
        hsm: Box<dyn Any + Send + Sync>,
    ) -> Bed {
        Bed {
            app,
            dir,
            cfg,
            _hsm: hsm,
        }
    }

    /// The appliance's SoftHSM2 token, opened again (to look at its keys).
    pub fn token(&self) -> signet_pkcs11::Token {
        self._hsm
            .downcast_ref::<SoftHsm>()
            .expect("Bed::token needs an appliance on the SoftHSM2 bed")
            .open()
    }

    /// The admin credential in the data directory. Its two files are replaced one after the other when the
    /// appliance renews it (after every activate), so a read between the two renames sees a key and a certificate
    /// that do not match: read again until they do (bounded).
    pub fn admin(&self) -> Credential {
        let p = self.app.paths();
        super::wait::wait_for(
            "the admin key and certificate in the data directory match",
            Duration::from_secs(30),
            || {
                let c = Credential {
                    chain_pem: std::fs::read_to_string(&p.admin_cert).unwrap(),
                    key_pem: std::fs::read_to_string(&p.admin_key).unwrap(),
                };
                if key_matches_leaf(&c) {
                    Ok(c)
                } else {
                    Err(String::new())
                }
            },
        )
    }

    pub fn roots_pem(&self) -> String {
        std::fs::read_to_string(&self.app.paths().bundle).unwrap()
    }

    /// Why the appliance refuses a connection presenting `identity` (or no client certificate) at the TLS
    /// handshake: the connection, or its first RPC (TLS 1.3 tells a client of the refusal after its side of the
    /// handshake is done), fails at the transport, and no RPC is answered. Fails the test if an RPC is answered.
    pub async fn refused_at_handshake(&self, identity: Option<&Credential>) -> String {
        use signet_proto::signet::v1::admin_client::AdminClient;
        let ch = match self.try_channel(identity).await {
            Ok(ch) => ch,
            Err(e) => return format!("{e:?}"),
        };
        match AdminClient::new(ch)
            .get_status(pb::GetStatusRequest {})
            .await
        {
            Ok(r) => panic!("an RPC was answered over a connection that should be refused: {r:?}"),
            Err(e) => {
                // A transport failure, not an answer of a service: tonic reports those as UNAVAILABLE, UNKNOWN or CANCELLED
                // with the connection error, and the appliance wrote nothing for the RPC.
                assert!(
                    matches!(
                        e.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ),
                    "{e:?}"
                );
                format!("{e:?}")
            }
        }
    }

    /// The appliance still issues to its admin (after whatever a test threw at it).
    pub async fn assert_serving(&self) {
        still_serving(&mut IssuerClient::new(
            self.channel(Some(&self.admin())).await,
        ))
        .await;
    }

    /// A channel presenting `identity` (or no client certificate).
    pub async fn channel(&self, identity: Option<&Credential>) -> Channel {
        self.try_channel(identity)
            .await
            .expect("connecting to the appliance")
    }

    /// A channel presenting `identity` (or no client certificate), or why it could not connect.
    pub async fn try_channel(
        &self,
        identity: Option<&Credential>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.roots_pem()))
            .domain_name("localhost");
        if let Some(c) = identity {
            tls = tls.identity(Identity::from_pem(&c.chain_pem, &c.key_pem));
        }
        Endpoint::from_shared(format!("https://{}", self.app.addr()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
    }

    /// An X509-SVID for `id`, minted through the Issuer API with the admin credential.
    pub async fn credential_for(&self, id: &str) -> Credential {
        self.credential_lasting(id, 3600).await
    }

    /// [`credential_for`](Self::credential_for) with a lifetime of `ttl_seconds`.
    pub async fn credential_lasting(&self, id: &str, ttl_seconds: i64) -> Credential {
        let mut c = IssuerClient::new(self.channel(Some(&self.admin())).await);
        let (csr, kp) = csr_for(id);
        let r = c
            .batch_mint_x509svid(pb::BatchMintX509svidRequest {
                requests: vec![pb::X509svidRequest { csr, ttl_seconds }],
            })
            .await
            .unwrap()
            .into_inner();
        let svid = expect_svid(r.results.into_iter().next().unwrap());
        Credential {
            chain_pem: pem_chain(&svid.cert_chain),
            key_pem: kp.serialize_pem(),
        }
    }

    /// The audit log's lines.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.app.audit_path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Stops the appliance and starts it again on the same token and data directory.
    pub async fn restart(self) -> Bed {
        let Bed {
            app,
            dir,
            cfg,
            _hsm,
        } = self;
        app.shutdown().await.unwrap();
        let app = Appliance::start(cfg.clone())
            .await
            .expect("the appliance restarts");
        Bed {
            app,
            dir,
            cfg,
            _hsm,
        }
    }

    pub async fn stop(self) {
        self.app.shutdown().await.unwrap();
        drop(self.dir);
    }
}

/// A P-256 key and a CSR for `id` (empty subject, one URI SAN).
pub fn csr_for(id: &str) -> (Vec<u8>, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
    let der = params.serialize_request(&kp).unwrap().der().to_vec();
    (der, kp)
}

/// `BatchMintX509SVID` of one CSR: its result.
pub async fn mint_one(
    c: &mut IssuerClient<Channel>,
    csr: Vec<u8>,
    ttl_seconds: i64,
) -> pb::X509svidResult {
    c.batch_mint_x509svid(pb::BatchMintX509svidRequest {
        requests: vec![pb::X509svidRequest { csr, ttl_seconds }],
    })
    .await
    .unwrap()
    .into_inner()
    .results
    .remove(0)
}

/// The appliance still issues to `c` (after whatever a test threw at it).
pub async fn still_serving(c: &mut IssuerClient<Channel>) {
    let (csr, _) = csr_for("spiffe://example.org/workloads/still-serving");
    expect_svid(mint_one(c, csr, 60).await);
}

pub fn expect_svid(r: pb::X509svidResult) -> pb::X509svid {
    match r.result {
        Some(pb::x509svid_result::Result::Svid(s)) => s,
        other => panic!("expected an SVID, got {other:?}"),
    }
}

pub fn expect_failure(r: &pb::X509svidResult) -> &pb::Failure {
    match &r.result {
        Some(pb::x509svid_result::Result::Failure(f)) => f,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// Waits for the next stream message, failing (instead of hanging) if none comes within a generous bound.
pub async fn next<T>(s: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), s.message())
        .await
        .expect("no stream message within 60 s")
        .expect("stream error")
        .expect("stream ended")
}

/// A self-signed CA (not ours) with a key, for foreign roots and foreign client certificates.
pub fn foreign_ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "foreign CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = p.self_signed(&kp).unwrap();
    (cert, kp)
}

/// Lines of the audit log for `caller` and `method`.
pub fn audit_lines<'a>(
    lines: &'a [serde_json::Value],
    caller: &str,
    method: &str,
) -> Vec<&'a serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["caller"] == caller && l["method"] == method)
        .collect()
}
