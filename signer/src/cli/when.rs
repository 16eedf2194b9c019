//! Times as the CLI prints them: RFC 3339 in UTC with a relative hint, `2026-12-06T10:00:00Z (in 23 h)` or
//! `2026-12-03T10:00:00Z (3 d ago)`, so an operator reads both the instant and how far it is.

/// Now, in unix seconds.
pub(super) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `t` (unix seconds) as RFC 3339 with its distance from `now`: `2026-12-06T10:00:00Z (in 23 h)`,
/// `... (3 d ago)`, `... (now)`. A time RFC 3339 cannot express is printed as the bare number.
pub(super) fn when_at(t: i64, now: i64) -> String {
    let stamp = time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string());
    let delta = t.saturating_sub(now);
    let span = relative(delta.unsigned_abs());
    match delta {
        0 => format!("{stamp} (now)"),
        d if d > 0 => format!("{stamp} (in {span})"),
        _ => format!("{stamp} ({span} ago)"),
    }
}

/// [`when_at`] against the current time.
pub(super) fn when(t: i64) -> String {
    when_at(t, now_unix())
}

/// [`when`], with `-` for 0 (a time never set).
pub(super) fn when_or_dash(t: i64) -> String {
    if t == 0 { "-".into() } else { when(t) }
}

/// A span in the largest unit that keeps at least one whole (two for hours and days, so `36 h` rather than `1 d`).
fn relative(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_796_551_200; // 2026-12-06T10:00:00Z

    #[test]
    fn future_past_and_now() {
        assert_eq!(when_at(T, T - 23 * 3600), "2026-12-06T10:00:00Z (in 23 h)");
        assert_eq!(when_at(T, T + 3 * 86_400), "2026-12-06T10:00:00Z (3 d ago)");
        assert_eq!(when_at(T, T), "2026-12-06T10:00:00Z (now)");
        assert_eq!(when_at(T, T - 59), "2026-12-06T10:00:00Z (in 59 s)");
        assert_eq!(when_at(T, T + 61), "2026-12-06T10:00:00Z (1 min ago)");
        assert_eq!(when_at(T, T - 47 * 3600), "2026-12-06T10:00:00Z (in 47 h)");
        assert_eq!(when_at(T, T - 48 * 3600), "2026-12-06T10:00:00Z (in 2 d)");
    }

    #[test]
    fn out_of_range_and_unset() {
        assert!(when_at(i64::MAX, 0).starts_with(&i64::MAX.to_string()));
        assert!(when_at(i64::MIN, i64::MAX).contains("ago"));
        assert_eq!(when_or_dash(0), "-");
    }
}
