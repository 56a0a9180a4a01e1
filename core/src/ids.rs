//! Identifier rules: registration ids, enrollment group ids, ID scopes and etags.

use crate::error::ServiceError;

/// Longest registration or enrollment group id (docs/service-api.md §1.3 notes).
pub const MAX_ID_LEN: usize = 128;

/// Registration ids and enrollment group ids: 1..=128 characters, alphanumerics plus `- . _ :`,
/// the last character alphanumeric or `-`, and no special first character
/// (TypeSpec text quoted in docs/service-api.md §1.3).
pub fn validate_id(what: &str, id: &str) -> Result<(), ServiceError> {
    let bad = |why: &str| Err(ServiceError::invalid(format!("{what} '{}' is invalid: {why}", printable(id))));
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > MAX_ID_LEN {
        return bad("longer than 128 characters");
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':')) {
        return bad("only alphanumerics and - . _ : are allowed");
    }
    let first = id.as_bytes()[0];
    let last = id.as_bytes()[id.len() - 1];
    if !first.is_ascii_alphanumeric() {
        return bad("must start with an alphanumeric character");
    }
    if !(last.is_ascii_alphanumeric() || last == b'-') {
        return bad("must end with an alphanumeric character or '-'");
    }
    Ok(())
}

/// Ids are case-insensitive: the store keys them in lower case.
pub fn id_key(id: &str) -> String {
    id.to_ascii_lowercase()
}

/// An ID scope: `0ne` and 8 upper-case hex digits (docs/service-api.md §4.2).
pub fn id_scope_from(random: [u8; 4]) -> String {
    format!("0ne{:08X}", u32::from_be_bytes(random))
}

/// An opaque etag shaped like the ones DPS emits (a quoted Cosmos-style value), from 16 random bytes.
pub fn etag_from(r: [u8; 16]) -> String {
    let mut s = String::with_capacity(38);
    s.push('"');
    for (i, part) in [&r[0..4], &r[4..6], &r[6..8], &r[8..10], &r[10..16]].into_iter().enumerate() {
        if i > 0 {
            s.push('-');
        }
        push_hex(&mut s, part);
    }
    s.push('"');
    s
}

/// Appends `bytes` in lower-case hex, two digits each (no allocation per byte: ids are
/// written on every registration).
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// `bytes` in lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    push_hex(&mut s, bytes);
    s
}

/// Etag comparison for If-Match: an optional `W/` prefix and surrounding quotes are ignored on
/// both sides; `*` matches any existing entity (docs/service-api.md §1.6).
pub fn etag_matches(if_match: &str, stored: &str) -> bool {
    fn bare(s: &str) -> &str {
        let s = s.trim();
        let s = s.strip_prefix("W/").unwrap_or(s);
        s.trim_matches('"')
    }
    let m = if_match.trim();
    m == "*" || bare(m) == bare(stored)
}

/// Shortened and sanitised for error messages.
pub fn printable(s: &str) -> String {
    s.chars().take(140).map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules() {
        assert!(validate_id("id", "dev-1.a_b:c").is_ok());
        assert!(validate_id("id", "dev-").is_ok());
        assert!(validate_id("id", "").is_err());
        assert!(validate_id("id", "-dev").is_err());
        assert!(validate_id("id", "dev.").is_err());
        assert!(validate_id("id", "dev/1").is_err());
        assert!(validate_id("id", &"a".repeat(129)).is_err());
        assert!(validate_id("id", &"a".repeat(128)).is_ok());
    }

    #[test]
    fn hex_digits() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
        let e = etag_from([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(e, "\"12345678-9abc-def0-0123-456789abcdef\"");
    }

    #[test]
    fn scope_shape() {
        assert_eq!(id_scope_from([0, 0, 0x0a, 0x0b]), "0ne00000A0B");
    }

    #[test]
    fn etag_match_rules() {
        let e = etag_from([7; 16]);
        assert!(etag_matches(&e, &e));
        assert!(etag_matches(e.trim_matches('"'), &e));
        assert!(etag_matches(&format!("W/{e}"), &e));
        assert!(etag_matches("*", &e));
        assert!(!etag_matches("\"other\"", &e));
    }
}
