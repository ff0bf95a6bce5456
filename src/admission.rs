//! Admitting a listener: `GET`/`HEAD` on a mount is checked, answered with the stream's response
//! head, and the listener is handed over a channel to its worker's fan-out loop, which writes it
//! from then on (the two share only the `NewListener` type they pass).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;

use crate::access_log::Record;
use crate::clients::{next_id, Client};
use crate::conn::{Incoming, ListenerGuard, Listening, NewListener, WorkerCtx};
use crate::fallbacks::live_fallback;
use crate::framing::carries_own_metadata;
use crate::http::{valid_mount_path, Method, Request, RESPONSE_TIMEOUT};
use crate::icy::Cadence;
use crate::listener_auth::{self, Asker, LeaveCall};
use crate::mounts::{Mount, Snapshot};
use crate::reasons::Refusal;
use crate::store::SourceState;

pub(crate) async fn admit(ctx: &Rc<WorkerCtx>, incoming: Incoming) {
    let fd = incoming.stream.as_raw_fd();
    let id = next_id();
    let leave = match authenticate(ctx, &incoming.req, incoming.peer, id).await {
        Ok(leave) => leave,
        Err(no) => return incoming.refuse(&ctx.shared, no).await,
    };
    let (mount, snap, guard) = match check(ctx, &incoming.req, incoming.peer, fd, id, leave) {
        Ok(admitted) => admitted,
        Err(no) => return incoming.refuse(&ctx.shared, no).await,
    };
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
    let preamble_len = snap.info.preamble.len() + snap.headers.len();
    let icy = wants_icy(&req, &snap)
        .then(|| Cadence::after(snap.settings.icy_metaint, preamble_len))
        .flatten()
        .map(Box::new);
    let head = async {
        match &icy {
            // The shared head, with `icy-metaint` before its closing blank line.
            Some(_) => {
                let shared = &snap.info.response_head;
                let mut head = shared[..shared.len() - 2].to_vec();
                head.extend_from_slice(
                    format!("icy-metaint: {}\r\n\r\n", snap.settings.icy_metaint).as_bytes(),
                );
                stream.write_all(&head).await?;
            }
            None => stream.write_all(&snap.info.response_head).await?,
        }
        if req.method == Method::Get {
            stream.write_all(&snap.info.preamble).await?;
            stream.write_all(&snap.headers).await?;
        }
        Ok::<_, io::Error>(())
    };
    match tokio::time::timeout(RESPONSE_TIMEOUT, head).await {
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
    ctx.shared
        .metrics
        .listener_connects
        .with_label_values(&[mount.label.as_str()])
        .inc();
    let mut guard = guard;
    if icy.is_some() {
        guard.count_icy();
    }
    tracing::debug!(%peer, mount = %mount.path, worker = ctx.index, "listener joined");
    let pos = snap.join_point(snap.settings.burst_bytes);
    // The fan-out loop lives as long as the worker; if it is gone, so is the listener.
    let _ = ctx.admit.send(NewListener {
        mount,
        stream: Rc::new(stream),
        pos,
        icy,
        guard,
        conn,
    });
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

/// The mount to join, as it stands now, and the listener counted in; or why not.
fn check(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    fd: RawFd,
    id: u64,
    leave: Option<LeaveCall>,
) -> Result<(Arc<Mount>, Arc<Snapshot>, ListenerGuard), Refusal> {
    let path = req.path.as_str();
    if !valid_mount_path(path) {
        return Err(Refusal::BadPath);
    }
    let config = ctx.shared.config.load();
    let mounts = &ctx.shared.mounts;
    // A mount whose source is away sends a newcomer to its fallback at once, as Icecast does.
    let (mount, snap) = match mounts.get(path) {
        Some(mount) => {
            let snap = mount.store.load_full();
            if snap.state == SourceState::Live {
                (mount, snap)
            } else {
                live_fallback(&config, mounts, path, &snap.settings).ok_or(Refusal::MountIdle)?
            }
        }
        None => config
            .mounts
            .get(path)
            .and_then(|declared| live_fallback(&config, mounts, path, declared))
            .ok_or(Refusal::UnknownMount)?,
    };
    let limit = Some(snap.settings.max_listeners);
    let client = Client::new(id, peer, req.header("user-agent"), ctx.index);
    let listening = Box::new(Listening {
        id,
        fd,
        record: ctx
            .shared
            .access_log
            .enabled()
            .then(|| Record::of(req, peer.ip(), 200, 0)),
        connected: Instant::now(),
        leave,
    });
    let guard = ListenerGuard::enter(&ctx.shared, &mount, &ctx.label, limit, client, listening)?;
    Ok((mount, snap, guard))
}
