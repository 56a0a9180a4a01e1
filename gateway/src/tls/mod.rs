//! The rustls server configuration shared by every TLS listener: TLS 1.2 and 1.3, ECDSA or RSA
//! certificate chosen by what the client offers, and a client certificate requested but not
//! required (X.509 attestation checks the chain against enrollments, not against a root store).

pub mod certs;

use crate::tls::certs::CertFiles;
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

/// Server-side TLS sessions kept for resumption, in two generations of a hash map: inserts go
/// to the current one; when it holds half the capacity it becomes the previous one (dropping
/// the old previous). Every operation is O(1), unlike rustls' own memory cache, whose removal
/// scans its eviction queue (measured: 21% of the shards' CPU in memcmp with 65,536 entries).
#[derive(Debug)]
pub struct SessionCache {
    half: usize,
    maps: std::sync::Mutex<[std::collections::HashMap<Vec<u8>, Vec<u8>>; 2]>,
}

impl SessionCache {
    pub fn new(entries: usize) -> SessionCache {
        SessionCache { half: (entries / 2).max(1), maps: Default::default() }
    }
}

impl rustls::server::StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let Ok(mut m) = self.maps.lock() else { return false };
        if m[0].len() >= self.half {
            m[1] = std::mem::take(&mut m[0]);
        }
        m[0].insert(key, value);
        true
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let m = self.maps.lock().ok()?;
        m[0].get(key).or_else(|| m[1].get(key)).cloned()
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut m = self.maps.lock().ok()?;
        m[0].remove(key).or_else(|| m[1].remove(key))
    }
    fn can_cache(&self) -> bool {
        true
    }
}

/// The server configurations: the one every listener uses (requesting a client certificate),
/// and, when `tls.service_api_host_names` is set, the HTTPS port's configuration for handshakes
/// that name one of those hosts (requesting none).
#[derive(Clone)]
pub struct TlsConfigs {
    pub devices: Arc<ServerConfig>,
    pub service_api: Option<(Arc<ServerConfig>, Arc<Vec<String>>)>,
    /// The web console's: no client certificate requested (a browser would ask its user).
    pub console: Arc<ServerConfig>,
}

impl TlsConfigs {
    /// Whether `sni` names one of the service API's own host names; without any configured,
    /// the service API shares every host name with the devices.
    pub fn is_service_api_host(&self, sni: Option<&str>) -> bool {
        match (&self.service_api, sni) {
            (None, _) => true,
            (Some((_, names)), Some(n)) => names.iter().any(|h| h.eq_ignore_ascii_case(n)),
            (Some(_), None) => false,
        }
    }

    /// The HTTPS configuration for a handshake naming `sni`.
    pub fn for_https(&self, sni: Option<&str>) -> Arc<ServerConfig> {
        match &self.service_api {
            Some((cfg, _)) if self.is_service_api_host(sni) => cfg.clone(),
            _ => self.devices.clone(),
        }
    }
}

pub fn server_configs(files: &CertFiles, knobs: &crate::config::Tls) -> Result<TlsConfigs, String> {
    let devices = server_config(files, knobs, true)?;
    let service_api = match knobs.service_api_host_names.is_empty() {
        true => None,
        false => Some((server_config(files, knobs, false)?, Arc::new(knobs.service_api_host_names.clone()))),
    };
    let console = server_config(files, knobs, false)?;
    Ok(TlsConfigs { devices, service_api, console })
}

fn server_config(files: &CertFiles, knobs: &crate::config::Tls, request_client_certificate: bool) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(server_provider());
    let resolver = ByClientOffer { ecdsa: certified(&provider, &files.ecdsa)?, rsa: certified(&provider, &files.rsa)? };
    if resolver.ecdsa.is_none() && resolver.rsa.is_none() {
        return Err("no server certificate configured".into());
    }
    let verifier = Arc::new(RequestClientCert { algs: provider.signature_verification_algorithms });
    // No ALPN list: a client that offers one (urllib3 offers http/1.1) is served HTTP/1.1 anyway,
    // and MQTT clients that offer none are not refused.
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| format!("TLS configuration: {e}"))?;
    let builder = match request_client_certificate {
        true => builder.with_client_cert_verifier(verifier),
        false => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(resolver));
    cfg.session_storage = match knobs.session_cache_entries {
        0 => Arc::new(rustls::server::NoServerSessionStorage {}),
        n => Arc::new(SessionCache::new(n)),
    };
    if knobs.stateless_tickets {
        cfg.ticketer = provider::Ticketer::new().map_err(|e| format!("TLS ticketer: {e}"))?;
    }
    // One ticket by default (rustls sends 2): a device resumes at most once per session, and
    // each ticket costs the server a cache entry or an encryption on every full handshake.
    cfg.send_tls13_tickets = knobs.tickets_per_handshake;
    // The suite is ours to pick, in the order of `server_provider`.
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// ring's suites, AES-128-GCM first in each TLS version. The official SDKs' TLS stacks
/// (OpenSSL for Python and C, Node's OpenSSL, Java's JSSE) list AES-256-GCM-SHA384 first, but
/// TLS 1.3 makes every client implement TLS_AES_128_GCM_SHA256 (RFC 8446, 9.1) and every SDK's
/// TLS 1.2 list holds ECDHE with AES-128-GCM; AES-128 is the suite every one of them accepts.
/// It is also the cheaper: SHA-384 (the key schedule and the Finished messages of the
/// AES-256 suite) runs in software where SHA-256 has CPU instructions, and it took about 3 % of
/// the gateway's CPU per registration (perf, tuning.md).
pub fn server_provider() -> CryptoProvider {
    let mut p = provider::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| {
        let name = format!("{:?}", s.suite());
        (s.version().version == rustls::ProtocolVersion::TLSv1_2, !name.contains("AES_128_GCM"))
    };
    p.cipher_suites.sort_by_key(rank);
    p.secure_random = &crate::service::ThreadRandom;
    p
}

/// A client configuration that trusts the CA certificates in `ca_pem` only (hub connectors
/// reach brokers of the operator's own PKI).
pub fn client_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig, String> {
    let pem = ca_pem.ok_or("a TLS control connection needs caCert (the PEM CA of the broker's certificate)")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots.add(c.map_err(|e| format!("caCert: {e}"))?).map_err(|e| format!("caCert: {e}"))?;
    }
    if roots.is_empty() {
        return Err("caCert holds no certificate".into());
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::SessionCache;
    use rustls::server::StoresServerSessions;

    #[test]
    fn session_cache_keeps_about_its_capacity_and_takes_once() {
        let c = SessionCache::new(4);
        for i in 0u8..5 {
            assert!(c.put(vec![i], vec![i + 100]));
        }
        // Capacity 4: two generations of 2; the oldest (0, 1) are gone.
        assert_eq!(c.get(&[0]), None);
        assert_eq!(c.get(&[1]), None);
        assert_eq!(c.get(&[2]), Some(vec![102]));
        assert_eq!(c.take(&[4]), Some(vec![104]));
        assert_eq!(c.take(&[4]), None, "a session resumes once");
        assert_eq!(c.take(&[3]), Some(vec![103]));
    }
}
