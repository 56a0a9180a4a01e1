"""The official Python device SDK (azure-iot-device ProvisioningDeviceClient) provisions devices
against our server; enrollments are made with the official Python service SDK.

Run by tests/tests/interop_device.rs with DPS_CS, DPS_SCOPE, DPS_CA and DPS_HUB set; the server
listens on 8883 (MQTT) and 443 (WebSockets) as the SDK requires.
"""
import base64
import hashlib
import hmac
import os
import time

import pytest
from azure.iot.device import ProvisioningDeviceClient
from azure.iot.deviceprovisioning import DeviceProvisioningClient

SCOPE = os.environ["DPS_SCOPE"]
HUB = os.environ["DPS_HUB"]
CA = open(os.environ["DPS_CA"]).read()
TRANSPORTS = [t for t in os.environ.get("DPS_TRANSPORTS", "mqtt").split(",") if t]


@pytest.fixture(scope="module")
def service():
    return DeviceProvisioningClient.from_connection_string(os.environ["DPS_CS"])


def device(registration_id, key, websockets):
    return ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=SCOPE,
        symmetric_key=key,
        websockets=websockets,
        server_verification_cert=CA,
    )


def derive(group_key, registration_id):
    return base64.b64encode(hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()).decode()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_individual_enrollment_is_assigned(service, transport):
    rid = f"py-ind-{transport}"
    service.enrollment.create_or_update(id=rid, enrollment={"registrationId": rid, "attestation": {"type": "symmetricKey"}})
    key = service.enrollment.get_attestation_mechanism(id=rid)["symmetricKey"]["primaryKey"]
    started = time.monotonic()
    result = device(rid, key, transport == "websockets").register()
    elapsed = time.monotonic() - started
    print(f"register() over {transport} took {elapsed * 1000:.0f} ms")
    assert result.status == "assigned"
    assert result.registration_state.assigned_hub == HUB
    assert result.registration_state.device_id == rid
    assert service.device_registration_state.get(id=rid)["status"] == "assigned"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_group_enrollment_is_assigned(service, transport):
    gid = f"py-group-{transport}"
    service.enrollment_group.create_or_update(id=gid, enrollment_group={"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}})
    group_key = service.enrollment_group.get_attestation_mechanism(id=gid)["symmetricKey"]["primaryKey"]
    rid = f"py-group-dev-{transport}"
    result = device(rid, derive(group_key, rid), transport == "websockets").register()
    assert result.status == "assigned"
    assert result.registration_state.assigned_hub == HUB
    states = list(service.device_registration_state.query(id=gid))
    assert [s["registrationId"] for s in states] == [rid]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_key_is_refused(service, transport):
    rid = f"py-wrong-{transport}"
    service.enrollment.create_or_update(id=rid, enrollment={"registrationId": rid, "attestation": {"type": "symmetricKey"}})
    wrong = base64.b64encode(b"w" * 32).decode()
    with pytest.raises(Exception) as e:
        device(rid, wrong, transport == "websockets").register()
    # The SDK wraps the service's answer: ClientError caused by a ServiceError naming the 401.
    chain = []
    err = e.value
    while err is not None:
        chain.append(repr(err))
        err = err.__cause__
    assert any("401" in c for c in chain), chain
    # The server closes a refused device's connection 1 s after the answer; the SDK takes that
    # quietly and the next registration (any device) still works.
    time.sleep(1.5)


def test_an_update_keeps_the_keys_and_devices_still_register(service):
    """The SDK's update flow: GET hides the keys, so the enrollment comes back without them; an
    update must keep the stored keys, or every device of the enrollment is locked out."""
    rid = "py-update-keeps-keys"
    service.enrollment.create_or_update(id=rid, enrollment={"registrationId": rid, "attestation": {"type": "symmetricKey"}})
    before = service.enrollment.get_attestation_mechanism(id=rid)["symmetricKey"]
    read = service.enrollment.get(id=rid)
    read["initialTwin"] = {"tags": {"updated": True}, "properties": {"desired": {}}}
    service.enrollment.create_or_update(id=rid, enrollment=read, if_match=read["etag"])
    assert service.enrollment.get_attestation_mechanism(id=rid)["symmetricKey"] == before
    assert device(rid, before["primaryKey"], False).register().status == "assigned"

    gid = "py-update-keeps-group-keys"
    service.enrollment_group.create_or_update(id=gid, enrollment_group={"enrollmentGroupId": gid, "attestation": {"type": "symmetricKey"}})
    group_before = service.enrollment_group.get_attestation_mechanism(id=gid)["symmetricKey"]
    group = service.enrollment_group.get(id=gid)
    group["capabilities"] = {"iotEdge": True}
    service.enrollment_group.create_or_update(id=gid, enrollment_group=group, if_match=group["etag"])
    assert service.enrollment_group.get_attestation_mechanism(id=gid)["symmetricKey"] == group_before
    dev = "py-update-group-dev"
    assert device(dev, derive(group_before["primaryKey"], dev), False).register().status == "assigned"


X509_DIR = os.environ.get("DPS_X509_DIR", "")


def x509_device(registration_id, websockets):
    from azure.iot.device import X509

    cert = os.path.join(X509_DIR, f"{registration_id}.pem")
    key = os.path.join(X509_DIR, f"{registration_id}.key")
    return ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host="localhost",
        registration_id=registration_id,
        id_scope=SCOPE,
        x509=X509(cert_file=cert, key_file=key),
        websockets=websockets,
        server_verification_cert=CA,
    )


def read(name):
    with open(os.path.join(X509_DIR, name)) as f:
        return f.read()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_x509_individual_and_group_devices_are_assigned(service, transport):
    """X.509: the certificate (and chain) in the TLS handshake; certificates made by
    tests/tests/interop_device.rs, the root uploaded there as the verified CA `interop-root`."""
    rid = f"py-x509-ind-{transport}"
    service.enrollment.create_or_update(
        id=rid,
        enrollment={"registrationId": rid, "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": read(f"{rid}.pem")}}}}},
    )
    result = x509_device(rid, transport == "websockets").register()
    assert result.status == "assigned"
    assert result.registration_state.assigned_hub == HUB
    assert result.registration_state.device_id == rid

    groups = {
        "int": ("py-x509-by-intermediate", {"signingCertificates": {"primary": {"certificate": read("intermediate-a.pem")}}}),
        "root": ("py-x509-by-root", {"caReferences": {"primary": "interop-root"}}),
    }
    for prefix, (gid, x509) in groups.items():
        try:
            service.enrollment_group.create_or_update(id=gid, enrollment_group={"enrollmentGroupId": gid, "attestation": {"type": "x509", "x509": x509}})
        except Exception:
            pass  # created by the other transport's run
        did = f"py-x509-{prefix}-{transport}"
        result = x509_device(did, transport == "websockets").register()
        assert result.status == "assigned"
        assert result.registration_state.assigned_hub == HUB
        states = list(service.device_registration_state.query(id=gid))
        assert did in [s["registrationId"] for s in states]
