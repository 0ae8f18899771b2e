//! Small shared helpers: human durations and sizes, and rate-limited logging.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The decimal digits of `n`, written at the end of `buf`.
pub fn format_u64(buf: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Parses `36h`, `90s`, `1h30m`, `500ms`, `2d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return Err(format!("bad duration {s:?}: expected a number, e.g. 36h, 90s, 500ms"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| format!("bad duration {s:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86_400),
            _ => return Err(format!("bad duration {s:?}: unit must be ms, s, m, h or d")),
        };
        total += d;
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
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

/// Parses `10GiB`, `512MiB`, `2GB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.bytes().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return Err(format!("bad size {s:?}: expected e.g. 10GiB, 512MiB, 4096"));
    }
    let n: u64 = s[..digits].parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        u => return Err(format!("bad size {s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Tells systemd (`Type=notify`) about our state through `$NOTIFY_SOCKET`, e.g. `READY=1`.
/// A no-op when not started by systemd.
pub fn sd_notify(state: &str) {
    #[cfg(unix)]
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        use std::os::unix::net::UnixDatagram;
        let Ok(sock) = UnixDatagram::unbound() else { return };
        let bytes = path.as_encoded_bytes();
        let result = if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket name (Linux).
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = name;
                return;
            }
        } else {
            sock.send_to(state.as_bytes(), std::path::Path::new(&path))
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }
}

/// (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Logs at most one line per key per interval, and says how many were suppressed: a hostile
/// upstream or client cannot flood the log.
pub struct RateLimitedLog {
    interval: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RateLimitedLog {
    pub fn new(interval: Duration) -> Self {
        RateLimitedLog { interval, last: Mutex::new(HashMap::new()) }
    }

    /// Whether a line for `key` may be written now; returns the number suppressed since the
    /// last one that was.
    pub fn allow(&self, key: &'static str) -> Option<u64> {
        let mut map = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match map.get_mut(key) {
            Some((at, suppressed)) if now.duration_since(*at) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                map.insert(key, (now, 0));
                Some(0)
            }
        }
    }

    pub fn warn(&self, key: &'static str, msg: impl FnOnce() -> String) {
        if let Some(suppressed) = self.allow(key) {
            tracing::warn!(kind = key, suppressed, "{}", msg());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("36h"), Ok(Duration::from_secs(36 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("10 parsecs").is_err());
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_638), (2026, 7, 4));
    }

    #[test]
    fn rate_limited_log_suppresses_and_counts() {
        let l = RateLimitedLog::new(Duration::from_secs(3600));
        assert_eq!(l.allow("x"), Some(0));
        assert_eq!(l.allow("x"), None);
        assert_eq!(l.allow("x"), None);
        assert_eq!(l.allow("y"), Some(0));
    }
}
