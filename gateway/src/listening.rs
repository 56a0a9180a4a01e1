//! Whether a TCP listener is already on an address, read from the kernel's socket tables
//! (`/proc/net/tcp`, `/proc/net/tcp6`): LISTEN sockets only, so connections of an earlier run
//! still in TIME_WAIT do not count.

use std::net::{IpAddr, SocketAddr};

/// The state column's value for LISTEN.
const LISTEN: &str = "0A";

/// True when a socket in LISTEN state has `addr`'s port on the same address, or on a wildcard
/// address that covers it (or `addr` is the wildcard).
pub fn someone_listens(addr: SocketAddr) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().filter_map(|t| std::fs::read_to_string(t).ok()).any(|text| listens_in(&text, addr))
}

fn listens_in(table: &str, addr: SocketAddr) -> bool {
    table.lines().skip(1).filter_map(parse_line).any(|(ip, port, state)| {
        state == LISTEN && port == addr.port() && (ip == addr.ip() || ip.is_unspecified() || addr.ip().is_unspecified())
    })
}

/// `sl local_address rem_address st …` with the local address as `HEXIP:HEXPORT`; the IP in
/// the kernel's byte order (each 32-bit word little-endian on the machines we run on).
fn parse_line(line: &str) -> Option<(IpAddr, u16, &str)> {
    let mut cols = line.split_whitespace();
    let local = cols.nth(1)?;
    let state = cols.nth(1)?;
    let (ip_hex, port_hex) = local.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let words: Vec<u32> =
        (0..ip_hex.len() / 8).map(|i| u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16).ok()).collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes.as_slice()).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
        _ => return None,
    };
    Some((ip, port, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:22B3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:01BB 0100007F:D431 06 00000000:00000000 03:00000F1A 00000000     0        0 0 3 0000000000000000
   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0";

    #[test]
    fn listeners_not_time_wait() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listens_in(TABLE, a("127.0.0.1:8883")), "127.0.0.1:8883 listens");
        assert!(!listens_in(TABLE, a("127.0.0.1:443")), "only TIME_WAIT on 443");
        assert!(!listens_in(TABLE, a("127.0.0.2:8883")), "another address");
        assert!(listens_in(TABLE, a("127.0.0.5:8080")), "the wildcard covers it");
        assert!(listens_in(TABLE, a("0.0.0.0:8883")), "a wildcard bind covers 127.0.0.1");
        let real = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(someone_listens(real.local_addr().unwrap()));
        let port = real.local_addr().unwrap().port();
        drop(real);
        assert!(!someone_listens(SocketAddr::from(([127, 0, 0, 1], port))));
    }
}
