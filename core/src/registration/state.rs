//! The registration state a registration ends in, once an enrollment has admitted the device:
//! disabled, assigned to a hub by the allocation policy (kept or moved by the reprovision
//! policy), or failed (docs/service-api.md §5, §6).

use crate::allocation::{allocate, AllocationError};
use crate::hub::custom;
use crate::hub::{HubAuth, HubDevice, HubTask, Twin};
use crate::model::*;
use crate::sas::derive_device_key;
use crate::time::UtcTime;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// DPS code for "no IoT hub available for assignment" (docs/device-protocol.md, C SDK).
pub const NO_HUB_ERROR: i32 = 400208;
/// Our code for an allocation policy we cannot serve.
pub const UNSUPPORTED_POLICY_ERROR: i32 = 400209;

/// The enrollment that admitted a device.
#[derive(Debug, Clone, Copy)]
pub enum Matched<'a> {
    Individual(&'a IndividualEnrollment),
    Group(&'a EnrollmentGroup),
}

impl<'a> Matched<'a> {
    pub fn common(&self) -> &'a EnrollmentCommon {
        match self {
            Matched::Individual(e) => &e.common,
            Matched::Group(g) => &g.common,
        }
    }
    pub fn group_id(&self) -> Option<&'a str> {
        match self {
            Matched::Individual(_) => None,
            Matched::Group(g) => Some(&g.enrollment_group_id),
        }
    }
}

/// What the next state depends on.
pub struct StateInputs<'a> {
    pub matched: Matched<'a>,
    pub linked: &'a [LinkedHub],
    pub previous: Option<&'a DeviceRegistrationState>,
    pub registration_id: &'a str,
    pub payload: Option<Value>,
    pub now: UtcTime,
    pub etag: String,
    pub latency: &'a dyn Fn(&str) -> Option<u64>,
    /// The credential the device will use at its hub ([`hub_auth`]).
    pub auth: Option<HubAuth>,
    /// What a custom allocation webhook is told of the device's attestation
    /// (`deviceRuntimeContext.symmetricKey`, `.x509` or `.tpm`).
    pub attestation: (&'static str, Value),
}

/// The credential a hub must accept from the device, as DPS gives IoT Hub
/// (docs/service-api.md §6.6): an individual enrollment's keys, a group's keys derived for the
/// device, the key a TPM device imported, or a certificate's thumbprint (primary repeated as
/// secondary when there is one certificate).
pub fn hub_auth(
    matched: Matched<'_>,
    registration_id: &str,
    x509: Option<&X509RegistrationResult>,
    tpm: Option<&TpmRegistrationSecret>,
) -> Option<HubAuth> {
    if let Some(t) = tpm {
        return Some(HubAuth::Sas { primary_key: t.hmac_key.clone(), secondary_key: t.hmac_key.clone() });
    }
    if let Some(x) = x509 {
        let t = x.certificate_info.sha256_thumbprint.clone();
        return Some(HubAuth::SelfSigned { primary_thumbprint: t.clone(), secondary_thumbprint: t });
    }
    let keys = matched.common().attestation.symmetric_key.as_ref()?;
    let (primary, secondary) = match matched {
        Matched::Individual(_) => (keys.primary_key.clone()?, keys.secondary_key.clone()?),
        Matched::Group(_) => {
            let derive = |k: &Option<String>| k.as_deref().and_then(|k| B64.decode(k).ok()).map(|k| derive_device_key(&k, registration_id));
            (derive(&keys.primary_key)?, derive(&keys.secondary_key)?)
        }
    };
    Some(HubAuth::Sas { primary_key: primary, secondary_key: secondary })
}

/// The registration state a registration ends in. At a `registry-only` hub the assignment is
/// only recorded, so the state is final at once; at a hub with a connector it is `assigning`
/// with the connector's [`HubTask`] until the hub has the device.
///
/// The twin written to the hub: the enrollment's initial twin on a first assignment and on a
/// reset (`migrateDeviceData` false, also on the same hub: a factory reset); on a move with
/// migration, the twin the service last wrote to the old hub; otherwise the hub's twin stays.
pub fn next_state(d: StateInputs<'_>) -> DeviceRegistrationState {
    let common = d.matched.common();
    let prev = d.previous;
    let device_id = match d.matched {
        Matched::Individual(e) => e.device_id.clone().unwrap_or_else(|| d.registration_id.to_string()),
        Matched::Group(_) => d.registration_id.to_string(),
    };
    let mut state = DeviceRegistrationState {
        registration_id: d.registration_id.to_string(),
        created_date_time_utc: Some(prev.and_then(|p| p.created_date_time_utc).unwrap_or(d.now)),
        assigned_hub: prev.and_then(|p| p.assigned_hub.clone()),
        device_id: prev.and_then(|p| p.device_id.clone()),
        status: RegistrationStatus::Assigned,
        substatus: None,
        error_code: None,
        error_message: None,
        last_updated_date_time_utc: Some(d.now),
        etag: Some(d.etag.clone()),
        payload: None,
        enrollment_group_id: d.matched.group_id().map(str::to_string),
        operation_id: None,
        x509: None,
        tpm: None,
        hub_task: None,
        custom_allocation: None,
        twin: prev.and_then(|p| p.twin.clone()),
    };
    if !common.is_enabled() {
        state.status = RegistrationStatus::Disabled;
        return state;
    }
    // A registration still `assigning` (its hub work unfinished, maybe in flight) may already
    // have put the device at its hub: the device counts as there, and what that work would
    // have done is carried over (the twin it writes, the hub it leaves).
    let unfinished = prev.filter(|p| p.status == RegistrationStatus::Assigning);
    let unfinished_task = unfinished.and_then(|p| p.hub_task.clone());
    let unfinished_custom = unfinished.and_then(|p| p.custom_allocation.as_ref()).and_then(|c| c.placement.previous.clone());
    let was_assigned = prev
        .filter(|p| p.status == RegistrationStatus::Assigned)
        .and_then(|p| p.assigned_hub.as_deref())
        .or(unfinished_task.as_ref().map(|t| t.hub.as_str()))
        .or(unfinished_custom.as_ref().map(|d| d.hub.as_str()));
    let previous_device = unfinished_task
        .as_ref()
        .map(|t| t.device_id.clone())
        .or(unfinished_custom.as_ref().map(|d| d.device_id.clone()))
        .or(prev.and_then(|p| p.device_id.clone()));
    let policy = common.reprovision_policy.clone().unwrap_or(ReprovisionPolicy { update_hub_assignment: true, migrate_device_data: true });
    let placement = Placement {
        device_id,
        auth: d.auth.clone(),
        iot_edge: common.capabilities.as_ref().is_some_and(|c| c.iot_edge),
        initial_twin: Twin::initial(common.initial_twin.as_ref()),
        previous: was_assigned.zip(previous_device).map(|(h, id)| HubDevice { hub: h.to_string(), device_id: id }),
        previous_substatus: prev.and_then(|p| p.substatus),
        policy,
        unfinished: unfinished_task.clone().map(Box::new),
    };
    let allocation = common.allocation_policy.unwrap_or(AllocationPolicy::Hashed);
    let hub = match was_assigned {
        Some(h) if !placement.policy.update_hub_assignment && allocation != AllocationPolicy::Custom => Ok(h.to_string()),
        _ if allocation == AllocationPolicy::Custom => {
            return match custom::call(&d, &placement) {
                Ok(call) => {
                    state.status = RegistrationStatus::Assigning;
                    state.custom_allocation = Some(call);
                    state
                }
                Err(e) => fail(state, e),
            };
        }
        _ => allocate(allocation, d.linked, common.iot_hubs.as_deref(), common.iot_hub_host_name.as_deref(), d.registration_id, d.latency),
    };
    match hub {
        Ok(hub) => {
            place(&mut state, hub, &placement, d.linked);
            state.payload = d.payload;
            state
        }
        Err(e) => fail(state, e),
    }
}

fn fail(mut state: DeviceRegistrationState, e: AllocationError) -> DeviceRegistrationState {
    let (code, msg) = match e {
        AllocationError::NoHub(m) => (NO_HUB_ERROR, m),
        AllocationError::Unsupported(m) => (UNSUPPORTED_POLICY_ERROR, m),
    };
    state.status = RegistrationStatus::Failed;
    state.error_code = Some(code);
    state.error_message = Some(msg);
    state
}

/// What placing a device at its hub depends on besides the hub: kept with a registration
/// while a custom allocation webhook is asked for the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<HubAuth>,
    #[serde(default)]
    pub iot_edge: bool,
    /// The enrollment's initial twin (or the webhook's, where it counts).
    pub initial_twin: Twin,
    /// Where the device is assigned now, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<HubDevice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_substatus: Option<Substatus>,
    pub policy: ReprovisionPolicy,
    /// The hub work of the state this registration replaces, when it had not finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unfinished: Option<Box<HubTask>>,
}

/// Assigns `state` (status `assigned`, twin last written in `state.twin`) to `hub`: the
/// substatus, the twin to write, the hub left, and — at a hub with a connector — the hub task,
/// which leaves the state `assigning`.
pub fn place(state: &mut DeviceRegistrationState, hub: String, p: &Placement, linked: &[LinkedHub]) {
    let was_assigned = p.previous.as_ref().map(|d| d.hub.as_str());
    let policy = &p.policy;
    // A reset writes the initial twin again, also on the same hub (a factory reset), so it
    // says so; staying put otherwise keeps what the last move said.
    let reset = policy.update_hub_assignment && !policy.migrate_device_data;
    state.substatus = Some(match was_assigned {
        None => Substatus::InitialAssignment,
        Some(_) if reset => Substatus::DeviceDataReset,
        Some(old) if old.eq_ignore_ascii_case(&hub) => p.previous_substatus.unwrap_or(Substatus::InitialAssignment),
        Some(_) => Substatus::DeviceDataMigrated,
    });
    let moved = was_assigned.is_some_and(|old| !old.eq_ignore_ascii_case(&hub));
    // The twin an unfinished assignment was writing is the newest the service knows of.
    let unfinished = p.unfinished.as_deref();
    let last_twin = unfinished.and_then(|u| u.twin.clone()).or_else(|| state.twin.clone());
    let twin = if was_assigned.is_none() || reset {
        Some(p.initial_twin.clone())
    } else if policy.update_hub_assignment && moved {
        Some(last_twin.unwrap_or_else(|| p.initial_twin.clone()))
    } else {
        // Staying put: the hub's twin stays, unless an unfinished assignment had not written it.
        unfinished.filter(|u| u.hub.eq_ignore_ascii_case(&hub)).and_then(|u| u.twin.clone())
    };
    let mut leave: Vec<HubDevice> = p.previous.clone().filter(|_| moved).into_iter().collect();
    for old in unfinished.map(|u| u.leave.as_slice()).unwrap_or_default() {
        if !old.hub.eq_ignore_ascii_case(&hub) && !leave.contains(old) {
            leave.push(old.clone());
        }
    }
    let connected = LinkedHub::with_connector(linked, &hub).is_some();
    match (connected, p.auth.clone()) {
        (true, Some(auth)) => {
            state.status = RegistrationStatus::Assigning;
            let task = HubTask { hub: hub.clone(), device_id: p.device_id.clone(), auth, iot_edge: p.iot_edge, twin, leave };
            state.hub_task = Some(task);
        }
        (true, None) => {
            state.status = RegistrationStatus::Failed;
            state.error_code = Some(crate::hub::HUB_REFUSED_ERROR);
            state.error_message = Some("the enrollment gives the device no credential for its hub".into());
            return;
        }
        // A registry-only hub: nothing to do there; what would be written is recorded.
        (false, _) => {
            if let Some(t) = twin {
                state.twin = Some(t);
            }
        }
    }
    state.assigned_hub = Some(hub);
    state.device_id = Some(p.device_id.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registration::tests::hub;

    fn enrollment(j: serde_json::Value) -> IndividualEnrollment {
        serde_json::from_value(j).unwrap()
    }

    fn run<'a>(m: Matched<'a>, hubs: &'a [LinkedHub], prev: Option<&'a DeviceRegistrationState>) -> DeviceRegistrationState {
        next_state(StateInputs {
            matched: m,
            linked: hubs,
            previous: prev,
            registration_id: "dev1",
            payload: None,
            now: UtcTime::from_unix_secs(10),
            etag: "\"e\"".into(),
            latency: &|_| None,
            auth: hub_auth(m, "dev1", None, None),
            attestation: ("symmetricKey", serde_json::json!({})),
        })
    }

    #[test]
    fn assigns_then_keeps_or_moves_by_policy() {
        let e = enrollment(serde_json::json!({"registrationId":"dev1","attestation":{"type":"symmetricKey"},"iotHubs":["a"]}));
        let hubs = vec![hub("a"), hub("b")];
        let s = run(Matched::Individual(&e), &hubs, None);
        assert_eq!((s.status, s.assigned_hub.as_deref(), s.device_id.as_deref()), (RegistrationStatus::Assigned, Some("a"), Some("dev1")));
        assert_eq!(s.substatus, Some(Substatus::InitialAssignment));

        let moved = enrollment(serde_json::json!({"registrationId":"dev1","attestation":{"type":"symmetricKey"},"iotHubs":["b"],
            "reprovisionPolicy":{"updateHubAssignment":true,"migrateDeviceData":false}}));
        let s2 = run(Matched::Individual(&moved), &hubs, Some(&s));
        assert_eq!((s2.assigned_hub.as_deref(), s2.substatus), (Some("b"), Some(Substatus::DeviceDataReset)));
        assert_eq!(s2.created_date_time_utc, s.created_date_time_utc);

        let never = enrollment(serde_json::json!({"registrationId":"dev1","attestation":{"type":"symmetricKey"},"iotHubs":["b"],
            "reprovisionPolicy":{"updateHubAssignment":false,"migrateDeviceData":false}}));
        assert_eq!(run(Matched::Individual(&never), &hubs, Some(&s)).assigned_hub.as_deref(), Some("a"));
    }

    #[test]
    fn disabled_and_failed() {
        let d =
            enrollment(serde_json::json!({"registrationId":"dev1","attestation":{"type":"symmetricKey"},"provisioningStatus":"disabled"}));
        assert_eq!(run(Matched::Individual(&d), &[hub("a")], None).status, RegistrationStatus::Disabled);
        let e = enrollment(serde_json::json!({"registrationId":"dev1","attestation":{"type":"symmetricKey"}}));
        let s = run(Matched::Individual(&e), &[], None);
        assert_eq!((s.status, s.error_code), (RegistrationStatus::Failed, Some(NO_HUB_ERROR)));
    }
}
