//! HTTP/1.1 framing on any async byte stream: request heads parsed with httparse (bounded),
//! bodies by Content-Length or chunked encoding (bounded), keep-alive and pipelining, and
//! response writing. Protocol logic lives in the handlers, not here.

use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head (request line plus headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path without the query string, as sent (still percent-encoded).
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// HTTP/1.0 without keep-alive, or `Connection: close`.
    pub close: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// A query parameter, percent-decoded (`+` as space).
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned())
        })
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Vec::new() }
    }
    pub fn json(status: u16, body: String) -> Response {
        Response { status, headers: vec![("Content-Type".into(), "application/json; charset=utf-8".into())], body: body.into_bytes() }
    }
    pub fn header(mut self, k: &str, v: impl Into<String>) -> Response {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    /// A DPS error answer: the error body with its tracking id, `x-ms-error-code`,
    /// `x-ms-request-id` and, when throttled or busy, `Retry-After`.
    pub fn error(err: &dps_core::error::ServiceError, tracking_id: &str, now: dps_core::time::UtcTime) -> Response {
        let mut r = Response::json(err.kind.status(), dps_core::error::error_body(err, tracking_id, now))
            .header("x-ms-error-code", err.kind.code().to_string())
            .header("x-ms-request-id", tracking_id);
        if let Some(s) = err.retry_after {
            r = r.header("Retry-After", s.to_string());
        }
        r
    }
}

/// Why no request could be read. Each maps to what the peer is told (if anything).
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Clean end of stream between requests.
    Closed,
    HeadTooLarge,
    BodyTooLarge,
    Malformed(&'static str),
    Io,
}

/// Outcome of parsing what has arrived so far.
#[derive(Debug)]
pub enum Parsed {
    /// A whole request, and how many bytes of the buffer it used.
    Complete(Request, usize),
    /// More bytes are needed; `expect_continue` when the head asked for `100 Continue`;
    /// `at_least`: the buffer length below which parsing again cannot complete the request.
    NeedMore { expect_continue: bool, at_least: usize },
}

/// Chunks a chunked body may have: with it, and the `at_least` hint, reading a body sent in
/// one-byte TLS records costs a bounded number of parses instead of one per byte.
pub const MAX_CHUNKS: usize = 1024;

/// Parses one request from the front of `buf` without consuming anything, so a read that is
/// cancelled (idle timeouts, shutdown) never loses bytes. Pure: this is the fuzz target.
pub fn parse_request(buf: &[u8], max_body: usize) -> Result<Parsed, ReadError> {
    #[cfg(test)]
    tests::PARSES.with(|p| p.set(p.get() + 1));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(ReadError::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(Parsed::NeedMore { expect_continue: false, at_least: buf.len() + 1 }),
        Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadTooLarge),
        Err(_) => return Err(ReadError::Malformed("invalid request head")),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(ReadError::HeadTooLarge);
    }
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let version = req.version.unwrap_or(1);
    let hdrs: Vec<(String, String)> =
        req.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string())).collect();
    let find = |n: &str| hdrs.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.as_str());
    let conn = find("connection").map(str::to_ascii_lowercase);
    let close = conn.as_deref() == Some("close") || (version == 0 && conn.as_deref() != Some("keep-alive"));
    let expect_continue = find("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
    let rest = &buf[head_len..];
    let (body, body_len) = if find("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
        match parse_chunked(rest, max_body)? {
            Ok(x) => x,
            Err(need) => return Ok(Parsed::NeedMore { expect_continue, at_least: head_len + need }),
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len.parse().map_err(|_| ReadError::Malformed("invalid Content-Length"))?;
        if len > max_body {
            return Err(ReadError::BodyTooLarge);
        }
        if rest.len() < len {
            return Ok(Parsed::NeedMore { expect_continue, at_least: head_len + len });
        }
        (rest[..len].to_vec(), len)
    } else {
        (Vec::new(), 0)
    };
    let request = Request { method, path: path.to_string(), query: query.to_string(), headers: hdrs, body, close };
    Ok(Parsed::Complete(request, head_len + body_len))
}

/// A chunked body at the front of `b`: the decoded body and the bytes it used, or, when
/// incomplete, the length `b` must reach before it can be complete.
type ChunkedBody = Result<(Vec<u8>, usize), usize>;

fn parse_chunked(b: &[u8], max_body: usize) -> Result<ChunkedBody, ReadError> {
    let mut body = Vec::new();
    let mut pos = 0;
    let line_at = |pos: usize| -> Result<Option<(&[u8], usize)>, ReadError> {
        match b[pos..].windows(2).position(|w| w == b"\r\n") {
            Some(i) => Ok(Some((&b[pos..pos + i], pos + i + 2))),
            None if b.len() - pos > 1024 => Err(ReadError::Malformed("chunk header too long")),
            None => Ok(None),
        }
    };
    for _ in 0..=MAX_CHUNKS {
        let Some((line, next)) = line_at(pos)? else { return Ok(Err(b.len() + 1)) };
        let text = std::str::from_utf8(line).map_err(|_| ReadError::Malformed("invalid chunk size"))?;
        let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| ReadError::Malformed("invalid chunk size"))?;
        if body.len().saturating_add(size) > max_body {
            return Err(ReadError::BodyTooLarge);
        }
        pos = next;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let Some((line, next)) = line_at(pos)? else { return Ok(Err(b.len() + 1)) };
                pos = next;
                if line.is_empty() {
                    return Ok(Ok((body, pos)));
                }
            }
        }
        if b.len() < pos + size + 2 {
            // This chunk, its CRLF and at least the last chunk's `0\r\n\r\n` are still to come.
            return Ok(Err(pos + size + 2 + 5));
        }
        body.extend_from_slice(&b[pos..pos + size]);
        if &b[pos + size..pos + size + 2] != b"\r\n" {
            return Err(ReadError::Malformed("chunk not followed by CRLF"));
        }
        pos += size + 2;
    }
    Err(ReadError::Malformed("too many chunks"))
}

/// Reads one request. `buf` carries bytes already received (pipelining) between calls; it is
/// only consumed once a whole request is there, so cancelling this future loses nothing.
pub async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, buf: &mut Vec<u8>, max_body: usize) -> Result<Request, ReadError> {
    let mut chunk = [0u8; 8192];
    let mut continued = false;
    // Parse again only when it can complete: once the buffer reaches what the last parse said
    // it needs, and, while the head is incomplete, once a new read brought its blank line.
    // Re-parsing everything after each read made a client sending one-byte TLS records cost
    // quadratic copying.
    // Before the blank line, a partial head is parsed at doubling sizes (garbage is still
    // refused at once, at linear total cost).
    let mut at_least = 0usize;
    let mut head_seen = false;
    let mut scanned = 0usize;
    let mut probe = 1usize;
    loop {
        let mut parse = head_seen && buf.len() >= at_least;
        if !head_seen {
            let from = scanned.saturating_sub(3);
            head_seen = buf[from..].windows(4).any(|w| w == b"\r\n\r\n") || buf[from..].windows(2).any(|w| w == b"\n\n");
            scanned = buf.len();
            if !head_seen && buf.len() > MAX_HEAD_BYTES {
                return Err(ReadError::HeadTooLarge);
            }
            parse = head_seen || buf.len() >= probe;
            if buf.len() >= probe {
                probe = buf.len() * 2;
            }
        }
        if parse {
            match parse_request(buf, max_body)? {
                Parsed::Complete(req, used) => {
                    buf.drain(..used);
                    return Ok(req);
                }
                Parsed::NeedMore { expect_continue, at_least: need } => {
                    at_least = need;
                    if expect_continue && !continued {
                        continued = true;
                        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.map_err(|_| ReadError::Io)?;
                        s.flush().await.map_err(|_| ReadError::Io)?;
                    }
                }
            }
        }
        let n = s.read(&mut chunk).await.map_err(|_| ReadError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() { ReadError::Closed } else { ReadError::Malformed("connection closed mid-request") });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

pub fn render(resp: &Response, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + resp.body.len());
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status)).as_bytes());
    for (k, v) in &resp.headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if resp.status != 204 && resp.status != 101 {
        out.extend_from_slice(format!("Content-Length: {}\r\n", resp.body.len()).as_bytes());
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&resp.body);
    out
}

pub async fn write_response<S: AsyncWrite + Unpin>(s: &mut S, resp: &Response, close: bool) -> std::io::Result<()> {
    s.write_all(&render(resp, close)).await?;
    s.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::io::Cursor;

    thread_local! {
        /// Calls of `parse_request` on this thread.
        pub static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A peer that sends one byte per read (one-byte TLS records).
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = usize::from(self.1 < self.0.len() && !out.is_empty());
            if n == 1 {
                out[0] = self.0[self.1];
                self.1 += 1;
            }
            std::task::Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>, b: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn one_byte_reads_cost_few_parses() {
        // Regression: the whole buffer was parsed again after every read, so a request sent in
        // one-byte TLS records cost a parse (and a copy of the body so far) per byte.
        let body = vec![b'x'; 60_000];
        let mut req =
            format!("PUT /a HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\nContent-Length: {}\r\n\r\n", "p".repeat(8000), body.len()).into_bytes();
        req.extend_from_slice(&body);
        PARSES.with(|p| p.set(0));
        let r = block_on(read_request(&mut Trickle(req, 0), &mut Vec::new(), 100_000)).unwrap();
        assert_eq!(r.body.len(), 60_000);
        let parses = PARSES.with(|p| p.get());
        assert!(parses < 40, "{parses} parses for a 68 KB request read byte by byte");

        // Chunked: 500 chunks of 100 bytes, read byte by byte.
        let mut req = b"PUT /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..500 {
            req.extend_from_slice(b"64\r\n");
            req.extend_from_slice(&[b'y'; 100]);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        PARSES.with(|p| p.set(0));
        let r = block_on(read_request(&mut Trickle(req, 0), &mut Vec::new(), 100_000)).unwrap();
        assert_eq!(r.body.len(), 50_000);
        let parses = PARSES.with(|p| p.get());
        assert!(parses < 1_100, "{parses} parses for 500 chunks read byte by byte");
        // Too many chunks is refused.
        let mut req = b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..=MAX_CHUNKS {
            req.extend_from_slice(b"1\r\nz\r\n");
        }
        req.extend_from_slice(b"0\r\n\r\n");
        assert!(matches!(parse_request(&req, 100_000), Err(ReadError::Malformed("too many chunks"))));
    }

    fn read(input: &[u8], max: usize) -> (Result<Request, ReadError>, Vec<u8>) {
        let mut c = Cursor::new(input.to_vec());
        let mut buf = Vec::new();
        let r = block_on(read_request(&mut c, &mut buf, max));
        (r, buf)
    }

    #[test]
    fn content_length_and_pipelining() {
        let (r, rest) =
            read(b"PUT /enrollments/a?api-version=2021-10-01 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n\r\n", 100);
        let r = r.unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str(), r.body.as_slice()), ("PUT", "/enrollments/a", &b"{}"[..]));
        assert_eq!(r.query_param("api-version").as_deref(), Some("2021-10-01"));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn chunked_body() {
        let (r, _) = read(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", 100);
        assert_eq!(r.unwrap().body, b"abcde");
        let (r, _) = read(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n", 100);
        assert_eq!(r.unwrap_err(), ReadError::BodyTooLarge);
    }

    #[test]
    fn limits_and_garbage() {
        assert_eq!(read(b"PUT / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 100).0.unwrap_err(), ReadError::BodyTooLarge);
        assert_eq!(read(b"\x16\x03\x01garbage\r\n\r\n", 100).0.unwrap_err(), ReadError::Malformed("invalid request head"));
        assert_eq!(read(b"", 100).0.unwrap_err(), ReadError::Closed);
        assert_eq!(
            read(b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", 100).0.unwrap_err(),
            ReadError::Malformed("connection closed mid-request")
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD_BYTES + 10));
        assert_eq!(read(big.as_bytes(), 100).0.unwrap_err(), ReadError::HeadTooLarge);
        assert_eq!(
            read(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 100).0.unwrap_err(),
            ReadError::Malformed("invalid Content-Length")
        );
    }
}
