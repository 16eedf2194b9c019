//! Distinguished names: carrying a parsed X.509 name over into rcgen's model without changing its encoding.
//!
//! rcgen keeps one value per attribute type and one attribute per RDN, so names with multi-valued RDNs or a repeated
//! attribute type cannot be copied exactly; they are rejected with that reason rather than silently altered. The
//! pre-issuance lint then compares the encoded issuer name byte for byte with the issuer's subject.

use rcgen::string::{BmpString, Ia5String, PrintableString, TeletexString, UniversalString};
use rcgen::{DistinguishedName, DnType, DnValue};
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::x509::X509Name;

/// Convert a parsed name into an rcgen [`DistinguishedName`] with the same attribute order and string types.
pub fn to_rcgen(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("a relative distinguished name holds zero or several attributes".into());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| "an attribute type OID has a component beyond 64 bits".to_string())?
            .collect();
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            return Err(format!(
                "attribute {} appears more than once",
                attr.attr_type()
            ));
        }
        let data = attr.attr_value().data;
        let text = || {
            std::str::from_utf8(data)
                .map_err(|_| "an attribute value is not valid text".to_string())
        };
        let bad = |e: rcgen::Error| format!("attribute {}: {e}", attr.attr_type());
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
                return Err(format!(
                    "attribute {} has unsupported string type {other}",
                    attr.attr_type()
                ));
            }
        };
        dn.push(ty, value);
    }
    Ok(dn)
}
