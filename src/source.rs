//! The Icecast source protocol, worker side: checks a `SOURCE`/`PUT` request, authenticates it
//! and hands the connection to the ingest thread, which claims the mount and answers.
//!
//! What real encoders do, and what this accepts:
//! - ffmpeg `icecast://`: `PUT` with `Expect: 100-continue`, waits for an answer before sending;
//!   with `-legacy_icecast 1`, `SOURCE` with media in the same packet as the headers.
//! - libshout (ezstream, ices): an unauthenticated `SOURCE` probe expecting 401 with
//!   `WWW-Authenticate`, then the same with credentials.
//! - liquidsoap: `PUT` with `Expect: 100-continue`, optionally a chunked body.
//!
//! The order matters: authenticate, then claim the mount (403 if it is live), and only then answer
//! `100 Continue` and `200 OK`, so an encoder never streams into a refusal.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::SystemTime;

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::acceptor::ConnGuard;
use crate::auth;
use crate::http::{valid_mount_path, Method, Request};
use crate::store::{StreamInfo, StreamMeta};
use crate::worker::{refuse, WorkerCtx};

const AUTH_REALM: &str = "Basic realm=\"fanstream\"";

/// An authenticated source on its way to the ingest thread.
pub(crate) struct SourceConn {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub mount: String,
    pub info: StreamInfo,
    /// The encoder waits for `100 Continue` before sending.
    pub expect_continue: bool,
    /// The body is `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// Body bytes that arrived with the request head.
    pub leftover: Vec<u8>,
}

pub(crate) async fn handshake(
    ctx: &Rc<WorkerCtx>,
    mut stream: TcpStream,
    req: Request,
    leftover: Vec<u8>,
    peer: SocketAddr,
    conn: ConnGuard,
) {
    let shared = &ctx.shared;
    let cfg = shared.config.load_full();
    if !valid_mount_path(&req.path) || crate::status::is_status_path(&req.path) {
        refuse(
            &ctx.shared,
            &mut stream,
            peer,
            400,
            "Bad Request",
            &[],
            "bad_mount_path",
        )
        .await;
        return;
    }
    let te = req.header("transfer-encoding");
    let chunked = match te {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("chunked") => true,
        Some(_) => {
            refuse(
                &ctx.shared,
                &mut stream,
                peer,
                501,
                "Not Implemented",
                &[],
                "unsupported_transfer_encoding",
            )
            .await;
            return;
        }
    };
    if chunked && req.header("content-length").is_some() {
        refuse(
            &ctx.shared,
            &mut stream,
            peer,
            400,
            "Bad Request",
            &[],
            "conflicting_length",
        )
        .await;
        return;
    }
    let content_type = match (req.header("content-type"), &req.method) {
        (Some(ct), _) if !ct.is_empty() => ct.to_string(),
        (_, Method::Put) => {
            refuse(
                &ctx.shared,
                &mut stream,
                peer,
                400,
                "Bad Request",
                &[],
                "missing_content_type",
            )
            .await;
            return;
        }
        // Legacy SOURCE clients predate the requirement; Icecast assumes MP3 for them too.
        _ => "audio/mpeg".to_string(),
    };
    let expected = cfg.source_password_for(&req.path).unwrap_or_default();
    let checked = auth::check(
        &shared.auth_failures,
        &cfg,
        &req,
        peer,
        &cfg.source_user,
        expected,
        "source",
    );
    if let Err(no) = checked {
        let headers = no.headers(AUTH_REALM);
        refuse(
            &ctx.shared,
            &mut stream,
            peer,
            no.status,
            no.phrase,
            &headers,
            no.reason,
        )
        .await;
        return;
    }
    let expect_continue = req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    let info = stream_info(&req, content_type);
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot hand source socket to ingest");
            return;
        }
    };
    // From here the ingest thread owns the connection; it no longer loads this worker.
    drop(conn);
    let conn = SourceConn {
        stream,
        peer,
        mount: req.path,
        info,
        expect_continue,
        chunked,
        leftover,
    };
    if shared.to_ingest.send(conn).is_err() {
        tracing::debug!(%peer, "ingest has stopped; source dropped");
    }
}

/// What the source says about its stream, from its `ice-*` (or `icy-*`) headers.
pub(crate) fn stream_info(req: &Request, content_type: String) -> StreamInfo {
    let pick = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| req.header(n))
            .map(clean_header_value)
            .filter(|v| !v.is_empty())
    };
    let audio_info = pick(&["ice-audio-info"]);
    let bitrate = pick(&["ice-bitrate", "icy-br"])
        .or_else(|| {
            audio_info.as_deref().and_then(|info| {
                info.split(';')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("bitrate"))
                    .map(|(_, v)| clean_header_value(v))
            })
        })
        .and_then(|b| b.trim().parse::<u32>().ok());
    let meta = StreamMeta {
        content_type: clean_header_value(&content_type),
        name: pick(&["ice-name", "icy-name"]),
        description: pick(&["ice-description", "icy-description"]),
        genre: pick(&["ice-genre", "icy-genre"]),
        url: pick(&["ice-url", "icy-url"]),
        public: pick(&["ice-public", "icy-pub"]),
        bitrate_kbps: bitrate,
        audio_info,
        started: Some(SystemTime::now()),
    };
    listener_info(meta, Bytes::new())
}

/// The response head every listener of this stream gets, built once: Content-Type, no caching,
/// and the source's description as the `icy-*` headers players show. Also used by the demo.
pub(crate) fn listener_info(meta: StreamMeta, preamble: Bytes) -> StreamInfo {
    let mut head = format!(
        "HTTP/1.0 200 OK\r\nServer: fanstream/{}\r\nContent-Type: {}\r\nCache-Control: no-cache, no-store\r\nPragma: no-cache\r\nConnection: close\r\nAccess-Control-Allow-Origin: *\r\n",
        env!("CARGO_PKG_VERSION"),
        meta.content_type
    );
    let bitrate = meta.bitrate_kbps.map(|b| b.to_string());
    for (name, value) in [
        ("icy-name", &meta.name),
        ("icy-genre", &meta.genre),
        ("icy-description", &meta.description),
        ("icy-url", &meta.url),
        ("icy-pub", &meta.public),
        ("icy-br", &bitrate),
    ] {
        if let Some(v) = value {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    StreamInfo {
        response_head: Bytes::from(head),
        preamble,
        meta,
    }
}

/// Header values are echoed to every listener: keep printable text only, and not too much of it.
fn clean_header_value(v: &str) -> String {
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
    use crate::http::parse_head;

    #[test]
    fn ice_headers_become_icy_headers() {
        let raw = b"PUT /live HTTP/1.1\r\nIce-Name: Radio\tX\r\nIce-Genre: jazz\r\nIce-Public: 1\r\nIce-Description: d\r\nIce-URL: http://x\r\nice-audio-info: channels=2;bitrate=128\r\n\r\n";
        let (req, _) = parse_head(raw).unwrap().unwrap();
        let info = stream_info(&req, "audio/mpeg".into());
        let head = std::str::from_utf8(&info.response_head).unwrap();
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        for line in [
            "Content-Type: audio/mpeg\r\n",
            "Cache-Control: no-cache, no-store\r\n",
            "icy-name: RadioX\r\n",
            "icy-genre: jazz\r\n",
            "icy-pub: 1\r\n",
            "icy-description: d\r\n",
            "icy-url: http://x\r\n",
            "icy-br: 128\r\n",
        ] {
            assert!(head.contains(line), "missing {line:?} in {head}");
        }
        assert!(!head.to_ascii_lowercase().contains("content-length"));
        assert!(head.ends_with("\r\n\r\n"));
    }

    #[test]
    fn explicit_bitrate_wins_and_missing_headers_are_left_out() {
        let (req, _) = parse_head(b"SOURCE /a HTTP/1.0\r\nicy-br: 64\r\n\r\n")
            .unwrap()
            .unwrap();
        let info = stream_info(&req, "audio/ogg".into());
        let head = std::str::from_utf8(&info.response_head).unwrap();
        assert!(head.contains("icy-br: 64\r\n"));
        assert!(!head.contains("icy-name"));
    }
}
