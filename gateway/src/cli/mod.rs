//! The operator's command line (`dps enrollment …`, `dps enrollment-group …`, `dps registration
//! …`, `dps linked-hub …`, `dps export`, `dps import`): a client of the service API like any
//! other, with the commands and option names of `az iot dps` where they overlap.

mod certificate;
pub mod client;
pub mod output;
mod transfer;

use client::{seg, CliError, Service};
use output::{Kind, OutputOpts};
use serde_json::{json, Map, Value};
use std::path::PathBuf;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttestationType {
    Symmetrickey,
    X509,
    Tpm,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Enabled,
    Disabled,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    Hashed,
    Geolatency,
    Static,
    Custom,
}

/// What create and update set on an enrollment or a group (unset: left as is, or the
/// service's default on create).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EnrollmentFields {
    /// symmetrickey (default), x509 or tpm (individual enrollments only).
    #[arg(long)]
    pub attestation_type: Option<AttestationType>,
    /// Base64 symmetric key (32 or 64 bytes); the service makes one when absent.
    #[arg(long)]
    pub primary_key: Option<String>,
    #[arg(long)]
    pub secondary_key: Option<String>,
    /// PEM certificate: an X.509 device's own (enrollment) or a signing CA (group).
    #[arg(long)]
    pub certificate_path: Option<PathBuf>,
    /// A verified CA certificate of the service, by name (groups).
    #[arg(long)]
    pub ca_name: Option<String>,
    /// TPM endorsement key, base64 (TPM enrollments).
    #[arg(long)]
    pub endorsement_key: Option<String>,
    #[arg(long)]
    pub provisioning_status: Option<Status>,
    #[arg(long)]
    pub allocation_policy: Option<Allocation>,
    /// Linked hubs the enrollment may be assigned to (host names).
    #[arg(long, num_args = 1..)]
    pub iot_hubs: Option<Vec<String>>,
    /// The initial twin, JSON: {"tags": {…}, "properties": {"desired": {…}}}.
    #[arg(long)]
    pub initial_twin: Option<String>,
    /// Device id at the hub (individual enrollments; default: the registration id).
    #[arg(long)]
    pub device_id: Option<String>,
    /// The device is an IoT Edge device.
    #[arg(long)]
    pub edge_enabled: Option<bool>,
    /// Custom allocation: the webhook URL (allocation policy custom).
    #[arg(long)]
    pub webhook_url: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum EnrollmentCmd {
    /// Create an individual enrollment.
    ///
    /// Example: dps enrollment create --registration-id dev-1 --primary-key "$KEY"
    Create {
        #[arg(long)]
        registration_id: String,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Show one enrollment.
    Show {
        #[arg(long)]
        registration_id: String,
    },
    /// List every enrollment.
    List,
    /// Change an enrollment (only the options given), guarded by its etag.
    ///
    /// Example: dps enrollment update --registration-id dev-1 --provisioning-status disabled
    Update {
        #[arg(long)]
        registration_id: String,
        /// Update only if the enrollment still has this etag (default: the one just read).
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    /// Delete an enrollment.
    Delete {
        #[arg(long)]
        registration_id: String,
        #[arg(long)]
        etag: Option<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum GroupCmd {
    /// Create an enrollment group.
    ///
    /// Example: dps enrollment-group create --enrollment-id line-7
    Create {
        #[arg(long)]
        enrollment_id: String,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    Show {
        #[arg(long)]
        enrollment_id: String,
    },
    List,
    Update {
        #[arg(long)]
        enrollment_id: String,
        #[arg(long)]
        etag: Option<String>,
        #[command(flatten)]
        fields: EnrollmentFields,
    },
    Delete {
        #[arg(long)]
        enrollment_id: String,
        #[arg(long)]
        etag: Option<String>,
    },
    /// The key a device of a symmetric-key group uses: base64(HMAC-SHA256(group key, registration id)).
    ///
    /// Example: dps enrollment-group compute-device-key --enrollment-id line-7 --registration-id dev-1
    ComputeDeviceKey {
        /// The group whose primary key to use (read from the service).
        #[arg(long, required_unless_present = "key")]
        enrollment_id: Option<String>,
        /// Or the group key itself (nothing is asked of the service).
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        registration_id: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum RegistrationCmd {
    /// Show a device's registration state.
    Show {
        #[arg(long)]
        registration_id: String,
    },
    /// List the registration states of an enrollment group's devices.
    List {
        #[arg(long)]
        enrollment_id: String,
    },
    /// Delete a registration state (the device may register again).
    Delete {
        #[arg(long)]
        registration_id: String,
        #[arg(long)]
        etag: Option<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum HubCmd {
    /// Link a hub (or change a linked one).
    ///
    /// Example: dps linked-hub add --hub-connection-string "HostName=hub1.example;SharedAccessKeyName=iothubowner;SharedAccessKey=…"
    Add {
        /// The hub's connection string (its HostName names the hub). (`--connection-string`
        /// says where this service is, as in every command.)
        #[arg(long)]
        hub_connection_string: String,
        #[arg(long)]
        allocation_weight: Option<u32>,
        #[arg(long)]
        apply_allocation_policy: Option<bool>,
        /// registry-only, mosquitto, azure-iothub or webhook.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        control_url: Option<String>,
        #[arg(long)]
        location: Option<String>,
    },
    List,
    Remove {
        /// The hub's host name.
        #[arg(long)]
        name: String,
    },
}

/// Reads a file for an option, or says which.
fn read(p: &PathBuf) -> Result<String, CliError> {
    std::fs::read_to_string(p).map_err(|e| CliError::local(format!("cannot read {}: {e}", p.display())))
}

/// Sets on `body` what `f` gives; `group` picks the group shapes of the X.509 attestation.
fn apply(body: &mut Map<String, Value>, f: &EnrollmentFields, group: bool, creating: bool) -> Result<(), CliError> {
    let kind = f.attestation_type.or_else(|| {
        if f.certificate_path.is_some() || f.ca_name.is_some() {
            Some(AttestationType::X509)
        } else if f.endorsement_key.is_some() {
            Some(AttestationType::Tpm)
        } else if creating || f.primary_key.is_some() || f.secondary_key.is_some() {
            Some(AttestationType::Symmetrickey)
        } else {
            None
        }
    });
    match kind {
        Some(AttestationType::Symmetrickey) => {
            let mut k = Map::new();
            if let Some(p) = &f.primary_key {
                k.insert("primaryKey".into(), json!(p));
            }
            if let Some(s) = &f.secondary_key {
                k.insert("secondaryKey".into(), json!(s));
            }
            body.insert("attestation".into(), json!({"type": "symmetricKey", "symmetricKey": k}));
        }
        Some(AttestationType::X509) => {
            let x509 = match (&f.certificate_path, &f.ca_name, group) {
                (_, Some(ca), true) => json!({"caReferences": {"primary": ca}}),
                (Some(p), None, true) => json!({"signingCertificates": {"primary": {"certificate": read(p)?}}}),
                (Some(p), None, false) => json!({"clientCertificates": {"primary": {"certificate": read(p)?}}}),
                _ => return Err(CliError::local("x509 attestation needs --certificate-path (or --ca-name for a group)")),
            };
            body.insert("attestation".into(), json!({"type": "x509", "x509": x509}));
        }
        Some(AttestationType::Tpm) => {
            let ek = f.endorsement_key.as_ref().ok_or_else(|| CliError::local("tpm attestation needs --endorsement-key"))?;
            body.insert("attestation".into(), json!({"type": "tpm", "tpm": {"endorsementKey": ek}}));
        }
        None => {}
    }
    if let Some(s) = f.provisioning_status {
        body.insert("provisioningStatus".into(), json!(if s == Status::Enabled { "enabled" } else { "disabled" }));
    }
    if let Some(a) = f.allocation_policy {
        let name = match a {
            Allocation::Hashed => "hashed",
            Allocation::Geolatency => "geoLatency",
            Allocation::Static => "static",
            Allocation::Custom => "custom",
        };
        body.insert("allocationPolicy".into(), json!(name));
    }
    if let Some(h) = &f.iot_hubs {
        body.insert("iotHubs".into(), json!(h));
    }
    if let Some(t) = &f.initial_twin {
        let twin: Value = serde_json::from_str(t).map_err(|e| CliError::local(format!("--initial-twin is not JSON: {e}")))?;
        body.insert("initialTwin".into(), twin);
    }
    if let Some(d) = &f.device_id {
        if group {
            return Err(CliError::local("--device-id is for individual enrollments"));
        }
        body.insert("deviceId".into(), json!(d));
    }
    if let Some(e) = f.edge_enabled {
        body.insert("capabilities".into(), json!({"iotEdge": e}));
    }
    if let Some(u) = &f.webhook_url {
        body.insert("customAllocationDefinition".into(), json!({"webhookUrl": u, "apiVersion": "2021-10-01"}));
    }
    Ok(())
}

fn if_match(etag: &Option<String>) -> Vec<(&str, &str)> {
    etag.as_deref().map(|e| vec![("If-Match", e)]).unwrap_or_default()
}

/// One kind of enrollment record: its collection path and id field.
struct Records {
    path: &'static str,
    id_field: &'static str,
    kind: fn() -> Kind,
    group: bool,
}

const ENROLLMENTS: Records = Records { path: "/enrollments", id_field: "registrationId", kind: || Kind::Enrollment, group: false };
const GROUPS: Records = Records { path: "/enrollmentGroups", id_field: "enrollmentGroupId", kind: || Kind::Group, group: true };

/// The record with its attestation's secrets: the service's GET and query leave symmetric
/// keys out (as DPS does), which only `POST …/{id}/attestationmechanism` gives.
pub(crate) fn with_keys(s: &Service, collection: &str, mut record: Value) -> Result<Value, CliError> {
    let id_field = if collection == "/enrollmentGroups" { "enrollmentGroupId" } else { "registrationId" };
    if record.pointer("/attestation/type").and_then(Value::as_str) != Some("symmetricKey") {
        return Ok(record);
    }
    let Some(id) = record.get(id_field).and_then(Value::as_str).map(str::to_string) else { return Ok(record) };
    let (mechanism, _) = s.call("POST", &format!("{collection}/{}/attestationmechanism", seg(&id)), None, &[])?;
    if let Some(m) = record.as_object_mut() {
        m.insert("attestation".into(), mechanism);
    }
    Ok(record)
}

impl Records {
    fn show(&self, s: &Service, id: &str, keys: bool) -> Result<Value, CliError> {
        let (v, _) = s.call("GET", &format!("{}/{}", self.path, seg(id)), None, &[])?;
        if keys {
            with_keys(s, self.path, v)
        } else {
            Ok(v)
        }
    }

    fn create(&self, s: &Service, id: &str, f: &EnrollmentFields) -> Result<Value, CliError> {
        let mut body = Map::new();
        body.insert(self.id_field.into(), json!(id));
        apply(&mut body, f, self.group, true)?;
        // If-None-Match would be DPS's create-only; a PUT without If-Match replaces, so ask first.
        match s.call("GET", &format!("{}/{}", self.path, seg(id)), None, &[]) {
            Ok(_) => return Err(CliError { status: Some(409), code: Some(409_201), message: format!("{id} already exists; use update") }),
            Err(e) if e.status == Some(404) => {}
            Err(e) => return Err(e),
        }
        Ok(s.call("PUT", &format!("{}/{}", self.path, seg(id)), Some(&Value::Object(body)), &[])?.0)
    }

    fn update(&self, s: &Service, id: &str, etag: &Option<String>, f: &EnrollmentFields) -> Result<Value, CliError> {
        let path = format!("{}/{}", self.path, seg(id));
        // With its keys: a PUT without them would have the service make new ones.
        let current = self.show(s, id, true)?;
        let mut body = current.as_object().cloned().unwrap_or_default();
        let etag = etag.clone().or_else(|| body.get("etag").and_then(Value::as_str).map(str::to_string));
        apply(&mut body, f, self.group, false)?;
        Ok(s.call("PUT", &path, Some(&Value::Object(body)), &if_match(&etag))?.0)
    }

    fn list(&self, s: &Service, keys: bool) -> Result<Value, CliError> {
        let mut all = Vec::new();
        s.query_all(&format!("{}/query", self.path), &json!({"query": "*"}), |v| {
            all.push(if keys { with_keys(s, self.path, v)? } else { v });
            Ok(())
        })?;
        Ok(Value::Array(all))
    }
}

pub fn enrollment(s: &Service, cmd: EnrollmentCmd, o: &OutputOpts) -> Result<(), CliError> {
    let r = ENROLLMENTS;
    let v = match cmd {
        EnrollmentCmd::Create { registration_id, fields } => r.create(s, &registration_id, &fields)?,
        EnrollmentCmd::Show { registration_id } => r.show(s, &registration_id, o.show_keys)?,
        EnrollmentCmd::List => r.list(s, o.show_keys)?,
        EnrollmentCmd::Update { registration_id, etag, fields } => r.update(s, &registration_id, &etag, &fields)?,
        EnrollmentCmd::Delete { registration_id, etag } => {
            s.call("DELETE", &format!("/enrollments/{}", seg(&registration_id)), None, &if_match(&etag))?;
            return Ok(());
        }
    };
    output::print(v, (r.kind)(), o);
    Ok(())
}

pub fn group(s: Option<&Service>, cmd: GroupCmd, o: &OutputOpts) -> Result<(), CliError> {
    let r = GROUPS;
    let need = || s.ok_or_else(|| CliError::local("no service given"));
    let v = match cmd {
        GroupCmd::Create { enrollment_id, fields } => r.create(need()?, &enrollment_id, &fields)?,
        GroupCmd::Show { enrollment_id } => r.show(need()?, &enrollment_id, o.show_keys)?,
        GroupCmd::List => r.list(need()?, o.show_keys)?,
        GroupCmd::Update { enrollment_id, etag, fields } => r.update(need()?, &enrollment_id, &etag, &fields)?,
        GroupCmd::Delete { enrollment_id, etag } => {
            need()?.call("DELETE", &format!("/enrollmentGroups/{}", seg(&enrollment_id)), None, &if_match(&etag))?;
            return Ok(());
        }
        GroupCmd::ComputeDeviceKey { enrollment_id, key, registration_id } => {
            let key = match (key, enrollment_id) {
                (Some(k), _) => k,
                (None, Some(g)) => {
                    let v = r.show(need()?, &g, true)?;
                    v.pointer("/attestation/symmetricKey/primaryKey")
                        .and_then(Value::as_str)
                        .ok_or_else(|| CliError::local(format!("group {g} has no symmetric key")))?
                        .to_string()
                }
                (None, None) => return Err(CliError::local("give --enrollment-id or --key")),
            };
            use base64::Engine;
            let bytes =
                base64::engine::general_purpose::STANDARD.decode(key.trim()).map_err(|_| CliError::local("the group key is not base64"))?;
            println!("{}", dps_core::sas::derive_device_key(&bytes, &registration_id));
            return Ok(());
        }
    };
    output::print(v, (r.kind)(), o);
    Ok(())
}

pub fn registration(s: &Service, cmd: RegistrationCmd, o: &OutputOpts) -> Result<(), CliError> {
    let v = match cmd {
        RegistrationCmd::Show { registration_id } => s.call("GET", &format!("/registrations/{}", seg(&registration_id)), None, &[])?.0,
        RegistrationCmd::List { enrollment_id } => {
            let mut all = Vec::new();
            s.query_all(&format!("/registrations/{}/query", seg(&enrollment_id)), &json!({"query": "*"}), |v| {
                all.push(v);
                Ok(())
            })?;
            Value::Array(all)
        }
        RegistrationCmd::Delete { registration_id, etag } => {
            s.call("DELETE", &format!("/registrations/{}", seg(&registration_id)), None, &if_match(&etag))?;
            return Ok(());
        }
    };
    output::print(v, Kind::Registration, o);
    Ok(())
}

pub fn linked_hub(s: &Service, cmd: HubCmd, o: &OutputOpts) -> Result<(), CliError> {
    let v = match cmd {
        HubCmd::Add {
            hub_connection_string: connection_string,
            allocation_weight,
            apply_allocation_policy,
            kind,
            control_url,
            location,
        } => {
            let cs = dps_core::model::parse_connection_string(&connection_string)
                .ok_or_else(|| CliError::local("--hub-connection-string must hold HostName, SharedAccessKeyName and SharedAccessKey"))?;
            let mut body = json!({"name": cs.host_name, "connectionString": connection_string});
            for (k, v) in [
                ("allocationWeight", allocation_weight.map(|w| json!(w))),
                ("applyAllocationPolicy", apply_allocation_policy.map(|a| json!(a))),
                ("kind", kind.map(|k| json!(k))),
                ("controlUrl", control_url.map(|u| json!(u))),
                ("location", location.map(|l| json!(l))),
            ] {
                if let (Some(v), Some(m)) = (v, body.as_object_mut()) {
                    m.insert(k.into(), v);
                }
            }
            s.call("PUT", &format!("/linkedHubs/{}", seg(&cs.host_name)), Some(&body), &[])?.0
        }
        HubCmd::List => s.call("GET", "/linkedHubs", None, &[])?.0,
        HubCmd::Remove { name } => {
            s.call("DELETE", &format!("/linkedHubs/{}", seg(&name)), None, &[])?;
            return Ok(());
        }
    };
    output::print(v, Kind::Hub, o);
    Ok(())
}

pub use certificate::{certificate, CertificateCmd};
pub use transfer::{export, import, ImportOpts};
