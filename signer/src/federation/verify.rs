//! The `https_spiffe` server certificate check (SPIFFE Federation §5.2): the endpoint's certificate must be an
//! X509-SVID that carries exactly the configured endpoint SPIFFE ID and chains to the foreign trust domain's bundle
//! (the bootstrap bundle first, then the last one fetched). Path validation is rustls-webpki's; the host name in
//! the URL plays no part.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_rustls::rustls;

use crate::spiffe::SpiffeId;

/// Why an endpoint's certificate is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The certificate is not an X509-SVID.
    #[error(transparent)]
    NotSvid(#[from] crate::x509::SvidIdError),
    /// The X509-SVID carries another SPIFFE ID than the one configured.
    #[error(
        "the endpoint presents SPIFFE ID {found}, but {expected} is configured (endpoint_spiffe_id)"
    )]
    WrongId {
        /// The ID presented.
        found: SpiffeId,
        /// The ID configured.
        expected: SpiffeId,
    },
    /// None of the bundle's roots is a usable trust anchor.
    #[error("the foreign trust domain's bundle holds no usable X.509 authority")]
    NoAuthority,
    /// rustls-webpki cannot read the certificate as an end entity.
    #[error("the endpoint's certificate is not usable: {0}")]
    Unusable(#[source] webpki::Error),
    /// Path validation failed.
    #[error("the endpoint's X509-SVID does not chain to the trust domain's bundle: {0}")]
    Chain(#[source] webpki::Error),
}

/// Verifies an endpoint's X509-SVID against a set of roots and one SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Vec<CertificateDer<'static>>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// Trusts `roots` (DER CA certificates of the foreign bundle) for an endpoint with SPIFFE ID `expected`.
    pub fn new(roots: &[Vec<u8>], expected: SpiffeId, provider: &CryptoProvider) -> Self {
        Self {
            roots: roots
                .iter()
                .map(|r| CertificateDer::from(r.clone()))
                .collect(),
            expected,
            algs: provider.signature_verification_algorithms,
        }
    }

    /// The check itself, without the TLS plumbing (also used by tests).
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), VerifyError> {
        let id = crate::x509::svid_spiffe_id(end_entity, "the endpoint's certificate")?;
        if id != self.expected {
            return Err(VerifyError::WrongId {
                found: id,
                expected: self.expected.clone(),
            });
        }
        let anchors = self
            .roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect::<Vec<_>>();
        if anchors.is_empty() {
            return Err(VerifyError::NoAuthority);
        }
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(VerifyError::Unusable)?;
        ee.verify_for_usage(
            self.algs.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(VerifyError::Chain)?;
        Ok(())
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // rustls shows a custom certificate error by its Debug form only; the message goes through as text.
        self.check(end_entity, intermediates, now)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The crypto provider of the federation's TLS (ring, Mozilla "intermediate" suites and groups).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://b.test").unwrap(),
        )];
        let kp = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&kp).unwrap();
        (cert, rcgen::Issuer::new(p, kp))
    }

    fn svid(id: &str, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(id).unwrap(),
        )];
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let kp = rcgen::KeyPair::generate().unwrap();
        p.signed_by(&kp, issuer).unwrap().der().to_vec()
    }

    #[test]
    fn the_endpoint_svid_must_carry_the_id_and_chain_to_the_bundle() {
        let (root, issuer) = ca();
        let (other_root, _) = ca();
        let want = SpiffeId::parse("spiffe://b.test/endpoint").unwrap();
        let good = CertificateDer::from(svid("spiffe://b.test/endpoint", &issuer));
        let now = UnixTime::now();
        let v = SpiffeServerVerifier::new(&[root.der().to_vec()], want.clone(), &provider());
        v.check(&good, &[], now).unwrap();
        let other_id = CertificateDer::from(svid("spiffe://b.test/someone", &issuer));
        let e = v.check(&other_id, &[], now).unwrap_err();
        assert!(matches!(e, VerifyError::WrongId { .. }), "{e:?}");
        assert!(e.to_string().contains("spiffe://b.test/someone"), "{e}");
        let stranger =
            SpiffeServerVerifier::new(&[other_root.der().to_vec()], want.clone(), &provider());
        let e = stranger.check(&good, &[], now).unwrap_err();
        assert!(matches!(e, VerifyError::Chain(_)), "{e:?}");
        assert!(e.to_string().contains("does not chain"), "{e}");
        let empty = SpiffeServerVerifier::new(&[], want, &provider());
        assert!(matches!(
            empty.check(&good, &[], now),
            Err(VerifyError::NoAuthority)
        ));
        assert!(matches!(
            v.check(&CertificateDer::from(vec![1, 2, 3]), &[], now),
            Err(VerifyError::NotSvid(_))
        ));
    }
}
