//! The state every thread shares, and how a thread learns that the server is stopping.
//!
//! Channels between stages are not here: `server.rs` creates each one and hands its ends to the
//! stages that use them, so this file names no stage's types.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::auth::AuthFailures;
use crate::config::Config;
use crate::heads::Heads;
use crate::logs::Summaries;
use crate::metrics::Metrics;
use crate::mounts::Mounts;

/// How the server should be running; sent to every thread through a `watch` channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// Stop accepting, give listeners `shutdown_grace_secs` to receive what is pending, then close.
    Drain,
    /// Close everything at once.
    Now,
}

/// Resolves when the server is asked to stop, with how.
pub(crate) async fn stopped(stop: &mut watch::Receiver<Stop>) -> Stop {
    loop {
        let now = *stop.borrow_and_update();
        if now != Stop::Running {
            return now;
        }
        if stop.changed().await.is_err() {
            return Stop::Now;
        }
    }
}

/// One worker as the other threads see it.
#[derive(Default)]
pub(crate) struct WorkerLink {
    /// Wakes the worker's intake after the acceptor sent it a socket. A `Notify` keeps one permit
    /// when the worker is busy, so no hand-off is missed and bursts cost one wake-up.
    pub conns_ready: Notify,
    /// Wakes the worker's fan-out after ingest published new data: one cross-thread wake-up per
    /// worker per publication, however many listeners the worker serves.
    pub data_ready: Notify,
    /// Connections the worker holds now (handshaking or listening): the acceptor's placement key,
    /// and summed, what it holds against `max_connections`. Incremented by the acceptor before
    /// the hand-off, decremented by the connection's guard (a source's, when ingest takes it).
    pub connections: AtomicUsize,
}

/// State every thread shares.
pub(crate) struct Shared {
    /// Settings, resolved (the source password is always set); replaced whole on reload.
    pub config: ArcSwap<Config>,
    /// Wakes ingest after `config` was replaced, so that it publishes each mount's new settings
    /// with its stream (readers take a mount's settings from its snapshot, never from `config`).
    pub config_changed: Notify,
    /// Connections the listener port may hold (`Config::connection_limit`, fixed at start-up):
    /// past it the acceptor waits for room.
    pub max_connections: usize,
    /// Connections on the listener port that have not sent their request head yet: counted per
    /// address, and the oldest idle one is what the acceptor closes to make room at the limit.
    pub heads: Arc<Heads>,
    /// Which log lines about refused and closed connections are written in full, and the
    /// summaries of the rest.
    pub logs: Summaries,
    /// Open connections per client address, kept only when `max_connections_per_ip` is set.
    /// Incremented by the acceptor, decremented by the connection's guard.
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Wakes the acceptor when a connection closes while it waits for room.
    pub room: Notify,
    /// Failed logins per address: the brake on password guessing.
    pub auth_failures: AuthFailures,
    pub mounts: Mounts,
    pub metrics: Metrics,
    pub workers: Vec<WorkerLink>,
    /// Listeners connected now, across mounts: admission checks it against `max_listeners`.
    pub listeners_total: AtomicUsize,
    pub stop: watch::Receiver<Stop>,
    /// When the server started, on the wall clock (status pages show it).
    pub started: SystemTime,
    /// Where listeners connect (status pages build listen URLs with its port).
    pub listen_addr: SocketAddr,
    /// The TLS certificate and settings new handshakes use, when there is a TLS port; replaced
    /// whole on `SIGHUP`, so a connection's handshake sees one or the other.
    pub tls: Option<ArcSwap<rustls::ServerConfig>>,
}

impl Shared {
    /// Connections the listener port holds now, across workers.
    pub fn open_connections(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.connections.load(Ordering::Relaxed))
            .sum()
    }

    /// Wakes every worker once: new data was published.
    pub fn wake_workers(&self) {
        for w in &self.workers {
            w.data_ready.notify_one();
        }
    }
}
