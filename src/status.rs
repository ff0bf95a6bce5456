//! Status pages, as JSON: `/status.json` in fanstream's own shape, and `/status-json.xsl` in
//! Icecast 2.4's shape so that the exporters, web players and scripts written for Icecast work
//! unchanged. Mounts set `hidden` are left out of both, as Icecast leaves them out. Both are
//! public on the listener port, as Icecast's are (web players fetch them from other origins,
//! hence CORS: [`crate::cors`]), and also served on the admin port,
//! whose thread answers even when every worker is saturated. Built at request time from the mount
//! table; nothing here runs on the fan-out's path.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::Serialize;

use crate::conn::{log_response, Incoming};
use crate::dates::Date;
use crate::framing::carries_own_metadata;
use crate::http::{self, Method, Request};
use crate::mounts::Mount;
use crate::shared::Shared;
use crate::store::SourceState;

/// fanstream's own status document.
pub(crate) const STATUS_JSON: &str = "/status.json";
/// Icecast's status document (an XSLT transform there; the path is what clients request).
pub(crate) const ICECAST_STATUS_JSON: &str = "/status-json.xsl";

/// The paths served here; they are never mount paths.
pub(crate) fn is_status_path(path: &str) -> bool {
    path == STATUS_JSON || path == ICECAST_STATUS_JSON
}

/// Answers a `GET` or `HEAD` of a status path and closes.
pub(crate) async fn serve(shared: &Shared, incoming: Incoming) {
    let base = listen_base(shared, &incoming.req, incoming.stream.tls_local());
    let resp = response(shared, &incoming.req, &base);
    log_response(shared, &incoming.req, incoming.peer, &resp);
    http::write_and_close(incoming.stream, &resp).await;
}

/// The whole HTTP response for a `GET` or `HEAD` of a status path, its `listenurl`s starting
/// with `base` (see [`listen_base`]).
pub(crate) fn response(shared: &Shared, req: &Request, base: &str) -> Vec<u8> {
    let body = if req.path == ICECAST_STATUS_JSON {
        let host = host_name(req.header("host"), shared.listen_addr);
        serde_json::to_vec(&icecast(shared, &host, base))
    } else {
        serde_json::to_vec(&own(shared, base))
    }
    // Serializing plain structs of strings and numbers into memory cannot fail.
    .expect("status serializes");
    let mut out = format!(
        "HTTP/1.0 200 OK\r\nServer: fanstream/{}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-cache, no-store\r\n{}Connection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        body.len(),
        crate::cors::headers(&shared.config.load(), req),
    )
    .into_bytes();
    if req.method != Method::Head {
        out.extend_from_slice(&body);
    }
    out
}

/// `GET /status.json`: every mount, live or waiting for its source within the grace period.
#[derive(Serialize)]
pub(crate) struct Status {
    pub(crate) server_id: String,
    pub(crate) server_start_iso8601: String,
    pub(crate) uptime_seconds: u64,
    /// Listeners connected now, across mounts.
    pub(crate) listeners: usize,
    pub(crate) mounts: Vec<MountStatus>,
    /// The edges registered with this server for spill-over; absent when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) edges: Vec<crate::edges::EdgeStatus>,
}

#[derive(Serialize)]
pub(crate) struct MountStatus {
    pub(crate) mount: String,
    pub(crate) listenurl: String,
    /// `live`, or `waiting` while listeners wait for the source to come back.
    pub(crate) state: &'static str,
    pub(crate) listeners: usize,
    /// Edges' relays pulling the mount now (the relay credentials): not in `listeners`.
    pub(crate) relays: usize,
    pub(crate) listener_peak: usize,
    pub(crate) content_type: String,
    pub(crate) name: Option<String>,
    pub(crate) description: Option<String>,
    pub(crate) genre: Option<String>,
    pub(crate) url: Option<String>,
    pub(crate) bitrate_kbps: Option<u32>,
    pub(crate) audio_info: Option<String>,
    /// What the format layer found the stream to be (`MP3`, `Opus`, ...).
    pub(crate) subtype: Option<String>,
    /// Now playing, from title updates or the stream's own tags.
    pub(crate) title: Option<String>,
    pub(crate) artist: Option<String>,
    /// When the title last changed.
    pub(crate) metadata_updated: Option<String>,
    pub(crate) stream_start_iso8601: Option<String>,
    /// Payload bytes received from sources since the mount appeared.
    pub(crate) received_bytes: u64,
    /// The upstream a relay pulls the mount from now (its URL without credentials).
    pub(crate) relay_upstream: Option<String>,
    /// Payload bytes sent to listeners since the mount appeared.
    pub(crate) sent_bytes: u64,
    pub(crate) retained_bytes: u64,
    /// HLS players now, from their playlist polls; absent for a mount without HLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) hls_sessions: Option<usize>,
}

/// The document `/status.json` serves; the page at `/` shows the same.
pub(crate) fn own(shared: &Shared, base: &str) -> Status {
    let now = SystemTime::now();
    let mounts = sorted_mounts(shared)
        .into_iter()
        .filter_map(|m| {
            let snap = m.store.load_full();
            if snap.settings.hidden {
                return None;
            }
            let state = match snap.state {
                SourceState::Live => "live",
                SourceState::Gone(_) => "waiting",
                // Leaving the table: its listeners are being closed or moved.
                SourceState::MovedTo(_) | SourceState::Closed => return None,
            };
            let meta = &snap.info.meta;
            Some(MountStatus {
                listenurl: format!("{base}{}", m.path),
                state,
                listeners: m.listeners.load(Ordering::Relaxed),
                relays: m.relays.load(Ordering::Relaxed),
                listener_peak: m.listener_peak.load(Ordering::Relaxed),
                content_type: meta.content_type.clone(),
                name: meta.name.clone(),
                description: meta.description.clone(),
                genre: meta.genre.clone(),
                url: meta.url.clone(),
                bitrate_kbps: meta.bitrate_kbps,
                audio_info: meta.audio_info.clone(),
                subtype: meta.subtype.clone(),
                title: snap.now_playing.title.clone(),
                artist: snap.now_playing.artist.clone(),
                metadata_updated: snap.now_playing.updated.map(|t| Date::of(t).iso8601()),
                stream_start_iso8601: meta.started.map(|t| Date::of(t).iso8601()),
                received_bytes: m.received_bytes.load(Ordering::Relaxed),
                relay_upstream: meta.relayed_from.clone(),
                sent_bytes: m.sent_bytes.load(Ordering::Relaxed),
                retained_bytes: snap.retained_bytes(),
                hls_sessions: snap.settings.hls.then(|| m.hls_sessions_now()),
                mount: m.path.clone(),
            })
        })
        .collect();
    Status {
        server_id: server_id(),
        server_start_iso8601: Date::of(shared.started).iso8601(),
        uptime_seconds: now
            .duration_since(shared.started)
            .unwrap_or_default()
            .as_secs(),
        listeners: shared.listeners_total.load(Ordering::Relaxed),
        mounts,
        edges: shared.edges.list(std::time::Instant::now()),
    }
}

/// `GET /status-json.xsl` as Icecast 2.4 answers it: `icestats` with the server's fields and
/// `source`, which is absent with no source, an object with one and an array with several.
/// Numbers are JSON numbers, as Icecast's XML-to-JSON transform makes them.
#[derive(Serialize)]
struct IcecastDoc {
    icestats: IceStats,
}

#[derive(Serialize)]
struct IceStats {
    /// Icecast's `<admin>` and `<location>` settings; fanstream has none, so Icecast's defaults.
    admin: &'static str,
    host: String,
    location: &'static str,
    server_id: String,
    server_start: String,
    server_start_iso8601: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<OneOrMany<IceSource>>,
    /// Icecast's transform leaves a `"dummy": null` closing the last object; with no source it
    /// closes `icestats`.
    #[serde(skip_serializing_if = "Option::is_none")]
    dummy: Option<()>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

/// One live source; fields in Icecast's (alphabetical) order, absent where Icecast omits them.
#[derive(Serialize)]
struct IceSource {
    #[serde(skip_serializing_if = "Option::is_none")]
    artist: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audio_info: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bitrate: Option<u32>,
    genre: String,
    /// HLS players estimated from playlist polls, beside the direct `listeners`; absent for a
    /// mount without HLS (Icecast has no such field: an extra one breaks no client).
    #[serde(skip_serializing_if = "Option::is_none")]
    hls_sessions: Option<usize>,
    listener_peak: usize,
    listeners: usize,
    listenurl: String,
    /// Edges' relays pulling it now: not in Icecast's document, and an extra field breaks no
    /// client.
    relays: usize,
    server_description: String,
    server_name: String,
    server_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_url: Option<String>,
    stream_start: String,
    stream_start_iso8601: String,
    /// What the stream turned out to be (`MP3`, `Vorbis`, `Opus`, `VP8/Opus`...), as Icecast
    /// gives it for Ogg streams.
    #[serde(skip_serializing_if = "Option::is_none")]
    subtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
    /// Icecast's stylesheet hides these two; they are in its XML stats and the users ask
    /// for them, and an extra field breaks no client.
    total_bytes_read: u64,
    total_bytes_sent: u64,
    dummy: (),
}

fn icecast(shared: &Shared, host: &str, base: &str) -> IcecastDoc {
    let mut sources: Vec<IceSource> = sorted_mounts(shared)
        .into_iter()
        .filter_map(|m| {
            let snap = m.store.load_full();
            // Icecast lists sources, not mounts: one waiting for its encoder is not there.
            if snap.state != SourceState::Live || snap.settings.hidden {
                return None;
            }
            let meta = &snap.info.meta;
            let started = Date::of(meta.started.unwrap_or(shared.started));
            let own_tags = carries_own_metadata(&meta.content_type);
            let (artist, title) = snap.now_playing.icecast(own_tags);
            Some(IceSource {
                artist,
                audio_info: meta.audio_info.clone(),
                bitrate: meta.bitrate_kbps,
                // Icecast's words for a source that did not say.
                genre: meta.genre.clone().unwrap_or_else(|| "various".into()),
                hls_sessions: snap.settings.hls.then(|| m.hls_sessions_now()),
                listener_peak: m.listener_peak.load(Ordering::Relaxed),
                listeners: m.listeners.load(Ordering::Relaxed),
                listenurl: format!("{base}{}", m.path),
                relays: m.relays.load(Ordering::Relaxed),
                server_description: meta
                    .description
                    .clone()
                    .unwrap_or_else(|| "Unspecified description".into()),
                server_name: meta
                    .name
                    .clone()
                    .unwrap_or_else(|| "Unspecified name".into()),
                server_type: meta.content_type.clone(),
                server_url: meta.url.clone(),
                stream_start: started.rfc2822(),
                stream_start_iso8601: started.iso8601(),
                subtype: meta.subtype.clone(),
                title,
                total_bytes_read: m.received_bytes.load(Ordering::Relaxed),
                total_bytes_sent: m.sent_bytes.load(Ordering::Relaxed),
                dummy: (),
            })
        })
        .collect();
    let source = match sources.len() {
        0 => None,
        1 => sources.pop().map(OneOrMany::One),
        _ => Some(OneOrMany::Many(sources)),
    };
    let start = Date::of(shared.started);
    IcecastDoc {
        icestats: IceStats {
            admin: "icemaster@localhost",
            host: host.to_string(),
            location: "Earth",
            server_id: server_id(),
            server_start: start.rfc2822(),
            server_start_iso8601: start.iso8601(),
            dummy: source.is_none().then_some(()),
            source,
        },
    }
}

pub(crate) fn server_id() -> String {
    format!("fanstream {}", env!("CARGO_PKG_VERSION"))
}

pub(crate) fn sorted_mounts(shared: &Shared) -> Vec<std::sync::Arc<Mount>> {
    let mut mounts = shared.mounts.all();
    mounts.sort_by(|a, b| a.path.cmp(&b.path));
    mounts
}

/// Where the `listenurl`s of an answer to `req` start. Icecast's `http://HOST:PORT`: the host
/// the client used, with the listen port. Over TLS (`tls_local`: the address the request came
/// to), `https://` and the host and port the client used, as playlists do: a page served over
/// https may not load an http stream (mixed content), so a panel or web player reading the
/// status over https needs an https URL.
pub(crate) fn listen_base(shared: &Shared, req: &Request, tls_local: Option<SocketAddr>) -> String {
    match tls_local {
        Some(local) => format!("https://{}", host_and_port(req.header("host"), local)),
        None => format!(
            "http://{}:{}",
            host_name(req.header("host"), shared.listen_addr),
            shared.listen_addr.port()
        ),
    }
}

/// The host clients reached us by, for `listenurl`: the request's `Host` without its port when it
/// is a plausible host name, else the listen address, else `localhost` (Icecast's default).
pub(crate) fn host_name(header: Option<&str>, listen: SocketAddr) -> String {
    let from_header = header.map(str::trim).and_then(|h| {
        let host = if h.starts_with('[') {
            &h[..=h.find(']')?]
        } else {
            h.split(':').next()?
        };
        let plausible = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
        plausible.then(|| host.to_string())
    });
    from_header.unwrap_or_else(|| {
        let ip = listen.ip();
        if ip.is_unspecified() {
            "localhost".to_string()
        } else if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    })
}

/// The host (and port) the client reached us by: its `Host` header when that is a plausible
/// host name or address with an optional port, else the listen address (`localhost` for a
/// wildcard one).
pub(crate) fn host_and_port(header: Option<&str>, listen: SocketAddr) -> String {
    let plausible = header.map(str::trim).filter(|h| {
        !h.is_empty()
            && h.len() <= 261
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
    });
    match plausible {
        Some(h) => h.to_string(),
        None if listen.ip().is_unspecified() => format!("localhost:{}", listen.port()),
        None => listen.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_uses_the_host_the_client_used() {
        let any: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        assert_eq!(
            host_and_port(Some("radio.example:8443"), any),
            "radio.example:8443"
        );
        assert_eq!(host_and_port(Some("radio.example"), any), "radio.example");
        assert_eq!(host_and_port(Some("[::1]:8000"), any), "[::1]:8000");
        assert_eq!(host_and_port(Some("evil/\"x"), local), "127.0.0.1:8000");
        assert_eq!(host_and_port(None, any), "localhost:8000");
    }

    #[test]
    fn host_comes_from_the_host_header_when_it_is_plausible() {
        let any: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        assert_eq!(host_name(Some("radio.example:8000"), any), "radio.example");
        assert_eq!(host_name(Some("[::1]:8000"), any), "[::1]");
        assert_eq!(host_name(Some("evil\"><script>"), any), "localhost");
        assert_eq!(host_name(Some(""), local), "127.0.0.1");
        assert_eq!(host_name(None, any), "localhost");
        assert_eq!(host_name(Some("[::1"), local), "127.0.0.1");
    }

    #[test]
    fn only_status_paths_are_reserved() {
        assert!(is_status_path("/status.json"));
        assert!(is_status_path("/status-json.xsl"));
        assert!(!is_status_path("/status"));
        assert!(!is_status_path("/live"));
    }
}
