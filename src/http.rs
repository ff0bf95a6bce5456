//! HTTP/1.x request heads and the short responses fanstream sends.
//!
//! Both listeners (`GET`, `HEAD`) and sources (`SOURCE`, `PUT`) start with one request head; this
//! module turns bytes into a [`Request`] or a specific [`HeadError`], and never panics on input.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Poll};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest request head accepted: request line plus headers.
pub(crate) const MAX_HEAD_BYTES: usize = 8192;
/// Most headers in one request.
const MAX_HEADERS: usize = 64;
/// Longest mount path.
const MAX_PATH_BYTES: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Head,
    /// Icecast's legacy source method (libshout, `ffmpeg -legacy_icecast 1`).
    Source,
    Put,
    /// A browser's CORS preflight, or a client asking what is allowed.
    Options,
    Other(String),
}

impl Method {
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Source => "SOURCE",
            Method::Put => "PUT",
            Method::Options => "OPTIONS",
            Method::Other(m) => m,
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Request {
    pub method: Method,
    /// The path without its query string.
    pub path: String,
    /// What followed `?` in the request target, still percent-encoded; empty if nothing.
    pub query: String,
    /// Header names lower-cased; values as sent.
    pub headers: Vec<(String, String)>,
    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
}

impl Request {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// User and password from `Authorization: Basic`, if present and well-formed.
    pub fn basic_auth(&self) -> Option<(String, String)> {
        let value = self.header("authorization")?;
        let (scheme, rest) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, pass) = text.split_once(':')?;
        Some((user.to_string(), pass.to_string()))
    }
}

/// Why a request head was refused; each maps to one status and one metric label.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Not HTTP, or bad syntax in the request line or headers.
    Malformed,
    /// The request line alone exceeds the head limit.
    UriTooLong,
    /// The headers exceed the head limit or the header count.
    HeadersTooLarge,
    /// `Content-Length` given more than once with different values (RFC 9112 §6.3: a proxy in
    /// front may have framed the request by the other one), or with a value that is no number.
    ConflictingLength,
}

/// Parses a request head from the start of `buf`. `Ok(None)` means more bytes are needed;
/// `Ok(Some((req, n)))` means the head is the first `n` bytes.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    // `SOURCE /m ICE/1.0`, the old libshout and Icecast 1 request line, which Icecast 2.4 takes
    // as HTTP/1.0: parsed as that, its head one byte shorter than the rewritten copy.
    if let Some(at) = ice_version_at(buf) {
        let mut http = Vec::with_capacity(buf.len() + 1);
        http.extend_from_slice(&buf[..at]);
        http.extend_from_slice(b"HTTP/1.0");
        http.extend_from_slice(&buf[at + ICE_VERSION.len()..]);
        return Ok(parse_http_head(&http)?.map(|(req, n)| (req, n - 1)));
    }
    if waits_for_ice_version(buf) {
        return Ok(None);
    }
    parse_http_head(buf)
}

const ICE_VERSION: &[u8] = b"ICE/1.0";

/// Where `ICE/1.0` ends the request line, if it does.
fn ice_version_at(buf: &[u8]) -> Option<usize> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let at = line.len().checked_sub(ICE_VERSION.len())?;
    (line.ends_with(ICE_VERSION) && at > 0 && line[at - 1] == b' ').then_some(at)
}

/// The request line so far (no line end yet) ends with a third word that may become `ICE/1.0`.
fn waits_for_ice_version(buf: &[u8]) -> bool {
    if buf.contains(&b'\n') || buf.len() >= MAX_HEAD_BYTES {
        return false;
    }
    let mut words = buf.split(|&b| b == b' ');
    let third = words.nth(2).map(|w| w.strip_suffix(b"\r").unwrap_or(w));
    third.is_some_and(|w| !w.is_empty() && ICE_VERSION.starts_with(w)) && words.next().is_none()
}

fn parse_http_head(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::HeadersTooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let n = match status {
        httparse::Status::Complete(n) if n <= MAX_HEAD_BYTES => n,
        httparse::Status::Complete(_) => return Err(oversize(buf)),
        httparse::Status::Partial if buf.len() >= MAX_HEAD_BYTES => return Err(oversize(buf)),
        httparse::Status::Partial => return Ok(None),
    };
    let method = match req.method.unwrap_or_default() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "SOURCE" => Method::Source,
        "PUT" => Method::Put,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_string()),
    };
    let target = origin_form(req.path.unwrap_or_default());
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (decoded_path(path), query.to_string());
    let mut hs = Vec::with_capacity(req.headers.len());
    let mut length = None;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HeadError::Malformed)?;
        if h.name.eq_ignore_ascii_case("content-length") {
            check_length(value, &mut length)?;
        }
        hs.push((h.name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Some((
        Request {
            method,
            path,
            query,
            headers: hs,
            version: req.version.unwrap_or(0),
        },
        n,
    )))
}

/// Checks one `Content-Length` field against those before it (`seen`): every value, including
/// each of a comma-separated list, must be the same number. RFC 9112 allows a recipient to
/// accept repeats of one value and requires it to refuse anything else, since a proxy that
/// picked another value would see a different request in the same bytes.
fn check_length(value: &str, seen: &mut Option<u64>) -> Result<(), HeadError> {
    for item in value.split(',') {
        let item = item.trim();
        if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HeadError::ConflictingLength);
        }
        let n: u64 = item.parse().map_err(|_| HeadError::ConflictingLength)?;
        match *seen {
            Some(before) if before != n => return Err(HeadError::ConflictingLength),
            _ => *seen = Some(n),
        }
    }
    Ok(())
}

fn oversize(buf: &[u8]) -> HeadError {
    let line_end = buf.iter().position(|&b| b == b'\n');
    match line_end {
        Some(i) if i < MAX_HEAD_BYTES => HeadError::HeadersTooLarge,
        _ => HeadError::UriTooLong,
    }
}

impl Request {
    /// The query's parameters, names and values percent-decoded (`+` as a space); values as
    /// bytes, since their character set is the client's to say (`charset=`).
    pub fn query_params(&self) -> Vec<(String, Vec<u8>)> {
        self.query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (
                    String::from_utf8_lossy(&percent_decode(k)).into_owned(),
                    percent_decode(v),
                )
            })
            .collect()
    }

    /// Whether the client asked for JSON: `?format=json` (as Icecast's admin API takes it) or
    /// `Accept: application/json`. Its answers, refusals included, are then JSON: a panel
    /// parses every answer it gets.
    pub fn wants_json(&self) -> bool {
        self.query_params()
            .iter()
            .any(|(name, value)| name == "format" && value == b"json")
            || self
                .header("accept")
                .is_some_and(|a| a.to_ascii_lowercase().contains("application/json"))
    }
}

/// The request target as a path and query: the absolute form (`http://host:8000/live`, which a
/// client configured for a proxy sends) less its scheme and authority, as RFC 9112 (3.2.2) has
/// a server accept it.
fn origin_form(target: &str) -> &str {
    let Some(rest) = ["http://", "https://"].iter().find_map(|scheme| {
        target
            .get(..scheme.len())
            .filter(|s| s.eq_ignore_ascii_case(scheme))
            .map(|_| &target[scheme.len()..])
    }) else {
        return target;
    };
    match rest.find(['/', '?']) {
        Some(at) if rest.as_bytes()[at] == b'/' => &rest[at..],
        // `http://host` or `http://host?q`: the root.
        _ => "/",
    }
}

/// A path with its `%XX` escapes decoded, as Icecast takes `/%6Cive` for `/live` (`+` is a plus
/// in a path). What they decode to is checked like any path ([`valid_mount_path`]), so an
/// escape passes no `..` or odd byte; one that is not UTF-8 is kept as sent, and refused so.
fn decoded_path(path: &str) -> String {
    if !path.contains('%') {
        return path.to_string();
    }
    String::from_utf8(percent_decode_as(path, false)).unwrap_or_else(|_| path.to_string())
}

/// `%XX` escapes and `+` decoded; a malformed escape is kept as it is.
fn percent_decode(s: &str) -> Vec<u8> {
    percent_decode_as(s, true)
}

/// `%XX` escapes decoded, and `+` as a space if `plus_is_space` (a query's convention).
fn percent_decode_as(s: &str, plus_is_space: bool) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// A mount path fanstream accepts: starts with '/', at most 256 bytes of unreserved characters
/// and '/', no empty or dot-dot segment. Nothing in fanstream maps paths to files; this keeps
/// logs, metric labels and status pages free of odd bytes.
pub(crate) fn valid_mount_path(path: &str) -> bool {
    path.len() >= 2
        && path.len() <= MAX_PATH_BYTES
        && path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~/".contains(&b))
        && path[1..]
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// How long a short response (an error, a status page) may take to write before we give up on
/// the peer.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes a whole short response and closes, giving up after [`RESPONSE_TIMEOUT`].
pub(crate) async fn write_and_close<S: AsyncWrite + Unpin>(mut stream: S, resp: &[u8]) {
    let _ = tokio::time::timeout(RESPONSE_TIMEOUT, async {
        stream.write_all(resp).await?;
        stream.shutdown().await
    })
    .await;
}

/// Why reading a request head ended without a request.
pub(crate) enum ReadHeadError {
    /// The peer closed or reset before sending a whole head.
    Closed,
    Head(HeadError),
}

/// Reads until a whole request head has arrived; returns it and any bytes after it (a legacy
/// source sends media in the same packet as its headers). Nothing is allocated before the first
/// bytes arrive, and then only what arrived: most connections of a flood never send any.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Request, Vec<u8>), ReadHeadError> {
    read_head_after(stream, Vec::new()).await
}

/// [`read_head`], the head beginning with `buf`, bytes already read (after a PROXY header).
pub(crate) async fn read_head_after<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: Vec<u8>,
) -> Result<(Request, Vec<u8>), ReadHeadError> {
    loop {
        if let Some((req, n)) = parse_head(&buf).map_err(ReadHeadError::Head)? {
            return Ok((req, buf.split_off(n)));
        }
        let room = MAX_HEAD_BYTES - buf.len();
        match read_with(stream, room, |bytes| buf.extend_from_slice(bytes)).await {
            Ok(0) | Err(_) => return Err(ReadHeadError::Closed),
            Ok(_) => {}
        }
    }
}

/// Reads once, at most `max` bytes (up to [`MAX_HEAD_BYTES`]), and hands what came to `take`;
/// returns how many bytes (0: the peer closed). The buffer read into lives on the stack of the
/// poll that completes the read, not in the caller's future: a connection that waits for bytes
/// holds none, whether it is a request head not sent yet or a refused peer being drained.
pub(crate) async fn read_with<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
    mut take: impl FnMut(&[u8]),
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut scratch = [MaybeUninit::<u8>::uninit(); MAX_HEAD_BYTES];
        let mut read = ReadBuf::uninit(&mut scratch[..max.min(MAX_HEAD_BYTES)]);
        ready!(Pin::new(&mut *stream).poll_read(cx, &mut read))?;
        take(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    })
    .await
}

/// The reason phrase of the statuses fanstream sends.
pub(crate) fn status_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The response head of a live stream, shared by its listeners: its Content-Type, no caching
/// (every response is a different moment of the stream), and the `extra` headers (the source's
/// `icy-*` description). What depends on the request (CORS, `icy-metaint`) is added per
/// listener with [`head_with`].
pub(crate) fn stream_head(content_type: &str, extra: &[(&str, String)]) -> String {
    let mut head = format!(
        "HTTP/1.0 200 OK\r\nServer: fanstream/{}\r\nContent-Type: {content_type}\r\nCache-Control: no-cache, no-store\r\nPragma: no-cache\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION"),
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// `head`, a complete response head, with `lines` (each ending in CRLF) before its closing blank
/// line: a shared head with what is particular to one request.
pub(crate) fn head_with(head: &[u8], lines: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + lines.len());
    out.extend_from_slice(&head[..head.len() - 2]);
    out.extend_from_slice(lines.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// A complete short response with a text body; the connection closes after it.
pub(crate) fn response(
    status: u16,
    reason: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    typed_response(
        status,
        reason,
        extra_headers,
        "text/plain; charset=utf-8",
        body,
    )
}

/// [`response`] with a body of another type.
pub(crate) fn typed_response(
    status: u16,
    reason: &str,
    extra_headers: &[(&str, &str)],
    content_type: &str,
    body: &str,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.0 {status} {reason}\r\nServer: fanstream/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in extra_headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    out.into_bytes()
}

/// A whole response with `lines` (header lines, each ending in CRLF) added after its status
/// line.
pub(crate) fn with_header_lines(resp: Vec<u8>, lines: &str) -> Vec<u8> {
    let Some(at) = resp.windows(2).position(|w| w == b"\r\n") else {
        return resp;
    };
    if lines.is_empty() {
        return resp;
    }
    let at = at + 2;
    let mut out = Vec::with_capacity(resp.len() + lines.len());
    out.extend_from_slice(&resp[..at]);
    out.extend_from_slice(lines.as_bytes());
    out.extend_from_slice(&resp[at..]);
    out
}

/// Compares secrets in time independent of where they differ, so timing tells a password guesser
/// nothing about how much of a guess was right.
pub(crate) fn secrets_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// Header values are echoed to every listener: keep printable text only, and not too much of it.
pub(crate) fn clean_header_value(v: &str) -> String {
    v.chars()
        .filter(|c| !c.is_control())
        .take(256)
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_source_put_with_body_bytes_after_the_head() {
        let raw = b"PUT /live HTTP/1.1\r\nHost: x\r\nauthorization: Basic c291cmNlOnB3\r\nContent-Type: audio/mpeg\r\nExpect: 100-continue\r\nIce-Name: Test\r\n\r\nMEDIA";
        let (req, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!(req.method, Method::Put);
        assert_eq!(req.path, "/live");
        assert_eq!(req.header("content-type"), Some("audio/mpeg"));
        assert_eq!(req.header("ice-name"), Some("Test"));
        assert_eq!(req.basic_auth(), Some(("source".into(), "pw".into())));
        assert_eq!(&raw[n..], b"MEDIA");
    }

    #[test]
    fn parses_legacy_source_and_strips_query() {
        let (req, _) = parse_head(b"SOURCE /m.mp3?x=1 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.method, Method::Source);
        assert_eq!(req.path, "/m.mp3");
        let (req, _) = parse_head(b"BREW /pot HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(req.method, Method::Other("BREW".into()));
    }

    #[test]
    fn a_target_in_absolute_form_or_with_escapes_is_the_path_it_names() {
        let path_query = |line: &str| {
            let raw = format!("{line}\r\n\r\n");
            let (req, _) = parse_head(raw.as_bytes()).unwrap().unwrap();
            (req.path, req.query)
        };
        let p = |path: &str, query: &str| (path.to_string(), query.to_string());
        assert_eq!(
            path_query("GET http://radio.example:8000/live?a=b HTTP/1.1"),
            p("/live", "a=b")
        );
        assert_eq!(path_query("GET HTTPS://radio.example HTTP/1.1"), p("/", ""));
        assert_eq!(
            path_query("GET http://radio.example?x HTTP/1.1"),
            p("/", "")
        );
        assert_eq!(
            path_query("GET /%6Cive?song=a%20b HTTP/1.1"),
            p("/live", "song=a%20b"),
            "the path decoded, the query left to its reader"
        );
        assert_eq!(path_query("GET /a+b HTTP/1.1"), p("/a+b", ""));
        // Decoded, then checked as any path.
        let (dots, _) = path_query("GET /%2e%2e/etc HTTP/1.1");
        assert_eq!(dots, "/../etc");
        assert!(!valid_mount_path(&dots));
        let (raw, _) = path_query("GET /%ff HTTP/1.1");
        assert_eq!(raw, "/%ff", "not UTF-8: kept as sent");
        assert!(!valid_mount_path(&raw));
    }

    #[test]
    fn an_ice_request_line_is_taken_as_http_1_0() {
        let raw = b"SOURCE /old ICE/1.0\r\nContent-Type: audio/mpeg\r\n\r\nMEDIA";
        let (req, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!(req.method, Method::Source);
        assert_eq!((req.path.as_str(), req.version), ("/old", 0));
        assert_eq!(req.header("content-type"), Some("audio/mpeg"));
        assert_eq!(&raw[n..], b"MEDIA");
        for partial in [
            &b"SOURCE /old I"[..],
            b"SOURCE /old ICE/1",
            b"SOURCE /old ICE/1.0\r",
        ] {
            assert!(parse_head(partial).unwrap().is_none(), "{partial:?}");
        }
        assert!(parse_head(b"SOURCE /old ICE/2.0\r\n\r\n").is_err());
        assert!(parse_head(b"SOURCE /old XICE/1.0\r\n\r\n").is_err());
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert_eq!(
            parse_head(b"GET /live HTTP/1.1\r\nHost: a")
                .unwrap()
                .map(|_| ()),
            None
        );
        assert_eq!(parse_head(b"").unwrap().map(|_| ()), None);
    }

    #[test]
    fn garbage_is_malformed() {
        for raw in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET\r\n\r\n",
            b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET /x HTTP/1.1\r\nX: \xff\xfe\r\n\r\n",
        ] {
            assert_eq!(
                parse_head(raw).unwrap_err(),
                HeadError::Malformed,
                "{raw:?}"
            );
        }
    }

    #[test]
    fn oversize_heads_are_told_apart() {
        let mut long_line = b"GET /".to_vec();
        long_line.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        assert_eq!(parse_head(&long_line).unwrap_err(), HeadError::UriTooLong);
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        while big.len() < MAX_HEAD_BYTES + 10 {
            big.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let e = parse_head(&big).unwrap_err();
        assert_eq!(e, HeadError::HeadersTooLarge);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many).unwrap_err(), HeadError::HeadersTooLarge);
    }

    #[test]
    fn content_lengths_that_disagree_are_refused() {
        let head =
            |fields: &str| parse_head(format!("PUT /live HTTP/1.1\r\n{fields}\r\n").as_bytes());
        assert_eq!(
            head("Content-Length: 5\r\nContent-Length: 7\r\n").unwrap_err(),
            HeadError::ConflictingLength
        );
        assert_eq!(
            head("Content-Length: 5, 7\r\n").unwrap_err(),
            HeadError::ConflictingLength
        );
        for bad in ["-1", "5x", "", "0x10", "99999999999999999999999"] {
            assert_eq!(
                head(&format!("Content-Length: {bad}\r\n")).unwrap_err(),
                HeadError::ConflictingLength,
                "{bad:?}"
            );
        }
        for ok in [
            "Content-Length: 5\r\n",
            "Content-Length: 5\r\ncontent-length: 5\r\n",
            "Content-Length: 5, 5\r\n",
        ] {
            assert!(head(ok).unwrap().is_some(), "{ok:?}");
        }
    }

    #[test]
    fn mount_paths() {
        for ok in ["/live", "/a/b.mp3", "/x-y_z~1"] {
            assert!(valid_mount_path(ok), "{ok}");
        }
        for bad in [
            "", "/", "live", "/../etc", "/a//b", "/a/./b", "/%2e", "/a b", "/a\0", "/a/",
        ] {
            assert!(!valid_mount_path(bad), "{bad:?}");
        }
        assert!(!valid_mount_path(&format!("/{}", "a".repeat(300))));
    }

    #[test]
    fn basic_auth_variants() {
        let req = |v: &str| Request {
            method: Method::Get,
            path: "/".into(),
            query: String::new(),
            headers: vec![("authorization".into(), v.into())],
            version: 1,
        };
        assert_eq!(
            req("basic c291cmNlOnA6dw==").basic_auth(),
            Some(("source".into(), "p:w".into()))
        );
        assert_eq!(req("Bearer abc").basic_auth(), None);
        assert_eq!(req("Basic !!!").basic_auth(), None);
        assert_eq!(req("Basic bm9jb2xvbg==").basic_auth(), None);
    }

    #[test]
    fn query_parameters_are_percent_decoded() {
        let (req, _) = parse_head(
            b"GET /admin/metadata?mode=updinfo&mount=%2Flive&song=Caf%E9+Noir&bad=%zz%4&empty HTTP/1.0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(req.path, "/admin/metadata");
        let params = req.query_params();
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("mount").unwrap(), b"/live");
        assert_eq!(get("song").unwrap(), b"Caf\xe9 Noir");
        assert_eq!(get("bad").unwrap(), b"%zz%4");
        assert_eq!(get("empty").unwrap(), b"");
        assert_eq!(get("mode").unwrap(), b"updinfo");
    }

    #[test]
    fn secret_comparison() {
        assert!(secrets_equal("hackme", "hackme"));
        assert!(!secrets_equal("hackme", "hackmf"));
        assert!(!secrets_equal("hackme", "hackme2"));
        assert!(!secrets_equal("", "a"));
    }

    #[test]
    fn responses_are_complete() {
        let r = String::from_utf8(response(
            401,
            "Unauthorized",
            &[("WWW-Authenticate", "Basic realm=\"fanstream\"")],
            "bad credentials\n",
        ))
        .unwrap();
        assert!(r.starts_with("HTTP/1.0 401 Unauthorized\r\n"));
        assert!(r.contains("WWW-Authenticate: Basic realm=\"fanstream\"\r\n"));
        assert!(r.ends_with("\r\n\r\nbad credentials\n"));
        assert!(r.contains("Content-Length: 16\r\n"));
    }

    #[test]
    fn lines_go_before_the_blank_line() {
        assert_eq!(
            head_with(b"HTTP/1.0 200 OK\r\nA: b\r\n\r\n", "C: d\r\n"),
            b"HTTP/1.0 200 OK\r\nA: b\r\nC: d\r\n\r\n"
        );
    }
}
