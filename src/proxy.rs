//! The client's address behind a proxy: from the PROXY protocol header a proxy sends before the
//! request (HAProxy's `send-proxy`/`send-proxy-v2`, nginx's `proxy_protocol on`), or from the
//! `X-Forwarded-For` or `Forwarded` header it adds to it. Both are believed only from
//! `trusted_proxies` (the callers check): anyone else could claim any address.
//!
//! The PROXY header is parsed by the `ppp` crate (both versions, and both parsed from a byte
//! slice: the reads stay here, bounded by the caller's head timeout, and what follows the header
//! is kept for the request head).

use std::net::{IpAddr, SocketAddr};

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::AsyncRead;

use crate::config::{Config, ForwardedHeader};
use crate::http::{read_with, Request};

/// The largest PROXY header taken: a v1 line is at most 107 bytes, a v2 header 16 plus its
/// addresses (216 at most, for Unix sockets) plus the TLVs a proxy adds (HAProxy's are a few
/// dozen bytes). More is not a proxy fanstream is meant to sit behind.
const MAX_HEADER_BYTES: usize = 1024;

/// The longest v1 header, its CRLF included (the specification's figure).
const V1_MAX_BYTES: usize = 107;

/// How each version begins.
const V1_SIGNATURE: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Why a connection that should start with a PROXY header did not.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ProxyHeaderError {
    /// The peer closed before a whole header.
    Closed,
    /// Not a PROXY header, or a malformed or oversized one.
    Bad,
}

/// What a PROXY header says: the client (if it names one), and the bytes read after it.
type Named = (Option<SocketAddr>, Vec<u8>);

/// Reads the PROXY header at the start of `stream`. Returns the client's address (`None` when
/// the header names none: a proxy's own health check, `LOCAL` or `UNKNOWN`) and the bytes that
/// came after the header, which begin the request head.
pub(crate) async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Named, ProxyHeaderError> {
    let mut buf = Vec::new();
    loop {
        if let Some(parsed) = parse_header(&buf)? {
            return Ok(parsed);
        }
        let room = MAX_HEADER_BYTES - buf.len();
        match read_with(stream, room, |bytes| buf.extend_from_slice(bytes)).await {
            Ok(0) | Err(_) => return Err(ProxyHeaderError::Closed),
            Ok(_) => {}
        }
    }
}

/// Parses a PROXY header at the start of `buf`: `Ok(None)` when more bytes are needed.
fn parse_header(buf: &[u8]) -> Result<Option<Named>, ProxyHeaderError> {
    // Told apart by their first bytes, so that a client speaking HTTP straight away is refused
    // at once rather than when the head timeout ends.
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n.min(V1_SIGNATURE.len())] != V1_SIGNATURE[..n.min(V1_SIGNATURE.len())]
        && buf[..n] != V2_SIGNATURE[..n]
    {
        return Err(ProxyHeaderError::Bad);
    }
    if buf.is_empty() {
        return Ok(None);
    }
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        // A v1 header is one line of at most 107 bytes: once its line has ended (or should
        // have), a header still short of something is malformed, however ppp words it.
        let v1_line_over = buf.starts_with(V1_SIGNATURE)
            && (buf.windows(2).any(|w| w == b"\r\n") || buf.len() >= V1_MAX_BYTES);
        return if v1_line_over || buf.len() >= MAX_HEADER_BYTES {
            Err(ProxyHeaderError::Bad)
        } else {
            Ok(None)
        };
    }
    let (client, len) = match result {
        HeaderResult::V1(Ok(h)) => {
            let client = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            (client, h.header.len())
        }
        HeaderResult::V2(Ok(h)) => {
            let client = match (h.command, h.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            (client, h.len())
        }
        HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => return Err(ProxyHeaderError::Bad),
    };
    let client = client.map(|c| SocketAddr::new(c.ip().to_canonical(), c.port()));
    Ok(Some((client, buf[len..].to_vec())))
}

/// The client a trusted proxy's request names in `forwarded_header`: the rightmost address that
/// is not itself a trusted proxy (each proxy appends the address it got the request from, so
/// everything left of the last untrusted one was written by the client, who can write
/// anything). `None` when the header is absent, or an entry on the way is not an address
/// (`unknown`, an obfuscated name, garbage): the connection's own address stands then.
pub(crate) fn forwarded_client(cfg: &Config, req: &Request) -> Option<IpAddr> {
    let entries: Vec<&str> = match cfg.forwarded_header {
        ForwardedHeader::XForwardedFor => header_values(req, "x-forwarded-for")
            .flat_map(|v| v.split(','))
            .collect(),
        ForwardedHeader::Forwarded => header_values(req, "forwarded")
            .flat_map(|v| v.split(','))
            .filter_map(forwarded_for)
            .collect(),
    };
    let mut last = None;
    for entry in entries.iter().rev() {
        let ip = parse_node(entry)?;
        last = Some(ip);
        if !cfg.trusts(ip) {
            return Some(ip);
        }
    }
    // Every hop was a trusted proxy: the leftmost is the client, a host of the proxies' own.
    last
}

/// Every value of a header given once or more, in order.
fn header_values<'a>(req: &'a Request, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    req.headers
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The `for=` parameter of one `Forwarded` element (`for=192.0.2.60;proto=http;by=...`).
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim().trim_matches('"'))
    })
}

/// An address as proxies write one: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_node(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let ip = if let Some(rest) = text.strip_prefix('[') {
        rest.split_once(']')?.0.parse().ok()?
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        ip
    } else {
        text.parse::<SocketAddr>().ok()?.ip()
    };
    Some(IpAddr::to_canonical(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(fields: &str) -> Request {
        crate::http::parse_head(format!("GET /live HTTP/1.1\r\n{fields}\r\n").as_bytes())
            .unwrap()
            .unwrap()
            .0
    }

    fn behind(trusted: &str, header: ForwardedHeader) -> Config {
        Config::from_toml(&format!("trusted_proxies = {trusted}"))
            .map(|c| Config {
                forwarded_header: header,
                ..c
            })
            .unwrap()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn x_forwarded_for_gives_the_rightmost_untrusted_address() {
        let cfg = behind(
            r#"["127.0.0.1", "10.0.0.0/8"]"#,
            ForwardedHeader::XForwardedFor,
        );
        // The client forged the leftmost one; the proxies appended the rest.
        let r = req("X-Forwarded-For: 6.6.6.6, 203.0.113.9, 10.1.1.1\r\n");
        assert_eq!(forwarded_client(&cfg, &r), ip("203.0.113.9"));
        let r = req("X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 203.0.113.9\r\n");
        assert_eq!(forwarded_client(&cfg, &r), ip("203.0.113.9"));
        let r = req("X-Forwarded-For: 10.2.2.2, 10.1.1.1\r\n");
        assert_eq!(forwarded_client(&cfg, &r), ip("10.2.2.2"), "all trusted");
        let r = req("X-Forwarded-For: 6.6.6.6, unknown, 10.1.1.1\r\n");
        assert_eq!(forwarded_client(&cfg, &r), None, "a hop that is no address");
        let r = req("X-Forwarded-For: [2001:db8::5]:443, ::ffff:10.0.0.1\r\n");
        assert_eq!(forwarded_client(&cfg, &r), ip("2001:db8::5"));
        assert_eq!(forwarded_client(&cfg, &req("")), None);
        let r = req("Forwarded: for=203.0.113.9\r\n");
        assert_eq!(
            forwarded_client(&cfg, &r),
            None,
            "the other header is not read"
        );
    }

    #[test]
    fn forwarded_gives_the_rightmost_untrusted_for() {
        let cfg = behind(r#"["127.0.0.1"]"#, ForwardedHeader::Forwarded);
        let r = req(
            "Forwarded: for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https, For=127.0.0.1;by=x\r\n",
        );
        assert_eq!(forwarded_client(&cfg, &r), ip("2001:db8:cafe::17"));
        let r = req("Forwarded: for=_hidden, for=127.0.0.1\r\n");
        assert_eq!(forwarded_client(&cfg, &r), None);
        let r = req("X-Forwarded-For: 203.0.113.9\r\n");
        assert_eq!(forwarded_client(&cfg, &r), None);
    }

    #[test]
    fn proxy_headers_of_both_versions() {
        let v1 = b"PROXY TCP4 203.0.113.9 127.0.0.1 51234 8000\r\nGET /live HTTP/1.0\r\n\r\n";
        let (client, rest) = parse_header(v1).unwrap().unwrap();
        assert_eq!(client, Some("203.0.113.9:51234".parse().unwrap()));
        assert!(rest.starts_with(b"GET /live"));
        assert_eq!(parse_header(&v1[..20]).unwrap(), None, "incomplete");
        let (client, _) = parse_header(b"PROXY UNKNOWN\r\nGET").unwrap().unwrap();
        assert_eq!(client, None);

        let header = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (
                "[2001:db8::9]:4000".parse::<SocketAddr>().unwrap(),
                "[::1]:8000".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"GET /live HTTP/1.0\r\n\r\n");
        let (client, rest) = parse_header(&bytes).unwrap().unwrap();
        assert_eq!(client, Some("[2001:db8::9]:4000".parse().unwrap()));
        assert!(rest.starts_with(b"GET /live"));
        assert_eq!(parse_header(&header[..10]).unwrap(), None, "incomplete");

        for bad in [
            &b"GET /live HTTP/1.0\r\n\r\n"[..],
            b"PROXY TCP4 nonsense\r\n",
        ] {
            assert_eq!(parse_header(bad).unwrap_err(), ProxyHeaderError::Bad);
        }
    }
}
