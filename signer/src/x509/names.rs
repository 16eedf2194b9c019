//! Distinguished names: carrying a parsed X.509 name over into rcgen's model without changing its encoding.
//!
//! rcgen keeps one value per attribute type and one attribute per RDN, so names with multi-valued RDNs or a repeated
//! attribute type cannot be copied exactly; they are rejected with that reason rather than silently altered. The
//! pre-issuance lint then compares the encoded issuer name byte for byte with the issuer's subject.

use rcgen::string::{BmpString, Ia5String, PrintableString, TeletexString, UniversalString};
use rcgen::{DistinguishedName, DnType, DnValue};
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::x509::X509Name;

/// Why a name cannot be carried over into rcgen's model unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// A multi-valued (or empty) RDN.
    #[error("a relative distinguished name holds zero or several attributes")]
    MultiValued,
    /// An OID component beyond 64 bits.
    #[error("an attribute type OID has a component beyond 64 bits")]
    OidTooLong,
    /// The same attribute type twice.
    #[error("attribute {oid} appears more than once")]
    Repeated {
        /// The attribute type.
        oid: String,
    },
    /// A value that is not text of its string type.
    #[error("an attribute value is not valid text")]
    NotText,
    /// rcgen refuses the value for its string type.
    #[error("attribute {oid}: {source}")]
    Value {
        /// The attribute type.
        oid: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A string type rcgen does not model.
    #[error("attribute {oid} has unsupported string type {tag}")]
    UnsupportedType {
        /// The attribute type.
        oid: String,
        /// The ASN.1 tag.
        tag: String,
    },
}

/// Convert a parsed name into an rcgen [`DistinguishedName`] with the same attribute order and string types.
pub fn to_rcgen(name: &X509Name<'_>) -> Result<DistinguishedName, NameError> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(NameError::MultiValued);
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or(NameError::OidTooLong)?
            .collect();
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            return Err(NameError::Repeated {
                oid: attr.attr_type().to_string(),
            });
        }
        let data = attr.attr_value().data;
        let text = || std::str::from_utf8(data).map_err(|_| NameError::NotText);
        let bad = |source: rcgen::Error| NameError::Value {
            oid: attr.attr_type().to_string(),
            source,
        };
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_string()),
            Tag::PrintableString => {
                DnValue::PrintableString(PrintableString::try_from(text()?).map_err(bad)?)
            }
            Tag::Ia5String => DnValue::Ia5String(Ia5String::try_from(text()?).map_err(bad)?),
            Tag::T61String => {
                DnValue::TeletexString(TeletexString::try_from(text()?).map_err(bad)?)
            }
            Tag::BmpString => {
                DnValue::BmpString(BmpString::from_utf16be(data.to_vec()).map_err(bad)?)
            }
            Tag::UniversalString => {
                DnValue::UniversalString(UniversalString::from_utf32be(data.to_vec()).map_err(bad)?)
            }
            other => {
                return Err(NameError::UnsupportedType {
                    oid: attr.attr_type().to_string(),
                    tag: other.to_string(),
                });
            }
        };
        dn.push(ty, value);
    }
    Ok(dn)
}
