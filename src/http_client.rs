//! The client side of HTTP that a relay needs to pull a stream, and an edge to register with its
//! origin: an `http://` or `https://` URL, the request Icecast's relay sends, the connection
//! (TCP, or TLS over it, [`crate::tls::connect`]) and the response head (HTTP/1.x, or
//! SHOUTcast's `ICY 200 OK`).
//!
//! Like [`crate::http`], it turns bytes into values or a specific error and never panics on
//! input: an upstream is another server, not trusted to speak well.

use std::sync::Arc;

use base64::Engine;
use bytes::BytesMut;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::MAX_HEAD_BYTES;

/// Most headers in one response.
const MAX_HEADERS: usize = 64;
/// Each read buffer allocation of a stream pulled: pieces share it, as ingest's reads do.
pub(crate) const READ_BUF_BYTES: usize = 64 * 1024;

/// An `http://` or `https://` URL, as a relay's upstream is written:
/// `http[s]://[user:pass@]host[:port]/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HttpUrl {
    /// `https://`: the connection is TLS, the certificate checked for `host`.
    pub tls: bool,
    /// As it goes in a `connect` and in `Host:` (an IPv6 address without its brackets).
    pub host: String,
    pub port: u16,
    /// The request target: path and query, starting with `/`.
    pub target: String,
    /// Credentials written in the URL, if any.
    pub user_info: Option<(String, String)>,
}

impl HttpUrl {
    /// Parses `text`, or says what is wrong with it in words an operator can act on.
    pub fn parse(text: &str) -> Result<HttpUrl, String> {
        let (tls, rest) = match text.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => (false, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (true, rest),
            _ => return Err("must start with http:// or https://".into()),
        };
        let (authority, target) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if target.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the path holds spaces or control characters".into());
        }
        let (user_info, host_port) = match authority.rsplit_once('@') {
            Some((ui, hp)) => {
                let (user, pass) = ui.split_once(':').unwrap_or((ui, ""));
                (Some((user.to_string(), pass.to_string())), hp)
            }
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or("unclosed '[' in the host")?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or("junk after the IPv6 address")?),
            };
            (host, port)
        } else {
            match host_port.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (host_port, None),
            }
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
        {
            return Err(format!("{host:?} is not a host name or address"));
        }
        let port = match port {
            None if tls => 443,
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{p:?} is not a port"))?,
        };
        Ok(HttpUrl {
            tls,
            host: host.to_string(),
            port,
            target: target.to_string(),
            user_info,
        })
    }

    /// The URL without its credentials: what logs, metric labels and status pages show.
    pub fn public(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}{}", self.host, self.port, self.target)
        } else {
            format!("{scheme}://{}:{}{}", self.host, self.port, self.target)
        }
    }

    /// Whether `other` is on the same server as this URL (scheme, host and port): the one a
    /// relay's configured credentials may go to.
    pub fn same_server(&self, other: &HttpUrl) -> bool {
        self.tls == other.tls && self.host == other.host && self.port == other.port
    }

    /// Where a redirect's `Location` points, taken from this URL: absolute, or a path on the
    /// same server.
    pub fn join(&self, location: &str) -> Result<HttpUrl, String> {
        if location.starts_with('/') {
            let mut next = self.clone();
            next.target = location.to_string();
            Ok(next)
        } else {
            HttpUrl::parse(location)
        }
    }

    /// The request Icecast's relay sends (`GET`, HTTP/1.0, ICY metadata asked for), with Basic
    /// credentials: `auth`, or those in the URL.
    pub fn request(&self, user_agent: &str, auth: Option<(&str, &str)>) -> Vec<u8> {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut out = format!(
            "GET {} HTTP/1.0\r\nHost: {host}:{}\r\nUser-Agent: {user_agent}\r\nIcy-MetaData: 1\r\nAccept: */*\r\n",
            self.target, self.port
        );
        let auth = auth.or(self
            .user_info
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str())));
        if let Some((user, pass)) = auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            out.push_str(&format!("Authorization: Basic {token}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    /// Header names lower-cased; values trimmed, non-UTF-8 bytes replaced.
    pub headers: Vec<(String, String)>,
}

impl Response {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a response head was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ResponseError {
    /// Not an HTTP response: garbage, or a head past [`MAX_HEAD_BYTES`].
    Malformed,
}

/// Parses a response head from the start of `buf`. `Ok(None)` means more bytes are needed;
/// `Ok(Some((resp, n)))` means the head is the first `n` bytes. SHOUTcast servers answer
/// `ICY 200 OK`, which is read as HTTP/1.0.
pub(crate) fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>, ResponseError> {
    const ICY: &[u8] = b"ICY ";
    const AS_HTTP: &[u8] = b"HTTP/1.0 ";
    // The same head with an HTTP status line, and how much longer that made it.
    let rewritten;
    let (buf, extra) = if buf.starts_with(ICY) {
        rewritten = [AS_HTTP, &buf[ICY.len()..]].concat();
        (&rewritten[..], AS_HTTP.len() - ICY.len())
    } else {
        (buf, 0)
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD_BYTES + extra => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES + extra => return Ok(None),
        _ => return Err(ResponseError::Malformed),
    };
    let headers = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).trim().to_string(),
            )
        })
        .collect();
    Ok(Some((
        Response {
            status: resp.code.unwrap_or_default(),
            headers,
        },
        n - extra,
    )))
}

/// An upstream connection: plain TCP, or TLS over it.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a request got no answer: the reason (a `fanstream_relay_failovers_total` label, a word
/// in a log line) and, for a TLS failure, what rustls said (the certificate's issuer unknown,
/// its name not the host's...) for the log line.
pub(crate) struct Failure {
    pub reason: &'static str,
    pub detail: Option<String>,
}

impl From<&'static str> for Failure {
    fn from(reason: &'static str) -> Failure {
        Failure {
            reason,
            detail: None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.detail {
            Some(detail) => write!(f, "{}: {detail}", self.reason),
            None => f.write_str(self.reason),
        }
    }
}

/// Connects to `url` (over TLS for `https://`, the certificate checked for its host with
/// `tls`), sends `request` and reads the response head: the stream, the head, and the body
/// bytes that came with it.
pub(crate) async fn request_head(
    url: &HttpUrl,
    request: &[u8],
    tls: &Arc<ClientConfig>,
) -> Result<(Box<dyn Io>, Response, BytesMut), Failure> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| Failure {
            reason: "connect",
            detail: Some(e.to_string()),
        })?;
    let _ = tcp.set_nodelay(true);
    let mut stream: Box<dyn Io> = if url.tls {
        let tls = crate::tls::connect(tls.clone(), &url.host, tcp)
            .await
            .map_err(|detail| Failure {
                reason: "tls",
                detail: Some(detail),
            })?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    stream.write_all(request).await.map_err(|e| Failure {
        reason: "connect",
        detail: Some(e.to_string()),
    })?;
    let mut buf = BytesMut::with_capacity(READ_BUF_BYTES);
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err("closed".into()),
            Ok(_) => {}
            Err(_) => return Err("read_error".into()),
        }
        match parse_response(&buf) {
            Ok(Some((head, n))) => {
                let _ = buf.split_to(n);
                return Ok((stream, head, buf));
            }
            Ok(None) if buf.len() <= MAX_HEAD_BYTES => {}
            _ => return Err("bad_response".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_their_parts_and_bad_ones_say_why() {
        let u = HttpUrl::parse("http://relay:pw@origin-a:8000/live?x=1").unwrap();
        assert_eq!(u.host, "origin-a");
        assert_eq!(u.port, 8000);
        assert_eq!(u.target, "/live?x=1");
        assert_eq!(u.user_info, Some(("relay".into(), "pw".into())));
        assert_eq!(u.public(), "http://origin-a:8000/live?x=1");
        let u = HttpUrl::parse("http://[::1]/m").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 80));
        assert_eq!(u.public(), "http://[::1]:80/m");
        assert_eq!(HttpUrl::parse("HTTP://h").unwrap().target, "/");
        let u = HttpUrl::parse("https://origin/live").unwrap();
        assert!(u.tls);
        assert_eq!(u.port, 443);
        assert_eq!(u.public(), "https://origin:443/live");
        assert!(!u.same_server(&HttpUrl::parse("http://origin:443/live").unwrap()));
        assert!(u.same_server(&HttpUrl::parse("HTTPS://origin:443/x").unwrap()));
        for (bad, why) in [
            ("ftp://h/m", "http://"),
            ("h:8000/m", "http://"),
            ("http://h:0/m", "port"),
            ("http://h:99999/m", "port"),
            ("http:///m", "host"),
            ("http://h h/m", "host"),
            ("http://h/a b", "spaces"),
            ("http://[::1/m", "'['"),
        ] {
            let e = HttpUrl::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_request_is_what_icecast_relays_send() {
        let u = HttpUrl::parse("http://u:p@h:8000/live").unwrap();
        let req = String::from_utf8(u.request("fanstream/1 (relay)", None)).unwrap();
        assert!(req.starts_with("GET /live HTTP/1.0\r\n"), "{req}");
        assert!(req.contains("Host: h:8000\r\n"));
        assert!(req.contains("Icy-MetaData: 1\r\n"));
        assert!(req.contains("User-Agent: fanstream/1 (relay)\r\n"));
        assert!(req.contains("Authorization: Basic dTpw\r\n"), "{req}");
        let req = String::from_utf8(u.request("x", Some(("a", "b")))).unwrap();
        assert!(
            req.contains("Authorization: Basic YTpi\r\n"),
            "given credentials win"
        );
        assert!(req.ends_with("\r\n\r\n"));
    }

    #[test]
    fn redirects_resolve_against_the_url() {
        let u = HttpUrl::parse("http://h:8000/live").unwrap();
        assert_eq!(u.join("/other").unwrap().public(), "http://h:8000/other");
        assert_eq!(
            u.join("http://edge:9000/live").unwrap().public(),
            "http://edge:9000/live"
        );
        assert!(u.join("nowhere").is_err());
        let secure = u.join("https://edge/live").unwrap();
        assert_eq!(secure.public(), "https://edge:443/live");
        assert_eq!(secure.join("/b").unwrap().public(), "https://edge:443/b");
    }

    #[test]
    fn response_heads_parse_incomplete_ones_wait_and_garbage_is_refused() {
        let raw = b"HTTP/1.0 200 OK\r\nContent-Type: audio/mpeg\r\nicy-metaint: 16000\r\n\r\nDATA";
        let (resp, n) = parse_response(raw).unwrap().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("audio/mpeg"));
        assert_eq!(resp.header("icy-metaint"), Some("16000"));
        assert_eq!(&raw[n..], b"DATA");
        let raw = b"ICY 200 OK\r\nicy-name: x\r\n\r\nDATA";
        let (resp, n) = parse_response(raw).unwrap().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(&raw[n..], b"DATA");
        assert!(parse_response(b"HTTP/1.0 200 OK\r\nA: b")
            .unwrap()
            .is_none());
        assert_eq!(
            parse_response(b"\x00\xff garbage\r\n\r\n").unwrap_err(),
            ResponseError::Malformed
        );
        let huge = [
            b"HTTP/1.0 200 OK\r\nA: ".as_slice(),
            &[b'x'; MAX_HEAD_BYTES],
        ]
        .concat();
        assert_eq!(parse_response(&huge).unwrap_err(), ResponseError::Malformed);
    }
}
