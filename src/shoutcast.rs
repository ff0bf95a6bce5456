//! The SHOUTcast v1 source port (`shoutcast_listen`): where DSP plugins, hardware encoders and
//! butt in SHOUTcast mode connect. The protocol, as Icecast speaks it:
//!
//! ```text
//! encoder: PASSWORD\r\n
//! server:  OK2\r\nicy-caps:11\r\n\r\n       (or "invalid password\r\n", then close)
//! encoder: icy-name:...\r\nicy-genre:...\r\nicy-br:128\r\ncontent-type:audio/mpeg\r\n\r\n
//! encoder: the stream
//! ```
//!
//! The password is the source password of `shoutcast_mount`, the one mount this port feeds;
//! failures count towards the per-address limit like other logins. The `icy-*` headers are
//! mapped as a source's `ice-*` ones are, and the stream goes to ingest like any encoder's. A
//! source ingest turns away (another is live on the mount) is closed: the protocol has no word
//! for it after `OK2`.
//! Its own thread and runtime, as the admin port has: a handful of encoders, never many.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Semaphore;
use tokio::task::LocalSet;

use crate::access_log::Record;
use crate::auth;
use crate::conn::{Encoder, Feed, SourceConn, ToIngest};
use crate::http::{parse_head, MAX_HEAD_BYTES, RESPONSE_TIMEOUT};
use crate::reasons::Realm;
use crate::shared::{stopped, Shared};

/// Encoders in their handshake at once; past it, a newcomer is closed at once.
const MAX_HANDSHAKES: usize = 16;
const OK: &[u8] = b"OK2\r\nicy-caps:11\r\n\r\n";
const INVALID: &[u8] = b"invalid password\r\n";

pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    socket: std::net::TcpListener,
    to_ingest: UnboundedSender<ToIngest>,
) {
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let socket = match tokio::net::TcpListener::from_std(socket) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "SHOUTcast source socket cannot be registered");
                return;
            }
        };
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let mut stop = shared.stop.clone();
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                accepted = socket.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                            tracing::warn!(%peer, "SHOUTcast source refused: too many handshakes at once");
                            continue;
                        };
                        let (shared, to_ingest) = (shared.clone(), to_ingest.clone());
                        tokio::task::spawn_local(async move {
                            handshake(&shared, &to_ingest, stream, peer).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "SHOUTcast accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
}

/// Reads the password line and the headers, answers, and hands the source to ingest.
async fn handshake(
    shared: &Shared,
    to_ingest: &UnboundedSender<ToIngest>,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let cfg = shared.config.load_full();
    let mount = cfg.shoutcast_mount.clone();
    let timeout = cfg.header_timeout(false);
    let mut buf = Vec::new();
    let Ok(Some(line_end)) =
        tokio::time::timeout(timeout, read_until(&mut stream, &mut buf, b"\n")).await
    else {
        tracing::info!(%peer, "SHOUTcast source closed: no password line in time");
        return;
    };
    let line = String::from_utf8_lossy(&buf[..line_end]).trim().to_string();
    buf.drain(..line_end + 1);
    let expected = cfg.source_password_for(&mount).unwrap_or_default();
    let checked = auth::check_given(
        &shared.auth_failures,
        &cfg,
        peer,
        &mount,
        Realm::Source,
        Some((cfg.source_user.clone(), line)),
        &[(&cfg.source_user, expected)],
    );
    if let Err(no) = checked {
        shared.metrics.refused(no);
        tracing::info!(%peer, %mount, reason = no.reason(), "SHOUTcast source refused");
        let _ = tokio::time::timeout(RESPONSE_TIMEOUT, stream.write_all(INVALID)).await;
        return;
    }
    if !matches!(
        tokio::time::timeout(RESPONSE_TIMEOUT, stream.write_all(OK)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    // The headers end with a blank line; they are `icy-*` headers an HTTP head can carry.
    let Ok(Some(end)) =
        tokio::time::timeout(timeout, read_until(&mut stream, &mut buf, b"\r\n\r\n")).await
    else {
        tracing::info!(%peer, "SHOUTcast source closed: no headers in time");
        return;
    };
    let mut head = format!("SOURCE {mount} HTTP/1.0\r\n").into_bytes();
    head.extend_from_slice(&buf[..end + 4]);
    let leftover = buf.split_off(end + 4);
    let req = match parse_head(&head) {
        Ok(Some((req, _))) => req,
        _ => {
            tracing::info!(%peer, "SHOUTcast source closed: its headers are not headers");
            return;
        }
    };
    // SHOUTcast v1 is MP3 unless the encoder says otherwise, as Icecast assumes.
    let content_type = req
        .header("content-type")
        .filter(|ct| !ct.is_empty())
        .unwrap_or("audio/mpeg")
        .to_string();
    let info = crate::source::stream_info(&req, content_type, peer);
    let Ok(stream) = stream.into_std() else {
        return;
    };
    let source = SourceConn {
        mount,
        info,
        feed: Feed::Encoder(Encoder {
            stream: crate::conn::Detached::Plain(stream),
            peer,
            expect_continue: false,
            answer: false,
            chunked: false,
            leftover,
        }),
        log: Some(Record::of(&req, peer.ip(), 200, 0)),
        claimed: None,
    };
    tracing::info!(%peer, "SHOUTcast source logged in");
    let _ = to_ingest.send(ToIngest::Source(Box::new(source)));
}

/// Reads into `buf` until it holds `end`; returns where `end` starts, or None if the peer closed
/// or sent more than a request head's worth first.
async fn read_until(stream: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> Option<usize> {
    loop {
        if let Some(at) = buf.windows(end.len()).position(|w| w == end) {
            return Some(at);
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return None;
        }
        let mut chunk = [0u8; 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
