//! Admitting a listener: `GET`/`HEAD` on a mount is checked, answered with the stream's response
//! head, and the listener is handed over a channel to its worker's fan-out loop, which writes it
//! from then on (the two share only the `NewListener` type they pass).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use tokio::io::AsyncWriteExt;

use crate::access_log::Record;
use crate::clients::{next_id, Client};
use crate::config::{file_format, FileFormat};
use crate::conn::{Incoming, ListenerGuard, Listening, NewListener, WorkerCtx};
use crate::fallbacks::live_fallback;
use crate::framing::carries_own_metadata;
use crate::http::{self, valid_mount_path, Method, Request, RESPONSE_TIMEOUT};
use crate::icy::Cadence;
use crate::listener_auth::{self, Asker, LeaveCall};
use crate::mounts::{Joining, Mount, Snapshot};
use crate::reasons::Refusal;
use crate::shared::{wait_until, Shared};
use crate::store::SourceState;

pub(crate) async fn admit(ctx: &Rc<WorkerCtx>, incoming: Incoming) {
    let fd = incoming.stream.socket().as_raw_fd();
    let id = next_id();
    let relay = incoming.relay;
    // A relay gave the server's own relay credentials: the mount's listener auth, meant for
    // its audience, is not asked about it.
    let mut leave = match relay {
        true => None,
        false => match authenticate(ctx, &incoming.req, incoming.peer, id).await {
            Ok(leave) => leave,
            Err(no) => return incoming.refuse(&ctx.shared, no).await,
        },
    };
    let asked = Asked {
        req: &incoming.req,
        peer: incoming.peer,
        fd,
        id,
        relay,
    };
    let checked = match check(ctx, &asked, &mut leave) {
        Err(Refusal::UnknownMount | Refusal::MountIdle)
            if ctx.shared.on_demand.ask(&incoming.req.path) =>
        {
            on_demand(ctx, &asked, &mut leave).await
        }
        checked => checked,
    };
    let (mount, snap, guard, joining) = match checked {
        Ok(admitted) => admitted,
        Err(no @ (Refusal::MountFull | Refusal::ServerFull)) => {
            match ctx.shared.edges.pick(Instant::now()) {
                Some(edge) => return redirect(&ctx.shared, incoming, &edge).await,
                None => return incoming.refuse(&ctx.shared, no).await,
            }
        }
        Err(no) => return incoming.refuse(&ctx.shared, no).await,
    };
    // Dropped after the hand-off below (or when the listener goes first).
    let _on_its_way = ctx.on_their_way.enter();
    let Incoming {
        mut stream,
        req,
        peer,
        conn,
        ..
    } = incoming;
    let sndbuf = ctx.shared.config.load().listener_send_buffer_bytes;
    if sndbuf > 0 {
        if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(sndbuf) {
            tracing::warn!(%peer, error = %e, "cannot bound the listener's send buffer");
        }
    }
    let intro = intro_for(&ctx.shared, &snap);
    let metaint = snap.settings.icy_metaint;
    let preamble_len = snap.info.preamble.len() + snap.headers.len();
    // An ICY listener gets the intro with an empty block every `icy_metaint` bytes, as the
    // stream after it; what of the last interval it fills counts with the preamble.
    let icy = wants_icy(&req, &snap)
        .then(|| Cadence::after(metaint, intro.len() % metaint + preamble_len))
        .flatten()
        .map(Box::new);
    // The mount's shared head, with what this request adds: CORS for its origin, and the ICY
    // interval when it asked for ICY.
    let mut lines = crate::cors::headers(&ctx.shared.config.load(), &req);
    if icy.is_some() {
        lines.push_str(&format!("icy-metaint: {}\r\n", snap.settings.icy_metaint));
    }
    let intro = match icy {
        Some(_) if !intro.is_empty() => with_empty_blocks(&intro, metaint),
        _ => intro,
    };
    let head = async {
        stream
            .write_all(&http::head_with(&snap.info.response_head, &lines))
            .await?;
        if req.method == Method::Get {
            stream.write_all(&intro).await?;
            stream.write_all(&snap.info.preamble).await?;
            stream.write_all(&snap.headers).await?;
        }
        // Over TLS, what the session still holds encrypted goes now, not with the first write
        // of the fan-out.
        stream.flush().await?;
        Ok::<_, io::Error>(())
    };
    // An intro is written at once, as a burst is: the player may take it at its own pace.
    let send_timeout = Duration::from_secs(ctx.shared.config.load().send_timeout_secs);
    let timeout = RESPONSE_TIMEOUT
        + if intro.is_empty() {
            Duration::ZERO
        } else {
            send_timeout
        };
    match tokio::time::timeout(timeout, head).await {
        Ok(Ok(())) => {}
        _ => {
            tracing::debug!(%peer, mount = %mount.path, "listener gone before its response head was sent");
            return;
        }
    }
    if req.method == Method::Head {
        let _ = stream.shutdown().await;
        return;
    }
    let mut guard = guard;
    if relay {
        tracing::info!(%peer, mount = %mount.path, worker = ctx.index, "relay joined");
    } else {
        ctx.shared
            .metrics
            .listener_connects
            .with_label_values(&[mount.label.as_str()])
            .inc();
        if icy.is_some() {
            guard.count_icy();
        }
        tracing::debug!(%peer, mount = %mount.path, worker = ctx.index, "listener joined");
    }
    let pos = snap.join_point(snap.settings.burst_bytes);
    #[cfg(feature = "fault-injection")]
    {
        // Only when asked: even a sleep of zero yields (tests are built with this feature).
        let delay = ctx.shared.config.load().join_delay_injection_ms;
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
    }
    // The fan-out loop lives as long as the worker; if it is gone, so is the listener.
    let _ = ctx.admit.send(NewListener {
        mount,
        stream,
        pos,
        icy,
        guard,
        conn,
        joining,
        headers_from: snap.headers_from,
    });
}

/// The mount of an on-demand relay that was just asked to pull: waits for it to go live, for
/// at most `source_timeout_secs` (a relay gives up an upstream that says nothing for that long).
/// Looks again each time ingest wakes `mounts_changed` (a source came or went, a fallback may
/// have), so the listener joins as soon as the mount is live.
async fn on_demand(
    ctx: &WorkerCtx,
    asked: &Asked<'_>,
    leave: &mut Option<LeaveCall>,
) -> Result<(Arc<Mount>, Arc<Snapshot>, ListenerGuard, Joining), Refusal> {
    let shared = &ctx.shared;
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(shared.config.load().source_timeout_secs);
    let look = || match check(ctx, asked, leave) {
        Err(Refusal::UnknownMount | Refusal::MountIdle) => None,
        done => Some(done),
    };
    match wait_until(&shared.mounts_changed, deadline, look).await {
        Some(done) => done,
        // Its refusal, from a last look.
        None => check(ctx, asked, leave),
    }
}

/// The mount's `intro_file`, as read at start-up or at the last reload, if its format is the
/// stream's (an MP3 intro before an Ogg stream would only be noise to a decoder).
fn intro_for(shared: &Shared, snap: &Snapshot) -> Bytes {
    let Some(file) = &snap.settings.intro_file else {
        return Bytes::new();
    };
    let stream = FileFormat::of_content_type(&snap.info.meta.content_type);
    let same_format = stream.is_some() && file_format(file) == stream;
    match shared.intros.load().get(file) {
        Some(intro) if same_format => intro.clone(),
        _ => Bytes::new(),
    }
}

/// `audio` with an empty ICY block (one zero byte) after every `metaint` bytes.
fn with_empty_blocks(audio: &[u8], metaint: usize) -> Bytes {
    let mut out = Vec::with_capacity(audio.len() + audio.len() / metaint);
    for interval in audio.chunks(metaint) {
        out.extend_from_slice(interval);
        if interval.len() == metaint {
            out.push(0);
        }
    }
    Bytes::from(out)
}

/// ICY blocks go to a player that asks for them (`Icy-MetaData: 1`), in a stream whose format
/// has no metadata of its own.
fn wants_icy(req: &Request, snap: &Snapshot) -> bool {
    req.header("icy-metadata").is_some_and(|v| v.trim() == "1")
        && !carries_own_metadata(&snap.info.meta.content_type)
}

/// Checks the listener with the auth of the mount it asked for (whichever mount it then gets,
/// as Icecast does). A path that is no mount has none: it gets its 404 from `check`. The
/// call runs in this listener's own task; the worker serves everyone else meanwhile.
async fn authenticate(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    id: u64,
) -> Result<Option<LeaveCall>, Refusal> {
    let shared = &ctx.shared;
    let config = shared.config.load_full();
    let settings = match shared.mounts.get(&req.path) {
        Some(mount) => mount.store.load().settings.clone(),
        None => match config.mounts.get(&req.path) {
            Some(declared) => Arc::new(declared.clone()),
            None => return Ok(None),
        },
    };
    if settings.auth.is_none() {
        return Ok(None);
    }
    let asker = Asker {
        req,
        peer,
        id,
        port: shared.listen_addr.port(),
    };
    listener_auth::check(
        &shared.listener_auth,
        &shared.auth_failures,
        &config,
        &settings,
        asker,
    )
    .await
}

/// A listener's request, as the checks need it.
struct Asked<'a> {
    req: &'a Request,
    peer: SocketAddr,
    fd: RawFd,
    id: u64,
    /// It gave the relay credentials.
    relay: bool,
}

/// Sends a listener that a full mount (or server) cannot take to `edge`, a registered edge
/// with room, at the same path and query: `302 Found`, as Icecast-KH sends its master's
/// listeners to its slaves. The edge pulls the mount from here as a relay, which no limit
/// binds.
async fn redirect(shared: &Shared, incoming: Incoming, edge: &str) {
    let req = &incoming.req;
    let location = match req.query.is_empty() {
        true => format!("{edge}{}", req.path),
        false => format!("{edge}{}?{}", req.path, req.query),
    };
    if let Some(mount) = shared.mounts.get(&req.path) {
        shared
            .metrics
            .listener_redirects
            .with_label_values(&[mount.label.as_str()])
            .inc();
    }
    tracing::debug!(peer = %incoming.peer, mount = %req.path, %edge, "full: listener sent to an edge");
    let resp = http::response(
        302,
        "Found",
        &[("Location", &location)],
        &format!("302 Found: this server is full; listen at {location}\n"),
    );
    crate::conn::log_response(shared, req, incoming.peer, &resp);
    http::write_and_close(incoming.stream, &resp).await
}

/// The mount to join, as it stands now, and the listener counted in; or why not.
fn check(
    ctx: &WorkerCtx,
    asked: &Asked<'_>,
    // Taken once the listener is counted in: a check that fails keeps it for the next try.
    leave: &mut Option<LeaveCall>,
) -> Result<(Arc<Mount>, Arc<Snapshot>, ListenerGuard, Joining), Refusal> {
    let &Asked {
        req,
        peer,
        fd,
        id,
        relay,
    } = asked;
    let path = req.path.as_str();
    if !valid_mount_path(path) {
        return Err(Refusal::BadPath);
    }
    let config = ctx.shared.config.load();
    let mounts = &ctx.shared.mounts;
    // A mount whose source is away sends a newcomer to its fallback at once, as Icecast does.
    let (mount, _) = match mounts.get(path) {
        Some(mount) => {
            let snap = mount.store.load_full();
            if snap.state == SourceState::Live {
                (mount, snap)
            } else {
                live_fallback(&config, mounts, path, &snap.settings, None)
                    .ok_or(Refusal::MountIdle)?
            }
        }
        None => config
            .mounts
            .get(path)
            .and_then(|declared| live_fallback(&config, mounts, path, declared, None))
            .ok_or(Refusal::UnknownMount)?,
    };
    // Counted as joining before the snapshot its join point comes from is loaded (see
    // `Joining`).
    let joining = Joining::new(&mount);
    let snap = mount.store.load_full();
    if snap.state != SourceState::Live {
        return Err(Refusal::MountIdle);
    }
    let limit = Some(snap.settings.max_listeners);
    let mut client = Client::new(id, peer, req.header("user-agent"), ctx.index);
    client.relay = relay;
    let listening = Box::new(Listening {
        id,
        fd,
        record: ctx
            .shared
            .access_log
            .enabled()
            .then(|| Box::new(Record::of(req, peer.ip(), 200, 0))),
        connected: Instant::now(),
        _leave: leave.take().map(Box::new),
    });
    let guard = ListenerGuard::enter(&ctx.shared, &mount, &ctx.label, limit, client, listening)?;
    Ok((mount, snap, guard, joining))
}
