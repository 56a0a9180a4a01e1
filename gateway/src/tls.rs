//! The rustls server configuration shared by every TLS listener: TLS 1.2 and 1.3, ECDSA or RSA
//! certificate chosen by what the client offers, and a client certificate requested but not
//! required (X.509 attestation checks the chain against enrollments, not against a root store).

use crate::certs::CertFiles;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{ring as provider, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &data[..]).collect();
    let certs = certs.map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut &data[..])
        .map_err(|e| format!("{}: {e}", path.display()))?
        .ok_or_else(|| format!("{} holds no private key", path.display()))
}

fn certified(
    provider: &CryptoProvider,
    pair: &Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<Option<Arc<CertifiedKey>>, String> {
    match pair {
        None => Ok(None),
        Some((c, k)) => {
            let key = provider.key_provider.load_private_key(load_key(k)?).map_err(|e| format!("{}: {e}", k.display()))?;
            Ok(Some(Arc::new(CertifiedKey::new(load_chain(c)?, key))))
        }
    }
}

#[derive(Debug)]
struct ByClientOffer {
    ecdsa: Option<Arc<CertifiedKey>>,
    rsa: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ByClientOffer {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let ecdsa_ok = hello.signature_schemes().contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            && hello.cipher_suites().iter().any(|s| {
                let name = format!("{s:?}");
                name.starts_with("TLS13_") || name.contains("ECDHE_ECDSA")
            });
        if ecdsa_ok {
            self.ecdsa.clone().or_else(|| self.rsa.clone())
        } else {
            self.rsa.clone().or_else(|| self.ecdsa.clone())
        }
    }
}

/// Asks for a client certificate and checks only that the client holds its key (the handshake
/// signature); which certificates are trusted is decided by the enrollment list afterwards.
#[derive(Debug)]
struct RequestClientCert {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for RequestClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end: &CertificateDer<'_>,
        _inter: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

pub fn server_config(files: &CertFiles, knobs: &crate::config::Tls) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(provider::default_provider());
    let resolver = ByClientOffer { ecdsa: certified(&provider, &files.ecdsa)?, rsa: certified(&provider, &files.rsa)? };
    if resolver.ecdsa.is_none() && resolver.rsa.is_none() {
        return Err("no server certificate configured".into());
    }
    let verifier = Arc::new(RequestClientCert { algs: provider.signature_verification_algorithms });
    // No ALPN list: a client that offers one (urllib3 offers http/1.1) is served HTTP/1.1 anyway,
    // and MQTT clients that offer none are not refused.
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    cfg.session_storage = match knobs.session_cache_entries {
        0 => Arc::new(rustls::server::NoServerSessionStorage {}),
        n => rustls::server::ServerSessionMemoryCache::new(n),
    };
    if knobs.stateless_tickets {
        cfg.ticketer = provider::Ticketer::new().map_err(|e| format!("TLS ticketer: {e}"))?;
    }
    // One ticket by default (rustls sends 2): a device resumes at most once per session, and
    // each ticket costs the server a cache entry or an encryption on every full handshake.
    cfg.send_tls13_tickets = knobs.tickets_per_handshake;
    Ok(Arc::new(cfg))
}
