//! The service's records and their JSON wire shapes (docs/service-api.md §2). Property names are
//! camelCase exactly as DPS writes them; absent optional members are omitted, never `null`
//! (§2.10); enum values are accepted case-insensitively because SDK typings differ (§2).

use crate::time::UtcTime;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A string enum that serialises in its canonical spelling and parses case-insensitively.
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            pub fn parse(s: &str) -> Option<Self> {
                $(if s.eq_ignore_ascii_case($text) { return Some($name::$variant); })+
                None
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "unknown {} '{}', expected one of: {}",
                        stringify!($name), crate::ids::printable(&s), [$($text),+].join(", ")
                    ))
                })
            }
        }
    };
}

wire_enum!(AttestationType { None = "none", Tpm = "tpm", X509 = "x509", SymmetricKey = "symmetricKey" });
wire_enum!(ProvisioningStatus { Enabled = "enabled", Disabled = "disabled" });
wire_enum!(AllocationPolicy { Hashed = "hashed", GeoLatency = "geoLatency", Static = "static", Custom = "custom" });
wire_enum!(
    /// How the service reaches a linked hub to create a device's identity there.
    HubKind { RegistryOnly = "registry-only", Mosquitto = "mosquitto", AzureIotHub = "azure-iothub", Webhook = "webhook" }
);
wire_enum!(RegistrationStatus {
    Unassigned = "unassigned",
    Assigning = "assigning",
    Assigned = "assigned",
    Failed = "failed",
    Disabled = "disabled",
});
wire_enum!(Substatus {
    InitialAssignment = "initialAssignment",
    DeviceDataMigrated = "deviceDataMigrated",
    DeviceDataReset = "deviceDataReset",
    ReprovisionedToInitialAssignment = "reprovisionedToInitialAssignment",
});
wire_enum!(
    /// Bulk modes; Node's typing spells the third `updateIfMatchEtag`, hence case-insensitive.
    BulkMode { Create = "create", Update = "update", UpdateIfMatchETag = "updateIfMatchETag", Delete = "delete" }
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct TpmAttestation {
    #[serde(default)]
    pub endorsement_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_root_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyAttestation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateInfo {
    pub subject_name: String,
    pub sha1_thumbprint: String,
    pub sha256_thumbprint: String,
    pub issuer_name: String,
    pub not_before_utc: UtcTime,
    pub not_after_utc: UtcTime,
    pub serial_number: String,
    pub version: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509CertificateWithInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// Server-computed; dropped from input by `validate::strip_read_only`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<X509CertificateInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509Certificates {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<X509CertificateWithInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<X509CertificateWithInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509CaReferences {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509Attestation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificates: Option<X509Certificates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificates: Option<X509Certificates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_references: Option<X509CaReferences>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationMechanism {
    #[serde(rename = "type")]
    pub kind: AttestationType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmAttestation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509Attestation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
}

impl AttestationMechanism {
    /// The view returned by GET, PUT and query: symmetric keys and certificate bodies are left
    /// out; they are read through `.../attestationmechanism` (docs/service-api.md §2.10).
    pub fn without_secrets(&self) -> AttestationMechanism {
        let mut a = self.clone();
        if let Some(k) = a.symmetric_key.as_mut() {
            k.primary_key = None;
            k.secondary_key = None;
        }
        if let Some(x) = a.x509.as_mut() {
            for certs in [x.client_certificates.as_mut(), x.signing_certificates.as_mut()].into_iter().flatten() {
                for c in [certs.primary.as_mut(), certs.secondary.as_mut()].into_iter().flatten() {
                    c.certificate = None;
                }
            }
        }
        a
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCapabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomAllocationDefinition {
    pub webhook_url: String,
    pub api_version: String,
}

/// Fields shared by individual enrollments and enrollment groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentCommon {
    pub attestation: AttestationMechanism,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<DeviceCapabilities>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    /// Open JSON (`{"tags": .., "properties": {"desired": ..}}`), persisted verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_status: Option<ProvisioningStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<UtcTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<UtcTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<AllocationPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hubs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_allocation_definition: Option<CustomAllocationDefinition>,
    // Preview members (2021-11-01-preview, 2025-07-01-preview), kept as opaque values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_issuance_policy: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_certificate_issuance_policy: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_policy_name: Option<String>,
}

impl EnrollmentCommon {
    pub fn is_enabled(&self) -> bool {
        self.provisioning_status != Some(ProvisioningStatus::Disabled)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<DeviceRegistrationState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional_device_information: Option<Value>,
    #[serde(flatten)]
    pub common: EnrollmentCommon,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    pub enrollment_group_id: String,
    #[serde(flatten)]
    pub common: EnrollmentCommon,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistrationState {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<UtcTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub status: RegistrationStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<Substatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<UtcTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// The group the device came through, when it did; kept for the by-group query (not a DPS
    /// member, never serialised to clients).
    #[serde(default, rename = "_enrollmentGroupId", skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The operation that produced this state, so status polls can be answered from any shard
    /// or node (not a DPS member, never serialised to clients).
    #[serde(default, rename = "_operationId", skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// For an X.509 device, what the device API reports as `registrationState.x509` (not a
    /// member of the service API's registration state, never serialised there).
    #[serde(default, rename = "_x509", skip_serializing_if = "Option::is_none")]
    pub x509: Option<X509RegistrationResult>,
    /// For a TPM device, the key its tokens are signed with and what the device API reports
    /// (not a DPS member, never serialised to clients; sealed at rest like every record).
    #[serde(default, rename = "_tpm", skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmRegistrationSecret>,
    /// While `assigning`: the hub connector's work still to do (not a DPS member, never
    /// serialised to clients; a restarted service resumes it).
    #[serde(default, rename = "_hubTask", skip_serializing_if = "Option::is_none")]
    pub hub_task: Option<crate::hub::HubTask>,
    /// While `assigning` under a custom allocation: the webhook call still to make (not a DPS
    /// member, never serialised to clients).
    #[serde(default, rename = "_customAllocation", skip_serializing_if = "Option::is_none")]
    pub custom_allocation: Option<crate::hub::custom::CustomCall>,
    /// The twin the service last wrote to the device's hub, migrated when the device moves
    /// (not a DPS member, never serialised to clients).
    #[serde(default, rename = "_twin", skip_serializing_if = "Option::is_none")]
    pub twin: Option<crate::hub::Twin>,
}

impl DeviceRegistrationState {
    /// True while work outside the store (a webhook, a hub) must end before the state is final.
    pub fn has_pending_work(&self) -> bool {
        self.hub_task.is_some() || self.custom_allocation.is_some()
    }

    /// The view the device API answers with, borrowed (no copy of the state per answer).
    pub fn public_view(&self) -> PublicState<'_> {
        PublicState {
            registration_id: &self.registration_id,
            created_date_time_utc: self.created_date_time_utc.as_ref(),
            assigned_hub: self.assigned_hub.as_deref(),
            device_id: self.device_id.as_deref(),
            status: self.status,
            substatus: self.substatus,
            error_code: self.error_code,
            error_message: self.error_message.as_deref(),
            last_updated_date_time_utc: self.last_updated_date_time_utc.as_ref(),
            etag: self.etag.as_deref(),
            payload: self.payload.as_ref(),
        }
    }

    /// The view clients see: internal members removed.
    pub fn public(mut self) -> DeviceRegistrationState {
        self.enrollment_group_id = None;
        self.operation_id = None;
        self.x509 = None;
        self.tpm = None;
        self.hub_task = None;
        self.custom_allocation = None;
        self.twin = None;
        self
    }
}

/// The members of a [`DeviceRegistrationState`] that clients see, serialised as the state's own
/// (the same names, the same members left out when absent), borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublicState<'a> {
    pub registration_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<&'a UtcTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<&'a str>,
    pub status: RegistrationStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub substatus: Option<Substatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<&'a UtcTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<&'a Value>,
}

/// What a TPM device's registration keeps: the identity key K it proved it imported (base64;
/// polls and lookups are signed with it), the endorsement key it was issued for (base64
/// TPM2B_PUBLIC), and the second `authenticationKey` the device API reports in
/// `registrationState.tpm` once the device is assigned (the SDKs import it as their hub key).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmRegistrationSecret {
    pub hmac_key: String,
    pub endorsement_key: String,
    pub authentication_key: String,
}

impl std::fmt::Debug for TpmRegistrationSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmRegistrationSecret").finish_non_exhaustive()
    }
}

/// `registrationState.x509` of the device API: the leaf the device presented and, for a group,
/// the group and the certificate of it that the chain reached (docs/device-protocol.md §6.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509RegistrationResult {
    pub certificate_info: X509CertificateInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_certificate_info: Option<X509CertificateInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QuerySpecification {
    #[serde(default)]
    pub query: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentOperation {
    pub mode: BulkMode,
    pub enrollments: Vec<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkEnrollmentGroupOperation {
    pub mode: BulkMode,
    pub enrollment_groups: Vec<Value>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BulkItemError {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    pub error_code: u32,
    pub error_status: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BulkOperationResult {
    pub is_successful: bool,
    pub errors: Vec<BulkItemError>,
}

/// A linked IoT hub (ARM `IotHubDefinitionDescription`, docs/service-api.md §4.3).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHub {
    /// Host name, e.g. `hub-a.azure-devices.net`. Derived from the connection string when absent.
    #[serde(default)]
    pub name: String,
    /// The hub's shared access policy (`registry-only` and `azure-iothub`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub connection_string: String,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply_allocation_policy: Option<bool>,
    /// The hub connector (absent: `registry-only`, the assignment is only recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<HubKind>,
    /// `mosquitto`: where the dynamic-security commands go (`mqtt://host:port`, `mqtts://…`);
    /// `webhook`: the URL the assignment is POSTed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_url: Option<String>,
    /// `mosquitto`: the dynamic-security client the service logs in as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// `mosquitto`: its password (a secret: sealed at rest, never returned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// PEM CA certificate the control connection verifies the broker with (`mqtts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

impl LinkedHub {
    pub fn kind(&self) -> HubKind {
        self.kind.unwrap_or(HubKind::RegistryOnly)
    }

    pub fn weight(&self) -> u32 {
        self.allocation_weight.unwrap_or(1)
    }

    /// The linked hub named `name` (case-insensitive) if a connector serves it, i.e. devices
    /// assigned there are created at the hub, not only recorded.
    pub fn with_connector<'a>(hubs: &'a [LinkedHub], name: &str) -> Option<&'a LinkedHub> {
        hubs.iter().find(|h| h.name.eq_ignore_ascii_case(name) && h.kind() != HubKind::RegistryOnly)
    }
    pub fn applies_allocation_policy(&self) -> bool {
        self.apply_allocation_policy.unwrap_or(true)
    }
    /// The view returned to clients: the connection string's key is replaced.
    pub fn redacted(&self) -> LinkedHub {
        let mut h = self.clone();
        if !h.connection_string.is_empty() {
            h.connection_string = redact_connection_string(&h.connection_string);
        }
        if h.password.is_some() {
            h.password = Some("****".into());
        }
        h
    }
}

/// Parses `HostName=..;SharedAccessKeyName=..;SharedAccessKey=..` (keys case-insensitive, as
/// the Python SDK does; docs/service-api.md §3.2).
pub fn parse_connection_string(s: &str) -> Option<ConnectionString> {
    let mut host = None;
    let mut name = None;
    let mut key = None;
    for part in s.split(';').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part.split_once('=')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "hostname" => host = Some(v.trim().to_string()),
            "sharedaccesskeyname" => name = Some(v.trim().to_string()),
            "sharedaccesskey" => key = Some(v.trim().to_string()),
            _ => {}
        }
    }
    Some(ConnectionString { host_name: host?, key_name: name?, key: key? })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    pub host_name: String,
    pub key_name: String,
    pub key: String,
}

impl ConnectionString {
    pub fn render(&self) -> String {
        format!("HostName={};SharedAccessKeyName={};SharedAccessKey={}", self.host_name, self.key_name, self.key)
    }
}

fn redact_connection_string(s: &str) -> String {
    match parse_connection_string(s) {
        Some(c) => format!("HostName={};SharedAccessKeyName={};SharedAccessKey=****", c.host_name, c.key_name),
        None => "****".to_string(),
    }
}

/// Drops `null` members recursively, so stored JSON never carries them.
pub fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Convenience for open JSON members.
pub fn empty_object() -> Value {
    Value::Object(Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_round_trip_and_case_insensitive_enums() {
        let j = r#"{"registrationId":"d1","attestation":{"type":"SYMMETRICKEY","symmetricKey":{"primaryKey":null}},
            "provisioningStatus":"Disabled","allocationPolicy":"GeoLatency",
            "initialTwin":{"tags":{"a":1},"properties":{"desired":{"b":2}}},"unknownMember":5}"#;
        let e: IndividualEnrollment = serde_json::from_str(j).unwrap();
        assert_eq!(e.common.attestation.kind, AttestationType::SymmetricKey);
        assert_eq!(e.common.provisioning_status, Some(ProvisioningStatus::Disabled));
        let out = serde_json::to_value(&e).unwrap();
        assert_eq!(out["attestation"]["type"], "symmetricKey");
        assert_eq!(out["provisioningStatus"], "disabled");
        assert_eq!(out["initialTwin"]["properties"]["desired"]["b"], 2);
        assert!(out.get("deviceId").is_none(), "absent members are omitted, not null");
    }

    /// The borrowed view the device API answers with serialises exactly as the owned state with
    /// its internal members removed: every member present, and every optional one absent.
    #[test]
    fn the_public_view_serialises_as_the_public_state() {
        let t = |n: i128| UtcTime::from_unix_nanos(n * 1_000_000_000);
        let full = DeviceRegistrationState {
            registration_id: "dev-1".into(),
            created_date_time_utc: Some(t(1_700_000_000)),
            assigned_hub: Some("hub-a.example.net".into()),
            device_id: Some("dev-1".into()),
            status: RegistrationStatus::Failed,
            substatus: Some(Substatus::ReprovisionedToInitialAssignment),
            error_code: Some(400_209),
            error_message: Some("quoted \"text\" and ünïcode".into()),
            last_updated_date_time_utc: Some(t(1_700_000_100)),
            etag: Some("\"e1\"".into()),
            payload: Some(serde_json::json!({"a": [1, 2], "b": null})),
            enrollment_group_id: Some("group".into()),
            operation_id: Some("1.00.64".into()),
            x509: None,
            tpm: Some(TpmRegistrationSecret { hmac_key: "k".into(), endorsement_key: "ek".into(), authentication_key: "ak".into() }),
            hub_task: None,
            custom_allocation: None,
            twin: Some(crate::hub::Twin::default()),
        };
        let bare = DeviceRegistrationState {
            registration_id: "dev-2".into(),
            created_date_time_utc: None,
            assigned_hub: None,
            device_id: None,
            status: RegistrationStatus::Assigning,
            substatus: None,
            error_code: None,
            error_message: None,
            last_updated_date_time_utc: None,
            etag: None,
            payload: None,
            enrollment_group_id: None,
            operation_id: None,
            x509: None,
            tpm: None,
            hub_task: None,
            custom_allocation: None,
            twin: None,
        };
        for s in [full, bare] {
            let view = serde_json::to_string(&s.public_view()).unwrap();
            let owned = serde_json::to_string(&s.clone().public()).unwrap();
            assert_eq!(view, owned);
        }
    }

    #[test]
    fn bad_enum_names_the_value() {
        let err = serde_json::from_str::<AttestationMechanism>(r#"{"type":"psk"}"#).unwrap_err();
        assert!(err.to_string().contains("psk"));
    }

    #[test]
    fn secrets_are_stripped_from_views() {
        let a = AttestationMechanism {
            kind: AttestationType::SymmetricKey,
            tpm: None,
            x509: None,
            symmetric_key: Some(SymmetricKeyAttestation { primary_key: Some("k".into()), secondary_key: Some("s".into()) }),
        };
        let v = a.without_secrets();
        assert_eq!(v.symmetric_key, Some(SymmetricKeyAttestation::default()));
    }

    #[test]
    fn connection_strings() {
        let c = parse_connection_string("hostname=h.example;sharedaccesskeyname=p;SharedAccessKey=a2V5").unwrap();
        assert_eq!(c.host_name, "h.example");
        assert_eq!(c.key, "a2V5");
        assert!(parse_connection_string("HostName=h").is_none());
    }
}
