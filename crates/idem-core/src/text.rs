//! Bounded strings and RFC 3339 times, as written in (and read back from) the
//! `x-idem-*` headers. The ground floor: depends on nothing else in the crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Cuts `s` to at most `max` bytes on a character boundary, ending with a marker that
/// says how many bytes were cut: `... [N bytes cut]`, where `N` is the length of `s`
/// minus the length of the part kept. `max` should leave room for the marker (about 30
/// bytes); with less, only the marker is returned.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    // Room for the marker: at most as many digits as `s.len()` has, since the count
    // cut is never more than that.
    let room = marker(s.len()).len();
    let mut end = max.saturating_sub(room);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}", &s[..end], marker(s.len() - end))
}

fn marker(cut: usize) -> String {
    format!("... [{cut} bytes cut]")
}

/// Formats a time as RFC 3339 UTC with millisecond precision.
pub fn rfc3339(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()) as i64;
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// Parses what [`rfc3339`] writes (UTC, `Z` suffix, optional fraction of 1 to 9
/// digits, of which milliseconds are kept). `None` for anything else, including
/// out-of-range fields (month 13, hour 24, year past 9999) and times before 1970.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    fn num(p: &str, len: usize, max: i64) -> Option<i64> {
        if p.len() != len || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok().filter(|n| *n <= max)
    }
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut dp = date.split('-');
    let (y, m, d) = (dp.next()?, dp.next()?, dp.next()?);
    let (y, m, d) = (num(y, 4, 9999)?, num(m, 2, 12)?, num(d, 2, 31)?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut tp = hms.split(':');
    let (h, min, sec) = (tp.next()?, tp.next()?, tp.next()?);
    let (h, min, sec) = (num(h, 2, 23)?, num(min, 2, 59)?, num(sec, 2, 60)?);
    if dp.next().is_some() || tp.next().is_some() || m == 0 || d == 0 {
        return None;
    }
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_ms: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    let days = days_from_civil(y, m, d);
    let ms = ((days * 24 + h) * 60 + min) * 60_000 + sec * 1000 + frac_ms;
    u64::try_from(ms)
        .ok()
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

// Howard Hinnant's civil-date algorithms.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::outcome::MAX_ERROR_LEN;

    #[test]
    fn truncation_is_bounded_and_utf8_safe() {
        let long = "é".repeat(5000);
        let t = truncate(&long, MAX_ERROR_LEN);
        assert!(t.len() <= MAX_ERROR_LEN);
        assert!(t.ends_with(" bytes cut]"));
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn truncation_marker_counts_the_bytes_cut() {
        // 2 KiB kept out of 5 MiB: the marker names the bytes dropped, not the length.
        let long = "E".repeat(5 << 20);
        let t = truncate(&long, MAX_ERROR_LEN);
        let marker = "... [5240855 bytes cut]";
        assert_eq!(t, format!("{}{marker}", "E".repeat(2025)));
        assert_eq!(t.len(), MAX_ERROR_LEN);

        // The count cut can have fewer digits than the length: the result is then a
        // byte or two under the limit, never over it.
        let s = "a".repeat(1000);
        assert_eq!(
            truncate(&s, 100),
            format!("{}... [920 bytes cut]", "a".repeat(80))
        );
        let s = "a".repeat(101);
        assert_eq!(
            truncate(&s, 100),
            format!("{}... [20 bytes cut]", "a".repeat(81))
        );

        // Multi-byte characters: the cut backs off to a boundary and counts it.
        let s = "é".repeat(5000); // 10 000 bytes
        let t = truncate(&s, MAX_ERROR_LEN);
        assert_eq!(t, format!("{}... [7974 bytes cut]", "é".repeat(1013)));
    }

    #[test]
    fn rfc3339_rejects_out_of_range_fields() {
        for bad in [
            "99999999999999999-01-01T00:00:00Z",
            "2023-13-01T00:00:00Z",
            "2023-00-01T00:00:00Z",
            "2023-01-00T00:00:00Z",
            "2023-01-01T24:00:00Z",
            "2023-01-01T00:60:00Z",
            "2023-01-01T00:00:00.Z",
            "2023-01-01T00:00:00.+12Z",
            "2023-01-01T00:00:00.1234567890Z",
            "+2023-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2023-01-01T00:00:00",
            "2023-01-01T00:00:00:00Z",
            "2023-01-01-01T00:00:00Z",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.123456Z"),
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
    }

    #[test]
    fn rfc3339_known_value() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.123Z"), Some(t));
    }

    proptest! {
        #[test]
        fn rfc3339_round_trips(ms in 0u64..4_000_000_000_000) {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            prop_assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        }
    }
}
