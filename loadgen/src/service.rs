//! What loadgen asks of the service API before a run: the group key (creating the group when
//! missing) or the individual enrollments of a CSV, created in bulk.

use crate::endpoint::Endpoint;
use crate::BoxError;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

pub struct ServiceClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ServiceClient {
    pub fn new(ep: &Endpoint) -> Result<ServiceClient, BoxError> {
        let ca = std::fs::read(&ep.ca)?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .resolve(&ep.host, format!("{}:{}", ep.connect, ep.https_port).parse()?)
            .build()?;
        let cs = dps_core::model::parse_connection_string(&ep.service_cs).ok_or("bad service connection string")?;
        let se = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64 + 24 * 3600;
        let token = dps_core::sas::build(&cs.host_name, &B64.decode(&cs.key)?, se, Some(&cs.key_name));
        Ok(ServiceClient { http, base: format!("https://{}:{}", ep.host, ep.https_port), token })
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<String>) -> Result<(u16, String), BoxError> {
        let mut r = self.http.request(method, format!("{}{path}?api-version=2021-10-01", self.base)).header("Authorization", &self.token);
        if let Some(b) = body {
            r = r.header("Content-Type", "application/json").body(b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// Creates the symmetric-key group if it is missing and returns its primary key.
    pub async fn group_key(&self, group: &str) -> Result<Vec<u8>, BoxError> {
        let body = serde_json::json!({"enrollmentGroupId": group, "attestation": {"type": "symmetricKey"}});
        let (st, text) = self.call(reqwest::Method::PUT, &format!("/enrollmentGroups/{group}"), Some(body.to_string())).await?;
        if !(200..300).contains(&st) && st != 409 {
            return Err(format!("creating group {group}: {st} {text}").into());
        }
        let (st, text) = self.call(reqwest::Method::POST, &format!("/enrollmentGroups/{group}/attestationmechanism"), None).await?;
        if st != 200 {
            return Err(format!("reading group {group}'s keys: {st} {text}").into());
        }
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let k = v["symmetricKey"]["primaryKey"].as_str().ok_or("group has no symmetric key")?;
        Ok(B64.decode(k)?)
    }

    /// An X.509 fleet: uploads `ca_pem` as the verified CA certificate `{group}-ca` and makes
    /// the X.509 group `group` reference it (replacing what a previous run left).
    pub async fn x509_group(&self, group: &str, ca_pem: &str) -> Result<(), BoxError> {
        let ca = format!("{group}-ca");
        let _ = self.call(reqwest::Method::DELETE, &format!("/certificates/{ca}"), None).await?;
        let body = serde_json::json!({"certificate": ca_pem, "isVerified": true});
        let (st, text) = self.call(reqwest::Method::PUT, &format!("/certificates/{ca}"), Some(body.to_string())).await?;
        if st != 200 {
            return Err(format!("uploading the fleet's CA: {st} {text}").into());
        }
        let _ = self.call(reqwest::Method::DELETE, &format!("/enrollmentGroups/{group}"), None).await?;
        let body =
            serde_json::json!({"enrollmentGroupId": group, "attestation": {"type": "x509", "x509": {"caReferences": {"primary": ca}}}});
        let (st, text) = self.call(reqwest::Method::PUT, &format!("/enrollmentGroups/{group}"), Some(body.to_string())).await?;
        if st != 200 {
            return Err(format!("creating group {group}: {st} {text}").into());
        }
        Ok(())
    }

    /// Creates individual symmetric-key enrollments in bulk calls of `batch`; ones that already
    /// exist are left as they are.
    pub async fn create_individual(&self, devices: &[(String, Vec<u8>)], batch: usize) -> Result<usize, BoxError> {
        let items: Vec<_> = devices
            .iter()
            .map(|(id, key)| {
                let k = B64.encode(key);
                serde_json::json!({"registrationId": id, "attestation": {"type": "symmetricKey",
                    "symmetricKey": {"primaryKey": k, "secondaryKey": k}}})
            })
            .collect();
        self.create_enrollments(items, batch).await
    }

    /// Creates individual TPM enrollments, every one naming this endorsement key (TPM2B_PUBLIC):
    /// one TPM answers for the whole fleet.
    pub async fn create_tpm_individual(&self, ids: &[String], endorsement_key: &[u8], batch: usize) -> Result<usize, BoxError> {
        let ek = B64.encode(endorsement_key);
        let items = ids
            .iter()
            .map(|id| serde_json::json!({"registrationId": id, "attestation": {"type": "tpm", "tpm": {"endorsementKey": ek}}}))
            .collect();
        self.create_enrollments(items, batch).await
    }

    async fn create_enrollments(&self, items: Vec<serde_json::Value>, batch: usize) -> Result<usize, BoxError> {
        let mut created = 0;
        for chunk in items.chunks(batch.max(1)) {
            let body = serde_json::json!({"mode": "create", "enrollments": chunk}).to_string();
            let (st, text) = self.call(reqwest::Method::POST, "/enrollments", Some(body)).await?;
            if st != 200 {
                return Err(format!("bulk create: {st} {}", &text[..text.len().min(300)]).into());
            }
            let v: serde_json::Value = serde_json::from_str(&text)?;
            for e in v["errors"].as_array().into_iter().flatten() {
                // 409: already enrolled, which is what a re-run wants.
                if e["errorCode"].as_u64().unwrap_or(0) / 1000 != 409 {
                    return Err(format!("bulk create refused an item: {e}").into());
                }
            }
            created += chunk.len() - v["errors"].as_array().map_or(0, |a| a.len());
        }
        Ok(created)
    }
}
