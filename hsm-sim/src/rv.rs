//! PKCS#11 return values as a Rust type: the error every token operation returns, with the names used in
//! configuration and control files (`"CKR_DEVICE_ERROR"`) and in messages.

use cryptoki_sys::*;
use std::fmt;

/// A PKCS#11 return value other than `CKR_OK`: why a token operation failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rv(pub CK_RV);

/// The result of a token operation.
pub type CkResult<T> = Result<T, Rv>;

const NAMES: &[(&str, CK_RV)] = &[
    ("CKR_OK", CKR_OK),
    ("CKR_CANCEL", CKR_CANCEL),
    ("CKR_HOST_MEMORY", CKR_HOST_MEMORY),
    ("CKR_SLOT_ID_INVALID", CKR_SLOT_ID_INVALID),
    ("CKR_GENERAL_ERROR", CKR_GENERAL_ERROR),
    ("CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED),
    ("CKR_ARGUMENTS_BAD", CKR_ARGUMENTS_BAD),
    ("CKR_CANT_LOCK", CKR_CANT_LOCK),
    ("CKR_ATTRIBUTE_READ_ONLY", CKR_ATTRIBUTE_READ_ONLY),
    ("CKR_ATTRIBUTE_SENSITIVE", CKR_ATTRIBUTE_SENSITIVE),
    ("CKR_ATTRIBUTE_TYPE_INVALID", CKR_ATTRIBUTE_TYPE_INVALID),
    ("CKR_ATTRIBUTE_VALUE_INVALID", CKR_ATTRIBUTE_VALUE_INVALID),
    ("CKR_DATA_INVALID", CKR_DATA_INVALID),
    ("CKR_DATA_LEN_RANGE", CKR_DATA_LEN_RANGE),
    ("CKR_DEVICE_ERROR", CKR_DEVICE_ERROR),
    ("CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY),
    ("CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED),
    ("CKR_FUNCTION_CANCELED", CKR_FUNCTION_CANCELED),
    ("CKR_FUNCTION_NOT_SUPPORTED", CKR_FUNCTION_NOT_SUPPORTED),
    ("CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID),
    ("CKR_KEY_SIZE_RANGE", CKR_KEY_SIZE_RANGE),
    ("CKR_KEY_TYPE_INCONSISTENT", CKR_KEY_TYPE_INCONSISTENT),
    (
        "CKR_KEY_FUNCTION_NOT_PERMITTED",
        CKR_KEY_FUNCTION_NOT_PERMITTED,
    ),
    ("CKR_MECHANISM_INVALID", CKR_MECHANISM_INVALID),
    ("CKR_MECHANISM_PARAM_INVALID", CKR_MECHANISM_PARAM_INVALID),
    ("CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID),
    ("CKR_OPERATION_ACTIVE", CKR_OPERATION_ACTIVE),
    (
        "CKR_OPERATION_NOT_INITIALIZED",
        CKR_OPERATION_NOT_INITIALIZED,
    ),
    ("CKR_PIN_INCORRECT", CKR_PIN_INCORRECT),
    ("CKR_PIN_INVALID", CKR_PIN_INVALID),
    ("CKR_PIN_LEN_RANGE", CKR_PIN_LEN_RANGE),
    ("CKR_PIN_LOCKED", CKR_PIN_LOCKED),
    ("CKR_SESSION_CLOSED", CKR_SESSION_CLOSED),
    ("CKR_SESSION_COUNT", CKR_SESSION_COUNT),
    ("CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID),
    (
        "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
        CKR_SESSION_PARALLEL_NOT_SUPPORTED,
    ),
    ("CKR_SESSION_READ_ONLY", CKR_SESSION_READ_ONLY),
    ("CKR_SESSION_EXISTS", CKR_SESSION_EXISTS),
    ("CKR_SESSION_READ_ONLY_EXISTS", CKR_SESSION_READ_ONLY_EXISTS),
    (
        "CKR_SESSION_READ_WRITE_SO_EXISTS",
        CKR_SESSION_READ_WRITE_SO_EXISTS,
    ),
    ("CKR_SIGNATURE_INVALID", CKR_SIGNATURE_INVALID),
    ("CKR_SIGNATURE_LEN_RANGE", CKR_SIGNATURE_LEN_RANGE),
    ("CKR_TEMPLATE_INCOMPLETE", CKR_TEMPLATE_INCOMPLETE),
    ("CKR_TEMPLATE_INCONSISTENT", CKR_TEMPLATE_INCONSISTENT),
    ("CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT),
    ("CKR_TOKEN_NOT_RECOGNIZED", CKR_TOKEN_NOT_RECOGNIZED),
    ("CKR_TOKEN_WRITE_PROTECTED", CKR_TOKEN_WRITE_PROTECTED),
    ("CKR_USER_ALREADY_LOGGED_IN", CKR_USER_ALREADY_LOGGED_IN),
    ("CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN),
    ("CKR_USER_PIN_NOT_INITIALIZED", CKR_USER_PIN_NOT_INITIALIZED),
    ("CKR_USER_TYPE_INVALID", CKR_USER_TYPE_INVALID),
    (
        "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
        CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
    ),
    ("CKR_USER_TOO_MANY_TYPES", CKR_USER_TOO_MANY_TYPES),
    (
        "CKR_RANDOM_SEED_NOT_SUPPORTED",
        CKR_RANDOM_SEED_NOT_SUPPORTED,
    ),
    ("CKR_RANDOM_NO_RNG", CKR_RANDOM_NO_RNG),
    ("CKR_DOMAIN_PARAMS_INVALID", CKR_DOMAIN_PARAMS_INVALID),
    ("CKR_CURVE_NOT_SUPPORTED", CKR_CURVE_NOT_SUPPORTED),
    ("CKR_BUFFER_TOO_SMALL", CKR_BUFFER_TOO_SMALL),
    ("CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED),
    (
        "CKR_CRYPTOKI_ALREADY_INITIALIZED",
        CKR_CRYPTOKI_ALREADY_INITIALIZED,
    ),
];

impl Rv {
    /// The symbolic name (`CKR_DEVICE_ERROR`), if this value is one hsm-sim knows.
    pub fn name(self) -> Option<&'static str> {
        NAMES.iter().find(|(_, v)| *v == self.0).map(|(n, _)| *n)
    }

    /// Parses a return value from its name (`CKR_DEVICE_ERROR`, with or without the `CKR_` prefix, any case)
    /// or from a number (`48`, `0x30`).
    pub fn parse(text: &str) -> Option<Rv> {
        let t = text.trim();
        if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            return CK_RV::from_str_radix(hex, 16).ok().map(Rv);
        }
        if let Ok(n) = t.parse::<CK_RV>() {
            return Some(Rv(n));
        }
        let upper = t.to_ascii_uppercase();
        let full = if upper.starts_with("CKR_") {
            upper
        } else {
            format!("CKR_{upper}")
        };
        NAMES.iter().find(|(n, _)| *n == full).map(|(_, v)| Rv(*v))
    }
}

impl fmt::Display for Rv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "CK_RV 0x{:x}", self.0),
        }
    }
}

impl fmt::Debug for Rv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Rv {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.name() {
            Some(n) => s.serialize_str(n),
            None => s.serialize_str(&format!("0x{:x}", self.0)),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Rv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Rv::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown PKCS#11 return value {text:?}: use a name such as \"CKR_DEVICE_ERROR\" or a number"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(Rv::parse("CKR_DEVICE_ERROR"), Some(Rv(CKR_DEVICE_ERROR)));
        assert_eq!(Rv::parse("device_removed"), Some(Rv(CKR_DEVICE_REMOVED)));
        assert_eq!(Rv::parse("0x30"), Some(Rv(0x30)));
        assert_eq!(Rv::parse("48"), Some(Rv(48)));
        assert_eq!(Rv::parse("CKR_NOPE"), None);
        assert_eq!(Rv(CKR_SESSION_COUNT).to_string(), "CKR_SESSION_COUNT");
        assert_eq!(Rv(0x8000_1234).to_string(), "CK_RV 0x80001234");
    }
}
