//! The acceptor thread: accepts TCP connections and places each on the least-loaded worker.
//!
//! It never reads from a socket, so a slow client cannot hold it up. Accept errors are sorted: a
//! connection reset before we took it is skipped; running out of file descriptors backs off for a
//! while instead of spinning on an error that will not clear until something closes.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::server::{runtime, stopped, Shared};

/// How long to pause accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) fn run(shared: Arc<Shared>, listener: std::net::TcpListener) {
    runtime().block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "acceptor cannot register its listener");
                return;
            }
        };
        let mut stop = shared.stop.clone();
        loop {
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

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn hand_off(shared: &Shared, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
    // Streams are written in coalesced pieces; Nagle would only add delay to the last one.
    let _ = stream.set_nodelay(true);
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "cannot detach accepted socket");
            return;
        }
    };
    let worker = shared
        .workers
        .iter()
        .min_by_key(|w| w.connections.load(Ordering::Relaxed))
        .expect("at least one worker");
    worker.connections.fetch_add(1, Ordering::Relaxed);
    if worker.conns.send(stream).is_err() {
        // The worker has exited (shutting down); the socket is dropped and closed.
        worker.connections.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    worker.conns_ready.notify_one();
}
