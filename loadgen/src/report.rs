//! A run's result: rate, latency quantiles and errors by kind, as a Markdown table and as JSON
//! with the git revision, the machine and the settings.

use crate::run::Plan;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::time::Duration;

pub struct Report {
    pub plan: Plan,
    pub seconds: f64,
    pub assigned: u64,
    pub hist: Histogram<u64>,
    /// Failures by kind (`status 401 errorCode 401002`, `Tls`, `Timeout`, …).
    pub errors: BTreeMap<String, usize>,
}

impl Report {
    pub fn new(plan: &Plan, elapsed: Duration, hist: Histogram<u64>, errors: BTreeMap<String, usize>) -> Report {
        Report { plan: plan.clone(), seconds: elapsed.as_secs_f64(), assigned: hist.len(), hist, errors }
    }

    /// Adds a later run of the same kind (its devices, time, latencies and errors), as if the
    /// two had run back to back.
    pub fn absorb(&mut self, other: &Report) -> Result<(), hdrhistogram::AdditionError> {
        self.hist.add(&other.hist)?;
        self.plan.devices += other.plan.devices;
        self.seconds += other.seconds;
        self.assigned += other.assigned;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        Ok(())
    }

    /// Successful sessions per second over the whole run.
    pub fn per_second(&self) -> f64 {
        self.assigned as f64 / self.seconds.max(1e-9)
    }

    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn error_count(&self) -> usize {
        self.errors.values().sum()
    }

    pub fn describe(&self) -> String {
        let p = &self.plan;
        let load = match p.rate {
            Some(r) => format!("open loop at {r:.0} devices/s (at most {} in flight)", p.concurrency),
            None => format!("closed loop, {} in flight", p.concurrency),
        };
        let tls = if p.resume { "TLS session resumed per device" } else { "new full TLS handshake per device" };
        format!("{}: {} devices, {load}, {tls}", p.transport.name(), p.devices)
    }

    pub const HEADER: &'static str =
        "| run | sessions/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | ok | errors |\n|---|---|---|---|---|---|---|---|---|";

    pub fn row(&self, label: &str) -> String {
        format!(
            "| {label} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            self.per_second(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.hist.max() as f64 / 1000.0,
            self.assigned,
            self.error_count()
        )
    }

    pub fn json(&self) -> serde_json::Value {
        let p = &self.plan;
        serde_json::json!({
            "revision": git_revision(),
            "machine": machine(),
            "settings": {"transport": p.transport.name(), "devices": p.devices, "concurrency": p.concurrency,
                "rate": p.rate, "tls_resumption": p.resume, "timeout_s": p.timeout.as_secs_f64()},
            "seconds": self.seconds,
            "sessions_per_s": self.per_second(),
            "latency_ms": {"p50": self.ms(0.5), "p90": self.ms(0.9), "p99": self.ms(0.99), "p999": self.ms(0.999),
                "max": self.hist.max() as f64 / 1000.0},
            "ok": self.assigned,
            "errors": self.errors,
        })
    }
}

/// `git rev-parse --short HEAD` where loadgen runs, or "unknown".
pub fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Host name, CPU model, cores, memory and kernel.
pub fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("").trim().to_string();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    serde_json::json!({
        "hostname": read("/proc/sys/kernel/hostname").trim(),
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_kib as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Transport;

    fn part(devices: usize, secs: u64, latencies_us: &[u64], errors: &[(&str, usize)]) -> Report {
        let plan = Plan {
            transport: Transport::Mqtt,
            devices,
            concurrency: 8,
            rate: None,
            resume: false,
            timeout: Duration::from_secs(60),
            progress: None,
        };
        let mut hist = Histogram::new(3).unwrap();
        for l in latencies_us {
            hist.record(*l).unwrap();
        }
        Report::new(&plan, Duration::from_secs(secs), hist, errors.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    /// Two parts of a run measured in turns add up as if they had run back to back: the rate
    /// is all sessions over all the time, not the mean of the parts' rates.
    #[test]
    fn parts_absorbed_count_as_one_run() {
        let mut total = part(3, 1, &[1_000, 2_000, 3_000], &[("Tls", 1)]);
        total.absorb(&part(5, 3, &[10_000, 20_000], &[("Tls", 2), ("Timeout", 1)])).unwrap();
        assert_eq!(total.assigned, 5);
        assert_eq!(total.plan.devices, 8);
        assert!((total.per_second() - 5.0 / 4.0).abs() < 1e-9);
        assert_eq!(total.errors.get("Tls"), Some(&3));
        assert_eq!(total.errors.get("Timeout"), Some(&1));
        assert_eq!(total.error_count(), 4);
        assert!(total.ms(1.0) >= 19.9, "the slowest part's latencies are in: {}", total.ms(1.0));
    }
}
