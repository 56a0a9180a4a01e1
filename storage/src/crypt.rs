//! Encryption at rest: every stored value is sealed with AES-256-GCM under the data key, with
//! a random 96-bit nonce and the table name and key as associated data (so a value cannot be
//! moved to another key). The etag and class stay outside the ciphertext; they hold no secrets.
//!
//! Layout: `[version=1][class][etag_len][etag][nonce: 12][ciphertext ‖ tag: 16]`.

use crate::record::{Record, Table};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const VERSION: u8 = 1;

pub struct DataKey {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl DataKey {
    pub fn new(bytes: &[u8; 32]) -> DataKey {
        // 32 bytes is always a valid AES-256 key, so this cannot fail.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 key of 32 bytes");
        DataKey { key: LessSafeKey::new(unbound), rng: SystemRandom::new() }
    }

    fn aad(table: Table, key: &str) -> Vec<u8> {
        let mut a = Vec::with_capacity(table.name().len() + 1 + key.len());
        a.extend_from_slice(table.name().as_bytes());
        a.push(0);
        a.extend_from_slice(key.as_bytes());
        a
    }

    pub fn seal(&self, table: Table, key: &str, r: &Record) -> Vec<u8> {
        let etag = &r.etag.as_bytes()[..r.etag.len().min(255)];
        let mut nonce = [0u8; NONCE_LEN];
        // The system RNG failing is unrecoverable for a process that makes keys.
        #[allow(clippy::expect_used)]
        self.rng.fill(&mut nonce).expect("system random source");
        let mut sealed = r.body.clone();
        // Sealing a buffer far below AES-GCM's length limit cannot fail.
        #[allow(clippy::expect_used)]
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(Self::aad(table, key)), &mut sealed)
            .expect("AES-GCM seal of a bounded buffer");
        let mut out = Vec::with_capacity(3 + etag.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(&[VERSION, r.class, etag.len() as u8]);
        out.extend_from_slice(etag);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    pub fn open(&self, table: Table, key: &str, v: &[u8]) -> Option<Record> {
        let (&version, rest) = v.split_first()?;
        if version != VERSION {
            return None;
        }
        let (&class, rest) = rest.split_first()?;
        let (&elen, rest) = rest.split_first()?;
        let etag = rest.get(..elen as usize)?;
        let rest = rest.get(elen as usize..)?;
        let nonce: [u8; NONCE_LEN] = rest.get(..NONCE_LEN)?.try_into().ok()?;
        let mut sealed = rest.get(NONCE_LEN..)?.to_vec();
        let body = self.key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(Self::aad(table, key)), &mut sealed).ok()?;
        Some(Record { etag: String::from_utf8(etag.to_vec()).ok()?, class, body: body.to_vec() })
    }

    /// The etag without decrypting.
    pub fn etag_of(v: &[u8]) -> Option<&str> {
        let elen = *v.get(2)? as usize;
        std::str::from_utf8(v.get(3..3 + elen)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let k = DataKey::new(&[1; 32]);
        let r = Record { etag: "\"e1\"".into(), class: 2, body: b"secret body".to_vec() };
        let v = k.seal(Table::Enrollments, "dev1", &r);
        assert!(!v.windows(6).any(|w| w == b"secret"));
        assert_eq!(k.open(Table::Enrollments, "dev1", &v), Some(r.clone()));
        assert_eq!(DataKey::etag_of(&v), Some("\"e1\""));
        assert_eq!(k.open(Table::Enrollments, "dev2", &v), None, "bound to its key");
        assert_eq!(DataKey::new(&[2; 32]).open(Table::Enrollments, "dev1", &v), None);
        let mut t = v.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert_eq!(k.open(Table::Enrollments, "dev1", &t), None);
        for n in 0..v.len() {
            assert_eq!(k.open(Table::Enrollments, "dev1", &v[..n]), None);
        }
    }
}
