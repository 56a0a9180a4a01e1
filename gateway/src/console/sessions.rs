//! The console's login sessions: a random id in an HttpOnly cookie names the shared access
//! policy the operator logged in with and its key, kept on the server only. Pure (time is
//! passed in), so it is tested without a browser.

use std::collections::HashMap;

/// Name of the session cookie.
pub const COOKIE: &str = "dps_console";
/// A session lasts this long after its login (seconds), whatever its use.
pub const LIFETIME_SECS: u64 = 8 * 3600;
/// Sessions held at once; a login beyond it drops the oldest.
pub const MAX_SESSIONS: usize = 1024;

#[derive(Clone, Debug)]
pub struct Session {
    pub policy: String,
    pub key: Vec<u8>,
    pub expires: u64,
}

#[derive(Default)]
pub struct Sessions {
    by_id: HashMap<String, Session>,
}

impl Sessions {
    /// Opens a session for `policy` under the fresh random `id` (hex, from the caller).
    pub fn open(&mut self, id: String, policy: &str, key: Vec<u8>, now: u64) {
        self.by_id.retain(|_, s| s.expires > now);
        if self.by_id.len() >= MAX_SESSIONS {
            if let Some(oldest) = self.by_id.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone()) {
                self.by_id.remove(&oldest);
            }
        }
        self.by_id.insert(id, Session { policy: policy.to_string(), key, expires: now + LIFETIME_SECS });
    }

    /// The live session a request's `Cookie` header names.
    pub fn find(&self, cookie_header: Option<&str>, now: u64) -> Option<&Session> {
        let id = session_id(cookie_header?)?;
        self.by_id.get(id).filter(|s| s.expires > now)
    }

    pub fn close(&mut self, cookie_header: Option<&str>) {
        if let Some(id) = cookie_header.and_then(session_id) {
            self.by_id.remove(id);
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The session id in a `Cookie` header (`a=b; dps_console=ID; …`).
fn session_id(header: &str) -> Option<&str> {
    header.split(';').map(str::trim).find_map(|kv| kv.strip_prefix(COOKIE)?.strip_prefix('=')).filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value for a new session: HttpOnly (no script reads it), Secure (the console
/// is HTTPS only), SameSite=Strict (another site's page cannot send it).
pub fn set_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; Max-Age={LIFETIME_SECS}; HttpOnly; Secure; SameSite=Strict")
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_until_it_expires() {
        let mut s = Sessions::default();
        s.open("abc".into(), "owner", vec![1, 2], 100);
        let found = s.find(Some("theme=dark; dps_console=abc; x=y"), 101).map(|s| s.policy.clone());
        assert_eq!(found.as_deref(), Some("owner"));
        assert!(s.find(Some("dps_console=abd"), 101).is_none(), "another id");
        assert!(s.find(Some("dps_consoleX=abc"), 101).is_none(), "another cookie name");
        assert!(s.find(Some("dps_console="), 101).is_none());
        assert!(s.find(None, 101).is_none());
        assert!(s.find(Some("dps_console=abc"), 100 + LIFETIME_SECS).is_none(), "expired");
        s.close(Some("dps_console=abc"));
        assert!(s.find(Some("dps_console=abc"), 101).is_none(), "logged out");
    }

    #[test]
    fn sessions_are_bounded_dropping_the_oldest() {
        let mut s = Sessions::default();
        for i in 0..MAX_SESSIONS as u64 + 5 {
            s.open(format!("id{i}"), "p", Vec::new(), 1000 + i);
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.find(Some("dps_console=id0"), 2000).is_none(), "the oldest went first");
        assert!(s.find(Some(&format!("dps_console=id{}", MAX_SESSIONS + 4)), 2000).is_some());
        // Expired sessions are swept at the next login.
        s.open("late".into(), "p", Vec::new(), 1000 + 2 * LIFETIME_SECS);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_cookie_cannot_be_read_by_scripts_or_sent_cross_site() {
        let c = set_cookie("abc");
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(attr), "{c} lacks {attr}");
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
