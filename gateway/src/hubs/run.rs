//! Runs a registration's pending work on the shard that starts it — the custom allocation
//! webhook, then the hub task — each step on the hub workers, transient failures retried by the
//! backoff, then the end committed, only if the stored state is still the `assigning` one the
//! work belongs to (a newer registration of the same device supersedes it). The work of one
//! registration runs once per process at a time; a poll that finds an `assigning` state nobody
//! is working on (the service restarted) starts it again. Also here: what an enrollment change
//! (disabled, keys rolled) asks of its devices' hubs.

use super::workers::Step;
use crate::clock::utc_now;
use crate::service::{new_etag, random_bytes, Service};
use dps_core::error::{ErrorKind, ServiceError};
use dps_core::hub::custom::{self, Allocated, CustomCall};
use dps_core::hub::{finish, Backoff, HubError, HubTask};
use dps_core::model::{DeviceRegistrationState, LinkedHub};
use dps_core::registration::state::{hub_auth, Matched};
use dps_storage::{Expect, Op, Record, Table, Txn, TxnError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Claims the task of `key` for this process; None when it already runs here.
pub fn claim(svc: &Arc<Service>, key: &str) -> Option<Claim> {
    let mut running = svc.hub_tasks.lock().ok()?;
    running.insert(key.to_string()).then(|| Claim { svc: svc.clone(), key: key.to_string() })
}

/// A running task's place in the service's set; released when the task ends, however it ends.
pub struct Claim {
    svc: Arc<Service>,
    key: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut running) = self.svc.hub_tasks.lock() {
            running.remove(&self.key);
        }
    }
}

fn backoff(svc: &Service) -> Backoff {
    let l = &svc.limits;
    Backoff {
        first_ms: l.hub_retry_first_ms,
        max_ms: l.hub_retry_max_ms.max(l.hub_retry_first_ms),
        deadline_ms: l.hub_deadline_secs * 1000,
    }
}

/// Runs the pending work of the `assigning` state stored under the claimed key (the custom
/// allocation webhook, then the hub task) and commits its end; returns the state the device's
/// registration is in afterwards.
pub async fn run(claim: Claim, hubs: Vec<LinkedHub>, mut state: DeviceRegistrationState) -> Result<DeviceRegistrationState, ServiceError> {
    let svc = claim.svc.clone();
    let expected = state.etag.clone().unwrap_or_default();
    if let Some(call) = state.custom_allocation.clone() {
        let answer = retried(&svc, || ask(&svc, &call)).await.unwrap_or_else(|e| Err(format!("Custom allocation failed: {}", e.message())));
        if let Err(why) = &answer {
            tracing::warn!(webhook = %super::http::redact(&call.webhook_url), registration_id = %state.registration_id, reason = %why, "custom allocation failed");
        }
        state = custom::resolve(state, answer, &hubs);
    }
    let done = match state.hub_task.clone() {
        Some(task) => {
            let result = retried(&svc, || steps(&svc, &hubs, &task)).await;
            if let Err(e) = &result {
                tracing::warn!(hub = %task.hub, device_id = %task.device_id, reason = %e.message(), "hub did not take the device");
            }
            finish(state, result, utc_now(), new_etag())
        }
        None => DeviceRegistrationState { etag: Some(new_etag()), last_updated_date_time_utc: Some(utc_now()), ..state },
    };
    let body = serde_json::to_vec(&done).map_err(|e| ServiceError::new(ErrorKind::Internal, "internal error").because(e.to_string()))?;
    let record = Record { etag: done.etag.clone().unwrap_or_default(), class: 0, body };
    let op = Op::Put { table: Table::Registrations, key: claim.key.clone(), record, expect: Expect::Etag(expected), quota: None };
    match svc.store.commit(Txn::one(op)).await? {
        Ok(_) => Ok(done),
        // A newer registration (or a delete) replaced the state this work was for.
        Err(TxnError::PreconditionFailed | TxnError::NotFound) => match svc.store.get(Table::Registrations, &claim.key).await? {
            Some(r) => r.parse(),
            None => Err(ServiceError::new(ErrorKind::RegistrationNotFound, "registration not found")),
        },
        Err(e) => Err(ServiceError::new(ErrorKind::Internal, "internal error").because(format!("hub work commit: {e:?}"))),
    }
}

/// How long a step waits for its turn at a hub that has as many steps in flight as allowed.
const TURN_WAIT_MS: u64 = 20;

/// Repeats `attempt` while it fails transiently, by the backoff, until the deadline; a step
/// that waits for its turn at a busy hub tries again shortly, without growing the backoff.
async fn retried<T, F: std::future::Future<Output = Result<T, HubError>>>(
    svc: &Service,
    mut attempt: impl FnMut() -> F,
) -> Result<T, HubError> {
    let backoff = backoff(svc);
    let started = Instant::now();
    let mut n = 0u32;
    loop {
        let elapsed = started.elapsed().as_millis() as u64;
        let jitter = u16::from_be_bytes(random_bytes::<2>()) % 1001;
        match attempt().await {
            Err(HubError::Busy(why)) => {
                if elapsed >= backoff.deadline_ms {
                    return Err(HubError::Transient(why));
                }
                glommio::timer::sleep(Duration::from_millis(TURN_WAIT_MS + TURN_WAIT_MS * u64::from(jitter) / 1000)).await;
            }
            Err(HubError::Transient(why)) => {
                let Some(ms) = backoff.next_delay(n, elapsed, jitter) else {
                    return Err(HubError::Transient(why));
                };
                tracing::debug!(attempt = n, retry_in_ms = ms, reason = %why, "hub work failed, retrying");
                glommio::timer::sleep(Duration::from_millis(ms)).await;
                n += 1;
            }
            other => return other,
        }
    }
}

/// One webhook call: its answer read, or a transient failure (unreachable, busy, failing).
async fn ask(svc: &Service, call: &CustomCall) -> Result<Result<Allocated, String>, HubError> {
    let step = Step::Allocate { url: call.webhook_url.clone(), body: call.body.clone() };
    match svc.hub_workers.run(None, step).await? {
        Some((status, _)) if custom::retryable(status) => Err(HubError::Transient(format!("the webhook answered {status}"))),
        Some((status, body)) => Ok(custom::read_answer(call, status, &body)),
        None => Err(HubError::Transient("no answer from the webhook".into())),
    }
}

/// One attempt: the device at its new hub, then gone from the hub it left.
async fn steps(svc: &Service, hubs: &[LinkedHub], task: &HubTask) -> Result<(), HubError> {
    let find = |name: &str| hubs.iter().find(|h| h.name.eq_ignore_ascii_case(name));
    let hub = find(&task.hub).ok_or_else(|| HubError::Refused(format!("hub {} is no longer linked", task.hub)))?;
    svc.hub_workers.run(Some(hub), Step::Assign(task.clone())).await?;
    for old in &task.leave {
        // A hub unlinked since keeps its identity: it is no longer ours to manage.
        if let Some(h) = find(&old.hub) {
            svc.hub_workers.run(Some(h), Step::Remove(old.device_id.clone())).await?;
        }
    }
    Ok(())
}

/// An enrollment as written, for the work its change causes at hubs.
pub enum Enrollment {
    Individual(Box<dps_core::model::IndividualEnrollment>),
    Group(Box<dps_core::model::EnrollmentGroup>),
}

/// What an enrollment change asks of the hubs its devices are at.
pub enum Refresh {
    /// Disabled: cut them off.
    Disable,
    /// Keys rolled: give the hubs the new credentials.
    Rekey(Enrollment),
}

/// The devices an enrollment admitted: an individual enrollment's one registration key, or a
/// group (by id) whose devices are read page by page.
pub enum Devices {
    One(String),
    Group(String),
}

/// Applies an enrollment change at the hubs of the devices it admitted. Runs in the
/// background with the same retries as a registration; a device registering meanwhile is
/// decided by the enrollment as it now is anyway.
pub async fn refresh_devices(svc: Arc<Service>, devices: Devices, refresh: Refresh) {
    let hubs: Vec<LinkedHub> = match svc.store.scan(Table::Hubs, "", None, usize::MAX).await {
        Ok(rows) => rows.iter().filter_map(|(_, r)| r.parse().ok()).collect(),
        Err(e) => {
            tracing::warn!(error = ?e, "cannot read the linked hubs to update devices");
            return;
        }
    };
    match devices {
        Devices::One(key) => refresh_some(&svc, &hubs, vec![key], &refresh).await,
        Devices::Group(group) => {
            let mut after: Option<String> = None;
            loop {
                let page = match svc.group_registrations(&group, after.as_deref(), RESYNC_PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(group = %group, error = ?e, "cannot read the group's devices to update them");
                        return;
                    }
                };
                let Some(last) = page.last().cloned() else { return };
                refresh_some(&svc, &hubs, page, &refresh).await;
                after = Some(last);
            }
        }
    }
}

async fn refresh_some(svc: &Service, hubs: &[LinkedHub], registrations: Vec<String>, refresh: &Refresh) {
    for key in registrations {
        let state: Option<DeviceRegistrationState> = match svc.store.get(Table::Registrations, &key).await {
            Ok(r) => r.and_then(|r| r.parse().ok()),
            Err(_) => None,
        };
        let Some(state) = state.filter(|s| s.status == dps_core::model::RegistrationStatus::Assigned) else { continue };
        let (Some(hub), Some(device_id)) = (state.assigned_hub.clone(), state.device_id.clone()) else { continue };
        let Some(h) = dps_core::model::LinkedHub::with_connector(hubs, &hub) else {
            continue;
        };
        let step = match refresh {
            Refresh::Disable => Step::Disable(device_id.clone()),
            Refresh::Rekey(e) => match assignment(e, &state, &hub, None) {
                Some(task) => Step::Assign(task),
                None => continue,
            },
        };
        if let Err(e) = retried(svc, || svc.hub_workers.run(Some(h), step.clone())).await {
            tracing::warn!(hub = %hub, device_id = %device_id, reason = %e.message(), "could not update the device at its hub");
        }
    }
}

/// Registration states read per store call while resyncing a hub.
const RESYNC_PAGE: usize = 500;

/// Gives `hub` again every device assigned to it (identity, credential, the twin last written),
/// walking the registration states page by page; devices whose enrollment is gone or disabled
/// are skipped. One device at a time, with the hub retries.
pub async fn resync_hub(svc: Arc<Service>, hub: LinkedHub) {
    let (mut after, mut given, mut failed) = (None::<String>, 0u64, 0u64);
    loop {
        let rows = match svc.store.scan(Table::Registrations, "", after.as_deref(), RESYNC_PAGE).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(hub = %hub.name, error = ?e, "resync stopped: cannot read registrations");
                return;
            }
        };
        let Some((last, _)) = rows.last() else { break };
        after = Some(last.clone());
        for (key, r) in rows {
            let Ok(state) = r.parse::<DeviceRegistrationState>() else { continue };
            let here = state.assigned_hub.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(&hub.name));
            if state.status != dps_core::model::RegistrationStatus::Assigned || !here {
                continue;
            }
            let Some(task) = resync_task(&svc, &key, &state, &hub).await else { continue };
            match retried(&svc, || svc.hub_workers.run(Some(&hub), Step::Assign(task.clone()))).await {
                Ok(_) => given += 1,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(hub = %hub.name, device_id = %task.device_id, reason = %e.message(), "resync: the hub did not take the device");
                }
            }
        }
    }
    tracing::info!(hub = %hub.name, given, failed, "resync done");
}

/// The assignment of a stored state again, with its enrollment's current credential.
async fn resync_task(svc: &Service, key: &str, state: &DeviceRegistrationState, hub: &LinkedHub) -> Option<HubTask> {
    let enrollment = match state.enrollment_group_id.as_deref() {
        Some(g) => Enrollment::Group(Box::new(svc.store.get(Table::Groups, &dps_core::ids::id_key(g)).await.ok()??.parse().ok()?)),
        None => Enrollment::Individual(Box::new(svc.store.get(Table::Enrollments, key).await.ok()??.parse().ok()?)),
    };
    if !enrollment.matched().common().is_enabled() {
        return None;
    }
    assignment(&enrollment, state, &hub.name, state.twin.clone())
}

/// A device's assignment to `hub` again, with the credential its enrollment gives it now.
fn assignment(e: &Enrollment, state: &DeviceRegistrationState, hub: &str, twin: Option<dps_core::hub::Twin>) -> Option<HubTask> {
    let matched = e.matched();
    let auth = hub_auth(matched, &state.registration_id, state.x509.as_ref(), state.tpm.as_ref())?;
    let iot_edge = matched.common().capabilities.as_ref().is_some_and(|c| c.iot_edge);
    Some(HubTask { hub: hub.to_string(), device_id: state.device_id.clone()?, auth, iot_edge, twin, leave: Vec::new() })
}

impl Enrollment {
    fn matched(&self) -> Matched<'_> {
        match self {
            Enrollment::Individual(e) => Matched::Individual(e),
            Enrollment::Group(g) => Matched::Group(g),
        }
    }
}
