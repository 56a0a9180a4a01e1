// The official Node device SDK (azure-iot-provisioning-device with its -mqtt, -amqp and -http
// transports and azure-iot-security-symmetric-key) provisions devices against our server;
// enrollments are made with the official Node service SDK. Run by
// tests/tests/interop_device.rs with DPS_CS, DPS_SCOPE, DPS_HUB and NODE_EXTRA_CA_CERTS set.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt, MqttWs } = require('azure-iot-provisioning-device-mqtt');
const { Http } = require('azure-iot-provisioning-device-http');
const { Amqp, AmqpWs } = require('azure-iot-provisioning-device-amqp');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');

const service = ProvisioningServiceClient.fromConnectionString(process.env.DPS_CS);
const scope = process.env.DPS_SCOPE;
const hub = process.env.DPS_HUB;
const body = (r) => (r && r.responseBody !== undefined ? r.responseBody : r);
const transports = { mqtt: () => new Mqtt(), mqttws: () => new MqttWs(), amqp: () => new Amqp(), amqpws: () => new AmqpWs(), http: () => new Http() };

function register(transport, registrationId, key) {
  const client = ProvisioningDeviceClient.create('localhost', scope, transports[transport](), new SymmetricKeySecurityClient(registrationId, key));
  return new Promise((resolve, reject) => client.register((err, result) => (err ? reject(err) : resolve(result))));
}

for (const transport of Object.keys(transports)) {
  test(`${transport}: individual enrollment is assigned`, async () => {
    const id = `node-ind-${transport}`;
    await service.createOrUpdateIndividualEnrollment({ registrationId: id, attestation: { type: 'symmetricKey' } });
    const keys = body(await service.getIndividualEnrollmentAttestationMechanism(id));
    const started = Date.now();
    const result = await register(transport, id, keys.symmetricKey.primaryKey);
    console.log(`# register() over ${transport} took ${Date.now() - started} ms`);
    assert.equal(result.status, 'assigned');
    assert.equal(result.assignedHub, hub);
    assert.equal(result.deviceId, id);
  });

  test(`${transport}: group enrollment device is assigned`, async () => {
    const gid = `node-group-${transport}`;
    await service.createOrUpdateEnrollmentGroup({ enrollmentGroupId: gid, attestation: { type: 'symmetricKey' } });
    const groupKey = body(await service.getEnrollmentGroupAttestationMechanism(gid)).symmetricKey.primaryKey;
    const id = `node-group-dev-${transport}`;
    const deviceKey = crypto.createHmac('sha256', Buffer.from(groupKey, 'base64')).update(id).digest('base64');
    const result = await register(transport, id, deviceKey);
    assert.equal(result.status, 'assigned');
    assert.equal(result.assignedHub, hub);
  });

  test(`${transport}: a wrong key is refused`, async () => {
    const id = `node-wrong-${transport}`;
    await service.createOrUpdateIndividualEnrollment({ registrationId: id, attestation: { type: 'symmetricKey' } });
    // MQTT and HTTP surface an UnauthorizedError; over AMQP the SDK hands back the Rejected
    // outcome's error (condition amqp:unauthorized-access, description the DPS error body).
    await assert.rejects(register(transport, id, Buffer.alloc(32, 9).toString('base64')), (err) => {
      const seen = String(err.name) + String(err.message) + (err.value ? JSON.stringify(err.value) : '');
      assert.match(seen, /Unauthorized|401002|unauthorized-access/);
      return true;
    });
    // The server closes a refused device's connection 1 s after the answer: the SDK must take
    // that quietly (an unhandled error event here would fail the run).
    await new Promise((resolve) => setTimeout(resolve, 1500));
  });
}

// The SDK's update flow: GET hides the keys, so the enrollment comes back without them; an
// update must keep the stored keys, or every device of the enrollment is locked out.
test('an update (get, change, createOrUpdate with the etag) keeps the keys: devices still register', async () => {
  const id = 'node-update-keeps-keys';
  await service.createOrUpdateIndividualEnrollment({ registrationId: id, attestation: { type: 'symmetricKey' } });
  const before = body(await service.getIndividualEnrollmentAttestationMechanism(id)).symmetricKey;
  const read = body(await service.getIndividualEnrollment(id));
  assert.ok(!read.attestation.symmetricKey || !read.attestation.symmetricKey.primaryKey, 'GET hides the keys');
  read.initialTwin = { tags: { updated: true }, properties: { desired: {} } };
  const updated = body(await service.createOrUpdateIndividualEnrollment(read));
  assert.notEqual(updated.etag, read.etag);
  assert.deepEqual(body(await service.getIndividualEnrollmentAttestationMechanism(id)).symmetricKey, before);
  assert.equal((await register('mqtt', id, before.primaryKey)).status, 'assigned');

  const gid = 'node-update-keeps-group-keys';
  await service.createOrUpdateEnrollmentGroup({ enrollmentGroupId: gid, attestation: { type: 'symmetricKey' } });
  const groupBefore = body(await service.getEnrollmentGroupAttestationMechanism(gid)).symmetricKey;
  const group = body(await service.getEnrollmentGroup(gid));
  group.capabilities = { iotEdge: true };
  await service.createOrUpdateEnrollmentGroup(group);
  assert.deepEqual(body(await service.getEnrollmentGroupAttestationMechanism(gid)).symmetricKey, groupBefore);
  const dev = 'node-update-group-dev';
  const deviceKey = crypto.createHmac('sha256', Buffer.from(groupBefore.primaryKey, 'base64')).update(dev).digest('base64');
  assert.equal((await register('mqtt', dev, deviceKey)).status, 'assigned');
});

// X.509: the device presents its certificate (and chain) in the TLS handshake; certificates are
// made by tests/tests/interop_device.rs in DPS_X509_DIR, the root CA uploaded there as the
// verified CA `interop-root`.
const fs = require('node:fs');
const path = require('node:path');
const { X509Security } = require('azure-iot-security-x509');
const pem = (name) => fs.readFileSync(path.join(process.env.DPS_X509_DIR, name), 'utf8');

function registerX509(transport, registrationId) {
  const security = new X509Security(registrationId, { cert: pem(`${registrationId}.pem`), key: pem(`${registrationId}.key`) });
  const client = ProvisioningDeviceClient.create('localhost', scope, transports[transport](), security);
  return new Promise((resolve, reject) => client.register((err, result) => (err ? reject(err) : resolve(result))));
}

test('x509: groups enrolled by an intermediate (inline) and by a verified root CA (reference)', async () => {
  await service.createOrUpdateEnrollmentGroup({ enrollmentGroupId: 'node-x509-by-intermediate',
    attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: pem('intermediate-a.pem') } } } } });
  await service.createOrUpdateEnrollmentGroup({ enrollmentGroupId: 'node-x509-by-root',
    attestation: { type: 'x509', x509: { caReferences: { primary: 'interop-root' } } } });
});

for (const transport of ['mqtt', 'mqttws', 'amqp', 'amqpws', 'http']) {
  test(`${transport}: x509 individual enrollment is assigned`, async () => {
    const id = `node-x509-ind-${transport}`;
    await service.createOrUpdateIndividualEnrollment({ registrationId: id,
      attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: pem(`${id}.pem`) } } } } });
    const result = await registerX509(transport, id);
    assert.equal(result.status, 'assigned');
    assert.equal(result.assignedHub, hub);
    assert.equal(result.deviceId, id);
  });

  test(`${transport}: x509 group devices (leaf + intermediate) are assigned`, async () => {
    for (const [prefix, group] of [['int', 'node-x509-by-intermediate'], ['root', 'node-x509-by-root']]) {
      const id = `node-x509-${prefix}-${transport}`;
      const result = await registerX509(transport, id);
      assert.equal(result.status, 'assigned');
      assert.equal(result.assignedHub, hub);
      assert.equal(result.x509.enrollmentGroupId, group);
    }
  });
}

// TPM: azure-iot-security-tpm talks to a software TPM (swtpm, started by
// tests/tests/interop_device.rs; ports in DPS_SWTPM_PORTS) through tss.js's TCP device in its
// "Linux TRM" framing, which swtpm's server port speaks. The client reads (or creates) the EK
// and SRK, fetches the challenge (HTTP: a 401 with authenticationKey; AMQP: the SASL TPM
// mechanism), activates it in the TPM, signs its token with the imported key, and imports the
// second authenticationKey of the assigned result.
const tss = require('tss.js');
const { TpmSecurityClient } = require('azure-iot-security-tpm');
const [tpmPort, otherTpmPort] = String(process.env.DPS_SWTPM_PORTS || '').split(',').map(Number);

// swtpm serves one connection at a time: each test closes the ones it opened.
let openTpms = [];
function tpmSecurity(registrationId, port) {
  const tpm = new tss.Tpm(false);
  tpm.device = new tss.TpmTcpDevice('127.0.0.1', port, true);
  openTpms.push(tpm);
  return new TpmSecurityClient(registrationId, tpm);
}
function closeTpms() {
  openTpms.forEach((t) => { try { t.close(); } catch (_) { /* already closed */ } });
  openTpms = [];
}

// A refused TPM registration leaves the SDK's AMQP connection open (its TPM flow does not
// disconnect on error), and our idle timeout would close it later under a test that has
// ended (an uncaught "rhea: connection disconnected"): disconnect the transport.
function registerTpm(transport, security) {
  const t = transports[transport]();
  const client = ProvisioningDeviceClient.create('localhost', scope, t, security);
  return new Promise((resolve, reject) => client.register((err, result) => {
    if (!err) return resolve(result);
    t.disconnect(() => reject(err));
  }));
}

const endorsementKey = (security) =>
  new Promise((resolve, reject) => security.getEndorsementKey((err, ek) => (err ? reject(err) : resolve(ek))));

for (const transport of ['http', 'amqp']) {
  test(`${transport}: TPM individual enrollment is assigned; another TPM under its id is refused`, async (t) => {
    t.after(closeTpms);
    const id = `node-tpm-${transport}`;
    const device = tpmSecurity(id, tpmPort);
    const ek = await endorsementKey(device);
    await service.createOrUpdateIndividualEnrollment({ registrationId: id,
      attestation: { type: 'tpm', tpm: { endorsementKey: ek.toString('base64') } } });
    // The TPM client answers with the whole operation result; it has already imported
    // registrationState.tpm.authenticationKey (it fails without one).
    const result = await registerTpm(transport, device);
    assert.equal(result.status, 'assigned');
    assert.equal(result.registrationState.assignedHub, hub);
    assert.equal(result.registrationState.deviceId, id);
    assert.equal(typeof result.registrationState.tpm.authenticationKey, 'string');
    const state = body(await service.getDeviceRegistrationState(id));
    assert.equal(state.status, 'assigned');

    const other = tpmSecurity(id, otherTpmPort);
    assert.notDeepEqual(await endorsementKey(other), ek, 'two TPMs, two endorsement keys');
    // HTTP: the challenge request is refused with a plain 401 (no authenticationKey), which the
    // SDK reports as a FormatError; AMQP: the other TPM proves its own keys in SASL, and its
    // register is Rejected with the DPS error 401002. Either way nothing changes.
    await assert.rejects(registerTpm(transport, other), (err) => {
      const seen = String(err.name) + String(err.message) + (err.value ? JSON.stringify(err.value) : '') + JSON.stringify(err);
      assert.match(seen, transport === 'http' ? /authentication blob/ : /401002|Unauthorized|unauthorized/);
      return true;
    });
    assert.equal(body(await service.getDeviceRegistrationState(id)).etag, state.etag, 'the registration is untouched');
  });
}
