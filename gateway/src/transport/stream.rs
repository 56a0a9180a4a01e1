//! The byte stream the device protocols run on: a TLS stream, or a WebSocket carried by one.

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::io;

#[allow(async_fn_in_trait)] // used on one thread (glommio); the futures need not be Send
pub trait ByteStream {
    /// Reads some bytes; 0 at end of stream. Cancellation-safe: a cancelled read loses nothing.
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `data` and flushes.
    async fn send(&mut self, data: &[u8]) -> io::Result<()>;
}

impl<T: AsyncRead + AsyncWrite + Unpin> ByteStream for T {
    async fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf).await
    }
    async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_all(data).await?;
        self.flush().await
    }
}

/// How a device connection (MQTT or AMQP) ended, for the logs.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Closed,
    Disconnect,
    Timeout,
    /// The login deadline passed with the device's next login step still to come: that step,
    /// and the device's registration id when it had sent it (AMQP's SASL init).
    LoginTimeout {
        waiting_for: &'static str,
        registration_id: Option<String>,
    },
    Shutdown,
    TooLarge,
    Malformed(String),
    Refused(&'static str),
    ProtocolViolation(&'static str),
}

impl From<Interrupted> for End {
    fn from(i: Interrupted) -> End {
        match i {
            Interrupted::Timeout => End::Timeout,
            Interrupted::Shutdown => End::Shutdown,
            Interrupted::Io => End::Closed,
        }
    }
}

/// Why [`read_before`] returned no bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Interrupted {
    Timeout,
    Shutdown,
    Io,
}

/// The limits on a device connection's next read besides its idle time: an absolute deadline
/// for logging in (the per-read deadline alone lets a client that sends a byte now and then
/// hold the connection without ever logging in), and, once its credential was refused, the
/// close that follows the answer. Shared by MQTT and AMQP.
pub struct ReadDeadlines {
    login: std::time::Instant,
    refused: Option<std::time::Instant>,
}

impl ReadDeadlines {
    pub fn new(login_timeout: std::time::Duration) -> ReadDeadlines {
        ReadDeadlines { login: std::time::Instant::now() + login_timeout, refused: None }
    }

    /// The credential travels in the login (CONNECT, SASL), so a refused device can only be
    /// refused again on this connection: it ends `after` the answer, unless already set. Not at
    /// once: closing right behind the answer leaves the official Node SDK's register callback
    /// never called, so it would never learn why.
    pub fn refused(&mut self, after: std::time::Duration) {
        self.refused.get_or_insert_with(|| std::time::Instant::now() + after);
    }

    /// When the next read gives up: after `idle`, cut by the login deadline until the device
    /// is logged in and by the close after a refusal.
    pub fn next(&self, idle: std::time::Duration, logged_in: bool) -> std::time::Instant {
        let mut deadline = std::time::Instant::now() + idle;
        if !logged_in {
            deadline = deadline.min(self.login);
        }
        if let Some(r) = self.refused {
            deadline = deadline.min(r);
        }
        deadline
    }
}

/// Reads some bytes, giving up at `deadline` or once `stop` is set (checked every 250 ms;
/// reads are cancellation-safe, so nothing is lost between slices).
pub async fn read_before<S: ByteStream>(
    s: &mut S,
    buf: &mut [u8],
    deadline: std::time::Instant,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<usize, Interrupted> {
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Interrupted::Shutdown);
        }
        if std::time::Instant::now() >= deadline {
            return Err(Interrupted::Timeout);
        }
        if let Ok(r) = glommio::timer::timeout(std::time::Duration::from_millis(250), async { Ok(s.read_some(buf).await) }).await {
            return r.map_err(|_| Interrupted::Io);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ReadDeadlines;
    use std::time::{Duration, Instant};

    #[test]
    fn the_login_deadline_holds_until_login_and_a_refusal_cuts_the_idle_time() {
        let idle = Duration::from_secs(60);
        let mut d = ReadDeadlines::new(Duration::from_secs(2));
        let before_login = d.next(idle, false);
        assert!(before_login <= Instant::now() + Duration::from_secs(2));
        assert!(d.next(idle, true) > Instant::now() + Duration::from_secs(59), "logged in: the idle time alone");
        d.refused(Duration::from_secs(5));
        let first = d.next(idle, true);
        assert!(first <= Instant::now() + Duration::from_secs(5));
        // A second refusal does not push the close further away.
        std::thread::sleep(Duration::from_millis(20));
        d.refused(Duration::from_secs(5));
        assert_eq!(d.next(idle, true), first);
        // Before login, the earlier of the two.
        assert!(d.next(idle, false) <= Instant::now() + Duration::from_secs(2));
    }
}
