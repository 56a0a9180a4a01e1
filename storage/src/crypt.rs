//! Encryption at rest: every stored value is sealed with AES-256-GCM under a key of its own,
//! derived from the current data key and a random 192-bit salt (HKDF-SHA256). Each derived key
//! seals exactly one value, so no nonce is ever used twice under one key however many records
//! are written (a single key with random 96-bit nonces would reach the 2³² safe limit in days
//! at 10,000 writes/s), and the data key itself never meets the cipher.
//!
//! Layout (format 2): `[2][key id][class][etag_len][etag][salt: 24][ciphertext ‖ tag: 16]`.
//! The associated data is everything before the salt plus the table name and the record's
//! key: a value cannot be moved to another key or table, nor its etag or class changed.
//! (Putting back an older value of the same key, by someone who can write the data dir,
//! is not detected; the data dir is private to the service's user for that reason.)
//!
//! The key id (the first byte of an HMAC of the data key) says which data key sealed a
//! value, so a store can hold values of several keys while it is re-sealed under a new one
//! (`dps rotate-data-key`). Format 1 values (AES-256-GCM under the data key itself, random
//! 96-bit nonce, table and key as associated data) are still read, and re-sealed as format 2
//! when written or rotated.

use crate::record::{Record, Table};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;

const FORMAT_1: u8 = 1;
const FORMAT_2: u8 = 2;
const SALT_LEN: usize = 24;
/// HKDF's extract salt and expand label: a derived key belongs to this use only.
const EXTRACT_SALT: &[u8] = b"dps data key v2";
const RECORD_INFO: &[u8] = b"dps record";

/// One data key.
struct Key {
    id: u8,
    prk: hkdf::Prk,
    /// For format 1 values.
    direct: LessSafeKey,
}

impl Key {
    fn new(bytes: &[u8; 32]) -> Key {
        let id = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, bytes), b"dps data key id").as_ref()[0];
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, EXTRACT_SALT).extract(bytes);
        // 32 bytes is always a valid AES-256 key, so this cannot fail.
        #[allow(clippy::expect_used)]
        let direct = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 key of 32 bytes"));
        Key { id, prk, direct }
    }

    /// The key that seals the value with this salt (used once).
    fn record_key(&self, salt: &[u8; SALT_LEN]) -> LessSafeKey {
        let info = [RECORD_INFO, salt.as_slice()];
        // 32 bytes of output from HKDF-SHA256 is always within its limits, so this cannot fail.
        #[allow(clippy::expect_used)]
        let okm = self.prk.expand(&info, &AES_256_GCM).expect("HKDF output of one AES-256 key");
        LessSafeKey::new(UnboundKey::from(okm))
    }
}

/// The data keys: the current one seals, every one opens (the older ones only while a
/// rotation re-seals the store).
pub struct DataKey {
    keys: Vec<Key>,
}

/// Shows the key ids only, never key material.
impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey").field("key_ids", &self.keys.iter().map(|k| k.id).collect::<Vec<_>>()).finish()
    }
}

impl DataKey {
    pub fn new(bytes: &[u8; 32]) -> DataKey {
        DataKey::ring(&[*bytes])
    }

    /// Several keys: the first seals, all open. An empty list makes a keyring that opens
    /// nothing and seals with an all-zero key, so callers pass at least one.
    pub fn ring(keys: &[[u8; 32]]) -> DataKey {
        let mut keys: Vec<Key> = keys.iter().map(Key::new).collect();
        if keys.is_empty() {
            keys.push(Key::new(&[0; 32]));
        }
        DataKey { keys }
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> u8 {
        self.keys[0].id
    }

    fn aad(header: &[u8], table: Table, key: &str) -> Vec<u8> {
        let mut a = Vec::with_capacity(header.len() + table.name().len() + 1 + key.len());
        a.extend_from_slice(header);
        a.extend_from_slice(table.name().as_bytes());
        a.push(0);
        a.extend_from_slice(key.as_bytes());
        a
    }

    pub fn seal(&self, table: Table, key: &str, r: &Record) -> Vec<u8> {
        let current = &self.keys[0];
        let etag = &r.etag.as_bytes()[..r.etag.len().min(255)];
        let mut out = Vec::with_capacity(4 + etag.len() + SALT_LEN + r.body.len() + 16);
        out.extend_from_slice(&[FORMAT_2, current.id, r.class, etag.len() as u8]);
        out.extend_from_slice(etag);
        let aad = Self::aad(&out, table, key);
        let mut salt = [0u8; SALT_LEN];
        // The thread's CSPRNG (ChaCha12, seeded and reseeded from the system source): a
        // 192-bit salt as unpredictable as a getrandom call's, without the syscall per commit.
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut salt);
        let mut sealed = r.body.clone();
        // A fresh key per value: the all-zero nonce is used once under it. Sealing a buffer
        // far below AES-GCM's length limit cannot fail.
        #[allow(clippy::expect_used)]
        current
            .record_key(&salt)
            .seal_in_place_append_tag(Nonce::assume_unique_for_key([0; NONCE_LEN]), Aad::from(aad), &mut sealed)
            .expect("AES-GCM seal of a bounded buffer");
        out.extend_from_slice(&salt);
        out.extend_from_slice(&sealed);
        out
    }

    pub fn open(&self, table: Table, key: &str, v: &[u8]) -> Option<Record> {
        match *v.first()? {
            FORMAT_2 => Self::open_2(self.keys.iter(), table, key, v),
            FORMAT_1 => self.open_1(table, key, v),
            _ => None,
        }
    }

    /// A format 2 value opened under whichever of `keys` sealed it.
    fn open_2<'k>(keys: impl Iterator<Item = &'k Key>, table: Table, key: &str, v: &[u8]) -> Option<Record> {
        let (&id, &class, &elen) = (v.get(1)?, v.get(2)?, v.get(3)?);
        let header_len = 4 + elen as usize;
        let header = v.get(..header_len)?;
        let etag = header.get(4..)?;
        let salt: [u8; SALT_LEN] = v.get(header_len..header_len + SALT_LEN)?.try_into().ok()?;
        let sealed = v.get(header_len + SALT_LEN..)?;
        // Ids are one byte: two keys of a ring may share one, so each is tried.
        keys.filter(|k| k.id == id).find_map(|k| {
            let mut buf = sealed.to_vec();
            let body = k
                .record_key(&salt)
                .open_in_place(Nonce::assume_unique_for_key([0; NONCE_LEN]), Aad::from(Self::aad(header, table, key)), &mut buf)
                .ok()?;
            Some(Record { etag: String::from_utf8(etag.to_vec()).ok()?, class, body: body.to_vec() })
        })
    }

    /// `[1][class][etag_len][etag][nonce: 12][ciphertext ‖ tag]`, sealed under the data key.
    fn open_1(&self, table: Table, key: &str, v: &[u8]) -> Option<Record> {
        let (&class, &elen) = (v.get(1)?, v.get(2)?);
        let etag = v.get(3..3 + elen as usize)?;
        let rest = v.get(3 + elen as usize..)?;
        let nonce: [u8; NONCE_LEN] = rest.get(..NONCE_LEN)?.try_into().ok()?;
        let sealed = rest.get(NONCE_LEN..)?;
        let mut aad = table.name().as_bytes().to_vec();
        aad.push(0);
        aad.extend_from_slice(key.as_bytes());
        self.keys.iter().find_map(|k| {
            let mut buf = sealed.to_vec();
            let body = k.direct.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad.as_slice()), &mut buf).ok()?;
            Some(Record { etag: String::from_utf8(etag.to_vec()).ok()?, class, body: body.to_vec() })
        })
    }

    /// Whether a stored value is sealed in the current format under the current key (a
    /// rotation leaves those alone). The one-byte id settles it unless another key of the ring
    /// has the same id (one new key in 256 does): then only opening the value under the current
    /// key tells. Regression: the id alone was trusted, so a rotation to a new key whose id
    /// matched the old one's re-sealed nothing and then dropped the old key, the only one that
    /// opened the store.
    pub fn is_current(&self, table: Table, key: &str, v: &[u8]) -> bool {
        let current = &self.keys[0];
        if v.first() != Some(&FORMAT_2) || v.get(1) != Some(&current.id) {
            return false;
        }
        self.keys[1..].iter().all(|k| k.id != current.id) || Self::open_2(std::iter::once(current), table, key, v).is_some()
    }

    /// The id a data key gets (the first byte of an HMAC of it).
    pub fn id_of(bytes: &[u8; 32]) -> u8 {
        Key::new(bytes).id
    }

    /// The etag without decrypting.
    pub fn etag_of(v: &[u8]) -> Option<&str> {
        let (start, elen) = match *v.first()? {
            FORMAT_2 => (4, *v.get(3)? as usize),
            FORMAT_1 => (3, *v.get(2)? as usize),
            _ => return None,
        };
        std::str::from_utf8(v.get(start..start + elen)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record { etag: "\"e1\"".into(), class: 2, body: b"secret body".to_vec() }
    }

    #[test]
    fn seal_open_and_tamper() {
        let k = DataKey::new(&[1; 32]);
        let r = record();
        let v = k.seal(Table::Enrollments, "dev1", &r);
        assert!(!v.windows(6).any(|w| w == b"secret"));
        assert_eq!(k.open(Table::Enrollments, "dev1", &v), Some(r.clone()));
        assert_eq!(DataKey::etag_of(&v), Some("\"e1\""));
        assert_eq!(k.open(Table::Enrollments, "dev2", &v), None, "bound to its key");
        assert_eq!(k.open(Table::Groups, "dev1", &v), None, "bound to its table");
        assert_eq!(DataKey::new(&[2; 32]).open(Table::Enrollments, "dev1", &v), None);
        // Every bit of the value matters: header (format, key id, class, etag), salt, body, tag.
        for i in 0..v.len() {
            let mut t = v.clone();
            t[i] ^= 1;
            assert_eq!(k.open(Table::Enrollments, "dev1", &t), None, "byte {i} flipped");
        }
        for n in 0..v.len() {
            assert_eq!(k.open(Table::Enrollments, "dev1", &v[..n]), None);
        }
    }

    #[test]
    fn the_etag_and_class_are_authenticated() {
        // Regression: the etag and class sat outside the associated data, so a value's etag
        // could be rewritten (to pass an If-Match) without the tag noticing.
        let k = DataKey::new(&[1; 32]);
        let v = k.seal(Table::Enrollments, "dev1", &record());
        let at = v.windows(2).position(|w| w == b"e1").unwrap();
        let mut forged = v.clone();
        forged[at + 1] = b'2';
        assert_eq!(DataKey::etag_of(&forged), Some("\"e2\""));
        assert_eq!(k.open(Table::Enrollments, "dev1", &forged), None);
        let mut reclassed = v.clone();
        reclassed[2] = 3;
        assert_eq!(k.open(Table::Enrollments, "dev1", &reclassed), None);
    }

    #[test]
    fn each_value_has_a_key_of_its_own() {
        // Regression: every value was sealed under the one data key with a random 96-bit
        // nonce. Now two seals of the same record share neither salt nor ciphertext, and the
        // ciphertext does not open under the data key used directly.
        let bytes = [9; 32];
        let k = DataKey::new(&bytes);
        let (a, b) = (k.seal(Table::Registrations, "r", &record()), k.seal(Table::Registrations, "r", &record()));
        let salt = |v: &[u8]| v[8..8 + SALT_LEN].to_vec();
        assert_ne!(salt(&a), salt(&b));
        assert_ne!(a[8 + SALT_LEN..], b[8 + SALT_LEN..]);
        let direct = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).unwrap());
        let mut body = a[8 + SALT_LEN..].to_vec();
        let aad = DataKey::aad(&a[..8], Table::Registrations, "r");
        assert!(direct.open_in_place(Nonce::assume_unique_for_key([0; NONCE_LEN]), Aad::from(aad), &mut body).is_err());
    }

    #[test]
    fn a_ring_opens_old_values_and_seals_with_the_first_key() {
        let (old, new) = ([1; 32], [2; 32]);
        let v_old = DataKey::new(&old).seal(Table::Hubs, "h", &record());
        let ring = DataKey::ring(&[new, old]);
        assert_eq!(ring.open(Table::Hubs, "h", &v_old), Some(record()));
        assert!(!ring.is_current(Table::Hubs, "h", &v_old));
        let v_new = ring.seal(Table::Hubs, "h", &record());
        assert!(ring.is_current(Table::Hubs, "h", &v_new));
        assert_eq!(DataKey::new(&new).open(Table::Hubs, "h", &v_new), Some(record()));
        assert_eq!(DataKey::new(&old).open(Table::Hubs, "h", &v_new), None);
    }

    /// Two different keys whose one-byte ids are equal (found by trying: among 257 keys two
    /// must share an id).
    fn keys_sharing_an_id() -> ([u8; 32], [u8; 32]) {
        let mut seen = std::collections::HashMap::new();
        for n in 0u16..=256 {
            let mut k = [7u8; 32];
            k[..2].copy_from_slice(&n.to_le_bytes());
            if let Some(first) = seen.insert(DataKey::id_of(&k), k) {
                return (first, k);
            }
        }
        unreachable!("257 keys, 256 ids")
    }

    #[test]
    fn a_new_key_with_the_old_keys_id_still_finds_the_old_values() {
        let (old, new) = keys_sharing_an_id();
        assert_ne!(old, new);
        let v_old = DataKey::new(&old).seal(Table::Enrollments, "d", &record());
        let ring = DataKey::ring(&[new, old]);
        assert_eq!(ring.current_id(), v_old[1], "the ids collide");
        assert!(!ring.is_current(Table::Enrollments, "d", &v_old), "sealed under the old key, whatever its id");
        assert_eq!(ring.open(Table::Enrollments, "d", &v_old), Some(record()));
        let v_new = ring.seal(Table::Enrollments, "d", &record());
        assert!(ring.is_current(Table::Enrollments, "d", &v_new));
        assert_eq!(DataKey::new(&new).open(Table::Enrollments, "d", &v_new), Some(record()));
    }

    #[test]
    fn format_1_values_are_still_read() {
        // A value as the first format wrote it: AES-256-GCM under the data key, random
        // nonce, `table \0 key` as associated data.
        let bytes = [5; 32];
        let direct = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).unwrap());
        let nonce = [7u8; NONCE_LEN];
        let mut sealed = b"secret body".to_vec();
        direct.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(b"groups\0g1".as_slice()), &mut sealed).unwrap();
        let mut v = vec![FORMAT_1, 2, 4];
        v.extend_from_slice(b"\"e1\"");
        v.extend_from_slice(&nonce);
        v.extend_from_slice(&sealed);
        let k = DataKey::ring(&[[6; 32], bytes]);
        assert_eq!(k.open(Table::Groups, "g1", &v), Some(record()));
        assert_eq!(k.open(Table::Groups, "g2", &v), None);
        assert_eq!(DataKey::etag_of(&v), Some("\"e1\""));
        assert!(!k.is_current(Table::Groups, "g1", &v));
    }
}
