//! Starting and stopping the whole server: the threads, the state they share, and their order.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch, Notify};

use crate::auth::AuthFailures;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::mounts::Mounts;
use crate::source::SourceConn;
use crate::threads::{self, ThreadRegistry};

/// How the server should be running; sent to every thread through a `watch` channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// Stop accepting, give listeners `shutdown_grace_secs` to receive what is pending, then close.
    Drain,
    /// Close everything at once.
    Now,
}

/// One worker as the other threads see it.
pub(crate) struct WorkerLink {
    /// Accepted sockets, from the acceptor.
    pub conns: crossbeam::channel::Sender<crate::acceptor::Accepted>,
    /// Wakes the worker's intake after a socket was sent on `conns`. A `Notify` keeps one permit
    /// when the worker is busy, so no hand-off is missed and bursts cost one wake-up.
    pub conns_ready: Notify,
    /// Wakes the worker's fan-out after ingest published new data: one cross-thread wake-up per
    /// worker per publication, however many listeners the worker serves.
    pub data_ready: Notify,
    /// Connections the worker holds now (handshaking or listening): the acceptor's placement key.
    /// Incremented by the acceptor before the hand-off, decremented by the connection's guard.
    pub connections: AtomicUsize,
}

/// State every thread shares.
pub(crate) struct Shared {
    /// Settings, resolved (the source password is always set); replaced whole on reload.
    pub config: ArcSwap<Config>,
    /// Connections a worker may hold before the acceptor waits for room.
    pub connections_per_worker: usize,
    /// Open connections per client address, kept only when `max_connections_per_ip` is set.
    /// Incremented by the acceptor, decremented by the connection's guard.
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Wakes the acceptor when a connection closes while every worker was full.
    pub room: Notify,
    /// Failed source logins per address: the acceptor of password guessing.
    pub auth_failures: AuthFailures,
    pub mounts: Mounts,
    pub metrics: Metrics,
    pub workers: Vec<WorkerLink>,
    /// Authenticated source connections, from workers to the ingest thread.
    pub to_ingest: mpsc::UnboundedSender<SourceConn>,
    /// Listeners connected now, across mounts: admission checks it against `max_listeners`.
    pub listeners_total: AtomicUsize,
    pub stop: watch::Receiver<Stop>,
    /// When the server started, on the wall clock (status pages show it).
    pub started: SystemTime,
    /// Where listeners connect (status pages build listen URLs with its port).
    pub listen_addr: SocketAddr,
}

impl Shared {
    /// Wakes every worker once: new data was published.
    pub fn wake_workers(&self) {
        for w in &self.workers {
            w.data_ready.notify_one();
        }
    }
}

/// A running server. Dropping it stops everything at once and joins the threads.
pub struct Server {
    stop_tx: watch::Sender<Stop>,
    threads: Vec<JoinHandle<()>>,
    listen_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
}

impl Server {
    /// Starts every thread on listeners the caller bound (so tests can bind port 0 and know the
    /// port before any client connects). `config.source_password` must be set.
    pub fn start(
        config: Config,
        listener: TcpListener,
        admin: Option<TcpListener>,
    ) -> io::Result<Server> {
        config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if config.source_password.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "source_password must be set before the server starts",
            ));
        }
        let listen_addr = listener.local_addr()?;
        let admin_addr = admin.as_ref().map(|a| a.local_addr()).transpose()?;
        let registry = Arc::new(ThreadRegistry::default());
        let (stop_tx, stop_rx) = watch::channel(Stop::Running);
        let (ingest_tx, ingest_rx) = mpsc::unbounded_channel();

        let nworkers = config.worker_count();
        let cores = if config.startup.pin_workers {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut worker_rxs = Vec::with_capacity(nworkers);
        let mut links = Vec::with_capacity(nworkers);
        for _ in 0..nworkers {
            let (tx, rx) = crossbeam::channel::unbounded();
            worker_rxs.push(rx);
            links.push(WorkerLink {
                conns: tx,
                conns_ready: Notify::new(),
                data_ready: Notify::new(),
                connections: AtomicUsize::new(0),
            });
        }
        let connections_per_worker = config.connection_limit().div_ceil(nworkers);
        let shared = Arc::new(Shared {
            auth_failures: AuthFailures::default(),
            config: ArcSwap::from_pointee(config),
            connections_per_worker,
            per_ip: Mutex::new(HashMap::new()),
            room: Notify::new(),
            mounts: Mounts::default(),
            metrics: Metrics::new(registry.clone()),
            workers: links,
            to_ingest: ingest_tx,
            listeners_total: AtomicUsize::new(0),
            stop: stop_rx,
            started: SystemTime::now(),
            listen_addr,
        });

        let mut handles = Vec::new();
        let s = shared.clone();
        let rt = runtime()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        handles.push(threads::spawn("fs-ingest", None, &registry, move || {
            crate::ingest::run(rt, s, ingest_rx, ready_tx)
        })?);
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the ingest thread failed to start"))?;
        for (index, rx) in worker_rxs.into_iter().enumerate() {
            let s = shared.clone();
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            let rt = runtime()?;
            handles.push(threads::spawn(
                &format!("fs-worker-{index}"),
                core,
                &registry,
                move || crate::worker::run(rt, s, index, rx),
            )?);
        }
        listener.set_nonblocking(true)?;
        let s = shared.clone();
        let rt = runtime()?;
        handles.push(threads::spawn("fs-acceptor", None, &registry, move || {
            crate::acceptor::run(rt, s, listener)
        })?);
        if let Some(admin) = admin {
            admin.set_nonblocking(true)?;
            let s = shared.clone();
            let rt = runtime()?;
            handles.push(threads::spawn("fs-admin", None, &registry, move || {
                crate::admin::run(rt, s, admin)
            })?);
        }
        tracing::info!(%listen_addr, admin = ?admin_addr, workers = nworkers, "fanstream started");
        Ok(Server {
            stop_tx,
            threads: handles,
            listen_addr,
            admin_addr,
            shared,
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Listeners connected now, across all mounts.
    pub fn listeners(&self) -> usize {
        self.shared.listeners_total.load(Ordering::Relaxed)
    }

    /// Applies a new configuration without dropping anyone: passwords, limits and mount
    /// settings take effect at once (new retention windows as the stream moves on). Settings
    /// bound at start-up (addresses, workers, the demo) keep their running values until a
    /// restart, with a warning. An invalid config is refused and the running one stays.
    pub fn reload(&self, new: Config) -> Result<(), String> {
        new.validate()?;
        let (new, restart_only) = self.shared.config.load().reloaded(new);
        for setting in &restart_only {
            tracing::warn!(
                setting = setting.as_str(),
                "changed in the config; takes effect at the next restart"
            );
        }
        for mount in self.shared.mounts.all() {
            mount.settings.store(Arc::new(new.mount(&mount.path)));
        }
        self.shared.config.store(Arc::new(new));
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Asks every thread to stop; returns at once. `Now` overrides an ongoing `Drain`.
    pub fn stop(&self, how: Stop) {
        self.stop_tx.send_if_modified(|cur| {
            let escalate = how == Stop::Now || *cur == Stop::Running;
            if escalate && *cur != how {
                *cur = how;
                true
            } else {
                false
            }
        });
    }

    /// Waits for every thread to finish (after [`Server::stop`]).
    pub fn join(mut self) {
        self.join_threads();
    }

    fn join_threads(&mut self) {
        for h in self.threads.drain(..) {
            let name = h.thread().name().unwrap_or("?").to_string();
            if h.join().is_err() {
                tracing::error!(thread = %name, "thread panicked");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop(Stop::Now);
            self.join_threads();
        }
    }
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

/// A current-thread runtime for one of our threads, built before the thread starts: a failure
/// (out of descriptors) is a start-up error, and once `start` returns every thread's runtime,
/// with its descriptors, exists.
fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
