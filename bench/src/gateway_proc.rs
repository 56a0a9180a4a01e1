//! The gateway under test in a child process (this binary re-run with `serve-gateway`), so its
//! memory (peak RSS) and CPU are its own, apart from the load generator's.

use crate::BoxError;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The configuration every benchmark gateway runs with: loopback, ephemeral ports, two linked
/// hubs (registry-only), no service or device rate limits.
pub fn config(shards: usize, handshake_only: bool) -> dps_gateway::config::Config {
    let mut c = dps_gateway::config::Config::loopback();
    c.shards = shards;
    c.handshake_only = handshake_only;
    c.limits.service_operations_per_minute = 0;
    c.limits.hub_latency_refresh_secs = 0;
    c.limits.max_connections_per_shard = 100_000;
    c.limits.max_registrations = 2_000_000;
    // Experiments with the park path (tuning.md): DPS_BENCH_SPIN_US=200.
    c.limits.spin_before_park_us = std::env::var("DPS_BENCH_SPIN_US").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    // DPS_BENCH_FENCES=0: glommio's membarrier at each park, as upstream (tuning.md).
    c.limits.park_with_fences = std::env::var("DPS_BENCH_FENCES").map_or(true, |v| v != "0");
    // DPS_BENCH_PREEMPT_TIMERS=1: glommio's preemption timers armed on every pass, as upstream.
    c.limits.preempt_timers = std::env::var("DPS_BENCH_PREEMPT_TIMERS").is_ok_and(|v| v == "1");
    // DPS_BENCH_STEER=0: new connections always spread by the kernel, light load or not.
    c.limits.steer_light_load = std::env::var("DPS_BENCH_STEER").map_or(true, |v| v != "0");
    // DPS_BENCH_LINGER_US=300: the store writer waits that long for more writes per group.
    if let Some(us) = std::env::var("DPS_BENCH_LINGER_US").ok().and_then(|v| v.parse().ok()) {
        c.store.linger_us = us;
    }
    for h in ["hub-a.example.net", "hub-b.example.net"] {
        c.linked_hubs.push(dps_gateway::config::HubConfig {
            host_name: h.into(),
            connection_string: format!(
                "HostName={h};SharedAccessKeyName=iothubowner;SharedAccessKey=YmVuY2gta2V5LWJlbmNoLWtleS1iZW5jaC1rZXk="
            ),
            ..Default::default()
        });
    }
    c
}

/// Child side: runs the gateway until stdin closes.
pub fn serve(dir: &Path, shards: usize, handshake_only: bool) -> Result<(), BoxError> {
    let running = dps_gateway::start(config(shards, handshake_only), dir)?;
    println!("ready");
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
    running.shutdown()?;
    Ok(())
}

/// CPU time (user + system, all threads) a process has used so far.
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(stat_cpu_ticks(&stat).unwrap_or(0) * 10)
}

/// utime + stime (clock ticks) from a `/proc/PID/stat` line. Fields are counted by position
/// after the command name (which may hold spaces and parentheses, hence the last `)`): state is
/// field 3, utime 14 and stime 15. Not by picking the numbers out: `tpgid` (field 8) is -1 for
/// a process without a terminal, and skipping it once shifted every later field by one, so
/// the benchmark reported stime + cutime and left out all user time.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(field(14)? + field(15)?)
}

/// Times the process's threads went to sleep of their own accord so far (the sum of each
/// thread's `voluntary_ctxt_switches`): each is a park or a blocking wait, and a wake-up later.
/// Threads that ended are not counted, so take it around a run of a server whose threads live.
pub fn process_sleeps(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|status| status_number(&status, "voluntary_ctxt_switches:"))
        .sum()
}

/// The number on a `/proc/.../status` line that starts with `field` (a unit after it, such as
/// VmHWM's `kB`, is left out).
pub fn status_number(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok())
}

pub struct Gateway {
    child: Child,
    stdin: Option<ChildStdin>,
    pub endpoint: PathBuf,
    /// From spawning the process to its listeners being bound and endpoint.json written.
    pub startup: Duration,
}

impl Gateway {
    pub fn start(dir: &Path, shards: usize, handshake_only: bool) -> Result<Gateway, BoxError> {
        let endpoint = dir.join("endpoint.json");
        let _ = std::fs::remove_file(&endpoint);
        let t = Instant::now();
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("serve-gateway").arg(dir).arg(shards.to_string());
        if handshake_only {
            cmd.arg("handshake-only");
        }
        let mut child = cmd.env("DPS_LOG", "warn").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        match lines.next() {
            Some(Ok(l)) if l == "ready" => {}
            other => {
                let _ = child.kill();
                return Err(format!("the gateway did not start: {other:?}").into());
            }
        }
        Ok(Gateway { child, stdin, endpoint, startup: t.elapsed() })
    }

    /// Peak resident memory so far (VmHWM), bytes.
    pub fn peak_rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| status_number(&s, "VmHWM:"))
            .map_or(0, |kib| kib * 1024)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes its stdin (it shuts down cleanly, flushing the store) and waits.
    pub fn stop(mut self) -> Result<(), BoxError> {
        drop(self.stdin.take());
        let st = self.child.wait()?;
        if !st.success() {
            return Err(format!("the gateway exited with {st}").into());
        }
        Ok(())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utime_and_stime_are_read_by_position() {
        // A daemon's line: no terminal, so tty_nr 0 and tpgid -1; utime 1234, stime 56, cutime 7.
        let line = "4242 (dps (shard) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 56 7 0 20 0 5 0 100 0 0";
        assert_eq!(stat_cpu_ticks(line), Some(1234 + 56));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_numbers_are_read_from_their_own_line() {
        let status = "Name:\tshard-0-1\nvoluntary_ctxt_switches:\t4711\nnonvoluntary_ctxt_switches:\t12\n";
        assert_eq!(status_number(status, "voluntary_ctxt_switches:"), Some(4711));
        assert_eq!(status_number("VmHWM:\t  306176 kB\n", "VmHWM:"), Some(306176));
        assert_eq!(status_number("Name:\tx\n", "voluntary_ctxt_switches:"), None);
    }

    #[test]
    fn a_thread_that_sleeps_is_counted() {
        let (own, all) = std::thread::spawn(|| {
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            // Read while the thread lives; other test threads may come and go meanwhile, so
            // the process's sum is compared with this thread's own count, not with an earlier sum.
            let own = std::fs::read_to_string("/proc/thread-self/status").ok().and_then(|s| status_number(&s, "voluntary_ctxt_switches:"));
            (own, process_sleeps(std::process::id()))
        })
        .join()
        .unwrap();
        let own = own.unwrap();
        assert!(own >= 20, "20 sleeps, {own} counted");
        assert!(all >= own, "the process's sum {all} leaves out the thread's {own}");
    }

    #[test]
    fn a_process_busy_in_user_space_shows_its_user_time() {
        // This thread's own CPU time (ticks), from the same parser: spinning until it reaches
        // 300 ms measures the work done, not the wall time, so other processes on the cores
        // (tests run side by side) cannot make the spin look short.
        let thread_ticks = || stat_cpu_ticks(&std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default()).unwrap_or(0);
        let before = process_cpu(std::process::id());
        let (start, wall) = (thread_ticks(), std::time::Instant::now());
        let mut x = 0u64;
        // The wall-clock cap ends the spin when the parser sees no user time at all.
        while thread_ticks() < start + 30 && wall.elapsed() < Duration::from_secs(10) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        let spent = process_cpu(std::process::id()) - before;
        // Nearly all of it is user time; a parser that reads only stime sees ~0.
        assert!(spent >= Duration::from_millis(250), "{spent:?} of CPU counted for 300 ms of this thread's spinning");
    }
}
