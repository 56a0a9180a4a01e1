//! A bounded multi-producer, multi-consumer queue whose consumers block on a condition
//! variable and never spin. The store threads used crossbeam channels, whose blocking receive
//! spins and then calls `sched_yield` several times before it parks: at partial load a store
//! thread goes idle after nearly every request, so those yields cost more CPU than the reads
//! (tuning.md, "The park path"). Producers (the shards) never block: a full queue is refused.
//! An idle consumer sleeps until an item comes or the queue is closed ([`Closer`]): it never
//! wakes just to look at a flag.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receivers: usize,
    /// Closed by a [`Closer`]: nothing more is taken, and receivers end once it is empty.
    closed: bool,
    /// Receivers asleep on `ready`: a send wakes one only if there is one (a wake-up is a
    /// system call, and the store writer mostly drains its queue without sleeping on it).
    sleeping: usize,
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
/// Closes the queue without being one of its senders (holding it keeps nothing open).
pub struct Closer<T>(Arc<Shared<T>>);

#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    Full,
    /// Every receiver is gone, or the queue was closed.
    Disconnected,
}

/// Empty, and every sender is gone or the queue was closed.
#[derive(Debug, PartialEq, Eq)]
pub struct RecvError;

pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), senders: 1, receivers: 1, closed: false, sleeping: 0 }),
        ready: Condvar::new(),
        capacity: capacity.max(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    pub fn try_send(&self, item: T) -> Result<(), TrySendError> {
        let mut s = self.0.lock();
        if s.receivers == 0 || s.closed {
            return Err(TrySendError::Disconnected);
        }
        if s.items.len() >= self.0.capacity {
            return Err(TrySendError::Full);
        }
        s.items.push_back(item);
        let wake = s.sleeping > 0;
        drop(s);
        if wake {
            self.0.ready.notify_one();
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.0.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn closer(&self) -> Closer<T> {
        Closer(self.0.clone())
    }
}

impl<T> Closer<T> {
    /// Refuses new items from now on and wakes every receiver: each takes what is queued,
    /// then gets `Disconnected`.
    pub fn close(&self) {
        self.0.lock().closed = true;
        self.0.ready.notify_all();
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
    /// The next item, waiting for it as long as the queue is open.
    pub fn recv(&self) -> Result<T, RecvError> {
        let mut s = self.0.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                return Ok(item);
            }
            if s.senders == 0 || s.closed {
                return Err(RecvError);
            }
            s.sleeping += 1;
            s = self.0.ready.wait(s).unwrap_or_else(|p| p.into_inner());
            s.sleeping -= 1;
        }
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
    use std::time::Duration;

    #[test]
    fn bounded_ordered_and_disconnects() {
        let (tx, rx) = bounded(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        assert_eq!(tx.len(), 2);
        assert_eq!(rx.recv(), Ok(1));
        let mut out = Vec::new();
        assert_eq!(rx.drain_into(&mut out, 10), 1);
        assert_eq!(out, [2]);
        assert_eq!(rx.drain_into(&mut out, 10), 0);
        // A waiting receiver is woken by a send from another thread.
        let tx2 = tx.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx2.try_send(7).unwrap();
        });
        assert_eq!(rx.recv(), Ok(7));
        t.join().unwrap();
        drop(tx);
        assert_eq!(rx.recv(), Err(RecvError));
        let (tx, rx) = bounded::<u8>(1);
        drop(rx);
        assert_eq!(tx.try_send(1), Err(TrySendError::Disconnected));
    }

    /// A send wakes a receiver only when one sleeps: with two asleep (the reader pool), two
    /// sends wake both, and a send while none sleeps is still taken.
    #[test]
    fn sends_wake_each_sleeping_receiver() {
        let (tx, rx) = bounded(8);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let receivers: Vec<_> = (0..2)
            .map(|_| {
                let (rx, done) = (rx.clone(), done_tx.clone());
                std::thread::spawn(move || done.send(rx.recv()).unwrap())
            })
            .collect();
        while rx.0.lock().sleeping < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        // Each receiver reports what it got (a receiver left asleep times this out).
        let mut got: Vec<u8> = (0..2).map(|_| done_rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, [1, 2]);
        for r in receivers {
            r.join().unwrap();
        }
        assert_eq!(rx.0.lock().sleeping, 0);
        tx.try_send(3).unwrap();
        assert_eq!(rx.recv(), Ok(3));
    }

    #[test]
    fn closing_wakes_a_waiting_receiver_after_what_is_queued() {
        let (tx, rx) = bounded(4);
        let closer = tx.closer();
        tx.try_send(1).unwrap();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            // Blocks with no deadline: only the close can end it.
            while let Ok(v) = rx.recv() {
                got.push(v);
            }
            got
        });
        std::thread::sleep(Duration::from_millis(20));
        tx.try_send(2).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        closer.close();
        assert_eq!(t.join().unwrap(), [1, 2]);
        // A closed queue takes nothing more, though a sender is still held.
        assert_eq!(tx.try_send(3), Err(TrySendError::Disconnected));
    }
}
