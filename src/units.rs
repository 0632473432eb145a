//! Sizes and durations as settings spell them, in nginx's forms: `1048576`, `"512k"`, `"1m"`;
//! `30`, `"30s"`, `"500ms"`, `"2m"`, `"1m30s"`. Plain Rust, so `cargo test` covers it.

use std::time::Duration;

/// The longest duration a setting stands for (100 years): larger values mean the same, so no
/// time arithmetic on them can overflow.
pub const MAX_SECONDS: f64 = 100.0 * 365.25 * 86400.0;

/// Parses `1048576`, `"512k"`, `"10m"`, `"1g"` (nginx's size units, powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1024),
        (i, 'm' | 'M') => (&s[..i], 1024 * 1024),
        (i, 'g' | 'G') => (&s[..i], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    let num = num.trim();
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// A size the way a setting would spell it: `"64m"`, `"512k"`, or bytes.
pub fn show_size(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "g"), (1 << 20, "m"), (1 << 10, "k")];
    for (m, u) in UNITS {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{u}", n / m);
        }
    }
    n.to_string()
}

/// Seconds as a `Duration`, clamped to `MAX_SECONDS`; `None` for NaN, infinities and
/// negative numbers.
pub fn seconds(v: f64) -> Option<Duration> {
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v.min(MAX_SECONDS)))
}

/// Parses nginx's time forms: a plain number of seconds (`"30"`, `"0.5"`), or one or more
/// `<number><unit>` parts with units `ms`, `s`, `m`, `h`, `d`, `w`, `M` (30 days), `y`
/// (365 days), as in `"1m30s"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return seconds(v);
    }
    let mut total = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else {
            match rest.chars().next()? {
                's' => (1.0, 1),
                'm' => (60.0, 1),
                'h' => (3600.0, 1),
                'd' => (86400.0, 1),
                'w' => (7.0 * 86400.0, 1),
                'M' => (30.0 * 86400.0, 1),
                'y' => (365.0 * 86400.0, 1),
                _ => return None,
            }
        };
        rest = &rest[len..];
        total += n * unit;
    }
    seconds(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_show_in_the_largest_whole_unit() {
        assert_eq!(show_size(64 << 20), "64m");
        assert_eq!(show_size(1536), "1536");
        assert_eq!(show_size(512 << 10), "512k");
        assert_eq!(show_size(2 << 30), "2g");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Some(1048576));
        assert_eq!(parse_size("512k"), Some(512 * 1024));
        assert_eq!(parse_size(" 1m "), Some(1024 * 1024));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("0"), Some(0));
        for bad in ["", "m", "1.5m", "-1", "1x", "k1", "99999999999999999999g"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations() {
        let d = |s: &str| parse_duration(s).map(|d| d.as_secs_f64());
        assert_eq!(d("30"), Some(30.0));
        assert_eq!(d("0.5"), Some(0.5));
        assert_eq!(d("30s"), Some(30.0));
        assert_eq!(d("500ms"), Some(0.5));
        assert_eq!(d("2m"), Some(120.0));
        assert_eq!(d("1m30s"), Some(90.0));
        assert_eq!(d("1h"), Some(3600.0));
        assert_eq!(d("1d"), Some(86400.0));
        for bad in ["", "s", "1x", "-1", "1s-", "ms", "nan", "inf"] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }
}
