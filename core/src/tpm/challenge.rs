//! The `authenticationKey` challenge (docs/tpm-attestation.md): a fresh HMAC key K, made into
//! a keyed-hash TPM object, duplicated in software for the device's storage root key, with
//! the duplication's inner wrapping key sealed to its endorsement key by MakeCredential. Only
//! the TPM that holds both private keys can import K; the device then signs SAS tokens with
//! TPM2_HMAC and the service checks them with its own copy of K.
//!
//! Everything here is deterministic in the [`Secrets`] it is given, so the test vector
//! reproduces byte for byte; the host draws them from the system's random source.

use super::public::{TpmKey, TpmPublic, ALG_SHA256};
use super::rsa_public::RsaPublic;
use aes::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use ring::{digest, hmac};

/// The random inputs of one challenge. Sizes are fixed by what the TPMs accept: the
/// obfuscation value must be as long as SHA-256's digest, and the inner wrapping key is an
/// AES-128 key (the C SDK imports with AES-128-CFB whatever it is given).
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// K: the identity key the device imports and signs with; what the service keeps.
    pub hmac_key: [u8; 32],
    pub obfuscation: [u8; 32],
    /// The credential MakeCredential seals: the duplication's inner wrapping key.
    pub inner_wrap_key: [u8; 16],
    pub dup_seed: [u8; 32],
    pub dup_oaep_seed: [u8; 32],
    pub cred_seed: [u8; 32],
    pub cred_oaep_seed: [u8; 32],
}

/// Bytes a [`Secrets`] is made of.
pub const SECRETS_LEN: usize = 32 * 6 + 16;

impl Secrets {
    /// The secrets laid out in one buffer (K, obfuscation, dup seed, its OAEP seed, cred seed,
    /// its OAEP seed, then the 16-byte W): one draw from a random source makes them all.
    pub fn from_bytes(b: &[u8; SECRETS_LEN]) -> Secrets {
        let at = |i: usize| -> [u8; 32] { std::array::from_fn(|j| b[32 * i + j]) };
        Secrets {
            hmac_key: at(0),
            obfuscation: at(1),
            dup_seed: at(2),
            dup_oaep_seed: at(3),
            cred_seed: at(4),
            cred_oaep_seed: at(5),
            inner_wrap_key: std::array::from_fn(|j| b[192 + j]),
        }
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(..)")
    }
}

/// Object attributes of the identity key: sign | noDA | userWithAuth. fixedTPM and fixedParent
/// stay clear, or the TPM refuses to import a duplicated object.
const IDENTITY_ATTRIBUTES: u32 = 0x0004_0440;
const ALG_KEYEDHASH: u16 = 0x0008;
const ALG_HMAC: u16 = 0x0005;
const ALG_AES: u16 = 0x0006;
const ALG_CFB: u16 = 0x0043;

/// The public key a seed is encrypted to, from a device's TPM2B_PUBLIC: RSA-2048 with SHA-256
/// as name algorithm and an AES-128-CFB symmetric definition (the SDKs' EK and SRK templates;
/// the key sizes of every derived key follow from these).
struct StorageKey {
    rsa: RsaPublic,
    /// TPM Name: nameAlg ‖ SHA-256 of the TPMT_PUBLIC exactly as received.
    name: Vec<u8>,
}

fn storage_key(what: &str, p: &TpmPublic) -> Result<StorageKey, String> {
    if p.name_alg != ALG_SHA256 {
        return Err(format!("the {what}'s name algorithm is 0x{:04x}, not SHA-256", p.name_alg));
    }
    if p.symmetric != Some((ALG_AES, 128, ALG_CFB)) {
        return Err(format!("the {what} is not a storage key with AES-128-CFB"));
    }
    let TpmKey::Rsa { key_bits, exponent, modulus } = &p.key else {
        return Err(format!("the {what} is not an RSA key"));
    };
    if *key_bits != 2048 || modulus.first().is_none_or(|&b| b < 0x80) {
        return Err(format!("the {what} is not a 2048-bit RSA key"));
    }
    let e = if *exponent == 0 { 65537 } else { *exponent };
    let rsa = RsaPublic::new(modulus, e).map_err(|e| format!("the {what}: {e}"))?;
    Ok(StorageKey { rsa, name: name_of(&p.tpmt) })
}

/// Whether a challenge can be built for this key (an EK or SRK): why not, if not.
pub fn challengeable(p: &TpmPublic) -> Result<(), String> {
    storage_key("key", p).map(|_| ())
}

/// `000b ‖ SHA-256(TPMT_PUBLIC)`.
fn name_of(tpmt_public: &[u8]) -> Vec<u8> {
    let mut n = ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(digest::digest(&digest::SHA256, tpmt_public).as_ref());
    n
}

fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    let mut c = digest::Context::new(&digest::SHA256);
    parts.iter().for_each(|p| c.update(p));
    c.finish().as_ref().to_vec()
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut c = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
    parts.iter().for_each(|p| c.update(p));
    c.sign().as_ref().to_vec()
}

/// A TPM2B: big-endian u16 length, then the bytes (every input here is far below 64 KiB).
fn tpm2b(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// KDFa with SHA-256 (TPM 2.0 Part 1 §11.4.10.2): counter-mode HMAC over
/// `counter ‖ label ‖ 00 ‖ contextU ‖ contextV ‖ bits`.
fn kdfa(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let want = bits as usize / 8;
    let mut out = Vec::with_capacity(want + 32);
    let mut counter = 1u32;
    while out.len() < want {
        out.extend(hmac_sha256(key, &[&counter.to_be_bytes(), label, &[0], context_u, context_v, &bits.to_be_bytes()]));
        counter += 1;
    }
    out.truncate(want);
    out
}

/// AES-128 in CFB mode with full-block feedback and a zero IV, as TPMs use it.
fn aes128_cfb(key: &[u8], data: &[u8]) -> Vec<u8> {
    let cipher = aes::Aes128::new(GenericArray::from_slice(key));
    let mut feedback = [0u8; 16];
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(16) {
        let mut block = GenericArray::clone_from_slice(&feedback);
        cipher.encrypt_block(&mut block);
        let start = out.len();
        out.extend(chunk.iter().zip(block.iter()).map(|(p, k)| p ^ k));
        feedback[..chunk.len()].copy_from_slice(&out[start..]);
    }
    out
}

/// MGF1 with SHA-256 (RFC 8017 B.2.1).
fn mgf1(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u32;
    while out.len() < len {
        out.extend(sha256(&[seed, &counter.to_be_bytes()]));
        counter += 1;
    }
    out.truncate(len);
    out
}

/// EME-OAEP encoding with SHA-256 (RFC 8017 §7.1.1) for a `k`-byte modulus. The label is
/// hashed with its trailing NUL, as TPMs do.
fn oaep_encode(message: &[u8], label: &[u8], seed: &[u8; 32], k: usize) -> Result<Vec<u8>, String> {
    const H: usize = 32;
    if message.len() + 2 * H + 2 > k {
        return Err("OAEP message too long for the key".into());
    }
    let mut db = sha256(&[label]);
    db.resize(k - H - 1 - message.len() - 1, 0);
    db.push(1);
    db.extend_from_slice(message);
    db.iter_mut().zip(mgf1(seed, k - H - 1)).for_each(|(b, m)| *b ^= m);
    let masked_seed: Vec<u8> = seed.iter().zip(mgf1(&db, H)).map(|(s, m)| s ^ m).collect();
    let mut em = Vec::with_capacity(k);
    em.push(0);
    em.extend(masked_seed);
    em.extend(db);
    Ok(em)
}

/// RSAES-OAEP-SHA256 with a fixed seed: the 256-byte ciphertext.
fn rsa_oaep(key: &RsaPublic, message: &[u8], label: &[u8], seed: &[u8; 32]) -> Result<Vec<u8>, String> {
    key.encrypt(&oaep_encode(message, label, seed, 256)?)
}

/// The identity key's TPMT_PUBLIC: a keyed-hash object with an HMAC-SHA256 scheme (devices
/// take the HMAC's hash from it) and `unique = SHA-256(obfuscation ‖ K)`.
fn identity_public(s: &Secrets) -> Vec<u8> {
    let mut p = Vec::with_capacity(48);
    p.extend(ALG_KEYEDHASH.to_be_bytes());
    p.extend(ALG_SHA256.to_be_bytes());
    p.extend(IDENTITY_ATTRIBUTES.to_be_bytes());
    p.extend(tpm2b(&[])); // authPolicy: empty
    p.extend(ALG_HMAC.to_be_bytes());
    p.extend(ALG_SHA256.to_be_bytes());
    p.extend(tpm2b(&sha256(&[&s.obfuscation, &s.hmac_key])));
    p
}

/// The identity key's TPM2B_SENSITIVE, with an empty authValue (the SDKs sign with an empty
/// password session).
fn identity_sensitive(s: &Secrets) -> Vec<u8> {
    let mut t = Vec::with_capacity(72);
    t.extend(ALG_KEYEDHASH.to_be_bytes());
    t.extend(tpm2b(&[]));
    t.extend(tpm2b(&s.obfuscation));
    t.extend(tpm2b(&s.hmac_key));
    tpm2b(&t)
}

/// Builds the `authenticationKey` blob (before base64) for a device's EK and SRK
/// (TPM2B_PUBLIC bytes as it sent them). Errors name what is wrong with a key.
pub fn authentication_key(endorsement_key: &TpmPublic, storage_root_key: &TpmPublic, s: &Secrets) -> Result<Vec<u8>, String> {
    let ek = storage_key("endorsement key", endorsement_key)?;
    let srk = storage_key("storage root key", storage_root_key)?;

    // The identity key, duplicated for the SRK with the inner wrapper keyed by W.
    let id_public = identity_public(s);
    let id_name = name_of(&id_public);
    let sens2b = identity_sensitive(s);
    let mut inner_plain = tpm2b(&sha256(&[&sens2b, &id_name]));
    inner_plain.extend_from_slice(&sens2b);
    let enc_sensitive = aes128_cfb(&s.inner_wrap_key, &inner_plain);
    let dup_secret = rsa_oaep(&srk.rsa, &s.dup_seed, b"DUPLICATE\0", &s.dup_oaep_seed)?;
    let outer_key = kdfa(&s.dup_seed, b"STORAGE", &id_name, &[], 128);
    let outer_hmac_key = kdfa(&s.dup_seed, b"INTEGRITY", &[], &[], 256);
    let dup_sensitive = aes128_cfb(&outer_key, &enc_sensitive);
    let mut duplicate = tpm2b(&hmac_sha256(&outer_hmac_key, &[&dup_sensitive, &id_name]));
    duplicate.extend(dup_sensitive);

    // W sealed to the EK, bound to the SRK's Name (the SDKs activate with the SRK).
    let cred_secret = rsa_oaep(&ek.rsa, &s.cred_seed, b"IDENTITY\0", &s.cred_oaep_seed)?;
    let cred_key = kdfa(&s.cred_seed, b"STORAGE", &srk.name, &[], 128);
    let cred_hmac_key = kdfa(&s.cred_seed, b"INTEGRITY", &[], &[], 256);
    let enc_identity = aes128_cfb(&cred_key, &tpm2b(&s.inner_wrap_key));
    let mut id_object = tpm2b(&hmac_sha256(&cred_hmac_key, &[&enc_identity, &srk.name]));
    id_object.extend(enc_identity);

    let mut blob = Vec::with_capacity(800);
    for part in [&id_object, &cred_secret, &duplicate, &dup_secret, &id_public] {
        blob.extend(tpm2b(part));
    }
    // A sixth, empty member: every SDK reads its length (it once carried an encrypted URI).
    blob.extend(tpm2b(&[]));
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tpm::parse_tpm2b_public;
    use serde_json::Value;

    fn vector() -> Value {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tpm-vector.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn hex(v: &Value, name: &str) -> Vec<u8> {
        let s = v[name].as_str().unwrap_or_else(|| panic!("{name} missing"));
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn arr<const N: usize>(v: &Value, name: &str) -> [u8; N] {
        hex(v, name).try_into().unwrap()
    }

    pub(crate) fn vector_secrets(v: &Value) -> Secrets {
        Secrets {
            hmac_key: arr(v, "hmac_key"),
            obfuscation: arr(v, "obfuscation"),
            inner_wrap_key: arr(v, "inner_wrap_key"),
            dup_seed: arr(v, "dup_seed"),
            dup_oaep_seed: arr(v, "dup_oaep_seed"),
            cred_seed: arr(v, "cred_seed"),
            cred_oaep_seed: arr(v, "cred_oaep_seed"),
        }
    }

    /// Every intermediate value of the test vector, then the blob, byte for byte.
    #[test]
    fn the_test_vector_reproduces() {
        let v = vector();
        let s = vector_secrets(&v);
        let ek = parse_tpm2b_public(&hex(&v, "ek_tpm2b_public")).unwrap();
        let srk = parse_tpm2b_public(&hex(&v, "srk_tpm2b_public")).unwrap();
        assert_eq!(name_of(&ek.tpmt), hex(&v, "ek_name"));
        assert_eq!(name_of(&srk.tpmt), hex(&v, "srk_name"));
        let id_public = identity_public(&s);
        assert_eq!(id_public, hex(&v, "id_tpmt_public"));
        let id_name = name_of(&id_public);
        assert_eq!(id_name, hex(&v, "id_name"));
        let sens2b = identity_sensitive(&s);
        assert_eq!(sens2b, hex(&v, "sens2b"));
        assert_eq!(&sens2b[2..], hex(&v, "id_tpmt_sensitive"));
        assert_eq!(sha256(&[&sens2b, &id_name]), hex(&v, "inner_integrity"));
        let mut inner_plain = tpm2b(&sha256(&[&sens2b, &id_name]));
        inner_plain.extend_from_slice(&sens2b);
        assert_eq!(inner_plain, hex(&v, "inner_plain"));
        let enc_sensitive = aes128_cfb(&s.inner_wrap_key, &inner_plain);
        assert_eq!(enc_sensitive, hex(&v, "enc_sensitive"));
        assert_eq!(oaep_encode(&s.dup_seed, b"DUPLICATE\0", &s.dup_oaep_seed, 256).unwrap(), hex(&v, "dup_oaep_em"));
        assert_eq!(oaep_encode(&s.cred_seed, b"IDENTITY\0", &s.cred_oaep_seed, 256).unwrap(), hex(&v, "cred_oaep_em"));
        let srk_key = storage_key("srk", &srk).unwrap();
        let ek_key = storage_key("ek", &ek).unwrap();
        assert_eq!(rsa_oaep(&srk_key.rsa, &s.dup_seed, b"DUPLICATE\0", &s.dup_oaep_seed).unwrap(), hex(&v, "dup_enc_seed"));
        assert_eq!(rsa_oaep(&ek_key.rsa, &s.cred_seed, b"IDENTITY\0", &s.cred_oaep_seed).unwrap(), hex(&v, "cred_secret"));
        let dup_sym = kdfa(&s.dup_seed, b"STORAGE", &id_name, &[], 128);
        assert_eq!(dup_sym, hex(&v, "dup_sym_key"));
        assert_eq!(kdfa(&s.dup_seed, b"INTEGRITY", &[], &[], 256), hex(&v, "dup_hmac_key"));
        let dup_sensitive = aes128_cfb(&dup_sym, &enc_sensitive);
        assert_eq!(dup_sensitive, hex(&v, "dup_sensitive"));
        assert_eq!(hmac_sha256(&hex(&v, "dup_hmac_key"), &[&dup_sensitive, &id_name]), hex(&v, "outer_hmac"));
        let cred_sym = kdfa(&s.cred_seed, b"STORAGE", &srk_key.name, &[], 128);
        assert_eq!(cred_sym, hex(&v, "cred_sym_key"));
        assert_eq!(kdfa(&s.cred_seed, b"INTEGRITY", &[], &[], 256), hex(&v, "cred_hmac_key"));
        assert_eq!(tpm2b(&s.inner_wrap_key), hex(&v, "cred_plain"));
        assert_eq!(aes128_cfb(&cred_sym, &tpm2b(&s.inner_wrap_key)), hex(&v, "cred_enc_identity"));
        let blob = authentication_key(&ek, &srk, &s).unwrap();
        assert_eq!(blob.len(), 766);
        assert_eq!(blob, hex(&v, "blob"));
        use base64::Engine;
        assert_eq!(base64::engine::general_purpose::STANDARD.encode(&blob), v["authenticationKey_base64"].as_str().unwrap());
        // The vector's SAS token verifies with K, and only with K.
        let token = crate::sas::parse(v["sas"]["token"].as_str().unwrap()).unwrap();
        assert!(token.signed_with(&s.hmac_key));
        assert!(!token.signed_with(&s.obfuscation));
    }

    /// Keys the construction cannot serve are refused with a reason, not built into a blob no
    /// TPM can use.
    #[test]
    fn unsuitable_keys_are_refused() {
        let v = vector();
        let s = vector_secrets(&v);
        let ek_bytes = hex(&v, "ek_tpm2b_public");
        let srk = parse_tpm2b_public(&hex(&v, "srk_tpm2b_public")).unwrap();
        let mut ek = parse_tpm2b_public(&ek_bytes).unwrap();
        ek.name_alg = 0x0004;
        assert!(authentication_key(&ek, &srk, &s).unwrap_err().contains("SHA-256"));
        let mut ek = parse_tpm2b_public(&ek_bytes).unwrap();
        ek.symmetric = None;
        assert!(authentication_key(&ek, &srk, &s).unwrap_err().contains("AES-128-CFB"));
        let mut ek = parse_tpm2b_public(&ek_bytes).unwrap();
        ek.key = TpmKey::Ecc { curve: 3, x: vec![1; 32], y: vec![2; 32] };
        assert!(authentication_key(&ek, &srk, &s).unwrap_err().contains("not an RSA key"));
        let mut ek = parse_tpm2b_public(&ek_bytes).unwrap();
        if let TpmKey::Rsa { modulus, .. } = &mut ek.key {
            modulus[0] = 0;
        }
        assert!(authentication_key(&ek, &srk, &s).unwrap_err().contains("2048-bit"));
    }

    #[test]
    fn secrets_take_disjoint_parts_of_one_buffer() {
        let b: [u8; SECRETS_LEN] = std::array::from_fn(|i| i as u8);
        let s = Secrets::from_bytes(&b);
        let mut all =
            [&s.hmac_key[..], &s.obfuscation, &s.dup_seed, &s.dup_oaep_seed, &s.cred_seed, &s.cred_oaep_seed, &s.inner_wrap_key].concat();
        all.sort_unstable();
        assert_eq!(all, b.to_vec(), "every byte used exactly once");
    }

    #[test]
    fn cfb_is_full_block_feedback_and_any_length() {
        // With full-block feedback the second block's keystream depends on the first
        // ciphertext block; with 8-bit feedback (the wrong CFB) it would not be this way.
        let key = [7u8; 16];
        let a = aes128_cfb(&key, &[0u8; 40]);
        let b = aes128_cfb(&key, &[0xffu8; 40]);
        // Only the first block's keystream is independent of the plaintext.
        assert!(a[..16].iter().zip(&b[..16]).all(|(x, y)| x ^ y == 0xff));
        assert_ne!(a[16..32].iter().zip(&b[16..32]).filter(|(x, y)| *x ^ *y == 0xff).count(), 16);
        assert_eq!(aes128_cfb(&key, &[1, 2, 3]).len(), 3);
    }
}
