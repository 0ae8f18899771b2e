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
/// events whose `time` fails that parse): `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r.clone()).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let num = |r: std::ops::Range<usize>| -> u32 { b[r].iter().fold(0, |n, d| n * 10 + (d - b'0') as u32) };
    if b.len() < 20 || !digits(0..4) || b[4] != b'-' || !digits(5..7) || b[7] != b'-' || !digits(8..10) {
        return false;
    }
    if b[10] != b'T' || !digits(11..13) || b[13] != b':' || !digits(14..16) || b[16] != b':' || !digits(17..19) {
        return false;
    }
    let (month, day) = (num(5..7), num(8..10));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return false;
    }
    if num(11..13) > 23 || num(14..16) > 59 || num(17..19) > 59 {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            let off = [*h1, *h2, *m1, *m2];
            off.iter().all(u8::is_ascii_digit)
                && (h1 - b'0') * 10 + (h2 - b'0') <= 23
                && (m1 - b'0') * 10 + (m2 - b'0') <= 59
        }
        _ => false,
    }
}

/// Unix microseconds of an RFC 3339 timestamp that [`is_rfc3339`] accepts (`None` otherwise).
/// Used for the relay-lag figure only; the event log never uses relay time.
pub fn rfc3339_to_unix_us(s: &str) -> Option<i64> {
    if !is_rfc3339(s) {
        return None;
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> i64 { b[r].iter().fold(0, |n, d| n * 10 + (d - b'0') as i64) };
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut us = ((days * 24 + num(11..13)) * 60 + num(14..16)) * 60 + num(17..19);
    us *= 1_000_000;
    let mut i = 19;
    if b[i] == b'.' {
        let mut scale = 100_000;
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            us += (b[i] - b'0') as i64 * scale;
            scale /= 10;
            i += 1;
        }
    }
    if b[i] != b'Z' {
        let off = (num(i + 1..i + 3) * 60 + num(i + 4..i + 6)) * 60_000_000;
        us += if b[i] == b'+' { -off } else { off };
    }
    Some(us)
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
}
