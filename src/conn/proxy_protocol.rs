//! The PROXY protocol (haproxy's `proxy-protocol.txt`), both ways: the header the gateway
//! sends first on an upstream connection (`upstream.*.proxy_protocol`), and the header a
//! fronting L4 balancer sends first on a device connection (`listen.accept_proxy_protocol`).
//! Headers are built and parsed by the `ppp` crate; this module only frames them on a socket.
//!
//! Invariants:
//! - An incoming header is read exactly: not one byte past its end leaves the kernel buffer,
//!   so what follows (the device's TLS ClientHello or its hello) reaches the next step
//!   untouched. Bytes are peeked first and only those known to belong to the header are read.
//! - A connection whose first bytes are not a complete, valid header ends with a typed
//!   [`HeaderError`]; nothing of it is forwarded.

use std::net::SocketAddr;

use thiserror::Error;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyProtocol;

/// The v2 signature (section 2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a v2 header: signature, version/command, family/protocol, length.
const V2_FIXED: usize = 16;
/// The longest v1 header, CRLF included (section 2.1).
const V1_MAX: usize = 107;

/// Why an incoming PROXY header was refused.
#[derive(Debug, Error)]
pub enum HeaderError {
    #[error("the connection closed before its PROXY header was complete")]
    Closed,
    #[error("the connection does not start with a PROXY header (first byte {0:#04x}); is the balancer set to send one?")]
    Missing(u8),
    #[error("a v1 PROXY header longer than {V1_MAX} bytes")]
    TooLong,
    #[error("a malformed PROXY header: {0}")]
    Malformed(String),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// What an incoming header says about the connection: the device's address and the address
/// it connected to, or nothing (v1 `UNKNOWN`, a v2 `LOCAL` command such as a balancer's
/// health check, or a family other than TCP over IP), in which case the socket's own
/// addresses stand.
pub type Claimed = Option<(SocketAddr, SocketAddr)>;

/// Reads one PROXY header (v1 or v2, whichever the first byte says) from the start of `tcp`,
/// leaving every byte after it unread.
pub async fn read_header(tcp: &mut TcpStream) -> Result<Claimed, HeaderError> {
    let mut head: Vec<u8> = Vec::with_capacity(V2_FIXED + 36);
    let mut scratch = [0u8; 256];
    loop {
        let want = match remaining(&head)? {
            0 => return parse(&head),
            n => n.min(scratch.len()),
        };
        let seen = tcp.peek(&mut scratch[..want]).await?;
        if seen == 0 {
            return Err(HeaderError::Closed);
        }
        let take = header_bytes_in(&head, &scratch[..seen]);
        let at = head.len();
        head.resize(at + take, 0);
        // Already in the kernel buffer (just peeked): this read returns at once.
        tcp.read_exact(&mut head[at..]).await?;
    }
}

/// How many more bytes the header needs at most, given its first bytes; 0 when complete.
fn remaining(head: &[u8]) -> Result<usize, HeaderError> {
    let Some(&first) = head.first() else {
        return Ok(V2_FIXED);
    };
    if first == V2_SIGNATURE[0] {
        let n = head.len().min(V2_SIGNATURE.len());
        if head[..n] != V2_SIGNATURE[..n] {
            return Err(HeaderError::Malformed("not the v2 signature".into()));
        }
        if head.len() < V2_FIXED {
            return Ok(V2_FIXED - head.len());
        }
        let total = V2_FIXED + usize::from(u16::from_be_bytes([head[14], head[15]]));
        Ok(total - head.len())
    } else if first == b'P' {
        let n = head.len().min(6);
        if head[..n] != b"PROXY "[..n] {
            return Err(HeaderError::Malformed("not \"PROXY \"".into()));
        }
        if head.ends_with(b"\n") {
            // Complete (a line feed without its CR is the parser's to refuse).
            Ok(0)
        } else if head.len() >= V1_MAX {
            Err(HeaderError::TooLong)
        } else {
            Ok(V1_MAX - head.len())
        }
    } else {
        Err(HeaderError::Missing(first))
    }
}

/// Of `peeked` (the bytes after `head`), how many belong to the header: for v2 up to its
/// declared length; for v1 up to and including the first line feed.
fn header_bytes_in(head: &[u8], peeked: &[u8]) -> usize {
    let is_v1 = head.first().or(peeked.first()) == Some(&b'P');
    if is_v1 {
        match peeked.iter().position(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => peeked.len(),
        }
    } else if head.len() < V2_FIXED {
        peeked.len().min(V2_FIXED - head.len())
    } else {
        // `remaining` capped the peek at the declared length.
        peeked.len()
    }
}

fn parse(head: &[u8]) -> Result<Claimed, HeaderError> {
    use ppp::{v1, v2, HeaderResult};
    let pair = |s: SocketAddr, d: SocketAddr| Some((s, d));
    match HeaderResult::parse(head) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => pair(
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            v1::Addresses::Tcp6(a) => pair(
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => pair(
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => pair(
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            _ => None,
        }),
        HeaderResult::V1(Err(e)) => Err(HeaderError::Malformed(format!("v1: {e}"))),
        HeaderResult::V2(Err(e)) => Err(HeaderError::Malformed(format!("v2: {e}"))),
    }
}

/// The PROXY protocol header for a connection from `origin` (client, then the address it
/// connected to); `None` when `proxy` is off. v1 `PROXY TCP4|TCP6 … \r\n` (`UNKNOWN` without
/// an origin or with mixed families), v2 a PROXY command over TCP (a LOCAL command without an
/// origin).
pub fn proxy_header(
    proxy: ProxyProtocol,
    origin: Option<(SocketAddr, SocketAddr)>,
) -> Option<Vec<u8>> {
    use ppp::{v1, v2};
    let pair = |o: Option<(SocketAddr, SocketAddr)>| match o {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => Some((
            v1::Addresses::new_tcp4(*s.ip(), *d.ip(), s.port(), d.port()),
            v2::Addresses::IPv4(v2::IPv4::new(*s.ip(), *d.ip(), s.port(), d.port())),
        )),
        Some((SocketAddr::V6(s), SocketAddr::V6(d))) => Some((
            v1::Addresses::new_tcp6(*s.ip(), *d.ip(), s.port(), d.port()),
            v2::Addresses::IPv6(v2::IPv6::new(*s.ip(), *d.ip(), s.port(), d.port())),
        )),
        _ => None,
    };
    match proxy {
        ProxyProtocol::Off => None,
        ProxyProtocol::V1 => Some(match pair(origin) {
            Some((a, _)) => a.to_string().into_bytes(),
            None => v1::Addresses::Unknown.to_string().into_bytes(),
        }),
        ProxyProtocol::V2 => {
            let built = match pair(origin) {
                Some((_, a)) => v2::Builder::with_addresses(
                    v2::Version::Two | v2::Command::Proxy,
                    v2::Protocol::Stream,
                    a,
                )
                .build(),
                None => v2::Builder::new(
                    v2::Version::Two | v2::Command::Local,
                    v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
                )
                .build(),
            };
            built.ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn v2_header(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, tlv: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.extend_from_slice(&[0x21, 0x11]);
        v.extend_from_slice(&(12 + tlv.len() as u16).to_be_bytes());
        v.extend_from_slice(&src);
        v.extend_from_slice(&dst);
        v.extend_from_slice(&sport.to_be_bytes());
        v.extend_from_slice(&dport.to_be_bytes());
        v.extend_from_slice(tlv);
        v
    }

    /// The specification's (haproxy's proxy-protocol.txt) v1 example, and the same addresses
    /// in v2 laid out by hand from its section 2.2: the 12-byte signature, 0x21 (version 2,
    /// PROXY), 0x11 (TCP over IPv4), the 12-byte length, then source, destination and ports.
    #[test]
    fn proxy_headers_are_the_specifications_bytes() {
        let origin: Option<(SocketAddr, SocketAddr)> = Some((
            "192.168.0.1:56324".parse().expect("addr"),
            "192.168.0.11:443".parse().expect("addr"),
        ));
        assert_eq!(
            proxy_header(ProxyProtocol::V1, origin),
            Some(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec())
        );
        let v2 = v2_header([192, 168, 0, 1], [192, 168, 0, 11], 56324, 443, &[]);
        assert_eq!(proxy_header(ProxyProtocol::V2, origin), Some(v2));
        let six: Option<(SocketAddr, SocketAddr)> = Some((
            "[::1]:1000".parse().expect("addr"),
            "[::1]:23779".parse().expect("addr"),
        ));
        assert_eq!(
            proxy_header(ProxyProtocol::V1, six),
            Some(b"PROXY TCP6 ::1 ::1 1000 23779\r\n".to_vec())
        );
        // No origin: v1 says UNKNOWN, v2 is a LOCAL command with no addresses.
        assert_eq!(
            proxy_header(ProxyProtocol::V1, None),
            Some(b"PROXY UNKNOWN\r\n".to_vec())
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(proxy_header(ProxyProtocol::V2, None), Some(local));
        assert_eq!(proxy_header(ProxyProtocol::Off, origin), None);
    }

    /// Sends `chunks` (with the peer free to read between them) then `after`, and returns
    /// what `read_header` made of it and the bytes left on the socket.
    async fn read_from(chunks: Vec<Vec<u8>>, after: &[u8]) -> (Result<Claimed, String>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let after = after.to_vec();
        let writer = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            c.set_nodelay(true).expect("nodelay");
            for ch in chunks {
                c.write_all(&ch).await.expect("write");
                c.flush().await.expect("flush");
                tokio::task::yield_now().await;
            }
            c.write_all(&after).await.expect("write after");
            c.shutdown().await.expect("fin");
        });
        let (mut s, _) = l.accept().await.expect("accept");
        let got = read_header(&mut s).await.map_err(|e| e.to_string());
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        writer.await.expect("writer");
        (got, rest)
    }

    fn split_everywhere(h: &[u8]) -> Vec<Vec<Vec<u8>>> {
        (1..h.len())
            .map(|i| vec![h[..i].to_vec(), h[i..].to_vec()])
            .chain(std::iter::once(h.iter().map(|b| vec![*b]).collect()))
            .collect()
    }

    #[tokio::test]
    async fn a_header_split_anywhere_is_read_exactly_and_the_bytes_after_it_are_left() {
        let tls_hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
        let want = Some((
            "192.168.0.1:56324".parse().expect("addr"),
            "192.168.0.11:443".parse().expect("addr"),
        ));
        let v1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec();
        // A v2 header with a TLV (type 0x04, a NOOP, three bytes), as AWS NLBs send them.
        let v2 = v2_header(
            [192, 168, 0, 1],
            [192, 168, 0, 11],
            56324,
            443,
            &[0x04, 0x00, 0x03, 9, 9, 9],
        );
        for h in [v1, v2] {
            for chunks in split_everywhere(&h) {
                let (got, rest) = read_from(chunks, &tls_hello).await;
                assert_eq!(got, Ok(want));
                assert_eq!(rest, tls_hello);
            }
        }
    }

    #[tokio::test]
    async fn unknown_and_local_headers_claim_nothing() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        for h in [b"PROXY UNKNOWN\r\n".to_vec(), local] {
            let (got, rest) = read_from(vec![h], b"#").await;
            assert_eq!(got, Ok(None));
            assert_eq!(rest, b"#");
        }
    }

    #[tokio::test]
    async fn what_is_not_a_whole_valid_header_is_refused_with_its_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            // A device that speaks without a balancer in front (its hello, 0x23).
            (
                vec![0x23, 0, 0, 0, 0x1f],
                "does not start with a PROXY header",
            ),
            (vec![0x16, 3, 1], "does not start with a PROXY header"),
            (b"PROXY TCP4 1.2.3.4\r\n".to_vec(), "malformed"),
            (
                b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\n".to_vec(),
                "malformed",
            ),
            (
                [b"PROXY ".to_vec(), vec![b'1'; 120]].concat(),
                "longer than",
            ),
            (b"\r\n\r\n\0\r\nQUITX".to_vec(), "malformed"),
            // Version 1 in the binary form.
            (
                [V2_SIGNATURE.to_vec(), vec![0x11, 0x11, 0, 12], vec![0; 12]].concat(),
                "malformed",
            ),
            (b"PROXY TCP4 1.2.3.4 5.6".to_vec(), "closed before"),
            (V2_SIGNATURE[..5].to_vec(), "closed before"),
        ];
        for (bytes, why) in cases {
            let (got, _) = read_from(vec![bytes.clone()], &[]).await;
            let e = got.expect_err("refused");
            assert!(e.contains(why), "{bytes:?}: {e} lacks {why:?}");
        }
    }
}
