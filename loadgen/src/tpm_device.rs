//! A device's TPM, driven through the TPM Software Stack (tss-esapi on libtss2's ESAPI), doing
//! what the Azure device SDKs do with it: create the endorsement key and storage root key with
//! the SDKs' templates (persisted at 0x81010001 and 0x81000001, reused when present), hand out
//! their public areas, activate an `authenticationKey` challenge (PolicySecret for the EK,
//! ActivateCredential, Import under the SRK with the recovered inner key, Load) and sign with
//! the imported HMAC key.
//!
//! The ESAPI context is not `Send`: [`TpmHandle`] owns it on a thread of its own and serves
//! async callers over a channel.

use crate::BoxError;
use std::str::FromStr;
use std::sync::mpsc;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle as TssHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, EncryptedSecret, IdObject, MaxBuffer, Nonce, Private, Public, PublicBuffer, PublicBuilder, PublicKeyRsa,
    PublicRsaParametersBuilder, RsaExponent, RsaScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};

const EK_HANDLE: u32 = 0x8101_0001;
const SRK_HANDLE: u32 = 0x8100_0001;
/// PolicySecret(TPM_RH_ENDORSEMENT): the EK template's policy.
const EK_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24, 0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52,
    0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// A TPM with the device's keys, used from one thread.
pub struct TpmDevice {
    ctx: Context,
    ek: KeyHandle,
    srk: KeyHandle,
    /// The identity key of the last activated challenge.
    identity: Option<KeyHandle>,
    /// TPM2B_PUBLIC of the EK and the SRK, as the TPM marshals them.
    pub endorsement_key: Vec<u8>,
    pub storage_root_key: Vec<u8>,
}

fn storage_key_template(endorsement: bool) -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_admin_with_policy(endorsement)
        .with_user_with_auth(!endorsement)
        .with_no_da(!endorsement)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let params = PublicRsaParametersBuilder::new()
        .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
        .with_scheme(RsaScheme::Null)
        .with_key_bits(RsaKeyBits::Rsa2048)
        .with_exponent(RsaExponent::default())
        .with_is_decryption_key(true)
        .with_restricted(true)
        .build()?;
    let policy = if endorsement { Digest::try_from(EK_POLICY.to_vec())? } else { Digest::default() };
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(policy)
        .with_rsa_parameters(params)
        // The SDKs' templates leave `unique` empty.
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
}

/// The six size-prefixed parts of an `authenticationKey`.
fn split(blob: &[u8]) -> Result<Vec<&[u8]>, BoxError> {
    let mut parts = Vec::with_capacity(6);
    let mut rest = blob;
    for _ in 0..6 {
        let (len, tail) = rest.split_first_chunk::<2>().ok_or("authenticationKey: truncated")?;
        let n = u16::from_be_bytes(*len) as usize;
        if tail.len() < n {
            return Err("authenticationKey: truncated".into());
        }
        parts.push(&tail[..n]);
        rest = &tail[n..];
    }
    Ok(parts)
}

impl TpmDevice {
    /// Connects (e.g. `swtpm:host=127.0.0.1,port=2321`) and makes sure the EK and SRK exist.
    pub fn open(tcti: &str) -> Result<TpmDevice, BoxError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| format!("TCTI {tcti}: {e}"))?;
        let mut ctx = Context::new(conf).map_err(|e| format!("connecting to the TPM at {tcti}: {e}"))?;
        let ek = Self::persistent_key(&mut ctx, EK_HANDLE, Hierarchy::Endorsement).map_err(|e| format!("endorsement key: {e}"))?;
        let srk = Self::persistent_key(&mut ctx, SRK_HANDLE, Hierarchy::Owner).map_err(|e| format!("storage root key: {e}"))?;
        let public = |ctx: &mut Context, k: KeyHandle| -> Result<Vec<u8>, BoxError> {
            let (p, _, _) = ctx.read_public(k)?;
            Ok(PublicBuffer::try_from(p)?.marshall()?)
        };
        let (endorsement_key, storage_root_key) = (public(&mut ctx, ek)?, public(&mut ctx, srk)?);
        Ok(TpmDevice { ctx, ek, srk, identity: None, endorsement_key, storage_root_key })
    }

    /// The key persisted at `handle`, created in `hierarchy` (and persisted) when absent.
    fn persistent_key(ctx: &mut Context, handle: u32, hierarchy: Hierarchy) -> Result<KeyHandle, BoxError> {
        let persistent = PersistentTpmHandle::new(handle)?;
        if let Ok(h) = ctx.tr_from_tpm_public(TssHandle::Persistent(persistent)) {
            return Ok(h.into());
        }
        let template = storage_key_template(hierarchy == Hierarchy::Endorsement)?;
        let created = ctx
            .execute_with_nullauth_session(|c| c.create_primary(hierarchy, template, None, None, None, None))
            .map_err(|e| format!("create primary: {e}"))?;
        let kept = ctx
            .execute_with_nullauth_session(|c| {
                c.evict_control(Provision::Owner, created.key_handle.into(), Persistent::Persistent(persistent))
            })
            .map_err(|e| format!("persist: {e}"))?;
        ctx.flush_context(created.key_handle.into()).map_err(|e| format!("flush: {e}"))?;
        Ok(kept.into())
    }

    /// Activates a challenge: afterwards [`TpmDevice::sign`] signs with the key it carried.
    /// Fails (with the TPM's response code) when the challenge was not built for this TPM's EK
    /// and SRK or was tampered with.
    pub fn activate(&mut self, blob: &[u8]) -> Result<(), BoxError> {
        let p = split(blob)?;
        let credential = IdObject::try_from(p[0].to_vec())?;
        let credential_secret = EncryptedSecret::try_from(p[1].to_vec())?;
        let duplicate = Private::try_from(p[2].to_vec())?;
        let duplicate_secret = EncryptedSecret::try_from(p[3].to_vec())?;
        let identity_public = Public::unmarshall(p[4])?;

        let session = self
            .ctx
            .start_auth_session(None, None, None, SessionType::Policy, SymmetricDefinition::AES_128_CFB, HashingAlgorithm::Sha256)?
            .ok_or("no policy session")?;
        let policy = PolicySession::try_from(session)?;
        let activated = (|| -> Result<Digest, BoxError> {
            self.ctx.execute_with_nullauth_session(|c| {
                c.policy_secret(
                    policy,
                    tss_esapi::handles::AuthHandle::Endorsement,
                    Nonce::default(),
                    Digest::default(),
                    Nonce::default(),
                    None,
                )
            })?;
            let (srk, ek) = (self.srk, self.ek);
            Ok(self.ctx.execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                c.activate_credential(srk, ek, credential, credential_secret)
            })?)
        })();
        let _ = self.ctx.flush_context(ObjectHandle::from(tss_esapi::handles::SessionHandle::from(session)));
        let inner_key = activated?;

        let srk = self.srk;
        let private = self.ctx.execute_with_nullauth_session(|c| {
            c.import(
                srk.into(),
                Some(Data::try_from(inner_key.value().to_vec())?),
                identity_public.clone(),
                duplicate,
                duplicate_secret,
                // The C SDK imports with AES-128-CFB whatever the key; the service sends 16 bytes.
                SymmetricDefinitionObject::AES_128_CFB,
            )
        })?;
        if let Some(old) = self.identity.take() {
            let _ = self.ctx.flush_context(old.into());
        }
        self.identity = Some(self.ctx.execute_with_nullauth_session(|c| c.load(srk, private, identity_public))?);
        Ok(())
    }

    /// TPM2_HMAC with the activated identity key.
    pub fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>, BoxError> {
        let key = self.identity.ok_or("no challenge activated yet")?;
        let buffer = MaxBuffer::try_from(data.to_vec())?;
        let digest = self.ctx.execute_with_nullauth_session(|c| c.hmac(key.into(), buffer, HashingAlgorithm::Sha256))?;
        Ok(digest.value().to_vec())
    }
}

enum Call {
    Activate(Vec<u8>, tokio::sync::oneshot::Sender<Result<(), String>>),
    ActivateAndSign(Vec<u8>, Vec<u8>, tokio::sync::oneshot::Sender<Result<Vec<u8>, String>>),
}

/// A [`TpmDevice`] on its own thread, for async callers. Calls are served one at a time, as a
/// TPM serves them.
#[derive(Clone)]
pub struct TpmHandle {
    calls: mpsc::Sender<Call>,
    pub endorsement_key: Vec<u8>,
    pub storage_root_key: Vec<u8>,
}

impl TpmHandle {
    pub fn open(tcti: &str) -> Result<TpmHandle, BoxError> {
        let (keys_tx, keys_rx) = mpsc::channel();
        let (calls, rx) = mpsc::channel::<Call>();
        let tcti = tcti.to_string();
        std::thread::Builder::new().name("tpm".into()).spawn(move || {
            let mut tpm = match TpmDevice::open(&tcti) {
                Ok(t) => {
                    let _ = keys_tx.send(Ok((t.endorsement_key.clone(), t.storage_root_key.clone())));
                    t
                }
                Err(e) => {
                    let _ = keys_tx.send(Err(e.to_string()));
                    return;
                }
            };
            while let Ok(call) = rx.recv() {
                match call {
                    Call::Activate(blob, reply) => {
                        let _ = reply.send(tpm.activate(&blob).map_err(|e| e.to_string()));
                    }
                    Call::ActivateAndSign(blob, data, reply) => {
                        let _ = reply.send(tpm.activate(&blob).and_then(|()| tpm.sign(&data)).map_err(|e| e.to_string()));
                    }
                }
            }
        })?;
        let (endorsement_key, storage_root_key) = keys_rx.recv()??;
        Ok(TpmHandle { calls, endorsement_key, storage_root_key })
    }

    /// Activates a challenge and signs `data` with its key, in one turn of the TPM (so two
    /// devices sharing a TPM cannot interleave their challenges).
    pub async fn activate_and_sign(&self, blob: Vec<u8>, data: Vec<u8>) -> Result<Vec<u8>, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls.send(Call::ActivateAndSign(blob, data, tx)).map_err(|_| "TPM thread gone".to_string())?;
        rx.await.map_err(|_| "TPM thread gone".to_string())?
    }

    /// Activates a challenge (the second `authenticationKey`, as the SDKs do on `assigned`).
    pub async fn activate(&self, blob: Vec<u8>) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.calls.send(Call::Activate(blob, tx)).map_err(|_| "TPM thread gone".to_string())?;
        rx.await.map_err(|_| "TPM thread gone".to_string())?
    }
}
