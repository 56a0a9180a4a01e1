//! `dps`: runs the device provisioning service (`dps serve`), and manages one from the command
//! line (enrollments, groups, registrations, linked hubs, export and import) through its
//! service API.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "dps", version, about = "Self-hosted device provisioning service, wire-compatible with Azure IoT Hub DPS")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    connect: dps_gateway::cli::client::ConnectOpts,
    #[command(flatten)]
    output: dps_gateway::cli::output::OutputOpts,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// Data directory (store, keys, generated certificates, endpoint.json).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// TOML configuration file (environment overlay: DPS_SECTION__KEY=value).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Host name clients use; repeat for several. Default: localhost.
        #[arg(long = "hostname")]
        host_names: Vec<String>,
        #[arg(long)]
        mqtt_port: Option<u16>,
        #[arg(long)]
        amqp_port: Option<u16>,
        #[arg(long)]
        https_port: Option<u16>,
        /// Shards (executors); default one per core.
        #[arg(long)]
        shards: Option<usize>,
        /// A throwaway instance for device test benches and firmware CI: a fresh data dir in
        /// the temporary directory, removed on exit; no service API rate limit.
        ///
        /// Example: dps serve --ephemeral --id-scope 0ne00000001 --enrollments fleet.jsonl --https-port 8443
        #[arg(long)]
        ephemeral: bool,
        /// ID scope of a new instance (0ne and 8 hex digits), e.g. fixed for a test bench.
        #[arg(long)]
        id_scope: Option<String>,
        /// Enrollments and groups to create once serving (JSON lines, as `dps export` writes).
        #[arg(long)]
        enrollments: Option<PathBuf>,
    },
    /// Re-seal every stored value under a new data key (with the service stopped).
    ///
    /// With DIR/data.key: a new key is generated, everything re-sealed, and the old key
    /// removed from the file. With DPS_DATA_KEY: give the new key first (DPS_DATA_KEY=new,old);
    /// afterwards DPS_DATA_KEY needs the new key only. An interrupted run can be run again.
    ///
    /// Example: systemctl stop dps && dps rotate-data-key --data-dir /var/lib/dps && systemctl start dps
    RotateDataKey {
        /// Data directory of the stopped service.
        #[arg(long, default_value = "dps-data")]
        data_dir: PathBuf,
    },
    /// Individual enrollments (az iot dps enrollment).
    Enrollment {
        #[command(subcommand)]
        cmd: dps_gateway::cli::EnrollmentCmd,
    },
    /// Enrollment groups (az iot dps enrollment-group).
    EnrollmentGroup {
        #[command(subcommand)]
        cmd: dps_gateway::cli::GroupCmd,
    },
    /// Device registration states (az iot dps registration).
    Registration {
        #[command(subcommand)]
        cmd: dps_gateway::cli::RegistrationCmd,
    },
    /// Linked IoT hubs (az iot dps linked-hub).
    LinkedHub {
        #[command(subcommand)]
        cmd: dps_gateway::cli::HubCmd,
    },
    /// CA certificates and their proof of possession (az iot dps certificate).
    Certificate {
        #[command(subcommand)]
        cmd: dps_gateway::cli::CertificateCmd,
    },
    /// Every enrollment and group as JSON lines (with their keys: keep the file secret).
    ///
    /// Example: dps export --endpoint dps-data/endpoint.json --file fleet.jsonl
    Export {
        /// Write here (mode 0600) instead of stdout.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Create or replace enrollments and groups from JSON lines (as `dps export` writes them).
    ///
    /// Example: dps import --endpoint other/endpoint.json --file fleet.jsonl
    Import(dps_gateway::cli::ImportOpts),
    /// Shell completions: dps completions bash > /etc/bash_completion.d/dps
    Completions { shell: clap_complete::Shell },
}

fn main() {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("DPS_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn"))
    };
    // One line per event; `DPS_LOG_FORMAT=json` makes each a JSON object for log shippers.
    // A log line that cannot be written (stderr on a full disk) is dropped: tracing's own
    // report of it would print to stderr too, and a failed print panics the thread that logged.
    let fmt = tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).log_internal_errors(false);
    if std::env::var("DPS_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let cli = Cli::parse();
    let (data_dir, config, host_names, mqtt_port, amqp_port, https_port, shards, ephemeral, id_scope, enrollments) = match cli.command {
        Command::Serve { data_dir, config, host_names, mqtt_port, amqp_port, https_port, shards, ephemeral, id_scope, enrollments } => {
            (data_dir, config, host_names, mqtt_port, amqp_port, https_port, shards, ephemeral, id_scope, enrollments)
        }
        Command::RotateDataKey { data_dir } => rotate(&data_dir),
        command => manage(command, &cli.connect, &cli.output),
    };
    let mut cfg = match dps_gateway::config::Config::load(config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => exit(&e),
    };
    if !host_names.is_empty() {
        cfg.host_names = host_names;
    }
    if let Some(p) = mqtt_port {
        cfg.ports.mqtt = p;
    }
    if let Some(p) = amqp_port {
        cfg.ports.amqp = p;
    }
    if let Some(p) = https_port {
        cfg.ports.https = p;
    }
    if let Some(s) = shards {
        cfg.shards = s;
    }
    if id_scope.is_some() {
        cfg.id_scope = id_scope;
    }
    let dir = if ephemeral {
        if data_dir.is_some() {
            exit("--ephemeral makes its own data dir; leave out --data-dir");
        }
        // A test bench imports and resets freely.
        cfg.limits.service_operations_per_minute = 0;
        let name = format!("dps-ephemeral-{}-{:016x}", std::process::id(), u64::from_be_bytes(dps_gateway::service::random_bytes::<8>()));
        std::env::temp_dir().join(name)
    } else {
        data_dir.or_else(|| cfg.data_dir.clone()).unwrap_or_else(|| PathBuf::from("dps-data"))
    };
    // Removes an ephemeral data dir however serving ends.
    let cleanup = |dir: &std::path::Path| {
        if ephemeral {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    let signals = match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM]) {
        Ok(s) => s,
        Err(e) => exit(&format!("cannot install signal handlers: {e}")),
    };
    let bulk = cfg.limits.max_bulk_items;
    let running = match dps_gateway::start(cfg, &dir) {
        Ok(r) => r,
        Err(e) => {
            cleanup(&dir);
            exit(&e)
        }
    };
    if let Some(file) = enrollments {
        let connect = dps_gateway::cli::client::ConnectOpts { endpoint: Some(dir.join("endpoint.json")), ..Default::default() };
        let opts = dps_gateway::cli::ImportOpts { file: Some(file.clone()), batch: bulk, restart: true };
        let imported = dps_gateway::cli::client::Service::connect(&connect).and_then(|s| dps_gateway::cli::import(&s, &opts));
        match imported {
            Ok(r) if r.failed.is_empty() => println!("Created {} enrollments and groups from {}.", r.written, file.display()),
            Ok(r) => tracing::warn!(refused = r.failed.len(), first = %r.failed[0], "some enrollments were refused"),
            Err(e) => {
                let _ = running.shutdown();
                cleanup(&dir);
                exit(&format!("cannot create the enrollments of {}: {e}", file.display()));
            }
        }
    }
    let e = &running.endpoint;
    println!("Device provisioning service is running.");
    println!("  ID scope:                   {}", e.id_scope);
    println!("  Global device endpoint:     {}", e.host_name);
    println!("  Service connection string:  {}", e.masked_connection_string());
    if let Some(ca) = &e.ca_certificate {
        println!("  CA certificate:             {}", ca.display());
    }
    println!("  MQTT port (devices):        {}", e.ports.mqtt);
    println!("  AMQP port (devices):        {}", e.ports.amqp);
    println!("  HTTPS port (service API):   {}", e.ports.https);
    println!("  Metrics:                    http://127.0.0.1:{}/metrics", e.ports.admin);
    println!("  Web console:                https://127.0.0.1:{}/ (log in with the connection string's policy and key)", e.ports.console);
    println!("  Details in {}", dir.join("endpoint.json").display());
    if ephemeral {
        println!("  Ephemeral: this data dir is removed on exit.");
    }
    let mut signals = signals;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down");
    }
    let stopped = running.shutdown();
    cleanup(&dir);
    if let Err(e) = stopped {
        exit(&e);
    }
}

/// The management commands: a client of the service API. Exit status 1 with the DPS error
/// (status, errorCode, message) on stderr when the service refuses.
fn manage(command: Command, connect: &dps_gateway::cli::client::ConnectOpts, out: &dps_gateway::cli::output::OutputOpts) -> ! {
    use dps_gateway::cli::{self, client::Service};
    let service = || Service::connect(connect);
    let done = match command {
        Command::Serve { .. } | Command::RotateDataKey { .. } => Ok(()),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "dps", &mut std::io::stdout());
            Ok(())
        }
        Command::Enrollment { cmd } => service().and_then(|s| cli::enrollment(&s, cmd, out)),
        Command::EnrollmentGroup { cmd } => {
            // compute-device-key with --key needs no service.
            let s = service().ok();
            cli::group(s.as_ref(), cmd, out)
        }
        Command::Registration { cmd } => service().and_then(|s| cli::registration(&s, cmd, out)),
        Command::LinkedHub { cmd } => service().and_then(|s| cli::linked_hub(&s, cmd, out)),
        Command::Certificate { cmd } => service().and_then(|s| cli::certificate(&s, cmd, out)),
        Command::Export { file } => service().and_then(|s| cli::export(&s, file)).map(|n| eprintln!("exported {n} records")),
        Command::Import(o) => service().and_then(|s| cli::import(&s, &o)).and_then(|r| {
            eprintln!("imported {} records ({} skipped as done before)", r.written, r.skipped);
            match r.failed.first() {
                None => Ok(()),
                Some(first) => {
                    Err(dps_gateway::cli::client::CliError::local(format!("{} records refused; the first: {first}", r.failed.len())))
                }
            }
        }),
    };
    match done {
        Ok(()) => std::process::exit(0),
        Err(e) => exit(&e.to_string()),
    }
}

fn rotate(dir: &std::path::Path) -> ! {
    match dps_gateway::bootstrap::rotate_data_key(dir, std::env::var("DPS_DATA_KEY").ok()) {
        Ok(r) => {
            println!("Re-sealed {} stored values under the new data key.", r.resealed);
            if r.from_env {
                println!("DPS_DATA_KEY can now hold the new (first) key alone.");
            } else {
                println!("{} holds the new key only.", dir.join(dps_gateway::bootstrap::DATA_KEY_FILE).display());
            }
            std::process::exit(0)
        }
        Err(e) => exit(&e),
    }
}

fn exit(msg: &str) -> ! {
    eprintln!("dps: {msg}");
    std::process::exit(1)
}
