//! The value types settings are written in: durations (`90s`, `5m`, `1h`, `30d`, combined as `1h30m`) and rates
//! (`100/s`, `6000/m`, `10000/h`). Each module's settings use them; [`crate::config`] reads them from TOML.

use std::time::Duration;

use serde::Deserialize;

/// A duration written `90s`, `5m`, `1h`, `30d` or combinations (`1h30m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    /// Parses `text` (see the type docs).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("an empty duration".into());
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
                _ => return Err(format!("{text:?}: unknown unit {c:?} (use s, m, h or d)")),
            };
            let n: u64 = number
                .parse()
                .map_err(|_| format!("{text:?}: a number must come before each unit"))?;
            number.clear();
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("{text:?} is too long"))?;
        }
        if !number.is_empty() {
            return Err(format!(
                "{text:?}: the number {number} has no unit (write e.g. {number}s)"
            ));
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
    pub fn parse(text: &str) -> Result<Self, String> {
        let (n, unit) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: write a rate as N/s, N/m or N/h"))?;
        let n: f64 = n
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {n:?} is not a number"))?;
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("{text:?}: a rate must be positive"));
        }
        let per = match unit.trim() {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => return Err(format!("{text:?}: unknown unit {u:?} (use s, m or h)")),
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
