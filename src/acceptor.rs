//! The acceptor thread: accepts TCP connections and places each on the least-loaded worker.
//!
//! It never reads from a socket, so a slow client cannot hold it up. When every worker holds its
//! share of `max_connections`, it stops calling `accept()` until a connection closes: the kernel's
//! backlog holds newcomers instead of the process running out of descriptors. Accept errors are
//! sorted: a connection reset before we took it is skipped; running out of file descriptors backs
//! off for a while instead of spinning on an error that will not clear until something closes.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam::channel::Sender;
use tokio::runtime::Runtime;

use crate::conn::{Accepted, ConnGuard};
use crate::reasons::Unanswered;
use crate::shared::{stopped, Shared};

/// How long to pause accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts on `listen_socket` until the server stops, handing each connection to a worker
/// through `workers` (one sender per worker, in the order of `shared.workers`).
pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    listen_socket: std::net::TcpListener,
    workers: Vec<Sender<Accepted>>,
) {
    rt.block_on(async move {
        let listen_socket = match tokio::net::TcpListener::from_std(listen_socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "acceptor cannot register its listening socket");
                return;
            }
        };
        let mut stop = shared.stop.clone();
        let mut waiting = false;
        loop {
            if all_full(&shared) {
                if !waiting {
                    waiting = true;
                    shared.metrics.unanswered(Unanswered::WorkersFull);
                    tracing::warn!(
                        limit = shared.connections_per_worker * shared.workers.len(),
                        "every worker is full: not accepting until a connection closes"
                    );
                }
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = shared.room.notified() => continue,
                }
            }
            if waiting {
                waiting = false;
                tracing::info!("room again: accepting");
            }
            tokio::select! {
                _ = stopped(&mut stop) => break,
                accepted = listen_socket.accept() => match accepted {
                    Ok((stream, peer)) => hand_off(&shared, &workers, stream, peer),
                    Err(e) if is_resource_exhaustion(&e) => {
                        shared.metrics.unanswered(Unanswered::AcceptResourcesExhausted);
                        tracing::warn!(error = %e, "accept failed: out of resources; pausing accepts");
                        tokio::time::sleep(RESOURCE_BACKOFF).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "accept failed; continuing"),
                },
            }
        }
        tracing::debug!("acceptor stopped");
    });
}

fn all_full(shared: &Shared) -> bool {
    shared
        .workers
        .iter()
        .all(|w| w.connections.load(Ordering::Relaxed) >= shared.connections_per_worker)
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn hand_off(
    shared: &Arc<Shared>,
    workers: &[Sender<Accepted>],
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    // Streams are written in coalesced pieces; Nagle would only add delay to the last one.
    let _ = stream.set_nodelay(true);
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "cannot detach accepted socket");
            return;
        }
    };
    let (index, worker) = shared
        .workers
        .iter()
        .enumerate()
        .min_by_key(|(_, w)| w.connections.load(Ordering::Relaxed))
        .expect("at least one worker");
    worker.connections.fetch_add(1, Ordering::Relaxed);
    let per_ip_limit = shared.config.load().max_connections_per_ip;
    let (ip, over_ip_limit) = if per_ip_limit > 0 {
        let mut per_ip = shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(peer.ip()).or_insert(0);
        *n += 1;
        (Some(peer.ip()), *n > per_ip_limit)
    } else {
        (None, false)
    };
    let accepted = Accepted {
        stream,
        guard: ConnGuard::new(shared.clone(), index, ip),
        over_ip_limit,
    };
    // Fails only when the worker has exited (shutting down): the socket is then dropped, closed.
    if workers[index].send(accepted).is_ok() {
        worker.conns_ready.notify_one();
    }
}
