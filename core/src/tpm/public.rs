//! TPM 2.0 public areas as DPS clients send them: base64 of a marshalled TPM2B_PUBLIC (big-endian
//! u16 size, then TPMT_PUBLIC). docs/service-api.md §7.1, TPM 2.0 Part 2 structures.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpmKey {
    Rsa { key_bits: u16, exponent: u32, modulus: Vec<u8> },
    Ecc { curve: u16, x: Vec<u8>, y: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    pub name_alg: u16,
    pub attributes: u32,
    pub auth_policy: Vec<u8>,
    /// Symmetric algorithm of a storage key, with key bits and mode (`None` for TPM_ALG_NULL).
    pub symmetric: Option<(u16, u16, u16)>,
    pub key: TpmKey,
    /// The TPMT_PUBLIC bytes (what a TPM Name hashes).
    pub tpmt: Vec<u8>,
}

const ALG_RSA: u16 = 0x0001;
const ALG_ECC: u16 = 0x0023;
const ALG_NULL: u16 = 0x0010;
pub const ALG_SHA256: u16 = 0x000B;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or("truncated TPM structure")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn tpm2b(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u16()? as usize;
        Ok(self.take(n)?.to_vec())
    }
}

/// Parses a TPM2B_PUBLIC holding an RSA or ECC key; anything else, trailing bytes or a size
/// that disagrees with the content is an error naming the problem.
pub fn parse_tpm2b_public(bytes: &[u8]) -> Result<TpmPublic, String> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let size = r.u16()? as usize;
    if size + 2 != bytes.len() {
        return Err(format!("TPM2B_PUBLIC size field {size} does not match the {} bytes that follow", bytes.len().saturating_sub(2)));
    }
    let tpmt = bytes[2..].to_vec();
    let kind = r.u16()?;
    let name_alg = r.u16()?;
    let attributes = r.u32()?;
    let auth_policy = r.tpm2b()?;
    let sym_alg = r.u16()?;
    let symmetric = if sym_alg == ALG_NULL { None } else { Some((sym_alg, r.u16()?, r.u16()?)) };
    let scheme = r.u16()?;
    if scheme != ALG_NULL {
        r.u16()?;
    }
    let key = match kind {
        ALG_RSA => {
            let key_bits = r.u16()?;
            let exponent = r.u32()?;
            let modulus = r.tpm2b()?;
            if modulus.len() * 8 != key_bits as usize {
                return Err(format!("RSA modulus of {} bytes does not match keyBits {key_bits}", modulus.len()));
            }
            TpmKey::Rsa { key_bits, exponent, modulus }
        }
        ALG_ECC => {
            let curve = r.u16()?;
            let kdf = r.u16()?;
            if kdf != ALG_NULL {
                r.u16()?;
            }
            TpmKey::Ecc { curve, x: r.tpm2b()?, y: r.tpm2b()? }
        }
        other => return Err(format!("unsupported TPM key type 0x{other:04x}; an endorsement key is RSA or ECC")),
    };
    if r.pos != bytes.len() {
        return Err("trailing bytes after TPMT_PUBLIC".to_string());
    }
    Ok(TpmPublic { name_alg, attributes, auth_policy, symmetric, key, tpmt })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_swtpm_endorsement_key() {
        let ek = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ek.pub")).unwrap();
        let p = parse_tpm2b_public(&ek).unwrap();
        assert_eq!(p.name_alg, ALG_SHA256);
        assert_eq!(p.attributes, 0x000300b2);
        assert_eq!(p.symmetric, Some((0x0006, 128, 0x0043)));
        match p.key {
            TpmKey::Rsa { key_bits, modulus, .. } => {
                assert_eq!(key_bits, 2048);
                assert_eq!(modulus.len(), 256);
            }
            other => panic!("expected RSA, got {other:?}"),
        }
    }

    #[test]
    fn rejects_truncation_and_garbage() {
        let ek = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ek.pub")).unwrap();
        for n in 0..ek.len() {
            assert!(parse_tpm2b_public(&ek[..n]).is_err(), "prefix of {n} bytes accepted");
        }
        let mut extra = ek.clone();
        extra.push(0);
        assert!(parse_tpm2b_public(&extra).is_err());
        assert!(parse_tpm2b_public(&[0x00, 0x02, 0x00, 0x08]).is_err());
    }
}
