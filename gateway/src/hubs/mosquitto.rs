//! The `mosquitto` connector: a Mosquitto 2 broker as the hub, managed through its
//! dynamic-security plugin (the commands are built and read in `dps_core::hub::dynsec`). Each
//! step is one short MQTT 3.1.1 session as the hub's admin client: subscribe to the response
//! topic, publish the command message (and the device's retained desired properties), wait for
//! the answers carrying this message's correlation data, disconnect. A connection per step
//! costs about a millisecond on a LAN; the broker itself spends far more, since every
//! dynamic-security change rewrites its whole JSON file.

use bytes::BytesMut;
use dps_core::hub::dynsec::{self, Command};
use dps_core::hub::{ControlUrl, HubConnector, HubError, HubTask, Twin};
use dps_core::model::LinkedHub;
use mqttbytes::v4::{self, Connect, ConnectReturnCode, Packet, Publish, Subscribe, SubscribeReasonCode};
use mqttbytes::QoS;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one step may take, connect to last answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest packet accepted from the broker (dynamic-security answers are small; a retained
/// message on the response topic could be anything).
const MAX_PACKET: usize = 1 << 20;

static SESSIONS: AtomicU64 = AtomicU64::new(0);

pub struct MosquittoHub {
    url: ControlUrl,
    username: String,
    password: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Unique per process start, so correlation data never collides with another node's.
    instance: u32,
}

impl MosquittoHub {
    pub fn new(hub: &LinkedHub, instance: u32) -> Result<MosquittoHub, HubError> {
        let refused = |m: &str| HubError::Refused(format!("hub {}: {m}", hub.name));
        let url = ControlUrl::parse(hub.control_url.as_deref().unwrap_or_default()).ok_or_else(|| refused("bad controlUrl"))?;
        let tls = match url.tls {
            true => Some(Arc::new(crate::tls::client_config(hub.ca_cert.as_deref()).map_err(|e| refused(&e))?)),
            false => None,
        };
        Ok(MosquittoHub {
            url,
            username: hub.username.clone().unwrap_or_default(),
            password: hub.password.clone().unwrap_or_default(),
            tls,
            instance,
        })
    }

    /// One admin session: the commands, then (optionally) a retained message; the answers once
    /// the broker answered every command (each as wanted) and acknowledged the message.
    fn step(&self, commands: &[Command], retained: Option<(String, Vec<u8>)>) -> Result<Vec<dynsec::Answer>, HubError> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let session = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let client_id = format!("dps-{:08x}-{session}", self.instance);
        let mut conn = self.connect(deadline)?;
        let mut connect = Connect::new(client_id.as_str());
        connect.keep_alive = 30;
        connect.set_login(self.username.clone(), self.password.clone());
        conn.send(|b| connect.write(b))?;
        match conn.next(deadline)? {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => {}
            Packet::ConnAck(a) => return Err(HubError::Refused(format!("the broker refused the admin login: {:?}", a.code))),
            other => return Err(unexpected(&other)),
        }
        let mut sub = Subscribe::new(dynsec::RESPONSE_TOPIC, QoS::AtMostOnce);
        sub.pkid = 1;
        conn.send(|b| sub.write(b))?;
        match conn.next(deadline)? {
            Packet::SubAck(a) if a.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_))) => {}
            Packet::SubAck(_) => return Err(HubError::Refused("the admin client may not read dynamic-security answers".into())),
            other => return Err(unexpected(&other)),
        }
        let prefix = client_id;
        if !commands.is_empty() {
            let publish = Publish::new(dynsec::CONTROL_TOPIC, QoS::AtMostOnce, dynsec::message(commands, &prefix));
            conn.send(|b| publish.write(b))?;
        }
        let mut acked = true;
        if let Some((topic, payload)) = retained {
            let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
            p.retain = true;
            p.pkid = 2;
            conn.send(|b| p.write(b))?;
            acked = false;
        }
        let mut answered = commands.is_empty();
        let mut answers = Vec::new();
        while !(answered && acked) {
            match conn.next(deadline)? {
                Packet::Publish(p) if p.topic == dynsec::RESPONSE_TOPIC => {
                    let mine: Vec<_> =
                        dynsec::answers(&p.payload).into_iter().filter(|a| dynsec::prefix_of(&a.correlation) == prefix).collect();
                    if !mine.is_empty() {
                        answers = mine;
                        answered = true;
                    }
                }
                Packet::PubAck(a) if a.pkid == 2 => acked = true,
                Packet::PingResp | Packet::Publish(_) => {}
                other => return Err(unexpected(&other)),
            }
        }
        let _ = conn.send(|b| v4::Disconnect.write(b));
        dynsec::check(commands, &prefix, &answers)?;
        Ok(answers)
    }

    fn connect(&self, deadline: Instant) -> Result<Conn, HubError> {
        let unreachable = |e: std::io::Error| HubError::Transient(format!("{}:{}: {e}", self.url.host, self.url.port));
        let addr = (self.url.host.as_str(), self.url.port)
            .to_socket_addrs()
            .map_err(unreachable)?
            .next()
            .ok_or_else(|| HubError::Transient(format!("{} does not resolve", self.url.host)))?;
        let tcp = TcpStream::connect_timeout(&addr, remaining(deadline)?).map_err(unreachable)?;
        tcp.set_nodelay(true).map_err(unreachable)?;
        tcp.set_read_timeout(Some(Duration::from_millis(250))).map_err(unreachable)?;
        tcp.set_write_timeout(Some(STEP_TIMEOUT)).map_err(unreachable)?;
        let io: Box<dyn ReadWrite> = match &self.tls {
            None => Box::new(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(self.url.host.clone())
                    .map_err(|_| HubError::Refused(format!("'{}' is not a TLS server name", self.url.host)))?;
                let c = rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| HubError::Refused(e.to_string()))?;
                Box::new(rustls::StreamOwned::new(c, tcp))
            }
        };
        Ok(Conn { io, buf: BytesMut::with_capacity(4096), addr })
    }
}

fn remaining(deadline: Instant) -> Result<Duration, HubError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| HubError::Transient("the broker did not answer in time".into()))
}

fn unexpected(p: &Packet) -> HubError {
    HubError::Transient(format!("unexpected packet from the broker: {p:?}"))
}

/// The desired properties as the retained message a device reads (empty: none, which clears
/// a retained message left by an earlier assignment).
fn desired_payload(twin: &Twin) -> Vec<u8> {
    twin.desired.as_ref().map(|d| d.to_string().into_bytes()).unwrap_or_default()
}

impl HubConnector for MosquittoHub {
    fn assign(&self, task: &HubTask) -> Result<(), HubError> {
        let retained = task.twin.as_ref().map(|t| (dynsec::desired_topic(&task.device_id), desired_payload(t)));
        let answers = self.step(&dynsec::create(task)?, retained)?;
        if dynsec::client_existed(&answers) {
            self.step(&dynsec::update(task)?, None)?;
        }
        Ok(())
    }

    fn remove(&self, device_id: &str) -> Result<(), HubError> {
        self.step(&dynsec::remove(device_id)?, Some((dynsec::desired_topic(device_id), Vec::new()))).map(drop)
    }

    fn disable(&self, device_id: &str) -> Result<(), HubError> {
        self.step(&dynsec::disable(device_id)?, None).map(drop)
    }
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

struct Conn {
    io: Box<dyn ReadWrite>,
    buf: BytesMut,
    addr: std::net::SocketAddr,
}

impl Conn {
    /// A broker whose certificate does not verify is refused at once (retrying will not make
    /// it verify); other I/O errors are transient.
    fn io_error(&self, e: std::io::Error) -> HubError {
        let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::InvalidCertificate(why)) => HubError::Refused(format!("{}: the broker's certificate: {why:?}", self.addr)),
            _ => HubError::Transient(format!("{}: {e}", self.addr)),
        }
    }

    fn send(&mut self, encode: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>) -> Result<(), HubError> {
        let mut out = BytesMut::with_capacity(256);
        encode(&mut out).map_err(|e| HubError::Refused(format!("cannot encode an MQTT packet: {e:?}")))?;
        self.io.write_all(&out).and_then(|()| self.io.flush()).map_err(|e| self.io_error(e))
    }

    /// The next packet, or an error once `deadline` passed.
    fn next(&mut self, deadline: Instant) -> Result<Packet, HubError> {
        loop {
            match v4::read(&mut self.buf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(HubError::Transient(format!("bad packet from the broker: {e:?}"))),
            }
            remaining(deadline)?;
            let mut chunk = [0u8; 4096];
            let n = match self.io.read(&mut chunk) {
                Ok(n) => n,
                // The socket's read timeout: look at the deadline again.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) => return Err(self.io_error(e)),
            };
            if n == 0 {
                return Err(HubError::Transient(format!("{}: the broker closed the connection", self.addr)));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
