//! Light load on one shard. The kernel spreads new connections over the shards' listeners
//! (SO_REUSEPORT, by a hash of the addresses), which is right under load and wasteful below
//! it: at light load each of two shards parks and wakes for most registrations it gets,
//! where one shard would more often find the next connection ready before it parks. So
//! while the shards together are lightly busy (tuning.md, "Light load on one shard": fewer
//! sleeps per registration at every rate, ~4 % less CPU at 500–750/s), a classic BPF program
//! on the listeners' reuseport groups sends every new connection to shard 0; once shard 0
//! gets busy, or holds many connections, a program that picks no listener hands the choice
//! back to the kernel's hash. Connections already accepted stay where they are.
//!
//! The decision ([`decide`]) is made every [`PERIOD`] on shard 0 from each shard's thread CPU
//! time; shard 0's accept loops apply it to their listeners (one program serves a whole
//! group) when they next accept, so no task outlives the listener it changes.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// How often shard 0 measures the shards' CPU.
pub const PERIOD: Duration = Duration::from_millis(250);

/// Steer to shard 0 while all shards together use less than this share of one core...
const STEER_BELOW: f64 = 0.35;
/// ...and spread again once shard 0 alone uses more than this. Between the two, the state
/// holds: a load that moves onto one shard costs that shard about what it cost all of them.
const SPREAD_ABOVE: f64 = 0.6;
/// Spread at once, whatever the last measurement said, when shard 0 holds this many
/// connections: a burst (the benchmark's 256 in flight, a fleet powering on) reaches every
/// shard within its first connections instead of after a measurement period. Lower when a
/// connection limit is lower ([`Steering::new`]).
pub const SPREAD_AT_CONNECTIONS: usize = 64;

/// No clock id (clock ids are `clockid_t`, 32 bits).
const UNSET: i64 = i64::MIN;

/// What the shards share: each one's CPU clock, and shard 0's last decision.
pub struct Steering {
    /// `pthread_getcpuclockid` of each shard's thread (a negative number: the kernel encodes
    /// thread clocks so); [`UNSET`] until the shard has started.
    clocks: Vec<AtomicI64>,
    light: AtomicBool,
    enabled: bool,
    spread_at: usize,
}

impl Steering {
    /// `enabled`: `limits.steer_light_load`, and more than one shard. `limits`: the shard's
    /// connection limit and one source's share of a shard (0: none): shard 0 spreads before
    /// it would refuse a connection that another shard could take.
    pub fn new(shards: usize, enabled: bool, limits: &[usize]) -> Steering {
        let spread_at = limits.iter().filter(|l| **l > 0).fold(SPREAD_AT_CONNECTIONS, |a, l| a.min(*l));
        Steering {
            clocks: (0..shards).map(|_| AtomicI64::new(UNSET)).collect(),
            light: AtomicBool::new(true),
            enabled: enabled && shards > 1,
            spread_at,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Called on the shard's own thread as it starts.
    pub fn register_this_thread(&self, shard: usize) {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self() is this live thread; `clock` is a valid place for the id.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        if let (0, Some(slot)) = (rc, self.clocks.get(shard)) {
            slot.store(i64::from(clock), Ordering::Relaxed);
        }
    }

    /// CPU time (ns) each shard's thread has used so far; 0 for one not started or gone.
    pub fn cpu_nanos(&self) -> Vec<u64> {
        self.clocks
            .iter()
            .map(|c| {
                let id = c.load(Ordering::Relaxed);
                if id == UNSET {
                    return 0;
                }
                let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: `ts` is a valid timespec for the call; an id whose thread has
                // ended makes the call fail (EINVAL), which reads as 0.
                #[allow(unsafe_code)]
                let rc = unsafe { libc::clock_gettime(id as libc::clockid_t, &mut ts) };
                if rc == 0 {
                    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
                } else {
                    0
                }
            })
            .collect()
    }

    /// Shard 0's last decision: the shards are lightly busy.
    pub fn light(&self) -> bool {
        self.light.load(Ordering::Relaxed)
    }

    pub fn set_light(&self, light: bool) {
        self.light.store(light, Ordering::Relaxed);
    }

    /// Whether new connections should go to shard 0, as shard 0 holding `open` connections
    /// sees it.
    pub fn steer(&self, open: usize) -> bool {
        self.enabled && self.light() && open < self.spread_at
    }
}

/// The next state from the last one and each shard's busy share of a core over the period
/// (shard 0 first).
pub fn decide(steering: bool, busy: &[f64]) -> bool {
    let first = busy.first().copied().unwrap_or(0.0);
    if steering {
        first <= SPREAD_ABOVE
    } else {
        busy.iter().sum::<f64>() < STEER_BELOW
    }
}

/// Each shard's busy share of a core between two readings `period_ns` apart.
pub fn busy(before: &[u64], after: &[u64], period_ns: u64) -> Vec<f64> {
    before.iter().zip(after).map(|(b, a)| a.saturating_sub(*b) as f64 / period_ns.max(1) as f64).collect()
}

/// Attaches to a listener's reuseport group a classic BPF program that returns `index`: the
/// group's listener at that index (in the order they began listening; shard 0's, first, is 0) takes each
/// new connection, and an index past the group's end leaves the choice to the kernel's hash.
pub fn attach(listener: std::os::fd::RawFd, index: u32) -> std::io::Result<()> {
    // One instruction: BPF_RET | BPF_K, returning the constant.
    let mut program = [libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: index }];
    // `program` outlives the call, which copies it into the kernel.
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
    super::set_socket_option(listener, libc::SOL_SOCKET, libc::SO_ATTACH_REUSEPORT_CBPF, &fprog)
}

/// The index [`attach`] is given to spread: past any group's end.
pub const SPREAD: u32 = u32::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn light_load_steers_and_a_busy_first_shard_spreads_with_hysteresis() {
        // Spread: steer once all shards together are lightly busy.
        assert!(decide(false, &[0.1, 0.1]));
        assert!(!decide(false, &[0.3, 0.3]), "0.6 of a core in all is not light");
        // Steered: hold while shard 0 copes, even above the steering line...
        assert!(decide(true, &[0.6, 0.0]));
        // ...and spread once it is busy.
        assert!(!decide(true, &[0.8, 0.0]));
        // Shard 1's long-lived connections do not count against steering new ones.
        assert!(decide(true, &[0.5, 0.4]));
        assert!(decide(false, &[]), "no measurement: nothing is busy");
    }

    #[test]
    fn busy_is_cpu_over_wall_time_per_shard() {
        let b = busy(&[1_000, 5_000], &[126_000, 5_000], 250_000);
        assert_eq!(b, vec![0.5, 0.0]);
        // A clock that reads 0 (thread gone) after a value is no negative load.
        assert_eq!(busy(&[9], &[0], 10), vec![0.0]);
    }

    #[test]
    fn many_connections_on_shard_0_spread_whatever_the_cpu() {
        let s = Steering::new(2, true, &[50_000, 500]);
        s.set_light(true);
        assert!(s.steer(0));
        assert!(!s.steer(SPREAD_AT_CONNECTIONS));
        assert!(!Steering::new(1, true, &[]).steer(0), "one shard: nothing to steer");
        // A source may hold 5 connections per shard: shard 0 spreads at 5, before refusing.
        let small = Steering::new(2, true, &[50_000, 5, 0]);
        assert!(small.steer(4) && !small.steer(5));
        let off = Steering::new(2, false, &[]);
        off.set_light(true);
        assert!(!off.steer(0), "turned off");
    }

    #[test]
    fn a_thread_cpu_clock_reads_this_threads_work() {
        let s = Steering::new(2, true, &[]);
        s.register_this_thread(0);
        let before = s.cpu_nanos();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = s.cpu_nanos();
        assert!(after[0] > before[0] + 5_000_000, "{before:?} -> {after:?}");
        assert_eq!(after[1], 0, "shard 1 never registered");
    }
}
