//! The value types settings are written in: durations (`90s`, `5m`, `1h`, `30d`, combined as `1h30m`) and rates
//! (`100/s`, `6000/m`, `10000/h`). Each module's settings use them; [`crate::config`] reads them from TOML.

use std::time::Duration;

use serde::Deserialize;

/// Why a duration or a rate is refused: the text as written and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnitError {
    /// Nothing written.
    #[error("an empty duration")]
    EmptyDuration,
    /// A duration unit other than s, m, h, d.
    #[error("{text:?}: unknown unit {unit:?} (use s, m, h or d)")]
    DurationUnit {
        /// The text.
        text: String,
        /// The unit.
        unit: char,
    },
    /// A unit without a number before it.
    #[error("{text:?}: a number must come before each unit")]
    MissingNumber {
        /// The text.
        text: String,
    },
    /// More seconds than fit in 64 bits.
    #[error("{text:?} is too long")]
    TooLong {
        /// The text.
        text: String,
    },
    /// A trailing number without a unit.
    #[error("{text:?}: the number {number} has no unit (write e.g. {number}s)")]
    NoUnit {
        /// The text.
        text: String,
        /// The number.
        number: String,
    },
    /// A rate not written N/unit.
    #[error("{text:?}: write a rate as N/s, N/m or N/h")]
    RateForm {
        /// The text.
        text: String,
    },
    /// A rate's count is not a number.
    #[error("{text:?}: {number:?} is not a number")]
    NotANumber {
        /// The text.
        text: String,
        /// The part before `/`.
        number: String,
    },
    /// A rate of zero, below, or not finite.
    #[error("{text:?}: a rate must be positive")]
    NotPositive {
        /// The text.
        text: String,
    },
    /// A rate unit other than s, m, h.
    #[error("{text:?}: unknown unit {unit:?} (use s, m or h)")]
    RateUnit {
        /// The text.
        text: String,
        /// The unit.
        unit: String,
    },
}

/// A duration written `90s`, `5m`, `1h`, `30d` or combinations (`1h30m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    /// Parses `text` (see the type docs).
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(UnitError::EmptyDuration);
        }
        let mut total: u64 = 0;
        let mut number = String::new();
        for c in t.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let unit: u64 = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => {
                    return Err(UnitError::DurationUnit {
                        text: text.to_string(),
                        unit: c,
                    });
                }
            };
            let n: u64 = number.parse().map_err(|_| UnitError::MissingNumber {
                text: text.to_string(),
            })?;
            number.clear();
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| UnitError::TooLong {
                    text: text.to_string(),
                })?;
        }
        if !number.is_empty() {
            return Err(UnitError::NoUnit {
                text: text.to_string(),
                number,
            });
        }
        Ok(Self(Duration::from_secs(total)))
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A rate written `100/s`, `6000/m` or `10000/h`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Requests per second.
    pub per_second: f64,
}

impl Rate {
    /// Parses `text` (see the type docs).
    pub fn parse(text: &str) -> Result<Self, UnitError> {
        let (n, unit) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| UnitError::RateForm {
                text: text.to_string(),
            })?;
        let n: f64 = n.trim().parse().map_err(|_| UnitError::NotANumber {
            text: text.to_string(),
            number: n.to_string(),
        })?;
        if !(n.is_finite() && n > 0.0) {
            return Err(UnitError::NotPositive {
                text: text.to_string(),
            });
        }
        let per = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => {
                return Err(UnitError::RateUnit {
                    text: text.to_string(),
                    unit: u.to_string(),
                });
            }
        };
        Ok(Self {
            per_second: n / per,
        })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}
