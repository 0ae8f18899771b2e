//! AT Protocol identifier syntax: NSID, DID, record key, TID, and the RFC 3339 `time` check.
//!
//! The rules are indigo's regular expressions (spec/firehose.md §5.4), written as plain loops
//! so the hot path needs no regex engine. Each function is pinned by the interop fixtures in
//! `tests/interop.rs`.

fn is_alpha(b: u8) -> bool {
    b.is_ascii_alphabetic()
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// An NSID such as `app.bsky.feed.post`: at least three segments, the first starting with a
/// letter, domain segments of letters, digits and inner hyphens, the last (the name) a letter
/// followed by letters and digits; at most 317 characters.
pub fn is_valid_nsid(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 317 {
        return false;
    }
    let Some(dot) = b.iter().rposition(|&c| c == b'.') else { return false };
    let (domain, name) = (&b[..dot], &b[dot + 1..]);
    if name.is_empty() || name.len() > 63 || !is_alpha(name[0]) || !name.iter().all(|&c| ALNUM[c as usize]) {
        return false;
    }
    let mut segments = 0;
    for (i, seg) in domain.split(|&c| c == b'.').enumerate() {
        if seg.is_empty() || seg.len() > 63 || (i == 0 && !is_alpha(seg[0])) {
            return false;
        }
        if !is_alnum(seg[0]) || !is_alnum(seg[seg.len() - 1]) || !seg.iter().all(|&c| DOMAIN_SEGMENT[c as usize]) {
            return false;
        }
        segments += 1;
    }
    // With the name: at least three.
    segments >= 2
}

/// Which bytes a kind of identifier may hold: letters, digits and `extra`. (A table: these
/// checks run on every event, and a chain of comparisons per byte showed in profiles.)
const fn allowed(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = (c as u8).is_ascii_alphanumeric();
        c += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

static ALNUM: [bool; 256] = allowed(b"");
static DOMAIN_SEGMENT: [bool; 256] = allowed(b"-");
static DID_IDENTIFIER: [bool; 256] = allowed(b"._:%-");
static RECORD_KEY: [bool; 256] = allowed(b"_~.:-");

/// A DID: `did:` + lowercase method + `:` + identifier of `[A-Za-z0-9._:%-]`, not ending in
/// `:` or `%`; at most 2048 characters.
pub fn is_valid_did(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() > 2048 {
        return false;
    }
    let Some(rest) = b.strip_prefix(b"did:") else { return false };
    let Some(colon) = rest.iter().position(|&c| c == b':') else { return false };
    let (method, ident) = (&rest[..colon], &rest[colon + 1..]);
    if method.is_empty() || !method.iter().all(|c| c.is_ascii_lowercase()) {
        return false;
    }
    let Some(&last) = ident.last() else { return false };
    ident.iter().all(|&c| DID_IDENTIFIER[c as usize]) && !matches!(last, b':' | b'%')
}

/// A record key: 1 to 512 characters of `[A-Za-z0-9._:~-]`, and not `.` or `..`.
pub fn is_valid_record_key(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty() && b.len() <= 512 && s != "." && s != ".." && b.iter().all(|&c| RECORD_KEY[c as usize])
}

/// A TID: 13 characters of base32-sortable, the first in `234567a-j`.
pub fn is_valid_tid(s: &str) -> bool {
    let b = s.as_bytes();
    let sortable = |c: u8| matches!(c, b'2'..=b'7' | b'a'..=b'z');
    b.len() == 13 && matches!(b[0], b'2'..=b'7' | b'a'..=b'j') && b.iter().all(|&c| sortable(c))
}

/// The time a TID was made at (its 53 bits of unix microseconds), if [`is_valid_tid`].
pub fn tid_to_unix_us(s: &str) -> Option<u64> {
    if !is_valid_tid(s) {
        return None;
    }
    let value = s.bytes().fold(0u64, |v, c| {
        let digit = if c <= b'7' { c - b'2' } else { c - b'a' + 6 };
        (v << 5) | digit as u64
    });
    Some(value >> 10)
}

/// An RFC 3339 timestamp as Go's `time.Parse(time.RFC3339, …)` accepts it (Jetstream v1 drops
/// events whose `time` fails that parse).
pub fn is_rfc3339(s: &str) -> bool {
    rfc3339_to_unix_us(s).is_some()
}

/// Unix microseconds of a timestamp that Go's `time.Parse(time.RFC3339, …)` accepts (`None`
/// otherwise), by Go's rules, which are RFC 3339's but looser in places:
/// `YYYY-MM-DDTH[H]:MM:SS[(.|,)digits](Z|±HH:MM)`, the day within its month (no February 30),
/// an hour of one digit, a decimal comma, and an offset of up to 24 hours and 60 minutes.
pub fn rfc3339_to_unix_us(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(at(4, b'-') && at(7, b'-') && at(10, b'T')) {
        return None;
    }
    let (year, month, day) = (digits_at(b, 0, 4)?, digits_at(b, 5, 2)?, digits_at(b, 8, 2)?);
    // The hour: one digit or two.
    let hour_digits = if b.get(12).is_some_and(u8::is_ascii_digit) { 2 } else { 1 };
    let hour = digits_at(b, 11, hour_digits)?;
    let mut i = 11 + hour_digits;
    if !(at(i, b':') && at(i + 3, b':')) {
        return None;
    }
    let (minute, second) = (digits_at(b, i + 1, 2)?, digits_at(b, i + 4, 2)?);
    i += 6;
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(month, year)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut us = 0;
    if matches!(b.get(i), Some(b'.' | b',')) && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i += 1;
        let mut scale = 100_000;
        while let Some(d) = b.get(i).filter(|d| d.is_ascii_digit()) {
            us += (d - b'0') as i64 * scale;
            scale /= 10;
            i += 1;
        }
    }
    let offset_minutes = match b.get(i)? {
        b'Z' => {
            i += 1;
            0
        }
        &sign @ (b'+' | b'-') => {
            let (h, m) = (digits_at(b, i + 1, 2)?, digits_at(b, i + 4, 2)?);
            if !at(i + 3, b':') || h > 24 || m > 60 {
                return None;
            }
            i += 6;
            if sign == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        _ => return None,
    };
    if i != b.len() {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = ((days * 24 + hour) * 60 + minute - offset_minutes) * 60 + second;
    Some(seconds * 1_000_000 + us)
}

/// The `n` ASCII digits at `at`, as a number.
fn digits_at(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let d = b.get(at..at + n).filter(|d| d.iter().all(u8::is_ascii_digit))?;
    Some(d.iter().fold(0, |v, c| v * 10 + (c - b'0') as i64))
}

/// Days in `month` (1–12) of `year`, by the Gregorian calendar.
fn days_in_month(month: i64, year: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NSID, DID and record-key rules written the plain way (segments in a list, a
    /// comparison per character): what the table-driven checks must agree with.
    fn plain_nsid(s: &str) -> bool {
        let segments: Vec<&[u8]> = s.as_bytes().split(|&c| c == b'.').collect();
        let last = segments.len() - 1;
        !s.is_empty()
            && s.len() <= 317
            && segments.len() >= 3
            && segments.iter().enumerate().all(|(i, seg)| {
                !seg.is_empty()
                    && seg.len() <= 63
                    && if i == last {
                        is_alpha(seg[0]) && seg.iter().all(|&c| is_alnum(c))
                    } else {
                        (i != 0 || is_alpha(seg[0]))
                            && is_alnum(seg[0])
                            && is_alnum(seg[seg.len() - 1])
                            && seg.iter().all(|&c| is_alnum(c) || c == b'-')
                    }
            })
    }

    fn plain_did(s: &str) -> bool {
        let Some(rest) = s.strip_prefix("did:") else { return false };
        let Some((method, ident)) = rest.split_once(':') else { return false };
        s.len() <= 2048
            && !method.is_empty()
            && method.bytes().all(|c| c.is_ascii_lowercase())
            && !ident.is_empty()
            && ident.bytes().all(|c| is_alnum(c) || matches!(c, b'.' | b'_' | b':' | b'%' | b'-'))
            && !ident.ends_with([':', '%'])
    }

    fn plain_record_key(s: &str) -> bool {
        (1..=512).contains(&s.len())
            && s != "."
            && s != ".."
            && s.bytes().all(|c| is_alnum(c) || matches!(c, b'_' | b'~' | b'.' | b':' | b'-'))
    }

    proptest::proptest! {
        #[test]
        fn the_checks_agree_with_the_rules_written_plainly(
            s in "[a-zA-Z0-9.:_~%é-]{0,24}",
            did in "did:[a-zA-Z]{0,3}:[a-zA-Z0-9.:_~%é-]{0,12}",
            nsid in "([a-z0-9-]{0,5}\\.){0,4}[a-zA-Z0-9-]{0,5}",
            // Around the length limits: 63 per NSID segment and 317 in all, 512 for a record
            // key, 2048 for a DID.
            long_nsid in "[a-z]{62,63}(\\.[a-z]{62,63}){4}",
            wide_nsid in "[a-z]{62,64}\\.[a-z]{62,64}\\.[a-z]{62,64}",
            long_key in "[a-z]{505,520}",
            long_did in "did:plc:[a-z]{2035,2045}",
        ) {
            for s in [&s, &did, &nsid, &long_nsid, &wide_nsid, &long_key, &long_did] {
                proptest::prop_assert_eq!(is_valid_nsid(s), plain_nsid(s), "nsid {:?}", s);
                proptest::prop_assert_eq!(is_valid_did(s), plain_did(s), "did {:?}", s);
                proptest::prop_assert_eq!(is_valid_record_key(s), plain_record_key(s), "record key {:?}", s);
            }
        }
    }

    #[test]
    fn examples() {
        assert!(is_valid_nsid("app.bsky.feed.post"));
        assert!(!is_valid_nsid("app.bsky.fo*"));
        assert!(!is_valid_nsid("app.bsky"));
        assert!(is_valid_did("did:plc:q6gjnaw2blty4crticxkmujt"));
        assert!(!is_valid_did("did:plc:abc:"));
        assert!(is_valid_record_key("self"));
        assert!(!is_valid_record_key(".."));
        assert!(is_valid_tid("3mptbypluud2a"));
        // The atproto spec's example TID: made on 2023-06-30 at 15:03:01.887007 UTC.
        assert_eq!(tid_to_unix_us("3jzfcijpj2z2a"), Some(1_688_137_381_887_007));
        assert_eq!(tid_to_unix_us("3jzfcijpj2z2"), None);
        assert!(is_rfc3339("2026-07-04T14:38:08.999Z"));
        assert!(is_rfc3339("2026-07-04T14:38:08+02:00"));
        assert!(!is_rfc3339("2026-07-04 14:38:08Z"));
        assert_eq!(rfc3339_to_unix_us("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_to_unix_us("2026-07-04T14:38:08.999Z"), Some(1_783_175_888_999_000));
        assert_eq!(rfc3339_to_unix_us("2026-07-04T16:38:08.999+02:00"), Some(1_783_175_888_999_000));
    }

    /// Go's `time.Parse(time.RFC3339, …)`, which decides what Jetstream v1 keeps, is looser
    /// than RFC 3339 in places and stricter in one: it checks the day against the month.
    #[test]
    fn timestamps_are_read_as_go_reads_them() {
        let us = rfc3339_to_unix_us;
        let at = Some(1_783_175_887_877_000); // 2026-07-04T14:38:07.877Z
                                              // A decimal comma (Go 1.17 on), an hour of one digit, any number of fraction digits.
        assert_eq!(us("2026-07-04T14:38:07,877Z"), at);
        assert_eq!(us("2026-07-04T14:38:07.877000999Z"), at);
        assert_eq!(us("2026-07-04T4:38:07.877-10:00"), at);
        assert_eq!(us("2026-07-04T14:38:07Z"), Some(1_783_175_887_000_000));
        // An offset of 24 hours, or of 60 minutes.
        assert_eq!(us("2026-07-05T14:38:07.877+24:00"), at);
        assert_eq!(us("2026-07-04T15:38:07.877+00:60"), at);
        for bad in [
            "2026-02-30T00:00:00Z", // the day past its month
            "2026-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-07-04T24:00:00Z",
            "2026-07-04T14:60:00Z",
            "2026-07-04T14:38:60Z",
            "2026-13-04T14:38:07Z",
            "2026-07-00T14:38:07Z",
            "2026-07-04T14:38:07+25:00",
            "2026-07-04T14:38:07+23:61",
            "2026-07-04T14:38:07.Z", // a separator without digits
            "2026-07-04T14:38:07,Z",
            "2026-07-04T14:38:07",      // no zone
            "2026-07-04T14:38:07+0200", // the offset's colon
            "2026-07-04T14:38:07Zjunk",
            "2026-07-04T14:38:7Z",
            "2026-7-04T14:38:07Z",
            "2026-07-04T:38:07Z",
            "+026-07-04T14:38:07Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
        assert!(is_rfc3339("2024-02-29T00:00:00Z") && is_rfc3339("2000-02-29T00:00:00Z"));
        assert!(!is_rfc3339("1900-02-29T00:00:00Z"));
    }
}
