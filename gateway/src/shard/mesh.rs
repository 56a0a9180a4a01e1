//! Request/reply between shards over glommio's channel mesh: a shard calls a peer with a
//! request and awaits its answer; each shard serves the calls it receives with one handler.
//! Shards share nothing else, so every cross-shard need (the enrollment cache partitions,
//! metrics scrapes) is a request type here, not a channel of its own.

use futures::channel::oneshot;
use futures::future::LocalBoxFuture;
use glommio::channels::channel_mesh::{Receivers, Senders};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// What travels on the mesh: a call, or the answer to one.
pub enum Envelope<Q, A> {
    Call { from: usize, id: u64, body: Q },
    Reply { id: u64, body: A },
}

/// This shard's ends of the mesh, once joined.
pub type Joined<Q, A> = (Senders<Envelope<Q, A>>, Receivers<Envelope<Q, A>>);

/// The handler a shard serves its peers' calls with.
pub type Serve<Q, A> = Rc<dyn Fn(Q) -> LocalBoxFuture<'static, A>>;

/// The peer could not be reached (it stopped, or the mesh is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable;

pub struct Mesh<Q: Send + 'static, A: Send + 'static> {
    me: usize,
    peers: usize,
    senders: Option<Senders<Envelope<Q, A>>>,
    next_id: Cell<u64>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<A>>>,
}

impl<Q: Send + 'static, A: Send + 'static> Mesh<Q, A> {
    /// Joins the mesh (None with a single shard, where every call is local) and serves the calls
    /// this shard receives with `serve`.
    pub fn start(joined: Option<Joined<Q, A>>, serve: Serve<Q, A>) -> Rc<Mesh<Q, A>> {
        let (me, peers, senders, receivers) = match joined {
            Some((s, r)) => (s.peer_id(), s.nr_consumers(), Some(s), Some(r)),
            None => (0, 1, None, None),
        };
        let mesh = Rc::new(Mesh { me, peers, senders, next_id: Cell::new(0), waiting: RefCell::new(HashMap::new()) });
        if let Some(mut r) = receivers {
            for (_, stream) in r.streams() {
                let (mesh, serve) = (Rc::downgrade(&mesh), serve.clone());
                glommio::spawn_local(async move {
                    while let Some(envelope) = stream.recv().await {
                        let Some(mesh) = mesh.upgrade() else { return };
                        mesh.receive(envelope, &serve);
                    }
                })
                .detach();
            }
        }
        mesh
    }

    pub fn me(&self) -> usize {
        self.me
    }

    pub fn peers(&self) -> usize {
        self.peers
    }

    /// Calls still waiting for their answer (a metric of cross-shard pressure).
    pub fn pending(&self) -> usize {
        self.waiting.borrow().len()
    }

    /// Sends `body` to `peer` and waits for its answer. Not for `peer == me`: the caller serves
    /// its own requests directly.
    pub async fn call(&self, peer: usize, body: Q) -> Result<A, Unreachable> {
        let Some(senders) = &self.senders else { return Err(Unreachable) };
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(id, tx);
        if senders.send_to(peer, Envelope::Call { from: self.me, id, body }).await.is_err() {
            self.waiting.borrow_mut().remove(&id);
            return Err(Unreachable);
        }
        rx.await.map_err(|_| Unreachable)
    }

    fn receive(self: Rc<Self>, envelope: Envelope<Q, A>, serve: &Serve<Q, A>) {
        match envelope {
            Envelope::Call { from, id, body } => {
                let answer = serve(body);
                glommio::spawn_local(async move {
                    let body = answer.await;
                    if let Some(s) = &self.senders {
                        let _ = s.send_to(from, Envelope::Reply { id, body }).await;
                    }
                })
                .detach();
            }
            Envelope::Reply { id, body } => {
                if let Some(tx) = self.waiting.borrow_mut().remove(&id) {
                    let _ = tx.send(body);
                }
            }
        }
    }
}
