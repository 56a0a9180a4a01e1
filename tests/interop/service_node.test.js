// The official Node service SDK (azure-iot-provisioning-service) against our server.
// Run by tests/tests/interop_service.rs with DPS_CS (service connection string) and
// NODE_EXTRA_CA_CERTS (our CA) set; the server listens on 443 as the SDK requires.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');

const client = ProvisioningServiceClient.fromConnectionString(process.env.DPS_CS);
const body = (r) => (r && r.responseBody !== undefined ? r.responseBody : r);
const status = async (p) => {
  try {
    await p;
    return 200;
  } catch (e) {
    return e.response ? e.response.statusCode : (e.responseBody ? -1 : String(e));
  }
};

test('individual enrollments: create, read, update with etag, query, bulk, delete', async () => {
  const created = body(await client.createOrUpdateIndividualEnrollment({
    registrationId: 'node-dev-1',
    attestation: { type: 'symmetricKey' },
    initialTwin: { tags: { site: 'node' }, properties: { desired: { interval: 5 } } },
  }));
  assert.equal(created.registrationId, 'node-dev-1');
  assert.equal(created.provisioningStatus, 'enabled');
  assert.ok(created.etag);

  const read = body(await client.getIndividualEnrollment('node-dev-1'));
  assert.equal(read.etag, created.etag);
  assert.equal(read.initialTwin.tags.site, 'node');

  const keys = body(await client.getIndividualEnrollmentAttestationMechanism('node-dev-1'));
  assert.equal(keys.type, 'symmetricKey');
  assert.equal(Buffer.from(keys.symmetricKey.primaryKey, 'base64').length, 32);

  // Update: the SDK sends the enrollment's etag as If-Match.
  read.provisioningStatus = 'disabled';
  const updated = body(await client.createOrUpdateIndividualEnrollment(read));
  assert.equal(updated.provisioningStatus, 'disabled');
  assert.notEqual(updated.etag, created.etag);

  // A stale etag is refused with 412.
  const stale = { ...read, etag: created.etag };
  assert.equal(await status(client.createOrUpdateIndividualEnrollment(stale)), 412);

  // runBulkEnrollmentOperation only answers through a callback (its promise form never
  // settles in 1.11.2), so it is called the way the SDK's samples call it.
  const bulk = await new Promise((resolve, reject) => client.runBulkEnrollmentOperation({
    mode: 'create',
    enrollments: [1, 2, 3].map((i) => ({ registrationId: `node-bulk-${i}`, attestation: { type: 'symmetricKey' } })),
  }, (err, result) => (err ? reject(err) : resolve(result))));
  assert.equal(bulk.isSuccessful, true);
  assert.deepEqual(bulk.errors, []);

  // Query in pages of two until the SDK sees no continuation.
  const q = client.createIndividualEnrollmentQuery({ query: '*' }, 2);
  const ids = [];
  let pages = 0;
  while (q.hasMoreResults) {
    // next() without an argument restarts from the first page; the caller passes the token.
    const page = body(await q.next(q.continuationToken));
    pages += 1;
    for (const e of page) ids.push(e.registrationId);
    assert.ok(pages < 10, 'query did not terminate');
  }
  assert.deepEqual(ids.sort(), ['node-bulk-1', 'node-bulk-2', 'node-bulk-3', 'node-dev-1']);
  assert.equal(pages, 2);

  await client.deleteIndividualEnrollment('node-dev-1', updated.etag);
  assert.equal(await status(client.getIndividualEnrollment('node-dev-1')), 404);
  for (const i of [1, 2, 3]) await client.deleteIndividualEnrollment(`node-bulk-${i}`);
});

test('enrollment groups: create, read, update with etag, query, delete', async () => {
  const created = body(await client.createOrUpdateEnrollmentGroup({
    enrollmentGroupId: 'node-group',
    attestation: { type: 'symmetricKey' },
  }));
  assert.equal(created.enrollmentGroupId, 'node-group');
  const read = body(await client.getEnrollmentGroup('node-group'));
  assert.equal(read.etag, created.etag);
  const keys = body(await client.getEnrollmentGroupAttestationMechanism('node-group'));
  assert.ok(keys.symmetricKey.primaryKey);

  read.capabilities = { iotEdge: true };
  const updated = body(await client.createOrUpdateEnrollmentGroup(read));
  assert.equal(updated.capabilities.iotEdge, true);
  assert.equal(await status(client.createOrUpdateEnrollmentGroup({ ...read, etag: created.etag })), 412);

  const q = client.createEnrollmentGroupQuery({ query: '*' });
  const page = body(await q.next());
  assert.deepEqual(page.map((g) => g.enrollmentGroupId), ['node-group']);
  assert.equal(q.hasMoreResults, false);

  await client.deleteEnrollmentGroup(updated);
  assert.equal(await status(client.getEnrollmentGroup('node-group')), 404);
});

test('a wrong key is refused with 401', async () => {
  const bad = process.env.DPS_CS.replace(/SharedAccessKey=[^;]+/, 'SharedAccessKey=' + Buffer.alloc(32, 7).toString('base64'));
  const other = ProvisioningServiceClient.fromConnectionString(bad);
  assert.equal(await status(other.getIndividualEnrollment('anything')), 401);
});
