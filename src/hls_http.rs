//! HLS over HTTP: `GET` and `HEAD` of `/MOUNT/index.m3u8` and of the segments it lists, answered
//! from the HLS window in the mount's snapshot ([`crate::hls`]), as responses any HTTP cache can
//! keep and serve in fanstream's place:
//! - a segment never changes under its name: `Cache-Control: public, max-age=86400, immutable`,
//!   a strong `ETag`, `Content-Length`, `Range` (one range; several are answered whole, as RFC
//!   9110 allows) and `304` on `If-None-Match`;
//! - the playlist changes with each segment: its max-age is half a target duration, and its
//!   `ETag` names its newest segment, so a cache revalidates it with a `304`.
//! - a blocking playlist reload (`index.m3u8?_HLS_msn=N`, advertised by the playlist's
//!   `EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES`) is held on its worker until segment N is
//!   published, woken by ingest, not by polling.
//!
//! Unlike a listener's long response, each is a short HTTP/1.1 response on a connection kept
//! alive: a player or a cache fetches the playlist and segment after segment on one connection,
//! pipelined or not; the next request on it is read here, and one that is not for HLS goes back
//! to the router. A refusal (`404` naming why: HLS off, a format not segmented, no segment yet,
//! a segment gone) closes the connection, as every refusal does.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use crate::conn::{log_request, refuse, Incoming, Io};
use crate::dates::Date;
use crate::hls::{is_segment_name, source_for, Source, FMP4_CODECS};
use crate::http::{
    parse_head, read_with, status_phrase, valid_mount_path, HeadError, Method, Request,
    MAX_HEAD_BYTES,
};
use crate::metrics::HLS_KINDS;
use crate::reasons::Refusal;
use crate::shared::Shared;

/// The live playlist's file name in a mount's directory.
pub(crate) const PLAYLIST: &str = "index.m3u8";
/// A segment's bytes never change; a day is as long as any cache needs them.
const SEGMENT_CACHE_CONTROL: &str = "public, max-age=86400, immutable";

/// The mount and the file an HLS path names: `/MOUNT/index.m3u8` or `/MOUNT/SEGMENT`.
fn split(path: &str) -> Option<(&str, &str)> {
    let (mount, file) = path.rsplit_once('/')?;
    (valid_mount_path(mount) && (file == PLAYLIST || is_segment_name(file)))
        .then_some((mount, file))
}

/// Whether the router should hand `path` here: an HLS file name under a mount path that is not
/// itself a mount (a stream mounted at `/x/index.m3u8` is that stream).
pub(crate) fn is_hls_path(shared: &Shared, path: &str) -> bool {
    split(path).is_some() && shared.mounts.get(path).is_none()
}

/// Answers HLS requests on the connection for as long as they come, and hands back the first
/// request that is not one, for the router; None once the connection is done.
pub(crate) async fn serve(shared: &Shared, incoming: Incoming) -> Option<Incoming> {
    let Incoming {
        mut stream,
        mut req,
        leftover: mut buf,
        mut peer,
        conn,
        relay,
    } = incoming;
    // Each response goes out whole in one or two writes: waiting to coalesce them only delays
    // the next request of a player fetching segment after segment.
    let _ = stream.socket().set_nodelay(true);
    loop {
        let keep_alive = keeps_alive(&req);
        pull_on_demand(shared, &req).await;
        let response = match block(shared, &req).await {
            Ok(()) => answer(shared, &req, peer.ip()),
            Err(no) => Err(no),
        };
        let response = match response {
            Ok(r) => r,
            Err(no) => {
                let leftover = Vec::new();
                let incoming = Incoming {
                    stream,
                    req,
                    leftover,
                    peer,
                    conn,
                    relay,
                };
                incoming.refuse(shared, no).await;
                return None;
            }
        };
        let send_timeout = Duration::from_secs(shared.config.load().send_timeout_secs);
        let sent = send(&mut stream, &req, &response, keep_alive, send_timeout).await;
        log_request(shared, &req, peer, response.status, response.body.len());
        if !sent {
            return None;
        }
        if !keep_alive {
            let _ = stream.shutdown().await;
            return None;
        }
        let idle = Duration::from_secs(shared.config.load().header_timeout_secs);
        req = match tokio::time::timeout(idle, next_head(&mut stream, &mut buf)).await {
            Ok(Ok(next)) => next,
            Ok(Err(Some(e))) => {
                // As the router refuses a malformed first request.
                refuse(shared, &mut stream, peer, e.into()).await;
                return None;
            }
            // Closed by the client, or idle past the header timeout: a kept-alive connection
            // ends so, with nothing to answer.
            Ok(Err(None)) | Err(_) => return None,
        };
        peer = client_of(shared, &stream, &req, peer);
        let hls =
            matches!(req.method, Method::Get | Method::Head) && is_hls_path(shared, &req.path);
        if !hls {
            // Relay credentials are taken on a connection's first request only (the router
            // checks them with its address limits): a later one is a listener's.
            return Some(Incoming {
                stream,
                req,
                leftover: buf,
                peer,
                conn,
                relay: false,
            });
        }
    }
}

/// An HLS request for a mount that an on-demand relay feeds asks the relay to pull, as a
/// listener's request does, so each playlist poll keeps it pulling (with the players counted in
/// `hls_sessions`: see `relay::Relay::wanted`). While the mount has no segment yet (the relay was
/// idle), the request waits for the first, at most `source_timeout_secs` and two segments' time,
/// instead of being refused at once: a player gives up on a playlist that is not there.
async fn pull_on_demand(shared: &Shared, req: &Request) {
    let Some((path, _)) = split(&req.path) else {
        return;
    };
    // A live mount's snapshot carries its settings. The configuration's copy of them is made only
    // for a mount that does not exist yet, the one case where an on-demand relay has a source to
    // start: not on every playlist and segment request of every mount.
    let (hls, segment_secs) = match shared.mounts.get(path) {
        Some(mount) => {
            let snap = mount.store.load();
            (snap.settings.hls, snap.settings.hls_segment_secs)
        }
        None => {
            let settings = shared.config.load().mount(path);
            (settings.hls, settings.hls_segment_secs)
        }
    };
    // A mount without HLS answers 404 whatever its source: no reason to pull.
    if !hls || !shared.on_demand.ask(path) {
        return;
    }
    let wait = shared.config.load().source_timeout_secs + 2 * segment_secs;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        // Both registered before the look, so that a mount or a segment arriving in between
        // still wakes this.
        let mount = shared.mounts.get(path);
        let mut changed = std::pin::pin!(shared.mounts_changed.notified());
        changed.as_mut().enable();
        let mut published = std::pin::pin!(mount.as_ref().map(|m| m.hls_published.notified()));
        if let Some(p) = published.as_mut().as_pin_mut() {
            p.enable();
        }
        if mount.as_ref().is_some_and(|m| m.store.load().hls.is_some()) {
            return;
        }
        let segment = async {
            match published.as_mut().as_pin_mut() {
                Some(p) => p.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = changed => {}
            _ = segment => {}
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// A blocking playlist reload (`index.m3u8?_HLS_msn=N`, RFC 8216bis, 6.2.5.2): waits until the
/// playlist lists segment N, woken by ingest when a segment is published (no polling), for at
/// most three target durations (then `503`). N more than two past the newest segment is a
/// `400`, as the specification says: that segment is too far off to wait for. Any other request
/// (or one for a mount without a window, which `answer` refuses) goes on at once.
async fn block(shared: &Shared, req: &Request) -> Result<(), Refusal> {
    let Some(msn) = requested_msn(&req.query)? else {
        return Ok(());
    };
    let Some(mount) = split(&req.path)
        .filter(|(_, file)| *file == PLAYLIST)
        .and_then(|(mount, _)| shared.mounts.get(mount))
    else {
        return Ok(());
    };
    let mut deadline = None;
    loop {
        // Registered before the snapshot is read: a segment published in between still wakes.
        let published = mount.hls_published.notified();
        tokio::pin!(published);
        published.as_mut().enable();
        let Some(window) = mount.store.load().hls.clone() else {
            return Ok(());
        };
        let newest = window.newest_seq();
        if msn <= newest {
            return Ok(());
        }
        if msn > newest + 2 {
            return Err(Refusal::HlsMsnTooFar);
        }
        let until = *deadline.get_or_insert_with(|| {
            tokio::time::Instant::now() + Duration::from_secs(3 * window.target_secs)
        });
        if tokio::time::timeout_at(until, published).await.is_err() {
            return Err(Refusal::HlsMsnTimeout);
        }
    }
}

/// The `_HLS_msn` of a playlist request's query: None without one, a `400` if it is not a
/// number.
fn requested_msn(query: &str) -> Result<Option<u64>, Refusal> {
    let Some(value) = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("_HLS_msn="))
    else {
        return Ok(None);
    };
    value.parse().map(Some).map_err(|_| Refusal::BadQuery)
}

/// Who sent a request after the first on the connection. Behind a trusted proxy that names
/// clients per request (`X-Forwarded-For`, `Forwarded`), a kept-alive connection carries
/// requests of many clients, each named by its own header, as the router names the first;
/// otherwise (a direct client, or a PROXY header naming one client for the connection) it is
/// still `previous`.
fn client_of(shared: &Shared, stream: &Io, req: &Request, previous: SocketAddr) -> SocketAddr {
    let cfg = shared.config.load();
    let Ok(proxy) = stream.socket().peer_addr() else {
        return previous;
    };
    if !cfg.trusts(proxy.ip()) || cfg.proxy_protocol {
        return previous;
    }
    crate::proxy::forwarded_client(&cfg, req).map_or(proxy, |ip| SocketAddr::new(ip, 0))
}

/// Reads the next request head, from what is already buffered (a pipelined request) first; the
/// bytes after it stay in `buf`. Err(None) when the client closed.
async fn next_head(stream: &mut Io, buf: &mut Vec<u8>) -> Result<Request, Option<HeadError>> {
    loop {
        if let Some((req, n)) = parse_head(buf).map_err(Some)? {
            buf.drain(..n);
            return Ok(req);
        }
        let room = MAX_HEAD_BYTES.saturating_sub(buf.len());
        match read_with(stream, room, |bytes| buf.extend_from_slice(bytes)).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

/// Whether the connection stays open after answering `req`: HTTP/1.1 unless the client says
/// `close`, HTTP/1.0 only if it asks for `keep-alive`; never after a request with a body, which
/// nothing here reads.
fn keeps_alive(req: &Request) -> bool {
    let says = |token: &str| {
        req.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let body = req
        .header("content-length")
        .is_some_and(|v| v.trim() != "0")
        || req.header("transfer-encoding").is_some();
    !body
        && match req.version {
            0 => says("keep-alive"),
            _ => !says("close"),
        }
}

/// A response to send: its status, headers but the connection's, and body.
#[derive(Debug)]
struct Response {
    status: u16,
    /// Header lines, each ending in CRLF.
    headers: String,
    body: Bytes,
    /// The length `Content-Length` states: the body's, or for a `HEAD` what a `GET` would send.
    length: usize,
}

/// Who polls a playlist, as HLS sessions are told apart: the address and the `User-Agent`.
fn client_key(req: &Request, peer: IpAddr) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    peer.hash(&mut h);
    req.header("user-agent").hash(&mut h);
    h.finish()
}

/// What the mount's HLS window has at the path, or why not.
fn answer(shared: &Shared, req: &Request, peer: IpAddr) -> Result<Response, Refusal> {
    let (mount_path, file) = split(&req.path).ok_or(Refusal::UnknownMount)?;
    let mount = shared.mounts.get(mount_path).ok_or(Refusal::UnknownMount)?;
    let snap = mount.store.load_full();
    if !snap.settings.hls {
        return Err(Refusal::HlsOff);
    }
    let Some(window) = snap.hls.as_ref() else {
        // An Ogg or WebM stream is segmented only if it carries Opus, Vorbis or FLAC; until the
        // format layer has seen its headers, it may.
        let subtype = snap.info.meta.subtype.as_deref();
        let audio = subtype.is_none_or(|s| s.split('/').any(|c| FMP4_CODECS.contains(&c)));
        return Err(match source_for(&snap.info.meta.content_type) {
            Some(Source::Packed(_)) => Refusal::HlsNotReady,
            Some(Source::Ogg | Source::Webm) if audio => Refusal::HlsNotReady,
            _ => Refusal::HlsUnsupportedFormat,
        });
    };
    let kind = if file == PLAYLIST { 0 } else { 1 };
    let (body, etag, content_type, cache_control) = if file == PLAYLIST {
        // A player polls the playlist about once a target duration: three missed polls and it
        // is gone.
        let ttl = Duration::from_secs(3 * window.target_secs);
        mount
            .hls_sessions
            .poll(client_key(req, peer), Instant::now(), ttl);
        // About half a segment: a player polls the playlist about once a target duration, and
        // a cache should not hold it much longer than the time a new segment takes to come.
        let max_age = window.target_secs.div_ceil(2);
        (
            window.playlist.clone(),
            window.playlist_etag.clone(),
            "application/vnd.apple.mpegurl",
            format!("public, max-age={max_age}"),
        )
    } else if let Some(init) = window.init(file) {
        (
            init.data.clone(),
            format!("\"{}\"", init.name),
            "audio/mp4",
            SEGMENT_CACHE_CONTROL.to_string(),
        )
    } else {
        let segment = window.segment(file).ok_or(Refusal::SegmentGone)?;
        (
            segment.data.clone(),
            segment.etag(),
            segment.content_type(),
            SEGMENT_CACHE_CONTROL.to_string(),
        )
    };
    shared
        .metrics
        .hls_requests
        .with_label_values(&[mount.label.as_str(), HLS_KINDS[kind]])
        .inc();
    let cors = crate::cors::headers(&shared.config.load(), req);
    Ok(respond(
        req,
        body,
        &etag,
        content_type,
        &cache_control,
        &cors,
    ))
}

/// The response to a `GET` or `HEAD` of `body`, as its validators and `Range` make it.
fn respond(
    req: &Request,
    body: Bytes,
    etag: &str,
    content_type: &str,
    cache_control: &str,
    cors: &str,
) -> Response {
    let mut headers = format!("Cache-Control: {cache_control}\r\nETag: {etag}\r\n{cors}");
    if req
        .header("if-none-match")
        .is_some_and(|v| etag_matches(v, etag))
    {
        return Response {
            status: 304,
            headers,
            body: Bytes::new(),
            length: 0,
        };
    }
    headers.push_str(&format!(
        "Content-Type: {content_type}\r\nAccept-Ranges: bytes\r\n"
    ));
    let total = body.len();
    // A range applies unless `If-Range` names another version than this one.
    let range = req
        .header("range")
        .filter(|_| req.header("if-range").is_none_or(|v| v.trim() == etag));
    let (status, body) = match range.map(|r| byte_range(r, total)) {
        Some(Ok(Some((first, last)))) => {
            headers.push_str(&format!("Content-Range: bytes {first}-{last}/{total}\r\n"));
            (206, body.slice(first..=last))
        }
        Some(Err(())) => {
            // Not the file's lasting answer: a cache must not keep it for the file's lifetime.
            headers = headers.replacen(
                &format!("Cache-Control: {cache_control}"),
                "Cache-Control: no-store",
                1,
            );
            headers.push_str(&format!("Content-Range: bytes */{total}\r\n"));
            (416, Bytes::new())
        }
        Some(Ok(None)) | None => (200, body),
    };
    let length = body.len();
    let body = if req.method == Method::Head {
        Bytes::new()
    } else {
        body
    };
    Response {
        status,
        headers,
        body,
        length,
    }
}

/// Whether `If-None-Match` names `etag` (by weak comparison, as RFC 9110 says for it) or `*`.
fn etag_matches(header: &str, etag: &str) -> bool {
    let ours = etag.trim_start_matches("W/");
    header
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours)
}

/// The one byte range a `Range` header asks of `total` bytes, as (first, last) inclusive:
/// Ok(None) when it is not a single byte range this answers (several, another unit, bad
/// syntax: the whole body goes), Err when no byte of it exists (416).
fn byte_range(header: &str, total: usize) -> Result<Option<(usize, usize)>, ()> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let number = |s: &str| s.trim().parse::<usize>().ok();
    let (first, last) = match (first.trim().is_empty(), last.trim().is_empty()) {
        // `-N`: the last N bytes.
        (true, false) => match number(last) {
            Some(0) => return Err(()),
            Some(n) => (total.saturating_sub(n), total.checked_sub(1).ok_or(())?),
            None => return Ok(None),
        },
        (false, true) => match number(first) {
            Some(f) => (f, total.saturating_sub(1)),
            None => return Ok(None),
        },
        (false, false) => match (number(first), number(last)) {
            (Some(f), Some(l)) if f <= l => (f, l.min(total.saturating_sub(1))),
            _ => return Ok(None),
        },
        (true, true) => return Ok(None),
    };
    if first >= total {
        return Err(());
    }
    Ok(Some((first, last)))
}

/// Writes the response and logs it; false if the client did not take it in time.
async fn send(
    stream: &mut Io,
    req: &Request,
    response: &Response,
    keep_alive: bool,
    timeout: Duration,
) -> bool {
    let connection = match (keep_alive, req.version) {
        (false, _) => "close",
        (true, 0) => "keep-alive",
        // HTTP/1.1 keeps connections alive unless told otherwise.
        (true, _) => "",
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: fanstream/{}\r\nDate: {}\r\n{}",
        response.status,
        status_phrase(response.status),
        env!("CARGO_PKG_VERSION"),
        Date::of(SystemTime::now()).http(),
        response.headers,
    );
    if response.status != 304 {
        head.push_str(&format!("Content-Length: {}\r\n", response.length));
    }
    if !connection.is_empty() {
        head.push_str(&format!("Connection: {connection}\r\n"));
    }
    head.push_str("\r\n");
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        if !response.body.is_empty() {
            stream.write_all(&response.body).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(headers: &[(&str, &str)]) -> Request {
        Request {
            method: Method::Get,
            path: "/m/index.m3u8".into(),
            query: String::new(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            version: 1,
        }
    }

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        assert_eq!(byte_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(byte_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-500", 100), Ok(Some((0, 99))));
        assert_eq!(byte_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(byte_range("bytes=100-", 100), Err(()));
        assert_eq!(byte_range("bytes=-0", 100), Err(()));
        assert_eq!(byte_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(byte_range("items=0-1", 100), Ok(None));
        assert_eq!(byte_range("bytes=9-1", 100), Ok(None));
        assert_eq!(byte_range("bytes=x-", 100), Ok(None));
    }

    #[test]
    fn validators_and_ranges_shape_the_response() {
        let body = Bytes::from_static(b"0123456789");
        let r = respond(&get(&[]), body.clone(), "\"a\"", "audio/mpeg", "c", "");
        assert_eq!(
            (r.status, r.length, &r.body[..]),
            (200, 10, &b"0123456789"[..])
        );
        let r = respond(
            &get(&[("if-none-match", "\"x\", W/\"a\"")]),
            body.clone(),
            "\"a\"",
            "t",
            "c",
            "",
        );
        assert_eq!((r.status, r.body.len()), (304, 0));
        let r = respond(
            &get(&[("range", "bytes=2-4")]),
            body.clone(),
            "\"a\"",
            "t",
            "c",
            "",
        );
        assert_eq!((r.status, &r.body[..]), (206, &b"234"[..]));
        assert!(
            r.headers.contains("Content-Range: bytes 2-4/10\r\n"),
            "{}",
            r.headers
        );
        let stale = [("range", "bytes=2-4"), ("if-range", "\"old\"")];
        assert_eq!(
            respond(&get(&stale), body.clone(), "\"a\"", "t", "c", "").status,
            200
        );
        let r = respond(
            &get(&[("range", "bytes=20-")]),
            body.clone(),
            "\"a\"",
            "t",
            "c",
            "",
        );
        assert_eq!(r.status, 416);
        assert!(
            r.headers.contains("Cache-Control: no-store\r\n") && !r.headers.contains(": c\r\n"),
            "{}",
            r.headers
        );
        let mut head = get(&[]);
        head.method = Method::Head;
        let r = respond(&head, body, "\"a\"", "t", "c", "");
        assert_eq!((r.status, r.length, r.body.len()), (200, 10, 0));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        assert!(keeps_alive(&get(&[])));
        assert!(!keeps_alive(&get(&[("connection", "Close")])));
        let mut old = get(&[]);
        old.version = 0;
        assert!(!keeps_alive(&old));
        old.headers.push(("connection".into(), "keep-alive".into()));
        assert!(keeps_alive(&old));
        assert!(!keeps_alive(&get(&[("content-length", "5")])));
    }

    #[test]
    fn hls_paths_are_a_mount_and_a_file_it_makes() {
        assert_eq!(split("/live/index.m3u8"), Some(("/live", "index.m3u8")));
        assert_eq!(split("/a/b/17-3.aac"), Some(("/a/b", "17-3.aac")));
        assert_eq!(split("/index.m3u8"), None);
        assert_eq!(split("/live/other.m3u8"), None);
        assert_eq!(split("/../x/index.m3u8"), None);
    }
}
