//! A worker thread: its own current-thread tokio runtime, pinned to one core, serving a shard of the
//! connections. It takes sockets from the acceptor, reads each request head and routes it: a
//! listener joins this worker's fan-out ([`crate::listener`]); a source is checked here and handed
//! to the ingest thread ([`crate::source`]).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::LocalSet;

use crate::acceptor::{Accepted, ConnGuard};
use crate::http::{self, HeadError, Method, Request};
use crate::listener::{FanOut, NewListener};
use crate::server::Shared;

/// How long a short response (an error, a refusal) may take to write before we give up on the peer.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a refusal, how much of what the peer keeps sending we read before closing anyway.
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// What every task on this worker shares.
pub(crate) struct WorkerCtx {
    pub shared: Arc<Shared>,
    pub index: usize,
    /// The worker index as a metric label.
    pub label: String,
    /// Admitted listeners, from their request tasks to the fan-out loop.
    pub admit: mpsc::UnboundedSender<NewListener>,
}

pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    index: usize,
    conns: crossbeam::channel::Receiver<Accepted>,
) {
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let (admit_tx, admit_rx) = mpsc::unbounded_channel();
        let ctx = Rc::new(WorkerCtx {
            shared,
            index,
            label: index.to_string(),
            admit: admit_tx,
        });
        let intake = tokio::task::spawn_local(intake(ctx.clone(), conns));
        FanOut::new(ctx.clone(), admit_rx).run().await;
        intake.abort();
        tracing::debug!(worker = index, "worker stopped");
    });
}

/// Takes sockets handed over by the acceptor and starts a request task for each.
async fn intake(ctx: Rc<WorkerCtx>, conns: crossbeam::channel::Receiver<Accepted>) {
    let link = &ctx.shared.workers[ctx.index];
    loop {
        link.conns_ready.notified().await;
        while let Ok(accepted) = conns.try_recv() {
            match TcpStream::from_std(accepted.stream) {
                Ok(stream) => {
                    let task = handle(ctx.clone(), stream, accepted.guard, accepted.over_ip_limit);
                    spawn_isolated(&ctx, task);
                }
                Err(e) => tracing::warn!(error = %e, "cannot register accepted socket"),
            }
        }
    }
}

/// Runs a request's task so that a panic in it (a bug) costs that one connection only: the
/// runtime catches the panic, this watcher counts and logs it, the worker goes on.
fn spawn_isolated(ctx: &Rc<WorkerCtx>, task: impl std::future::Future<Output = ()> + 'static) {
    let handle = tokio::task::spawn_local(task);
    let ctx = ctx.clone();
    tokio::task::spawn_local(async move {
        if let Err(e) = handle.await {
            if e.is_panic() {
                ctx.shared
                    .metrics
                    .panics
                    .with_label_values(&["request"])
                    .inc();
                tracing::error!(
                    worker = ctx.index,
                    "a request handler panicked; connection dropped"
                );
            }
        }
    });
}

/// Why reading a request head ended without a request.
pub(crate) enum ReadHeadError {
    /// The peer closed or reset before sending a whole head.
    Closed,
    Head(HeadError),
}

/// Reads until a whole request head has arrived; returns it and any bytes after it (a legacy
/// source sends media in the same packet as its headers).
pub(crate) async fn read_head(stream: &mut TcpStream) -> Result<(Request, Vec<u8>), ReadHeadError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some((req, n)) = http::parse_head(&buf).map_err(ReadHeadError::Head)? {
            return Ok((req, buf.split_off(n)));
        }
        let room = http::MAX_HEAD_BYTES - buf.len();
        let mut take = (&mut *stream).take(room as u64);
        match take.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Err(ReadHeadError::Closed),
            Ok(_) => {}
        }
    }
}

async fn handle(ctx: Rc<WorkerCtx>, mut stream: TcpStream, conn: ConnGuard, over_ip_limit: bool) {
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    if over_ip_limit {
        let retry = [("Retry-After", "10")];
        refuse(
            &ctx.shared,
            &mut stream,
            peer,
            429,
            "Too Many Requests",
            &retry,
            "per_ip_limit",
        )
        .await;
        return;
    }
    let timeout = Duration::from_secs(ctx.shared.config.load().header_timeout_secs);
    let (req, leftover) = match tokio::time::timeout(timeout, read_head(&mut stream)).await {
        Err(_) => {
            ctx.shared.metrics.reject("header_timeout");
            tracing::info!(%peer, "closed: request head not complete within header_timeout_secs");
            return;
        }
        Ok(Err(ReadHeadError::Closed)) => return,
        Ok(Err(ReadHeadError::Head(e))) => {
            let (status, phrase) = e.status();
            refuse(
                &ctx.shared,
                &mut stream,
                peer,
                status,
                phrase,
                &[],
                e.reason(),
            )
            .await;
            return;
        }
        Ok(Ok(r)) => r,
    };
    let injected = ctx.shared.config.load().panic_injection_mount.clone();
    if injected.is_some_and(|m| req.path == format!("{m}/panic")) {
        panic!("panic injected for a test");
    }
    match req.method {
        Method::Get | Method::Head if crate::status::is_status_path(&req.path) => {
            crate::status::serve(&ctx.shared, &mut stream, &req).await
        }
        Method::Get | Method::Head => crate::listener::admit(&ctx, stream, req, peer, conn).await,
        Method::Source | Method::Put => {
            crate::source::handshake(&ctx, stream, req, leftover, peer, conn).await
        }
        Method::Other(ref m) => {
            tracing::debug!(%peer, method = %m, "unsupported method");
            let allow = [("Allow", "GET, HEAD, SOURCE, PUT")];
            refuse(
                &ctx.shared,
                &mut stream,
                peer,
                405,
                "Method Not Allowed",
                &allow,
                "method_not_allowed",
            )
            .await;
        }
    }
}

/// Answers with a short error response, counts it by `reason`, logs it once with the peer, and
/// lets the connection close.
pub(crate) async fn refuse(
    shared: &Shared,
    stream: &mut TcpStream,
    peer: std::net::SocketAddr,
    status: u16,
    phrase: &str,
    headers: &[(&str, &str)],
    reason: &'static str,
) {
    shared.metrics.reject(reason);
    tracing::info!(%peer, status, reason, "refused request");
    let body = format!("{status} {phrase}: {}\n", reason.replace('_', " "));
    let resp = http::response(status, phrase, headers, &body);
    let _ = tokio::time::timeout(RESPONSE_TIMEOUT, async {
        stream.write_all(&resp).await?;
        stream.shutdown().await?;
        // Read what the peer still sends (a source's media) until it closes: closing a socket
        // with unread bytes sends a reset, which can destroy the response before it is read.
        let mut sink = [0u8; 4096];
        let mut left = LINGER_MAX_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}
