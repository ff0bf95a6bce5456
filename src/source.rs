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
use std::time::SystemTime;

use bytes::Bytes;

use crate::access_log::Record;
use crate::auth;
use crate::conn::{Encoder, Feed, Incoming, SourceConn, ToIngest, WorkerCtx};
use crate::http::{clean_header_value, valid_mount_path, Method, Request};
use crate::reasons::{Realm, Refusal};
use crate::shared::Shared;
use crate::store::{StreamInfo, StreamMeta};

/// A source request that passed every check, on its way to ingest.
struct Admitted {
    info: StreamInfo,
    /// The encoder waits for `100 Continue` before sending.
    expect_continue: bool,
    /// The body is `Transfer-Encoding: chunked`.
    chunked: bool,
}

pub(crate) async fn handshake(ctx: &WorkerCtx, incoming: Incoming) {
    let admitted = match check(&ctx.shared, &incoming.req, incoming.peer) {
        Ok(a) => a,
        Err(no) => return incoming.refuse(&ctx.shared, no).await,
    };
    let Incoming {
        stream,
        req,
        leftover,
        peer,
        conn,
        ..
    } = incoming;
    let stream = match stream.detach() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot hand source socket to ingest");
            return;
        }
    };
    // From here the ingest thread owns the connection; it no longer loads this worker.
    drop(conn);
    let log = Some(Record::of(&req, peer.ip(), 200, 0));
    let source = SourceConn {
        mount: req.path,
        log,
        info: admitted.info,
        feed: Feed::Encoder(Encoder {
            stream,
            peer,
            expect_continue: admitted.expect_continue,
            answer: true,
            chunked: admitted.chunked,
            leftover,
        }),
        claimed: None,
    };
    if ctx
        .to_ingest
        .send(ToIngest::Source(Box::new(source)))
        .is_err()
    {
        tracing::debug!(%peer, "ingest has stopped; source dropped");
    }
}

/// Checks a source request: its path, its body framing, its Content-Type, its credentials.
fn check(shared: &Shared, req: &Request, peer: SocketAddr) -> Result<Admitted, Refusal> {
    // `/admin/` is the admin API's on the listener port: a mount there could not be played.
    if !valid_mount_path(&req.path)
        || crate::status::is_status_path(&req.path)
        || req.path.starts_with("/admin/")
    {
        return Err(Refusal::BadPath);
    }
    let chunked = match req.header("transfer-encoding") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("chunked") => true,
        Some(_) => return Err(Refusal::UnsupportedTransferEncoding),
    };
    if chunked && req.header("content-length").is_some() {
        return Err(Refusal::ConflictingLength);
    }
    let content_type = match (req.header("content-type"), &req.method) {
        (Some(ct), _) if !ct.is_empty() => ct.to_string(),
        (_, Method::Put) => return Err(Refusal::MissingContentType),
        // Legacy SOURCE clients predate the requirement; Icecast assumes MP3 for them too.
        _ => "audio/mpeg".to_string(),
    };
    let cfg = shared.config.load();
    let expected = cfg.source_password_for(&req.path).unwrap_or_default();
    auth::check(
        &shared.auth_failures,
        &cfg,
        req,
        peer,
        Realm::Source,
        cfg.source_user_for(&req.path),
        expected,
    )?;
    Ok(Admitted {
        info: stream_info(req, content_type, peer),
        expect_continue: req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue")),
        chunked,
    })
}

/// What the source says about its stream, from its `ice-*` (or `icy-*`) headers.
pub(crate) fn stream_info(req: &Request, content_type: String, peer: SocketAddr) -> StreamInfo {
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
        subtype: None,
        source_ip: Some(peer.ip().to_string()),
        user_agent: req.header("user-agent").map(clean_header_value),
        relayed_from: None,
    };
    StreamInfo::new(meta, Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_head;

    const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

    #[test]
    fn ice_headers_become_icy_headers() {
        let raw = b"PUT /live HTTP/1.1\r\nIce-Name: Radio\tX\r\nIce-Genre: jazz\r\nIce-Public: 1\r\nIce-Description: d\r\nIce-URL: http://x\r\nice-audio-info: channels=2;bitrate=128\r\n\r\n";
        let (req, _) = parse_head(raw).unwrap().unwrap();
        let info = stream_info(&req, "audio/mpeg".into(), PEER);
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
        let info = stream_info(&req, "audio/ogg".into(), PEER);
        let head = std::str::from_utf8(&info.response_head).unwrap();
        assert!(head.contains("icy-br: 64\r\n"));
        assert!(!head.contains("icy-name"));
    }
}
