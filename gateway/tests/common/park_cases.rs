// The cases of `park.rs` and `park_preempt_timers.rs`, included by both with their own
// `PREEMPT_TIMERS` (glommio's switch is process-wide, so each setting needs a test binary).

use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::{LocalExecutorBuilder, Placement};
use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The longest a test may take before the watchdog calls it hung.
const WATCHDOG: Duration = Duration::from_secs(20);
/// The timer every test keeps pending, so the executor sleeps with it armed.
const LONG: Duration = Duration::from_secs(5);

/// Runs `f` on an executor configured as the shards are (with `PREEMPT_TIMERS` as the including
/// test file sets it), and returns its result, or fails after the watchdog.
fn on_shard_executor<T, F>(f: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + 'static,
{
    glommio::use_symmetric_sleep_fences(true);
    glommio::use_preempt_timers(PREEMPT_TIMERS);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let ex = LocalExecutorBuilder::new(Placement::Unbound).make();
        let ex = match ex {
            Ok(ex) => ex,
            Err(e) => panic!("executor: {e}"),
        };
        let out = ex.run(async move {
            // A far timer, pending throughout: every sleep has it armed.
            glommio::spawn_local(glommio::timer::sleep(LONG * 4)).detach();
            f().await
        });
        let _ = tx.send(out);
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(out) => out,
        Err(_) => panic!("the executor did not finish within {WATCHDOG:?}: a wake-up was lost"),
    }
}

#[test]
fn a_timer_earlier_than_the_armed_one_fires_at_its_own_deadline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Another thread sends one byte after 200 ms, while the executor sleeps with LONG armed.
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
    });
    let short = on_shard_executor(move || async move {
        glommio::spawn_local(glommio::timer::sleep(LONG)).detach();
        let mut s = glommio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("read");
        // Woken by the socket; now a timer earlier than the armed one.
        let start = Instant::now();
        glommio::timer::sleep(Duration::from_millis(50)).await;
        let waited = start.elapsed();
        s.write_all(b"y").await.expect("write");
        waited
    });
    peer.join().expect("peer");
    assert!(short >= Duration::from_millis(50), "the timer fired early: {short:?}");
    assert!(short < LONG / 2, "a 50 ms timer registered under an armed {LONG:?} one took {short:?}");
}

#[test]
fn a_sleeping_executor_is_woken_by_another_thread() {
    // As the store threads answer a shard: a futures channel whose waker is called from a plain
    // thread (glommio's foreign wake-up, its eventfd).
    let (sender, mut receiver) = futures::channel::mpsc::unbounded::<u32>();
    let producer = std::thread::spawn(move || {
        for i in 0..20u32 {
            std::thread::sleep(Duration::from_millis(20));
            sender.unbounded_send(i).expect("send");
        }
    });
    let (got, took) = on_shard_executor(move || async move {
        use futures::StreamExt;
        glommio::spawn_local(glommio::timer::sleep(LONG)).detach();
        let start = Instant::now();
        let mut got = Vec::new();
        while let Some(i) = receiver.next().await {
            got.push(i);
        }
        (got, start.elapsed())
    });
    producer.join().expect("producer");
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    assert!(took < LONG, "20 messages 20 ms apart took {took:?}");
}

#[test]
fn timers_alone_wake_a_sleeping_executor_again_and_again() {
    // Each expiry completes the linked poll; the next sleep must arm a new one, or the executor
    // sleeps through the following timers until the far one.
    let ticks = on_shard_executor(|| async {
        let start = Instant::now();
        let mut ticks = 0u32;
        while start.elapsed() < Duration::from_millis(500) {
            glommio::timer::sleep(Duration::from_millis(5)).await;
            ticks += 1;
        }
        ticks
    });
    assert!(ticks >= 20, "only {ticks} 5 ms timers fired in 500 ms");
}
