//! Registrations to hubs with a connector: the `assigning` state with its hub task (the
//! device's credential, the twin to write, the hub it leaves), for every reprovision policy.

use super::tests::*;
use super::*;
use crate::hub::{finish, HubAuth, HubDevice, HubTask, Twin};
use serde_json::json;

fn mosquitto(name: &str) -> LinkedHub {
    LinkedHub { name: name.into(), kind: Some(HubKind::Mosquitto), ..LinkedHub::default() }
}

fn world() -> World {
    let mut w = World::new(no_limits());
    w.config.hubs = vec![mosquitto("hub-a"), mosquitto("hub-b"), hub("plain")];
    w
}

fn twin(v: i64) -> serde_json::Value {
    json!({"initialTwin": {"tags": {"t": v}, "properties": {"desired": {"v": v}}}})
}

fn with(mut base: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    base
}

fn policy(update: bool, migrate: bool) -> serde_json::Value {
    json!({"reprovisionPolicy": {"updateHubAssignment": update, "migrateDeviceData": migrate}})
}

/// What the host does once the connector succeeded: commits the finished state.
fn hub_done(w: &mut World, id: &str) -> DeviceRegistrationState {
    let s = w.states.get(id).unwrap().clone();
    let done = finish(s, Ok(()), UtcTime::from_unix_secs(w.now), "\"done\"".into());
    w.states.insert(id.into(), done.clone());
    done
}

fn task(o: &Outcome) -> HubTask {
    let s = state(o);
    assert_eq!(s.status, RegistrationStatus::Assigning);
    s.hub_task.clone().expect("a hub task")
}

#[test]
fn a_connector_hub_leaves_the_registration_assigning_until_the_hub_has_the_device() {
    let mut w = world();
    w.enroll(individual("d", with(json!({"iotHubs": ["hub-a"], "capabilities": {"iotEdge": true}}), twin(1))));
    let o = w.register("d", KEY_A);
    let t = task(&o);
    assert_eq!((t.hub.as_str(), t.device_id.as_str(), t.iot_edge, t.leave), ("hub-a", "d", true, vec![]));
    assert_eq!(t.auth, HubAuth::Sas { primary_key: b64(KEY_A), secondary_key: b64(KEY_B) });
    assert_eq!(t.twin, Some(Twin { tags: Some(json!({"t": 1})), desired: Some(json!({"v": 1})) }));
    // The device is told to poll; the task never reaches it.
    let reply = o.reply("t", UtcTime::from_unix_secs(0));
    assert_eq!((reply.status, reply.retry_after), (202, Some(1)));
    assert!(!reply.body.contains("_hubTask") && !reply.body.contains("primaryKey"), "{}", reply.body);
    let polled = w.poll("d", KEY_A, &operation(&o));
    assert_eq!(state(&polled).status, RegistrationStatus::Assigning);
    hub_done(&mut w, "d");
    let polled = w.poll("d", KEY_A, &operation(&o));
    assert_eq!((state(&polled).status, state(&polled).assigned_hub.as_deref()), (RegistrationStatus::Assigned, Some("hub-a")));
    assert_eq!(polled.reply("t", UtcTime::from_unix_secs(0)).status, 200);
}

#[test]
fn group_devices_get_their_derived_keys_and_registry_only_hubs_assign_at_once() {
    let mut w = world();
    w.group(sym_group("g", GROUP_1, json!({"iotHubs": ["hub-b"]})));
    let key = device_key(GROUP_1, "member");
    let t = task(&w.register("member", &key));
    assert_eq!(
        t.auth,
        HubAuth::Sas {
            primary_key: derive_key(GROUP_1, "member"),
            secondary_key: derive_key(b"unused-secondary-unused-secondary", "member")
        }
    );
    w.enroll(individual("p", with(json!({"iotHubs": ["plain"]}), twin(3))));
    let s = state(&w.register("p", KEY_A)).clone();
    assert_eq!((s.status, s.hub_task), (RegistrationStatus::Assigned, None));
    assert_eq!(s.twin.and_then(|t| t.desired), Some(json!({"v": 3})), "what would be written is recorded");
}

fn derive_key(group_key: &[u8], id: &str) -> String {
    crate::sas::derive_device_key(group_key, id)
}

#[test]
fn reprovision_policies_decide_the_twin_and_the_hub_left() {
    let mut w = world();
    w.enroll(individual("d", with(json!({"iotHubs": ["hub-a"]}), twin(1))));
    w.register("d", KEY_A);
    hub_done(&mut w, "d");
    let leave_a = vec![HubDevice { hub: "hub-a".into(), device_id: "d".into() }];
    let leave_b = vec![HubDevice { hub: "hub-b".into(), device_id: "d".into() }];
    let written = |v: i64| Some(Twin { tags: Some(json!({"t": v})), desired: Some(json!({"v": v})) });

    // Migrate to another hub: the twin written at the old hub moves along (not the
    // enrollment's new initial twin), and the old identity goes.
    w.enroll(individual("d", with(with(json!({"iotHubs": ["hub-b"]}), twin(2)), policy(true, true))));
    let t = task(&w.register("d", KEY_A));
    assert_eq!((t.hub.as_str(), &t.twin, &t.leave), ("hub-b", &written(1), &leave_a));
    hub_done(&mut w, "d");

    // Reset to another hub: the enrollment's initial twin.
    w.enroll(individual("d", with(with(json!({"iotHubs": ["hub-a"]}), twin(2)), policy(true, false))));
    let o = w.register("d", KEY_A);
    let t = task(&o);
    assert_eq!((t.hub.as_str(), &t.twin, &t.leave), ("hub-a", &written(2), &leave_b));
    assert_eq!(state(&o).substatus, Some(Substatus::DeviceDataReset));
    hub_done(&mut w, "d");

    // Reset on the same hub is a factory reset: the initial twin again, nothing left.
    w.enroll(individual("d", with(with(json!({"iotHubs": ["hub-a"]}), twin(4)), policy(true, false))));
    let o = w.register("d", KEY_A);
    let t = task(&o);
    assert_eq!((&t.twin, &t.leave), (&written(4), &vec![]));
    assert_eq!(state(&o).substatus, Some(Substatus::DeviceDataReset));
    hub_done(&mut w, "d");

    // Migrate on the same hub: the identity is refreshed, the hub's twin stays.
    w.enroll(individual("d", with(with(json!({"iotHubs": ["hub-a"]}), twin(5)), policy(true, true))));
    let t = task(&w.register("d", KEY_A));
    assert_eq!((&t.twin, &t.leave), (&None, &vec![]));
    assert_eq!(hub_done(&mut w, "d").twin, written(4));

    // Never reprovision (either migrate flag): the device stays, its twin is left alone.
    for migrate in [false, true] {
        w.enroll(individual("d", with(with(json!({"iotHubs": ["hub-b"]}), twin(6)), policy(false, migrate))));
        let t = task(&w.register("d", KEY_A));
        assert_eq!((t.hub.as_str(), &t.twin, &t.leave), ("hub-a", &None, &vec![]));
        assert_eq!(hub_done(&mut w, "d").twin, written(4));
    }
}

#[test]
fn a_disabled_enrollment_creates_no_hub_work() {
    let mut w = world();
    w.enroll(individual("d", json!({"iotHubs": ["hub-a"], "provisioningStatus": "disabled"})));
    let s = state(&w.register("d", KEY_A)).clone();
    assert_eq!((s.status, s.hub_task), (RegistrationStatus::Disabled, None));
}

#[test]
fn the_hub_task_is_stored_but_never_shown() {
    let mut w = world();
    w.enroll(individual("d", json!({"iotHubs": ["hub-a"]})));
    w.register("d", KEY_A);
    let stored = serde_json::to_value(w.states.get("d").unwrap()).unwrap();
    assert_eq!(stored["_hubTask"]["auth"]["type"], "sas");
    let public = serde_json::to_value(w.states.get("d").unwrap().clone().public()).unwrap();
    assert!(public.get("_hubTask").is_none() && public.get("_twin").is_none());
}

mod custom_allocation {
    use super::*;
    use crate::hub::custom::{read_answer, resolve, CUSTOM_ALLOCATION_FAILED};

    fn custom(extra: serde_json::Value) -> serde_json::Value {
        let base = json!({"allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": "https://fn.example/api/alloc?code=k", "apiVersion": "2021-10-01"}});
        with(base, extra)
    }

    fn register_with_payload(w: &mut World, id: &str) -> Outcome {
        let body = br#"{"registrationId":"d","payload":{"model":"m1"}}"#.to_vec();
        w.run(request(id, Credential::SasToken(token(id, KEY_A, w.now + 3600)), Operation::Register { body }))
    }

    fn answer(w: &mut World, id: &str, status: u16, body: serde_json::Value) -> DeviceRegistrationState {
        let s = w.states.get(id).unwrap().clone();
        let call = s.custom_allocation.clone().expect("a webhook call");
        let hubs = w.config.hubs.clone();
        let next = resolve(s, read_answer(&call, status, body.to_string().as_bytes()), &hubs);
        w.states.insert(id.into(), next.clone());
        next
    }

    #[test]
    fn the_webhook_is_asked_with_the_contract_and_its_answer_places_the_device() {
        let mut w = world();
        w.enroll(individual("d", custom(with(json!({"iotHubs": ["hub-a", "plain"]}), twin(1)))));
        let o = register_with_payload(&mut w, "d");
        let s = state(&o);
        assert_eq!(s.status, RegistrationStatus::Assigning);
        let call = s.custom_allocation.clone().unwrap();
        assert_eq!(call.webhook_url, "https://fn.example/api/alloc?code=k");
        assert_eq!(call.body["linkedHubs"], json!(["hub-a", "plain"]));
        assert_eq!(call.body["deviceRuntimeContext"], json!({"registrationId": "d", "symmetricKey": {}, "payload": {"model": "m1"}}));
        assert_eq!(call.body["individualEnrollment"]["registrationId"], "d");
        assert!(call.body["individualEnrollment"]["attestation"]["symmetricKey"].get("primaryKey").is_none(), "no secrets");
        assert!(!o.reply("t", UtcTime::from_unix_secs(0)).body.contains("_customAllocation"));

        // The webhook picks the connector hub with its own twin and payload: the hub task
        // carries the webhook's twin, the device gets the payload.
        let wt = json!({"tags": {"w": 1}, "properties": {"desired": {"w": 1}}});
        let s = answer(&mut w, "d", 200, json!({"IotHubHostName": "HUB-A", "initialTwin": wt, "payload": {"ok": true}}));
        assert_eq!(
            (s.status, s.assigned_hub.as_deref(), s.payload.clone()),
            (RegistrationStatus::Assigning, Some("hub-a"), Some(json!({"ok": true})))
        );
        assert_eq!(s.hub_task.unwrap().twin, Some(Twin { tags: Some(json!({"w": 1})), desired: Some(json!({"w": 1})) }));
        // A registry-only hub is final at once; without a webhook twin the enrollment's counts.
        w.register("d", KEY_A);
        let s = answer(&mut w, "d", 200, json!({"iotHubHostName": "plain"}));
        assert_eq!((s.status, s.assigned_hub.as_deref(), s.payload.clone()), (RegistrationStatus::Assigned, Some("plain"), None));
    }

    #[test]
    fn bad_answers_fail_the_registration_with_400207() {
        let mut w = world();
        w.enroll(individual("d", custom(json!({"iotHubs": ["hub-a"]}))));
        for (status, body, says) in [
            (400, json!({}), "status code: 400"),
            (200, json!({"iotHubHostName": "hub-b"}), "not one of the linked hubs"),
            (200, json!({"payload": 1}), "no iotHubHostName"),
            (200, json!([1]), "not a JSON object"),
        ] {
            w.register("d", KEY_A);
            let s = answer(&mut w, "d", status, body);
            assert_eq!((s.status, s.error_code), (RegistrationStatus::Failed, Some(CUSTOM_ALLOCATION_FAILED)));
            assert!(s.error_message.as_deref().unwrap().contains(says), "{:?}", s.error_message);
            assert_eq!(s.assigned_hub, None);
        }
    }

    #[test]
    fn reprovisioning_offers_only_the_current_hub_when_it_never_moves_and_ignores_the_webhook_twin() {
        let mut w = world();
        w.enroll(individual("d", custom(with(json!({"iotHubs": ["hub-a", "hub-b"]}), twin(1)))));
        w.register("d", KEY_A);
        answer(&mut w, "d", 200, json!({"iotHubHostName": "hub-a"}));
        hub_done(&mut w, "d");
        w.enroll(individual("d", custom(with(json!({"iotHubs": ["hub-a", "hub-b"]}), policy(false, false)))));
        let o = w.register("d", KEY_A);
        let call = state(&o).custom_allocation.clone().unwrap();
        assert_eq!(call.body["linkedHubs"], json!(["hub-a"]));
        assert_eq!(call.body["deviceRuntimeContext"]["currentIotHubHostName"], "hub-a");
        assert_eq!(call.body["deviceRuntimeContext"]["currentDeviceId"], "d");
        let s = answer(&mut w, "d", 200, json!({"iotHubHostName": "hub-a", "initialTwin": {"properties": {"desired": {"x": 9}}}}));
        assert_eq!(s.hub_task.unwrap().twin, None, "never reprovision keeps the hub's twin");
        // A reset to another hub takes the webhook's twin.
        hub_done(&mut w, "d");
        w.enroll(individual("d", custom(with(json!({"iotHubs": ["hub-a", "hub-b"]}), policy(true, false)))));
        w.register("d", KEY_A);
        let s = answer(&mut w, "d", 200, json!({"iotHubHostName": "hub-b", "initialTwin": {"properties": {"desired": {"x": 9}}}}));
        let t = s.hub_task.unwrap();
        assert_eq!(
            (t.twin.and_then(|t| t.desired), t.leave.first().map(|l| l.hub.clone())),
            (Some(json!({"x": 9})), Some("hub-a".to_string()))
        );
        assert_eq!(s.substatus, Some(Substatus::DeviceDataReset));
    }
}

#[test]
fn a_deleted_registration_state_makes_the_next_registration_a_first_one() {
    let mut w = world();
    w.enroll(individual("d", with(json!({"iotHubs": ["hub-a"]}), twin(1))));
    w.register("d", KEY_A);
    hub_done(&mut w, "d");
    w.enroll(individual("d", with(json!({"iotHubs": ["hub-b"]}), twin(2))));
    w.states.remove("d");
    let o = w.register("d", KEY_A);
    let t = task(&o);
    assert_eq!(state(&o).substatus, Some(Substatus::InitialAssignment));
    // Nothing is known of the old hub: it is not cleaned up (as DPS), the initial twin is written.
    assert_eq!((t.hub.as_str(), t.leave, t.twin.and_then(|t| t.desired)), ("hub-b", vec![], Some(json!({"v": 2}))));
}

#[test]
fn registering_again_before_the_hub_work_finished_carries_that_work_over() {
    let mut w = world();
    let at = |hub: &str| HubDevice { hub: hub.into(), device_id: "d".into() };
    // Assigning to hub-a, unfinished; the enrollment now names hub-b: the device may be at
    // hub-a already, so it leaves hub-a.
    w.enroll(individual("d", with(json!({"iotHubs": ["hub-a"]}), twin(1))));
    w.register("d", KEY_A);
    w.enroll(individual("d", with(json!({"iotHubs": ["hub-b"]}), twin(2))));
    let t = task(&w.register("d", KEY_A));
    assert_eq!((t.hub.as_str(), &t.leave), ("hub-b", &vec![at("hub-a")]));
    assert_eq!(t.twin.and_then(|t| t.desired), Some(json!({"v": 1})), "migrated: the twin the unfinished work was writing");
    // Still unfinished, back to hub-a: hub-b is left; hub-a (where it goes) is not.
    w.enroll(individual("d", with(json!({"iotHubs": ["hub-a"]}), twin(3))));
    let t = task(&w.register("d", KEY_A));
    assert_eq!((t.hub.as_str(), &t.leave), ("hub-a", &vec![at("hub-b")]));
    hub_done(&mut w, "d");
    // Staying put while an assignment is unfinished: its twin is still written.
    w.enroll(individual("d", with(json!({"iotHubs": ["hub-b"]}), twin(4))));
    w.register("d", KEY_A);
    w.enroll(individual("d", with(json!({"iotHubs": ["hub-b"]}), twin(5))));
    let t = task(&w.register("d", KEY_A));
    assert_eq!((t.hub.as_str(), &t.leave), ("hub-b", &vec![at("hub-a")]));
    assert_eq!(t.twin.and_then(|t| t.desired), Some(json!({"v": 1})));
}
