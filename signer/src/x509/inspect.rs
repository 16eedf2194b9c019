//! Facts read from issued certificates for responses, the audit log and the heartbeat: serial, issuer and subject
//! key identifiers, and the id a root goes by.

/// Serial number and issuer key identifier of a certificate (both lowercase hex), for responses and the audit log.
pub fn cert_facts(der: &[u8]) -> (String, Option<String>) {
    use x509_parser::extensions::ParsedExtension;
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => {
            let serial = hex::encode(cert.raw_serial());
            let aki = cert
                .iter_extensions()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(a) => {
                        a.key_identifier.as_ref().map(|k| hex::encode(k.0))
                    }
                    _ => None,
                });
            (serial, aki)
        }
        Err(_) => (String::new(), None),
    }
}

/// The SubjectKeyIdentifier of a certificate in hex.
pub fn cert_ski(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(hex::encode(k.0)),
            _ => None,
        })
}

/// The root id a heartbeat reports and `retire` compares: the root certificate's SubjectKeyIdentifier in hex (as
/// `Admin.GetRotation` shows it), or the SHA-256 of its SubjectPublicKeyInfo when it has none.
pub fn root_id(root_der: &[u8]) -> String {
    if let Some(ski) = cert_ski(root_der) {
        return ski;
    }
    let spki = x509_parser::parse_x509_certificate(root_der)
        .map(|(_, c)| c.public_key().raw.to_vec())
        .unwrap_or_default();
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &spki))
}
