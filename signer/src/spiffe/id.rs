//! SPIFFE IDs and trust domains, parsed and validated exactly as the SPIFFE-ID standard (§2) says.
//!
//! [`SpiffeId`] is the only way an identity reaches a certificate or a token: it cannot hold an invalid ID. The
//! parser is strict where other implementations are lenient: an uppercase trust domain is rejected (go-spiffe and
//! SPIRE reject it; some libraries silently lowercase it), and so is anything longer than 2048 bytes.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID signet accepts or generates, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME_PREFIX: &str = "spiffe://";

/// The rule of SPIFFE-ID §2 that an input broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// Empty input.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// Longer than 2048 bytes.
    #[error("SPIFFE ID is {0} bytes long: at most 2048 bytes are allowed")]
    TooLong(usize),
    /// Scheme is not exactly `spiffe://`.
    #[error("SPIFFE ID must start with the scheme \"spiffe://\" (lowercase)")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("SPIFFE ID has an empty trust domain")]
    MissingTrustDomain,
    /// Trust domain longer than 255 bytes.
    #[error("trust domain is {0} bytes long: at most 255 bytes are allowed")]
    TrustDomainTooLong(usize),
    /// Uppercase letter in the trust domain.
    #[error("trust domain contains an uppercase letter: trust domains are lowercase only")]
    UppercaseTrustDomain,
    /// A `:` port in the authority.
    #[error("trust domain contains a port (':'): SPIFFE IDs carry no port")]
    Port,
    /// A `user@` part in the authority.
    #[error("trust domain contains userinfo ('@'): SPIFFE IDs carry no userinfo")]
    Userinfo,
    /// A `?query`.
    #[error("SPIFFE ID contains a query ('?'): SPIFFE IDs carry no query")]
    Query,
    /// A `#fragment`.
    #[error("SPIFFE ID contains a fragment ('#'): SPIFFE IDs carry no fragment")]
    Fragment,
    /// A `%` escape.
    #[error("SPIFFE ID contains percent-encoding ('%'): it is not allowed anywhere in a SPIFFE ID")]
    PercentEncoding,
    /// A character outside `[a-z0-9.-_]` in the trust domain.
    #[error("trust domain contains {0:?}: only a-z, 0-9, '.', '-' and '_' are allowed")]
    BadTrustDomainChar(char),
    /// A character outside `[a-zA-Z0-9.-_]` in a path segment.
    #[error("path contains {0:?}: path segments allow only a-z, A-Z, 0-9, '.', '-' and '_'")]
    BadPathChar(char),
    /// `//` in the path.
    #[error("path contains an empty segment ('//')")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path contains a '.' or '..' segment: dot segments are not allowed")]
    DotSegment,
    /// The path ends in `/`.
    #[error("path ends with '/': trailing slashes are not allowed")]
    TrailingSlash,
    /// A path was given where a trust-domain-only ID (`spiffe://<td>`) is required.
    #[error("expected the trust domain ID spiffe://{0} with no path")]
    UnexpectedPath(String),
    /// A trust-domain-only ID was given where a workload ID (with a path) is required.
    #[error(
        "expected a workload SPIFFE ID with a path under spiffe://{0}, got the bare trust domain ID"
    )]
    MissingPath(String),
    /// The ID belongs to another trust domain.
    #[error("SPIFFE ID is in trust domain {found:?}, expected {expected:?}")]
    WrongTrustDomain {
        /// The trust domain required.
        expected: String,
        /// The trust domain found.
        found: String,
    },
}

impl SpiffeIdError {
    /// A short stable name of the rule broken (for metrics and tables).
    pub fn rule(&self) -> &'static str {
        match self {
            SpiffeIdError::Empty => "empty",
            SpiffeIdError::TooLong(_) => "too-long",
            SpiffeIdError::WrongScheme => "scheme",
            SpiffeIdError::MissingTrustDomain => "missing-trust-domain",
            SpiffeIdError::TrustDomainTooLong(_) => "trust-domain-too-long",
            SpiffeIdError::UppercaseTrustDomain => "uppercase-trust-domain",
            SpiffeIdError::Port => "port",
            SpiffeIdError::Userinfo => "userinfo",
            SpiffeIdError::Query => "query",
            SpiffeIdError::Fragment => "fragment",
            SpiffeIdError::PercentEncoding => "percent-encoding",
            SpiffeIdError::BadTrustDomainChar(_) => "trust-domain-char",
            SpiffeIdError::BadPathChar(_) => "path-char",
            SpiffeIdError::EmptySegment => "empty-segment",
            SpiffeIdError::DotSegment => "dot-segment",
            SpiffeIdError::TrailingSlash => "trailing-slash",
            SpiffeIdError::UnexpectedPath(_) => "unexpected-path",
            SpiffeIdError::MissingPath(_) => "missing-path",
            SpiffeIdError::WrongTrustDomain { .. } => "wrong-trust-domain",
        }
    }
}

fn check_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(SpiffeIdError::UppercaseTrustDomain),
            ':' => return Err(SpiffeIdError::Port),
            '@' => return Err(SpiffeIdError::Userinfo),
            '?' => return Err(SpiffeIdError::Query),
            '#' => return Err(SpiffeIdError::Fragment),
            '%' => return Err(SpiffeIdError::PercentEncoding),
            other => return Err(SpiffeIdError::BadTrustDomainChar(other)),
        }
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(td.len()));
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // The caller guarantees the path starts with '/'.
    let body = &path[1..];
    let mut segments = body.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        for c in seg.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
                '?' => return Err(SpiffeIdError::Query),
                '#' => return Err(SpiffeIdError::Fragment),
                '%' => return Err(SpiffeIdError::PercentEncoding),
                other => return Err(SpiffeIdError::BadPathChar(other)),
            }
        }
        if seg.is_empty() {
            return Err(if last {
                SpiffeIdError::TrailingSlash
            } else {
                SpiffeIdError::EmptySegment
            });
        }
        if seg == "." || seg == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
    }
    Ok(())
}

/// A SPIFFE trust domain name (`example.org`), validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parse a trust domain name. A trust domain ID (`spiffe://example.org`) is accepted too.
    pub fn parse(name: &str) -> Result<Self, SpiffeIdError> {
        if name.starts_with(SCHEME_PREFIX) {
            let id = SpiffeId::parse(name)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::UnexpectedPath(
                    id.trust_domain_name().to_string(),
                ));
            }
            return Ok(id.trust_domain());
        }
        if name.contains('/') {
            return Err(SpiffeIdError::BadTrustDomainChar('/'));
        }
        check_trust_domain(name)?;
        Ok(Self(name.to_string()))
    }

    /// The name (`example.org`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<td>`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            full: format!("{SCHEME_PREFIX}{}", self.0),
            td_end: SCHEME_PREFIX.len() + self.0.len(),
        }
    }

    /// A workload ID in this trust domain with the given path (which must start with `/`).
    pub fn workload_id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        let id = SpiffeId::parse(&format!("{SCHEME_PREFIX}{}{path}", self.0))?;
        id.require_workload()?;
        Ok(id)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A SPIFFE ID (`spiffe://<trust-domain>[/<path>]`), validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    td_end: usize,
}

impl SpiffeId {
    /// Parse and validate a SPIFFE ID.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(input.len()));
        }
        let rest = input
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        check_trust_domain(td)?;
        check_path(path)?;
        Ok(Self {
            full: input.to_string(),
            td_end: SCHEME_PREFIX.len() + td_len,
        })
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain name.
    pub fn trust_domain_name(&self) -> &str {
        &self.full[SCHEME_PREFIX.len()..self.td_end]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().to_string())
    }

    /// The path (empty for a trust domain ID, otherwise starting with `/`).
    pub fn path(&self) -> &str {
        &self.full[self.td_end..]
    }

    /// True when this is `spiffe://<td>` with no path.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }

    /// Error unless the ID has a path (a workload ID).
    pub fn require_workload(&self) -> Result<(), SpiffeIdError> {
        if self.is_trust_domain_id() {
            return Err(SpiffeIdError::MissingPath(
                self.trust_domain_name().to_string(),
            ));
        }
        Ok(())
    }

    /// Error unless the ID belongs to `td`.
    pub fn require_trust_domain(&self, td: &TrustDomain) -> Result<(), SpiffeIdError> {
        if self.trust_domain_name() != td.as_str() {
            return Err(SpiffeIdError::WrongTrustDomain {
                expected: td.as_str().to_string(),
                found: self.trust_domain_name().to_string(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::parse(&s).map_err(serde::de::Error::custom)
    }
}
