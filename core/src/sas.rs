//! Shared access signature tokens (docs/service-api.md §3.3):
//! `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded base64 HMAC}&se={expiry}&skn={key name}`.
//! The signature is HMAC-SHA256 over `{sr as sent}\n{se}` under the base64-decoded key.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use ring::hmac;

/// What `encodeURIComponent` leaves alone: alphanumerics and `-_.!~*'()`.
const URI_COMPONENT: &AsciiSet =
    &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'!').remove(b'~').remove(b'*').remove(b'\'').remove(b'(').remove(b')');

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as it appeared in the token (still percent-encoded).
    pub resource_raw: String,
    /// `sr` percent-decoded.
    pub resource: String,
    /// The signature bytes.
    pub signature: Vec<u8>,
    pub expiry: i64,
    pub key_name: Option<String>,
}

/// Why a token was refused; logged, never shown to the caller beyond "Unauthorized".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SasError {
    NotSas,
    Malformed,
    Expired,
    WrongResource,
    UnknownKeyName,
    BadSignature,
}

impl SasError {
    pub fn reason(self) -> &'static str {
        match self {
            SasError::NotSas => "not a SharedAccessSignature",
            SasError::Malformed => "malformed token",
            SasError::Expired => "token expired",
            SasError::WrongResource => "token resource does not cover this endpoint",
            SasError::UnknownKeyName => "unknown key name",
            SasError::BadSignature => "signature does not match",
        }
    }
}

/// Parses the header value (or MQTT password). Field order is free.
pub fn parse(value: &str) -> Result<SasToken, SasError> {
    let rest = value.trim().strip_prefix("SharedAccessSignature").ok_or(SasError::NotSas)?;
    let rest = rest.trim_start();
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for part in rest.split('&') {
        let (k, v) = part.split_once('=').ok_or(SasError::Malformed)?;
        match k {
            "sr" => sr = Some(v),
            "sig" => sig = Some(v),
            "se" => se = Some(v),
            "skn" => skn = Some(v),
            _ => {}
        }
    }
    let sr = sr.ok_or(SasError::Malformed)?;
    let sig = percent_decode_str(sig.ok_or(SasError::Malformed)?).decode_utf8().map_err(|_| SasError::Malformed)?;
    let signature = B64.decode(sig.as_bytes()).map_err(|_| SasError::Malformed)?;
    let expiry = se.ok_or(SasError::Malformed)?.parse::<i64>().map_err(|_| SasError::Malformed)?;
    let resource = percent_decode_str(sr).decode_utf8().map_err(|_| SasError::Malformed)?.into_owned();
    let key_name = skn.map(|s| percent_decode_str(s).decode_utf8().map(|c| c.into_owned())).transpose().map_err(|_| SasError::Malformed)?;
    Ok(SasToken { resource_raw: sr.to_string(), resource, signature, expiry, key_name })
}

/// The `sr` text for a resource, as Node and Python encode it.
pub fn encode_resource(resource: &str) -> String {
    utf8_percent_encode(resource, URI_COMPONENT).to_string()
}

pub fn sign(key: &[u8], string_to_sign: &str) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), string_to_sign.as_bytes()).as_ref().to_vec()
}

/// Builds a token (for tests, loadgen and the printed connection details).
pub fn build(resource: &str, key: &[u8], expiry: i64, key_name: Option<&str>) -> String {
    let sr = encode_resource(resource);
    let sig = B64.encode(sign(key, &format!("{sr}\n{expiry}")));
    let mut t = format!("SharedAccessSignature sr={sr}&sig={}&se={expiry}", encode_resource(&sig));
    if let Some(n) = key_name {
        t.push_str("&skn=");
        t.push_str(&encode_resource(n));
    }
    t
}

impl SasToken {
    /// Checks expiry and that the decoded resource equals `resource` or is a segment prefix of it
    /// (a token for `/a/b` covers `/a/b/c`, not `/a/bc`), case-insensitively.
    pub fn check_scope(&self, resource: &str, now_secs: i64) -> Result<(), SasError> {
        if self.expiry <= now_secs {
            return Err(SasError::Expired);
        }
        let want = resource.trim_end_matches('/').to_ascii_lowercase();
        let got = self.resource.trim_end_matches('/').to_ascii_lowercase();
        let got = got.strip_prefix("https://").unwrap_or(&got);
        if want == got || (want.starts_with(got) && want.as_bytes().get(got.len()) == Some(&b'/')) {
            Ok(())
        } else {
            Err(SasError::WrongResource)
        }
    }

    /// True when the signature was made with `key` (already base64-decoded). Encoders differ in
    /// the case of percent escapes (the C SDK writes `%2f`, the others `%2F`), so the canonical
    /// re-encodings are tried after the text as sent. Comparison is constant-time.
    pub fn signed_with(&self, key: &[u8]) -> bool {
        let k = hmac::Key::new(hmac::HMAC_SHA256, key);
        let check = |sr: &str| hmac::verify(&k, format!("{sr}\n{}", self.expiry).as_bytes(), &self.signature).is_ok();
        if check(&self.resource_raw) {
            return true;
        }
        let canonical = encode_resource(&self.resource);
        if canonical != self.resource_raw && check(&canonical) {
            return true;
        }
        let lower = lower_escapes(&canonical);
        lower != canonical && lower != self.resource_raw && check(&lower)
    }
}

fn lower_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = 0;
    for c in s.chars() {
        if c == '%' {
            esc = 2;
            out.push(c);
        } else if esc > 0 {
            esc -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// base64 of HMAC-SHA256(groupKey, registrationId): a group device's key (docs/service-api.md §2.2).
pub fn derive_device_key(group_key: &[u8], registration_id: &str) -> String {
    B64.encode(sign(group_key, registration_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_parse_verify() {
        let key = b"0123456789abcdef";
        let t = build("myhost.example", key, 2000, Some("provisioningserviceowner"));
        let p = parse(&t).unwrap();
        assert_eq!(p.resource, "myhost.example");
        assert_eq!(p.key_name.as_deref(), Some("provisioningserviceowner"));
        assert!(p.signed_with(key));
        assert!(!p.signed_with(b"another key....."));
        assert_eq!(p.check_scope("myhost.example", 1999), Ok(()));
        assert_eq!(p.check_scope("myhost.example", 2000), Err(SasError::Expired));
        assert_eq!(p.check_scope("otherhost", 1), Err(SasError::WrongResource));
    }

    #[test]
    fn segment_prefix_rule() {
        let t = parse(&build("0ne1/registrations", b"k", 10, None)).unwrap();
        assert!(t.check_scope("0ne1/registrations/dev", 1).is_ok());
        let t = parse(&build("0ne1/reg", b"k", 10, None)).unwrap();
        assert_eq!(t.check_scope("0ne1/registrations", 1), Err(SasError::WrongResource));
    }

    #[test]
    fn lower_case_escapes_from_the_c_sdk_verify() {
        let key = b"devicekey";
        let sr = "0ne00000001%2fregistrations%2fdev1";
        let sig = B64.encode(sign(key, &format!("{sr}\n99")));
        let t = format!("SharedAccessSignature sr={sr}&sig={}&se=99&skn=registration", encode_resource(&sig));
        let p = parse(&t).unwrap();
        assert_eq!(p.resource, "0ne00000001/registrations/dev1");
        assert!(p.signed_with(key));
    }

    #[test]
    fn malformed_tokens() {
        assert_eq!(parse("Bearer x"), Err(SasError::NotSas));
        assert_eq!(parse("SharedAccessSignature sr=a&se=1"), Err(SasError::Malformed));
        assert_eq!(parse("SharedAccessSignature sr=a&sig=%%%&se=1"), Err(SasError::Malformed));
        assert_eq!(parse("SharedAccessSignature sr=a&sig=AAAA&se=soon"), Err(SasError::Malformed));
        assert_eq!(parse("SharedAccessSignature garbage"), Err(SasError::Malformed));
    }

    #[test]
    fn derived_key_matches_the_documented_algorithm() {
        // HMAC-SHA256 with key "key" over "The quick brown fox jumps over the lazy dog" (RFC 4231-style vector).
        let k = derive_device_key(b"key", "The quick brown fox jumps over the lazy dog");
        assert_eq!(B64.decode(k).unwrap()[..4], [0xf7, 0xbc, 0x83, 0xf4]);
    }
}
