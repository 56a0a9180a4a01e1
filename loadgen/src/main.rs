//! `loadgen`: the command line of `dps-loadgen`. See `--help` and tuning.md.

use clap::Parser;
use dps_loadgen::device::{BrokerLogin, Transport};
use dps_loadgen::endpoint::Endpoint;
use dps_loadgen::identities::Identities;
use dps_loadgen::report::Report;
use dps_loadgen::run::{run, Fleet, Plan};
use dps_loadgen::service::ServiceClient;
use dps_loadgen::BoxError;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Clone)]
#[command(about = "Provision simulated devices against a DPS endpoint and report latencies")]
struct Args {
    /// endpoint.json written by `dps serve` (ID scope, host, ports, CA, service connection string).
    #[arg(long)]
    endpoint: std::path::PathBuf,
    /// Devices to provision (with --csv: defaults to the devices in the file).
    #[arg(long)]
    devices: Option<usize>,
    /// Devices in flight at most; in closed loop (no --rate) exactly this many.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop: start this many devices per second, whatever the server's pace; latency is
    /// measured from each device's scheduled start.
    #[arg(long)]
    rate: Option<f64>,
    /// `mqtt`, `mqttws` (MQTT over WebSockets on the HTTPS port), `amqp`, `amqpws`, `https` (device REST API),
    /// `tls` (handshake and close only), or `broker` (a plain MQTT broker session, see --username).
    #[arg(long, default_value = "mqtt")]
    transport: String,
    /// Resume each device's TLS session: a first pass connects every device (not measured),
    /// the measured pass resumes (as in a re-registration storm).
    #[arg(long)]
    resume: bool,
    /// Enrollment group whose derived keys the devices use; created (symmetric key) if missing.
    #[arg(long, default_value = "loadgen")]
    group: String,
    /// X.509 devices: a test CA (uploaded as a verified CA certificate, referenced by the group
    /// `--group`, replaced on every run) signs each device's leaf certificate as it starts.
    #[arg(long)]
    x509: bool,
    /// TPM devices (`https` and `amqp` transports): every device's challenge is activated and
    /// signed by the TPM at this TSS TCTI (e.g. `swtpm:host=127.0.0.1,port=2321`, or
    /// `start-swtpm` to start a software TPM of its own); its EK is enrolled under each device's
    /// registration id (individual TPM enrollments, created first).
    #[arg(long)]
    tpm: Option<String>,
    /// Prefix of registration ids: `{prefix}-{n}`.
    #[arg(long, default_value = "loadgen-dev")]
    prefix: String,
    /// Individual enrollments instead of a group: lines of `registrationId,base64 primary key`.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// With --csv: create the file's enrollments through the service API (bulk) first.
    #[arg(long)]
    create: bool,
    /// Items per bulk call when creating enrollments (the server's `limits.max_bulk_items`).
    #[arg(long, default_value_t = 10)]
    bulk_batch: usize,
    /// Host to connect to; TLS still verifies `hostName` from endpoint.json.
    #[arg(long, default_value = "127.0.0.1")]
    connect: String,
    /// Port for `tls` and `broker` runs (default: the MQTT port of endpoint.json).
    #[arg(long)]
    port: Option<u16>,
    /// Broker login for `broker` runs.
    #[arg(long, default_value = "loadgen")]
    username: String,
    #[arg(long, default_value = "loadgen")]
    password: String,
    /// The max-frame-size AMQP devices announce (512 is AMQP's minimum).
    #[arg(long, default_value_t = 65_536)]
    amqp_max_frame: u32,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds a device may take before it counts as a timeout.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 5)]
    progress: u64,
    /// Print the result as one JSON line too.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<(), BoxError> {
    let a = Args::parse();
    let transport = Transport::parse(&a.transport).ok_or_else(|| format!("unknown transport '{}'", a.transport))?;
    let mut ep = Endpoint::read(&a.endpoint, &a.connect)?;
    if let Some(p) = a.port {
        ep.mqtt_port = p;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(a.threads.max(1)).enable_all().build()?;
    let needs_keys = !matches!(transport, Transport::TlsHandshake | Transport::BrokerSession);
    let ids = match &a.csv {
        Some(path) => {
            let ids = Identities::read_csv(&std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?)?;
            if a.create {
                if let Identities::Individual(devices) = &ids {
                    let n = rt.block_on(ServiceClient::new(&ep)?.create_individual(devices, a.bulk_batch))?;
                    eprintln!("created {n} of {} enrollments", devices.len());
                }
            }
            ids
        }
        None if a.x509 => {
            let ca = std::sync::Arc::new(dps_loadgen::identities::TestCa::new("dps-loadgen fleet CA")?);
            rt.block_on(ServiceClient::new(&ep)?.x509_group(&a.group, &ca.pem))?;
            Identities::X509 { prefix: a.prefix.clone(), ca }
        }
        None if needs_keys => {
            Identities::Group { prefix: a.prefix.clone(), key: rt.block_on(ServiceClient::new(&ep)?.group_key(&a.group))? }
        }
        None => Identities::Group { prefix: a.prefix.clone(), key: Vec::new() },
    };
    let mut devices = a.devices.or(ids.count()).unwrap_or(1000);
    // Kept alive for the run when loadgen started it.
    let mut _soft_tpm = None;
    let (ids, tpm) = match &a.tpm {
        Some(tcti) => {
            let tcti = if tcti == "start-swtpm" {
                let soft = dps_loadgen::swtpm::SoftTpm::start()?;
                let t = soft.tcti();
                _soft_tpm = Some(soft);
                t
            } else {
                tcti.clone()
            };
            let handle = dps_loadgen::tpm_device::TpmHandle::open(&tcti)?;
            let reg_ids: Vec<String> = (0..devices).map(|i| ids.device(i).0).collect();
            let n = rt.block_on(ServiceClient::new(&ep)?.create_tpm_individual(&reg_ids, &handle.endorsement_key, a.bulk_batch))?;
            eprintln!("created {n} of {} TPM enrollments", reg_ids.len());
            devices = reg_ids.len();
            (Identities::Individual(reg_ids.into_iter().map(|id| (id, Vec::new())).collect()), Some(handle))
        }
        None => (ids, None),
    };
    let fleet = Arc::new(Fleet {
        broker: Some(BrokerLogin { username: a.username.clone(), password: a.password.clone() }),
        amqp_max_frame: a.amqp_max_frame,
        tpm,
        ..Fleet::new(ep, ids)?
    });
    let plan = Plan {
        transport,
        devices,
        concurrency: a.concurrency,
        rate: a.rate,
        resume: a.resume,
        timeout: Duration::from_secs(a.timeout),
        progress: (a.progress > 0).then(|| Duration::from_secs(a.progress)),
    };
    let report: Report = rt.block_on(run(fleet, plan))?;
    println!("{}", report.describe());
    println!("{}", Report::HEADER);
    println!("{}", report.row(transport.name()));
    for (k, v) in &report.errors {
        println!("error {k}: {v}");
    }
    if a.json {
        println!("{}", report.json());
    }
    Ok(())
}
