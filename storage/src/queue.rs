//! A bounded multi-producer, multi-consumer queue whose consumers block on a condition
//! variable and never spin. The store threads used crossbeam channels, whose blocking receive
//! spins and then calls `sched_yield` several times before it parks: at partial load a store
//! thread goes idle after nearly every request, so those yields cost more CPU than the reads
//! (tuning.md, "The park path"). Producers (the shards) never block: a full queue is refused.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receivers: usize,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding this lock leaves a consistent queue (every change is one
        // push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Sender<T>(Arc<Shared<T>>);
pub struct Receiver<T>(Arc<Shared<T>>);

#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    Full,
    /// Every receiver is gone.
    Disconnected,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RecvError {
    Timeout,
    /// Empty and every sender is gone.
    Disconnected,
}

pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), senders: 1, receivers: 1 }),
        ready: Condvar::new(),
        capacity: capacity.max(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    pub fn try_send(&self, item: T) -> Result<(), TrySendError> {
        let mut s = self.0.lock();
        if s.receivers == 0 {
            return Err(TrySendError::Disconnected);
        }
        if s.items.len() >= self.0.capacity {
            return Err(TrySendError::Full);
        }
        s.items.push_back(item);
        drop(s);
        self.0.ready.notify_one();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.0.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.lock().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.senders -= 1;
        if s.senders == 0 {
            drop(s);
            self.0.ready.notify_all();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting until `deadline` at most.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvError> {
        let mut s = self.0.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                return Ok(item);
            }
            if s.senders == 0 {
                return Err(RecvError::Disconnected);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                return Err(RecvError::Timeout);
            };
            s = self.0.ready.wait_timeout(s, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvError> {
        self.recv_deadline(Instant::now() + timeout)
    }

    /// Moves up to `max` waiting items into `out` without waiting; how many.
    pub fn drain_into(&self, out: &mut Vec<T>, max: usize) -> usize {
        let mut s = self.0.lock();
        let n = s.items.len().min(max);
        out.extend(s.items.drain(..n));
        n
    }
}

impl<T> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.0.lock().receivers += 1;
        Receiver(self.0.clone())
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.lock().receivers -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_ordered_and_disconnects() {
        let (tx, rx) = bounded(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        assert_eq!(tx.len(), 2);
        assert_eq!(rx.recv_timeout(Duration::ZERO), Ok(1));
        let mut out = Vec::new();
        assert_eq!(rx.drain_into(&mut out, 10), 1);
        assert_eq!(out, [2]);
        assert_eq!(rx.recv_timeout(Duration::from_millis(10)), Err(RecvError::Timeout));
        // A waiting receiver is woken by a send from another thread.
        let tx2 = tx.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx2.try_send(7).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(7));
        t.join().unwrap();
        drop(tx);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Err(RecvError::Disconnected));
        let (tx, rx) = bounded::<u8>(1);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(TrySendError::Disconnected));
    }
}
