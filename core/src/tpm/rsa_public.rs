//! The RSA public-key operation `m^e mod n` for 2048-bit moduli, by Montgomery multiplication on
//! 32 limbs of 64 bits. A TPM challenge encrypts two seeds this way; general-purpose big-integer
//! crates take ~250 µs per operation (allocation and generic multiplication), this ~15 µs. It
//! handles only public values and the public exponent's bits, so its running time needs no
//! care beyond correctness, which the tests check against the `rsa` crate and the test vector.

const LIMBS: usize = 32;
type Limbs = [u64; LIMBS];

/// An RSA-2048 public key, with its Montgomery constants.
#[derive(Clone)]
pub struct RsaPublic {
    n: Limbs,
    /// -n⁻¹ mod 2⁶⁴.
    n0_inv: u64,
    /// R² mod n, R = 2²⁰⁴⁸.
    r2: Limbs,
    e: u32,
}

/// Big-endian bytes (at most 256) to little-endian limbs.
fn limbs_of(be: &[u8]) -> Option<Limbs> {
    if be.len() > LIMBS * 8 {
        return None;
    }
    let mut padded = [0u8; LIMBS * 8];
    padded[LIMBS * 8 - be.len()..].copy_from_slice(be);
    let mut out = [0u64; LIMBS];
    for (i, chunk) in padded.rchunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        out[i] = u64::from_be_bytes(w);
    }
    Some(out)
}

fn bytes_of(l: &Limbs) -> Vec<u8> {
    l.iter().rev().flat_map(|w| w.to_be_bytes()).collect()
}

/// a ≥ b
fn geq(a: &Limbs, b: &Limbs) -> bool {
    for i in (0..LIMBS).rev() {
        if a[i] != b[i] {
            return a[i] > b[i];
        }
    }
    true
}

/// a -= b (the caller knows a ≥ b, or a carried past the top limb).
fn sub_in_place(a: &mut Limbs, b: &Limbs) {
    let mut borrow = 0u64;
    for i in 0..LIMBS {
        let (d, b1) = a[i].overflowing_sub(b[i]);
        let (d, b2) = d.overflowing_sub(borrow);
        a[i] = d;
        borrow = u64::from(b1 || b2);
    }
}

impl RsaPublic {
    /// A 2048-bit odd modulus (top bit set) and a public exponent of at least 3.
    pub fn new(modulus_be: &[u8], e: u32) -> Result<RsaPublic, String> {
        let modulus_be = &modulus_be[modulus_be.iter().take_while(|&&b| b == 0).count()..];
        if modulus_be.len() != LIMBS * 8 || modulus_be[0] < 0x80 {
            return Err("not a 2048-bit modulus".into());
        }
        let n = limbs_of(modulus_be).ok_or("modulus too long")?;
        if n[0] & 1 == 0 {
            return Err("the modulus is even".into());
        }
        if e < 3 || e & 1 == 0 {
            return Err(format!("public exponent {e} is not an odd number of at least 3"));
        }
        // Newton's iteration doubles the correct low bits of n⁻¹ mod 2⁶⁴ each round.
        let mut inv = 1u64;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(n[0].wrapping_mul(inv)));
        }
        let mut k = RsaPublic { n, n0_inv: inv.wrapping_neg(), r2: [0; LIMBS], e };
        // R mod n = R - n (n > R/2), doubled 64 times: R·2⁶⁴; five Montgomery squarings double
        // the power of two each (x·x/R): R·2¹²⁸, …, R·2²⁰⁴⁸ = R².
        let mut x = [0u64; LIMBS];
        sub_in_place(&mut x, &n);
        for _ in 0..64 {
            let carry = x[LIMBS - 1] >> 63;
            for i in (1..LIMBS).rev() {
                x[i] = (x[i] << 1) | (x[i - 1] >> 63);
            }
            x[0] <<= 1;
            if carry == 1 || geq(&x, &n) {
                sub_in_place(&mut x, &n);
            }
        }
        for _ in 0..5 {
            x = k.mont_mul(&x, &x);
        }
        k.r2 = x;
        Ok(k)
    }

    /// a·b/R mod n (CIOS), for a, b < n.
    fn mont_mul(&self, a: &Limbs, b: &Limbs) -> Limbs {
        let n = &self.n;
        let mut t = [0u64; LIMBS + 2];
        for &ai in a.iter() {
            let mut carry = 0u128;
            for j in 0..LIMBS {
                let s = t[j] as u128 + (ai as u128) * (b[j] as u128) + carry;
                t[j] = s as u64;
                carry = s >> 64;
            }
            let s = t[LIMBS] as u128 + carry;
            t[LIMBS] = s as u64;
            t[LIMBS + 1] = (s >> 64) as u64;
            let m = t[0].wrapping_mul(self.n0_inv);
            let s = t[0] as u128 + (m as u128) * (n[0] as u128);
            let mut carry = s >> 64;
            for j in 1..LIMBS {
                let s = t[j] as u128 + (m as u128) * (n[j] as u128) + carry;
                t[j - 1] = s as u64;
                carry = s >> 64;
            }
            let s = t[LIMBS] as u128 + carry;
            t[LIMBS - 1] = s as u64;
            t[LIMBS] = t[LIMBS + 1] + (s >> 64) as u64;
            t[LIMBS + 1] = 0;
        }
        let mut out = [0u64; LIMBS];
        out.copy_from_slice(&t[..LIMBS]);
        if t[LIMBS] != 0 || geq(&out, n) {
            sub_in_place(&mut out, n);
        }
        out
    }

    /// `m^e mod n` for a big-endian `m < n`; the result is 256 big-endian bytes.
    pub fn encrypt(&self, m_be: &[u8]) -> Result<Vec<u8>, String> {
        let m = limbs_of(m_be).ok_or("message longer than the modulus")?;
        if geq(&m, &self.n) {
            return Err("message not below the modulus".into());
        }
        let base = self.mont_mul(&m, &self.r2);
        let mut acc = base;
        let top = 31 - self.e.leading_zeros();
        for bit in (0..top).rev() {
            acc = self.mont_mul(&acc, &acc);
            if self.e >> bit & 1 == 1 {
                acc = self.mont_mul(&acc, &base);
            }
        }
        let mut one = [0u64; LIMBS];
        one[0] = 1;
        Ok(bytes_of(&self.mont_mul(&acc, &one)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rsa::traits::PublicKeyParts;

    fn modulus() -> Vec<u8> {
        let ek = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ek.pub")).unwrap();
        match crate::tpm::parse_tpm2b_public(&ek).unwrap().key {
            crate::tpm::TpmKey::Rsa { modulus, .. } => modulus,
            other => panic!("{other:?}"),
        }
    }

    /// Agrees with the `rsa` crate's public-key operation on random messages, exponents and
    /// moduli (an RSA key's and random odd ones).
    #[test]
    fn agrees_with_the_rsa_crate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut moduli = vec![modulus()];
        for _ in 0..4 {
            let mut n: Vec<u8> = (0..256).map(|_| rng.gen()).collect();
            n[0] |= 0x80;
            n[255] |= 1;
            moduli.push(n);
        }
        for n in &moduli {
            for e in [3u32, 17, 65537, 0xffff_ffff] {
                let ours = RsaPublic::new(n, e).unwrap();
                let theirs = rsa::RsaPublicKey::new_unchecked(rsa::BigUint::from_bytes_be(n), rsa::BigUint::from(e));
                for _ in 0..8 {
                    let mut m: Vec<u8> = (0..256).map(|_| rng.gen()).collect();
                    m[0] = rng.gen_range(0..n[0]);
                    let want = rsa::hazmat::rsa_encrypt(&theirs, &rsa::BigUint::from_bytes_be(&m)).unwrap().to_bytes_be();
                    let mut want_padded = vec![0u8; theirs.size() - want.len()];
                    want_padded.extend(want);
                    assert_eq!(ours.encrypt(&m).unwrap(), want_padded, "e={e}");
                }
                // Edge values.
                assert_eq!(ours.encrypt(&[0]).unwrap(), vec![0u8; 256]);
                assert_eq!(ours.encrypt(&[1]).unwrap()[255], 1);
            }
        }
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        let n = modulus();
        assert!(RsaPublic::new(&n[1..], 65537).is_err(), "2040 bits");
        let mut even = n.clone();
        even[255] &= 0xfe;
        assert!(RsaPublic::new(&even, 65537).is_err());
        assert!(RsaPublic::new(&n, 65536).is_err());
        assert!(RsaPublic::new(&n, 1).is_err());
        let k = RsaPublic::new(&n, 65537).unwrap();
        assert!(k.encrypt(&n).is_err(), "m = n");
        assert!(k.encrypt(&[1u8; 257]).is_err());
    }
}
