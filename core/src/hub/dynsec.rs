//! Mosquitto 2's dynamic-security plugin as a hub: the command messages the `mosquitto`
//! connector publishes on [`CONTROL_TOPIC`] and how their answers on [`RESPONSE_TOPIC`] are
//! read. Facts from Mosquitto 2.0.11:
//!
//! - Answers go to every subscriber of the response topic, one message per command message,
//!   each command's answer carrying the `correlationData` it was sent with; a connector matches
//!   on it (several shards share one admin client).
//! - A message's commands run in order and independently (a failed command does not undo the
//!   ones before it), so each step here is written to be harmless when repeated: "already
//!   exists" and "not found" answers count as done where that is the state wanted.
//! - ACL patterns (`%c`, `%u`) do not work in 2.0, so each device gets a role of its own that
//!   allows `devices/{deviceId}/#` only.
//! - `disableClient` does not stop a client that logs in with a certificate; deleting its role
//!   does (it can then neither publish nor subscribe).

use super::{HubAuth, HubError, HubTask};
use serde_json::{json, Value};

pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";

/// The role that holds one device's ACLs.
pub fn role_name(device_id: &str) -> String {
    format!("dps-device-{device_id}")
}

/// Where a device's desired properties are kept (a retained message).
pub fn desired_topic(device_id: &str) -> String {
    format!("devices/{device_id}/twin/desired")
}

/// A device id becomes a topic level and a user name: no wildcards, separators or NUL.
pub fn check_device_id(device_id: &str) -> Result<(), HubError> {
    let bad = device_id.is_empty() || device_id.len() > 128 || device_id.chars().any(|c| matches!(c, '+' | '#' | '/' | '\0'));
    match bad {
        true => {
            Err(HubError::Refused(format!("device id '{}' cannot be a Mosquitto user and topic level", crate::ids::printable(device_id))))
        }
        false => Ok(()),
    }
}

/// One command and the errors that mean its goal already holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub body: Value,
    pub tolerate: &'static [&'static str],
}

fn command(body: Value, tolerate: &'static [&'static str]) -> Command {
    Command { body, tolerate }
}

/// Makes the broker hold a new device: its role and its client. The client's password is its
/// primary symmetric key (what DPS gives IoT Hub); a certificate device has none (the listener
/// takes the certificate's identity as the user name). When the client exists already (a
/// repeat, a device registering again, one disabled before), [`update`] follows; sending it
/// only then halves the broker's file rewrites for a new device.
pub fn create(task: &HubTask) -> Result<Vec<Command>, HubError> {
    let id = task.device_id.as_str();
    check_device_id(id)?;
    let devices = format!("devices/{id}/#");
    let acls = json!([
        {"acltype": "publishClientSend", "topic": devices, "allow": true},
        {"acltype": "subscribePattern", "topic": devices, "allow": true},
        {"acltype": "unsubscribePattern", "topic": devices, "allow": true},
    ]);
    let mut client = client(task);
    client["command"] = json!("createClient");
    Ok(vec![
        command(json!({"command": "createRole", "rolename": role_name(id), "acls": acls}), &["Role already exists"]),
        command(client, &[CLIENT_EXISTS]),
    ])
}

/// Brings an existing client in line: password and role set again, enabled.
pub fn update(task: &HubTask) -> Result<Vec<Command>, HubError> {
    check_device_id(&task.device_id)?;
    let mut modify = client(task);
    modify["command"] = json!("modifyClient");
    Ok(vec![command(modify, &[]), command(json!({"command": "enableClient", "username": task.device_id}), &[])])
}

/// Mosquitto's answer to creating a client that exists.
pub const CLIENT_EXISTS: &str = "Client already exists";

/// Whether the answers to [`create`] say the client existed.
pub fn client_existed(answers: &[Answer]) -> bool {
    answers.iter().any(|a| a.error.as_deref() == Some(CLIENT_EXISTS))
}

fn client(task: &HubTask) -> Value {
    let id = task.device_id.as_str();
    let mut client = json!({"username": id, "clientid": id, "roles": [{"rolename": role_name(id)}]});
    if let HubAuth::Sas { primary_key, .. } = &task.auth {
        client["password"] = json!(primary_key);
    }
    client
}

/// Removes the device: its client (which disconnects it) and its role.
pub fn remove(device_id: &str) -> Result<Vec<Command>, HubError> {
    check_device_id(device_id)?;
    Ok(vec![
        command(json!({"command": "deleteClient", "username": device_id}), &["Client not found"]),
        command(json!({"command": "deleteRole", "rolename": role_name(device_id)}), &["Role not found"]),
    ])
}

/// Cuts the device off: its role goes (no topic is allowed any more, which also stops a
/// certificate client) and its client is disabled (disconnected, its password refused).
pub fn disable(device_id: &str) -> Result<Vec<Command>, HubError> {
    check_device_id(device_id)?;
    Ok(vec![
        command(json!({"command": "deleteRole", "rolename": role_name(device_id)}), &["Role not found"]),
        command(json!({"command": "disableClient", "username": device_id}), &["Client not found"]),
    ])
}

/// The payload of one command message; command `i` carries `correlationData` `{prefix}.{i}`.
pub fn message(commands: &[Command], prefix: &str) -> Vec<u8> {
    let list: Vec<Value> = commands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut b = c.body.clone();
            b["correlationData"] = json!(format!("{prefix}.{i}"));
            b
        })
        .collect();
    json!({ "commands": list }).to_string().into_bytes()
}

/// One answer: the correlation data it names and its error, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub correlation: String,
    pub error: Option<String>,
}

/// The answers in a response message (unreadable entries are skipped: they are not ours).
pub fn answers(payload: &[u8]) -> Vec<Answer> {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else { return Vec::new() };
    let Some(list) = v.get("responses").and_then(Value::as_array) else { return Vec::new() };
    list.iter()
        .filter_map(|r| {
            let correlation = r.get("correlationData")?.as_str()?.to_string();
            let error = r.get("error").and_then(Value::as_str).map(str::to_string);
            Some(Answer { correlation, error })
        })
        .collect()
}

/// The message prefix an answer belongs to (`{prefix}.{i}` → `prefix`).
pub fn prefix_of(correlation: &str) -> &str {
    correlation.rsplit_once('.').map_or(correlation, |(p, _)| p)
}

/// Whether a message's commands all reached their goal, from its answers.
pub fn check(commands: &[Command], prefix: &str, answers: &[Answer]) -> Result<(), HubError> {
    for (i, c) in commands.iter().enumerate() {
        let want = format!("{prefix}.{i}");
        let a = answers
            .iter()
            .find(|a| a.correlation == want)
            .ok_or_else(|| HubError::Transient(format!("no answer to dynamic-security command {want}")))?;
        if let Some(e) = a.error.as_deref().filter(|e| !c.tolerate.contains(e)) {
            let name = c.body.get("command").and_then(Value::as_str).unwrap_or("?");
            return Err(HubError::Refused(format!("Mosquitto refused {name}: {e}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Twin;

    fn task(auth: HubAuth) -> HubTask {
        HubTask {
            hub: "localhost".into(),
            device_id: "dev-1".into(),
            auth,
            iot_edge: false,
            twin: Some(Twin::default()),
            leave: Vec::new(),
        }
    }

    #[test]
    fn assign_creates_role_and_client_with_the_primary_key() {
        let sas = task(HubAuth::Sas { primary_key: "cHJp".into(), secondary_key: "c2Vj".into() });
        let cmds: Vec<Command> = create(&sas).unwrap().into_iter().chain(update(&sas).unwrap()).collect();
        let names: Vec<&str> = cmds.iter().map(|c| c.body["command"].as_str().unwrap()).collect();
        assert_eq!(names, ["createRole", "createClient", "modifyClient", "enableClient"]);
        assert_eq!(cmds[0].body["acls"][0]["topic"], "devices/dev-1/#");
        assert_eq!(cmds[1].body["password"], "cHJp");
        assert_eq!(cmds[2].body["roles"][0]["rolename"], "dps-device-dev-1");
        let x509 = create(&task(HubAuth::SelfSigned { primary_thumbprint: "A".into(), secondary_thumbprint: "A".into() })).unwrap();
        assert!(x509[1].body.get("password").is_none());
    }

    #[test]
    fn wildcards_in_device_ids_are_refused() {
        for id in ["a/b", "a+", "#", ""] {
            assert!(matches!(remove(id), Err(HubError::Refused(_))), "{id}");
        }
    }

    #[test]
    fn answers_are_matched_by_correlation_and_tolerated_errors_pass() {
        let sas = task(HubAuth::Sas { primary_key: "k".into(), secondary_key: "k".into() });
        let cmds: Vec<Command> = create(&sas).unwrap().into_iter().chain(update(&sas).unwrap()).collect();
        let msg: Value = serde_json::from_slice(&message(&cmds, "s0-7")).unwrap();
        assert_eq!(msg["commands"][3]["correlationData"], "s0-7.3");
        // As Mosquitto 2.0.11 answers a repeated assignment.
        let payload = br#"{"responses":[{"command":"createRole","error":"Role already exists","correlationData":"s0-7.0"},
            {"command":"createClient","error":"Client already exists","correlationData":"s0-7.1"},
            {"command":"modifyClient","correlationData":"s0-7.2"},{"command":"enableClient","correlationData":"s0-7.3"},
            {"command":"createClient","correlationData":"s1-2.0"}]}"#;
        let a = answers(payload);
        assert_eq!(prefix_of(&a[4].correlation), "s1-2");
        assert_eq!(check(&cmds, "s0-7", &a), Ok(()));
        assert!(client_existed(&a));
        let refused = br#"{"responses":[{"command":"createRole","correlationData":"s0-7.0"},
            {"command":"createClient","error":"Invalid/missing password","correlationData":"s0-7.1"}]}"#;
        assert!(matches!(check(&cmds, "s0-7", &answers(refused)), Err(HubError::Refused(m)) if m.contains("createClient")));
        assert!(matches!(check(&cmds, "s0-8", &a), Err(HubError::Transient(_))));
        assert!(answers(b"not json").is_empty());
    }
}
