//! Which devices exist and what key each holds: ids `{prefix}-{n}` with keys derived from an
//! enrollment group's key, or individual enrollments read from a CSV file
//! (`registrationId,base64 primary key` per line; a header line and blank lines are skipped).

use crate::BoxError;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

pub enum Identities {
    Group { prefix: String, key: Vec<u8> },
    Individual(Vec<(String, Vec<u8>)>),
}

impl Identities {
    pub fn read_csv(text: &str) -> Result<Identities, BoxError> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || (n == 0 && line.to_ascii_lowercase().starts_with("registrationid")) {
                continue;
            }
            let (id, key) = line.split_once(',').ok_or_else(|| format!("CSV line {}: expected registrationId,primaryKey", n + 1))?;
            let key = B64.decode(key.trim()).map_err(|e| format!("CSV line {}: key is not base64: {e}", n + 1))?;
            out.push((id.trim().to_string(), key));
        }
        if out.is_empty() {
            return Err("the CSV holds no devices".into());
        }
        Ok(Identities::Individual(out))
    }

    /// Device `i`: its registration id and its symmetric key.
    pub fn device(&self, i: usize) -> (String, Vec<u8>) {
        match self {
            Identities::Group { prefix, key } => {
                // The raw bytes of the derived key (`derive_device_key` is their base64).
                let id = format!("{prefix}-{i}");
                let k = dps_core::sas::sign(key, &id);
                (id, k)
            }
            Identities::Individual(v) => v[i % v.len()].clone(),
        }
    }

    pub fn count(&self) -> Option<usize> {
        match self {
            Identities::Group { .. } => None,
            Identities::Individual(v) => Some(v.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_header_and_bad_lines() {
        let ids = Identities::read_csv("registrationId,primaryKey\ndev-1,AAEC\n\ndev-2, AwQF \n").unwrap();
        assert_eq!(ids.count(), Some(2));
        assert_eq!(ids.device(1), ("dev-2".to_string(), vec![3, 4, 5]));
        assert!(Identities::read_csv("dev-1\n").is_err());
        assert!(Identities::read_csv("dev-1,@@@\n").is_err());
        assert!(Identities::read_csv("").is_err());
    }

    #[test]
    fn group_keys_are_derived() {
        let ids = Identities::Group { prefix: "d".into(), key: b"group-key".to_vec() };
        let (id, key) = ids.device(7);
        assert_eq!(id, "d-7");
        assert_eq!(B64.encode(key), dps_core::sas::derive_device_key(b"group-key", "d-7"));
    }
}
