//! Admitting a listener: `GET`/`HEAD` on a mount is checked, answered with the stream's response
//! head, and the listener is handed over a channel to its worker's fan-out loop, which writes it
//! from then on (the two share only the `NewListener` type they pass).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use crate::access_log::Record;
use crate::clients::{next_id, Client};
use crate::conn::{Incoming, ListenerGuard, Listening, NewListener, WorkerCtx};
use crate::framing::carries_own_metadata;
use crate::http::{self, valid_mount_path, Method, Request, RESPONSE_TIMEOUT};
use crate::icy::Cadence;
use crate::mounts::{Joining, Mount, Snapshot};
use crate::reasons::Refusal;
use crate::store::SourceState;

pub(crate) async fn admit(ctx: &Rc<WorkerCtx>, incoming: Incoming) {
    let fd = incoming.stream.socket().as_raw_fd();
    let (mount, snap, guard, joining) = match check(ctx, &incoming.req, incoming.peer, fd) {
        Ok(admitted) => admitted,
        Err(Refusal::UnknownMount | Refusal::MountIdle)
            if ctx.shared.on_demand.ask(&incoming.req.path) =>
        {
            match on_demand(ctx, &incoming.req, incoming.peer, fd).await {
                Ok(admitted) => admitted,
                Err(no) => return incoming.refuse(&ctx.shared, no).await,
            }
        }
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
    // The mount's shared head, with what this request adds: CORS for its origin, and the ICY
    // interval when it asked for ICY.
    let mut lines = crate::cors::headers(&ctx.shared.config.load(), &req);
    if icy.is_some() {
        lines.push_str(&format!("icy-metaint: {}\r\n", snap.settings.icy_metaint));
    }
    let head = async {
        stream
            .write_all(&http::head_with(&snap.info.response_head, &lines))
            .await?;
        if req.method == Method::Get {
            stream.write_all(&snap.info.preamble).await?;
            stream.write_all(&snap.headers).await?;
        }
        // Over TLS, what the session still holds encrypted goes now, not with the first write
        // of the fan-out.
        stream.flush().await?;
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
    #[cfg(feature = "fault-injection")]
    {
        let delay = ctx.shared.config.load().join_delay_injection_ms;
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    // The fan-out loop lives as long as the worker; if it is gone, so is the listener.
    let _ = ctx.admit.send(NewListener {
        mount,
        stream: Rc::new(stream),
        pos,
        icy,
        guard,
        conn,
        joining,
    });
}

/// The mount of an on-demand relay that was just asked to pull: waits for it to go live, for
/// at most `source_timeout_secs` (a relay gives up an upstream that says nothing for that long).
/// Looked at every few milliseconds: a listener waits here only while its relay connects.
async fn on_demand(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    fd: RawFd,
) -> Result<(Arc<Mount>, Arc<Snapshot>, ListenerGuard, Joining), Refusal> {
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_secs(ctx.shared.config.load().source_timeout_secs);
    loop {
        match check(ctx, req, peer, fd) {
            Err(Refusal::UnknownMount | Refusal::MountIdle)
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            done => return done,
        }
    }
}

/// ICY blocks go to a player that asks for them (`Icy-MetaData: 1`), in a stream whose format
/// has no metadata of its own.
fn wants_icy(req: &Request, snap: &Snapshot) -> bool {
    req.header("icy-metadata").is_some_and(|v| v.trim() == "1")
        && !carries_own_metadata(&snap.info.meta.content_type)
}

/// The mount to join, as it stands now, and the listener counted in; or why not.
fn check(
    ctx: &WorkerCtx,
    req: &Request,
    peer: SocketAddr,
    fd: RawFd,
) -> Result<(Arc<Mount>, Arc<Snapshot>, ListenerGuard, Joining), Refusal> {
    let path = req.path.as_str();
    if !valid_mount_path(path) {
        return Err(Refusal::BadPath);
    }
    let mount = ctx.shared.mounts.get(path).ok_or(Refusal::UnknownMount)?;
    let joining = Joining::new(&mount);
    let snap = mount.store.load_full();
    if snap.state != SourceState::Live {
        return Err(Refusal::MountIdle);
    }
    let limit = Some(snap.settings.max_listeners);
    let id = next_id();
    let client = Client::new(id, peer, req.header("user-agent"), ctx.index);
    let listening = Box::new(Listening {
        id,
        fd,
        record: ctx
            .shared
            .access_log
            .enabled()
            .then(|| Record::of(req, peer.ip(), 200, 0)),
    });
    let guard = ListenerGuard::enter(&ctx.shared, &mount, &ctx.label, limit, client, listening)?;
    Ok((mount, snap, guard, joining))
}
