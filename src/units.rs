//! Human units in the configuration: durations (`500ms`, `90s`, `36h`, `7d`, `1h30m`; a bare
//! number is seconds) and sizes (`4096`, `512MiB`, `10GiB`, `2GB`), parsed by `humantime` and
//! `bytesize`, and written back the way an operator would write them.

use std::time::Duration;

/// The longest duration any setting takes: beyond it a timer's deadline (now + it) could
/// overflow the clock's range and panic the task that sets it.
pub const MAX_DURATION: Duration = Duration::from_secs(3_155_760_000); // 100 × 365.25 days

/// Parses a duration; a bare number is seconds. At most [`MAX_DURATION`] (100 years).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<u64>() {
        Ok(n) => Duration::from_secs(n),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("bad duration {s:?} ({e}): expected e.g. 36h, 90s, 500ms"))?,
    };
    if d > MAX_DURATION {
        return Err(format!("duration {s:?} is more than 100 years"));
    }
    Ok(d)
}

/// Formats a duration in its largest whole unit (`1d`, `36h`, `90s`, `1500ms`), which
/// [`parse_duration`] reads back. (humantime's own formatter writes `1day 12h`, which is
/// correct but not how anyone writes a config file.)
pub fn format_duration(d: Duration) -> String {
    if !d.subsec_nanos().is_multiple_of(1_000) {
        return format!("{}ns", d.as_nanos());
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        // Below a millisecond (`--write-linger 500us`).
        return format!("{}us", d.as_micros());
    }
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s > 0 && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

/// Parses a size in bytes: a bare number, or a number with a decimal (`KB`, `MB`, `GB`, `TB`)
/// or binary (`KiB`, `MiB`, `GiB`, `TiB`) unit.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("bad size {s:?} ({e}): expected e.g. 10GiB, 512MiB, 4096"))
}

/// Serialises a duration as [`format_duration`] writes it (for `--validate-only`).
pub fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A duration no timer can add to the clock is refused where it is read (a pong timeout of
    /// 2^63 seconds passed --validate-only and panicked every subscriber's session).
    #[test]
    fn durations_past_a_century_are_refused() {
        assert_eq!(parse_duration("100y").map(|_| ()), Ok(()));
        for huge in ["9223372036854775807", "101y"] {
            let e = parse_duration(huge).unwrap_err();
            assert!(e.contains("more than 100 years"), "{e}");
        }
        assert!(parse_duration("600000000000y").is_err(), "humantime's own overflow");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("36h"), Ok(Duration::from_secs(36 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("1y").is_err() || parse_duration("1y").unwrap() > Duration::from_secs(86_400 * 300));
        assert!(parse_duration("forever").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
        assert_eq!(format_duration(Duration::from_secs(36 * 3600)), "36h");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_micros(500)), "500us");
        assert_eq!(format_duration(Duration::from_nanos(1)), "1ns");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1500us");
        for d in ["36h", "90s", "1500ms", "7d", "5m", "500us", "1500us", "1ns", "2500ns"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("32KiB"), Ok(32 << 10));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("10 parsecs").is_err());
    }
}
