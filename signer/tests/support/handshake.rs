//! What a server presents to a fresh TLS handshake, for tests that watch an appliance's own credential change while
//! it runs (renewal, rotation, replicas). Shared by test binaries through `#[path]`.

use std::sync::Arc;

use tokio_rustls::rustls;

/// The CERTIFICATE blocks of `pem_text`, DER (none when it does not parse).
pub fn ders(pem_text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(pem_text)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.contents().to_vec())
        .collect()
}

/// The certificate chain the server at `addr` presents to a new TLS handshake (verified against `roots_pem` for
/// `localhost`), presenting the client credential `chain_pem` / `key_pem` (PKCS#8); or why the handshake failed.
pub async fn served_chain(
    addr: &str,
    roots_pem: &str,
    chain_pem: &str,
    key_pem: &str,
) -> Result<Vec<Vec<u8>>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for r in ders(roots_pem) {
        roots.add(r.into()).map_err(|e| e.to_string())?;
    }
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        ders(chain_pem).into_iter().map(Into::into).collect();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
        pem::parse(key_pem)
            .map_err(|e| e.to_string())?
            .contents()
            .to_vec()
            .into(),
    );
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().map_err(|_| "server name")?, tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.to_vec())
        .collect())
}

/// The serial number of the certificate `der`.
pub fn serial(der: &[u8]) -> Vec<u8> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.raw_serial().to_vec())
        .unwrap_or_default()
}

/// Whether `root`'s key signed `leaf`.
pub fn signed_by(leaf: &[u8], root: &[u8]) -> bool {
    match (
        x509_parser::parse_x509_certificate(leaf),
        x509_parser::parse_x509_certificate(root),
    ) {
        (Ok((_, l)), Ok((_, r))) => l.verify_signature(Some(r.public_key())).is_ok(),
        _ => false,
    }
}
