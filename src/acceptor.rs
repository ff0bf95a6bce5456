//! The acceptor thread: accepts TCP connections and places each on the least-loaded worker.
//!
//! It never reads from a socket, so a slow client cannot hold it up. When every worker holds its
//! share of `max_connections`, it stops calling `accept()` until a connection closes: the kernel's
//! backlog holds newcomers instead of the process running out of descriptors. Accept errors are
//! sorted: a connection reset before we took it is skipped; running out of file descriptors backs
//! off for a while instead of spinning on an error that will not clear until something closes.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Runtime;

use crate::server::{stopped, Shared};

/// How long to pause accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

/// A connection on its way to a worker.
pub(crate) struct Accepted {
    pub stream: std::net::TcpStream,
    pub guard: ConnGuard,
    /// The client's address already holds `max_connections_per_ip`: the worker answers 429.
    pub over_ip_limit: bool,
}

/// Counts a connection against its worker's load and its address until dropped.
/// The acceptor creates it (incrementing), whoever holds the connection last drops it.
pub(crate) struct ConnGuard {
    shared: Arc<Shared>,
    worker: usize,
    /// Set when per-address counting is on.
    ip: Option<IpAddr>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.workers[self.worker]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            let mut per_ip = self.shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        // The acceptor may be waiting for room.
        self.shared.room.notify_one();
    }
}

pub(crate) fn run(rt: Runtime, shared: Arc<Shared>, listener: std::net::TcpListener) {
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "acceptor cannot register its listener");
                return;
            }
        };
        let mut stop = shared.stop.clone();
        let mut waiting = false;
        loop {
            if all_full(&shared) {
                if !waiting {
                    waiting = true;
                    shared.metrics.reject("workers_full");
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
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => hand_off(&shared, stream, peer),
                    Err(e) if is_resource_exhaustion(&e) => {
                        shared.metrics.reject("accept_resources_exhausted");
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

fn hand_off(shared: &Arc<Shared>, stream: tokio::net::TcpStream, peer: SocketAddr) {
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
    let guard = ConnGuard {
        shared: shared.clone(),
        worker: index,
        ip,
    };
    let accepted = Accepted {
        stream,
        guard,
        over_ip_limit,
    };
    // Fails only when the worker has exited (shutting down): the socket is then dropped, closed.
    if worker.conns.send(accepted).is_ok() {
        worker.conns_ready.notify_one();
    }
}
