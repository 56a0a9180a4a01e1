"""A device provisioned by the official Python device SDK lands at a real Mosquitto broker
linked as a `mosquitto` hub: it logs in there with its device key, receives the desired
properties of its enrollment's initial twin (retained), may not touch another device's topics,
and is cut off when its enrollment is disabled.

Run by tests/tests/interop_hub_mosquitto.rs with DPS_CS, DPS_SCOPE, DPS_CA, DPS_HUB and
DPS_BROKER_PORT (the broker's TLS device listener) set.
"""
import os
import queue
import time

import paho.mqtt.client as mqtt
from azure.iot.device import ProvisioningDeviceClient
from azure.iot.deviceprovisioning import DeviceProvisioningClient

SCOPE = os.environ["DPS_SCOPE"]
CA_PATH = os.environ["DPS_CA"]
HUB = os.environ["DPS_HUB"]
BROKER_PORT = int(os.environ["DPS_BROKER_PORT"])


def hub_client(device_id, password, events):
    c = mqtt.Client(client_id=device_id, protocol=mqtt.MQTTv311)
    c.username_pw_set(device_id, password)
    c.tls_set(ca_certs=CA_PATH)
    c.on_connect = lambda _c, _u, _f, rc: events.put(("connect", rc))
    c.on_subscribe = lambda _c, _u, mid, granted: events.put(("suback", mid, list(granted)))
    c.on_message = lambda _c, _u, m: events.put(("message", m.topic, m.payload, m.retain))
    c.on_disconnect = lambda _c, _u, rc: events.put(("disconnect", rc))
    return c


def next_event(events, kind, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {kind} event"
        e = events.get(timeout=left)
        if e[0] == kind:
            return e


def login_code(device_id, password):
    events = queue.Queue()
    c = hub_client(device_id, password, events)
    c.reconnect_delay_set(60, 60)
    try:
        c.connect(HUB, BROKER_PORT)
    except OSError:
        return None
    c.loop_start()
    try:
        return next_event(events, "connect")[1]
    finally:
        c.disconnect()
        c.loop_stop()


def test_the_device_connects_to_its_broker_with_what_it_was_given():
    service = DeviceProvisioningClient.from_connection_string(os.environ["DPS_CS"])
    rid = "py-mosquitto-dev"
    service.enrollment.create_or_update(
        id=rid,
        enrollment={
            "registrationId": rid,
            "attestation": {"type": "symmetricKey"},
            "iotHubs": [HUB],
            "initialTwin": {"tags": {"line": "7"}, "properties": {"desired": {"telemetryInterval": 30}}},
        },
    )
    key = service.enrollment.get_attestation_mechanism(id=rid)["symmetricKey"]["primaryKey"]
    result = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost", registration_id=rid, id_scope=SCOPE, symmetric_key=key,
        server_verification_cert=open(CA_PATH).read(),
    ).register()
    assert result.status == "assigned"
    assert result.registration_state.assigned_hub == HUB
    device_id = result.registration_state.device_id
    assert device_id == rid

    events = queue.Queue()
    device = hub_client(device_id, key, events)
    device.reconnect_delay_set(60, 60)
    device.connect(result.registration_state.assigned_hub, BROKER_PORT)
    device.loop_start()
    assert next_event(events, "connect")[1] == 0
    device.subscribe(f"devices/{device_id}/twin/desired", qos=0)
    assert next_event(events, "suback")[2] == [0]
    _, topic, payload, retained = next_event(events, "message")
    assert (topic, retained) == (f"devices/{device_id}/twin/desired", 1)
    assert payload == b'{"telemetryInterval":30}'
    device.subscribe("devices/someone-else/#", qos=0)
    assert next_event(events, "suback")[2] == [128], "another device's topics are refused"
    assert login_code(device_id, "bm90LXRoZS1rZXk=") not in (0, None), "a wrong key is refused"

    # Disabling the enrollment cuts the device off at the broker.
    e = service.enrollment.get(id=rid)
    e["provisioningStatus"] = "disabled"
    service.enrollment.create_or_update(id=rid, enrollment=e, if_match=e["etag"])
    assert next_event(events, "disconnect")[1] != 0
    device.loop_stop()
    deadline = time.monotonic() + 10
    while login_code(device_id, key) == 0:
        assert time.monotonic() < deadline, "a disabled device can still log in"
        time.sleep(0.2)
