"""The official Python service SDK (azure-iot-deviceprovisioning) against our server.

Run by tests/tests/interop_service.rs with DPS_CS (service connection string) and
REQUESTS_CA_BUNDLE (our CA) set; the server listens on 443 as the SDK requires.
"""
import base64
import os

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.iot.deviceprovisioning import DeviceProvisioningClient


@pytest.fixture(scope="module")
def client():
    return DeviceProvisioningClient.from_connection_string(os.environ["DPS_CS"])


def test_individual_enrollments(client):
    created = client.enrollment.create_or_update(
        id="py-dev-1",
        enrollment={"registrationId": "py-dev-1", "attestation": {"type": "symmetricKey"}, "capabilities": {"iotEdge": False}},
    )
    assert created["registrationId"] == "py-dev-1"
    assert created["etag"]

    with pytest.raises(ResourceExistsError):
        client.enrollment.create_or_update(id="py-dev-1", enrollment={"registrationId": "py-dev-1", "attestation": {"type": "symmetricKey"}})

    read = client.enrollment.get(id="py-dev-1")
    assert read["etag"] == created["etag"]
    keys = client.enrollment.get_attestation_mechanism(id="py-dev-1")
    assert len(base64.b64decode(keys["symmetricKey"]["primaryKey"])) == 32

    read["provisioningStatus"] = "disabled"
    updated = client.enrollment.create_or_update(id="py-dev-1", enrollment=read, if_match=read["etag"])
    assert updated["provisioningStatus"] == "disabled"
    assert updated["etag"] != created["etag"]
    with pytest.raises(HttpResponseError) as e:
        client.enrollment.create_or_update(id="py-dev-1", enrollment=read, if_match=created["etag"])
    assert e.value.status_code == 412

    result = client.enrollment.run_bulk_operation(
        bulk_operation={
            "mode": "create",
            "enrollments": [{"registrationId": f"py-bulk-{i}", "attestation": {"type": "symmetricKey"}} for i in range(3)],
        }
    )
    assert result["isSuccessful"] is True
    assert result["errors"] == []

    pages = list(client.enrollment.query(query_specification={"query": "*"}, top=2).by_page())
    ids = sorted(e["registrationId"] for page in pages for e in page)
    assert ids == ["py-bulk-0", "py-bulk-1", "py-bulk-2", "py-dev-1"]

    client.enrollment.delete(id="py-dev-1", if_match=updated["etag"])
    with pytest.raises(ResourceNotFoundError):
        client.enrollment.get(id="py-dev-1")
    deleted = client.enrollment.run_bulk_operation(
        bulk_operation={"mode": "delete", "enrollments": [{"registrationId": f"py-bulk-{i}", "attestation": {"type": "symmetricKey"}} for i in range(3)]}
    )
    assert deleted["isSuccessful"] is True


def test_enrollment_groups(client):
    created = client.enrollment_group.create_or_update(
        id="py-group", enrollment_group={"enrollmentGroupId": "py-group", "attestation": {"type": "symmetricKey"}}
    )
    read = client.enrollment_group.get(id="py-group")
    assert read["etag"] == created["etag"]
    assert client.enrollment_group.get_attestation_mechanism(id="py-group")["symmetricKey"]["secondaryKey"]
    read["capabilities"] = {"iotEdge": True}
    updated = client.enrollment_group.create_or_update(id="py-group", enrollment_group=read, if_match=read["etag"])
    assert updated["capabilities"]["iotEdge"] is True

    bulk = client.enrollment_group.run_bulk_operation(
        bulk_operation={"mode": "create", "enrollmentGroups": [{"enrollmentGroupId": f"py-bulk-group-{i}", "attestation": {"type": "symmetricKey"}} for i in range(2)]}
    )
    assert bulk["isSuccessful"] is True
    groups = sorted(g["enrollmentGroupId"] for g in client.enrollment_group.query(query_specification={"query": "*"}))
    assert groups == ["py-bulk-group-0", "py-bulk-group-1", "py-group"]

    client.enrollment_group.delete(id="py-group", if_match=updated["etag"])
    for i in range(2):
        client.enrollment_group.delete(id=f"py-bulk-group-{i}")
    with pytest.raises(ResourceNotFoundError):
        client.enrollment_group.get(id="py-group")


def test_registration_state_of_unknown_device_is_404(client):
    with pytest.raises(ResourceNotFoundError):
        client.device_registration_state.get(id="never-registered")
