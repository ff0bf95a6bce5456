//! Wiring the stages together: the channels between them, the threads that run them, and the
//! order in which they start and stop.
//!
//! Start order (each stage runs before anything that feeds it):
//! 1. **ingest**, which takes sources from one channel;
//! 2. **the demo**, a source like any other; `start` waits until ingest has claimed its mount, so
//!    `/demo` plays as soon as the server says it started; then **the relays**, sources too,
//!    which connect to their upstreams on their own thread;
//! 3. **workers**, which hand sources to ingest and take sockets from the acceptor;
//! 4. **the acceptor**, which starts accepting;
//! 5. **the admin listener**, and the SHOUTcast source port when there is one.
//!
//! Every thread's runtime is built before any thread starts, so running out of descriptors is a
//! start-up error, not a thread dying later.
//!
//! Stop order: every thread watches one `Stop` channel. The acceptor stops accepting at once;
//! ingest stops reading, closes its sources and says so (`Shared::ingest_stopped`), the demo
//! stops playing and the relays close their upstream connections; workers, on `Drain`, wait for ingest to stop, then give listeners
//! `shutdown_grace_secs` in all to receive what it published, then close them. `join` then
//! waits for every thread.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};

use crate::access_log::AccessLog;
use crate::auth::AuthFailures;
use crate::config::Config;
use crate::listener_auth::ListenerAuth;
use crate::metrics::Metrics;
use crate::mounts::Mounts;
pub use crate::shared::Stop;
use crate::shared::{Shared, WorkerLink};
use crate::threads::{self, ThreadRegistry};

/// A running server. Dropping it stops everything at once and joins the threads.
pub struct Server {
    stop_tx: watch::Sender<Stop>,
    threads: Vec<JoinHandle<()>>,
    /// The access log's writer, joined after every other thread.
    log_writer: Option<JoinHandle<()>>,
    listen_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    shoutcast_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    /// The fallback files read at start-up, each playing on its own thread.
    files: std::collections::BTreeSet<std::path::PathBuf>,
    /// What the relays thread runs; a reload sends it the new `[[relays]]` and `[master]`.
    relays: watch::Sender<Arc<crate::relay::Plan>>,
}

impl Server {
    /// Starts every thread on sockets the caller bound (so tests can bind port 0 and know the
    /// port before any client connects). `config.source_password` must be set.
    pub fn start(
        config: Config,
        listen_socket: TcpListener,
        admin_socket: Option<TcpListener>,
    ) -> io::Result<Server> {
        Server::start_with_tls(config, listen_socket, admin_socket, None)
    }

    /// [`Server::start`] with a TLS port too, on `tls_socket`, with the certificate the
    /// config's `tls_cert` and `tls_key` name.
    pub fn start_with_tls(
        config: Config,
        listen_socket: TcpListener,
        admin_socket: Option<TcpListener>,
        tls_socket: Option<TcpListener>,
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
        let tls = match &tls_socket {
            Some(_) => {
                Some(ArcSwap::new(load_certificate(&config).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, e)
                })?))
            }
            None => None,
        };
        let plan = relay_plan(&config, None)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let (relays_tx, plans) = watch::channel(Arc::new(plan));
        let tls_addr = tls_socket.as_ref().map(|t| t.local_addr()).transpose()?;
        let listen_addr = listen_socket.local_addr()?;
        let shoutcast_socket = config
            .startup
            .shoutcast_listen
            .map(|addr| {
                TcpListener::bind(addr).map_err(|e| {
                    io::Error::new(e.kind(), format!("shoutcast_listen = {addr}: {e}"))
                })
            })
            .transpose()?;
        let shoutcast_addr = shoutcast_socket
            .as_ref()
            .map(|s| s.local_addr())
            .transpose()?;
        let admin_addr = admin_socket.as_ref().map(|a| a.local_addr()).transpose()?;
        let registry = Arc::new(ThreadRegistry::default());
        let (stop_tx, stop_rx) = watch::channel(Stop::Running);
        let nworkers = config.worker_count();
        let cores = if config.startup.pin_workers {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let demo = config
            .startup
            .demo
            .then(|| config.startup.demo_mount.clone());
        let (access_log, log_writer) = match &config.startup.access_log {
            Some(path) => {
                let (log, writer) = AccessLog::open(path)
                    .map_err(|e| io::Error::new(e.kind(), format!("access_log = {path:?}: {e}")))?;
                (log, Some(writer))
            }
            None => (AccessLog::default(), None),
        };
        // Read before anything starts: a file that cannot play is a start-up error.
        let files = config
            .fallback_files()
            .into_iter()
            .map(|file| {
                let looped = crate::file_source::load(file).map_err(|e| {
                    let msg = format!("fallback_file = {}: {e}", file.display());
                    io::Error::new(io::ErrorKind::InvalidInput, msg)
                })?;
                Ok((file.to_path_buf(), looped))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let intros = crate::file_source::load_intros(&config)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let max_connections = config.connection_limit();
        warn_if_over_budget(&config, max_connections);
        warn_if_wrong_users_files(&config);
        crate::admin_api::warn_if_closed(config.admin_password.as_deref());
        let shared = Arc::new(Shared {
            auth_failures: AuthFailures::default(),
            listener_auth: ListenerAuth::new(config.startup.max_listener_auth_calls),
            intros: ArcSwap::from_pointee(intros),
            max_connections,
            heads: Default::default(),
            logs: Default::default(),
            config: ArcSwap::from_pointee(config),
            config_changed: Default::default(),
            per_ip: Mutex::new(HashMap::new()),
            room: Default::default(),
            mounts: Mounts::default(),
            metrics: Metrics::new(registry.clone()),
            workers: (0..nworkers).map(|_| WorkerLink::default()).collect(),
            listeners_total: Default::default(),
            stop: stop_rx,
            ingest_stopped: Default::default(),
            started: SystemTime::now(),
            listen_addr,
            tls,
            access_log,
            on_demand: Default::default(),
            mounts_changed: Default::default(),
            edges: Default::default(),
        });

        // The channels between stages.
        let (to_ingest, from_workers) = mpsc::unbounded_channel();
        let (to_workers, worker_intakes): (Vec<_>, Vec<_>) = (0..nworkers)
            .map(|_| crossbeam::channel::unbounded())
            .unzip();
        // The admin API, on any worker or the admin thread, reaches each worker's listeners.
        let (control, control_rxs): (Vec<_>, Vec<_>) =
            (0..nworkers).map(|_| mpsc::unbounded_channel()).unzip();
        let control: Arc<[_]> = control.into();

        let mut handles = Vec::new();
        // Started first and stopped last (see `join_threads`), so that it writes the lines of
        // everything that ends before the other threads have.
        let log_writer = log_writer
            .map(|w| threads::spawn("fs-access-log", None, &registry, move || w.run()))
            .transpose()?;

        let s = shared.clone();
        let ingest_control = control.clone();
        spawn_stage(&mut handles, &registry, "fs-ingest", None, move |rt| {
            crate::ingest::run(rt, s, from_workers, ingest_control)
        })?;

        if let Some(path) = demo {
            let (mut source, player) = crate::demo::source(&path);
            let (claimed_tx, claimed_rx) = tokio::sync::oneshot::channel();
            source.claimed = Some(claimed_tx);
            // Ingest holds the receiver until it stops: this send succeeds.
            let _ = to_ingest.send(crate::conn::ToIngest::Source(Box::new(source)));
            match claimed_rx.blocking_recv() {
                Ok(Ok(())) => {
                    let stop = shared.stop.clone();
                    spawn_stage(&mut handles, &registry, "fs-demo", None, move |rt| {
                        crate::demo::run(rt, player, stop)
                    })?;
                    tracing::info!(mount = %path, "demo tone playing");
                }
                Ok(Err(no)) => {
                    tracing::warn!(mount = %path, reason = no.reason(), "demo not started")
                }
                Err(_) => return Err(io::Error::other("the ingest thread failed to start")),
            }
        }

        let playing = files.iter().map(|(file, _)| file.clone()).collect();
        // Each fallback file plays on its own thread, claimed before anyone can connect.
        for (n, (file, looped)) in files.into_iter().enumerate() {
            let path = crate::config::file_mount_path(&file);
            let (mut source, player) = crate::file_source::source(&path, &file, looped);
            let (claimed_tx, claimed_rx) = tokio::sync::oneshot::channel();
            source.claimed = Some(claimed_tx);
            let _ = to_ingest.send(crate::conn::ToIngest::Source(Box::new(source)));
            match claimed_rx.blocking_recv() {
                Ok(Ok(())) => {
                    let stop = shared.stop.clone();
                    spawn_stage(
                        &mut handles,
                        &registry,
                        &format!("fs-file-{n}"),
                        None,
                        move |rt| crate::file_source::run(rt, player, stop),
                    )?;
                    tracing::info!(file = %file.display(), mount = %path, "fallback file playing");
                }
                Ok(Err(no)) => {
                    tracing::warn!(file = %file.display(), mount = %path, reason = no.reason(), "fallback file not started")
                }
                Err(_) => return Err(io::Error::other("the ingest thread failed to start")),
            }
        }
        // Always running, idle without relays or registration: a reload may add them.
        let (s, to_ingest_r, stop) = (shared.clone(), to_ingest.clone(), shared.stop.clone());
        let registering = (shared.clone(), relays_tx.subscribe(), shared.stop.clone());
        spawn_stage(&mut handles, &registry, "fs-relays", None, move |rt| {
            let (rs, rplans, rstop) = registering;
            rt.block_on(async move {
                tokio::join!(
                    crate::relay::run(s, to_ingest_r, plans, stop),
                    crate::registration::run(rs, rplans, rstop),
                )
            });
        })?;

        let intakes = worker_intakes.into_iter().zip(control_rxs);
        for (index, (intake, control_rx)) in intakes.enumerate() {
            let s = shared.clone();
            let to_ingest = to_ingest.clone();
            let control = control.clone();
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            spawn_stage(
                &mut handles,
                &registry,
                &format!("fs-worker-{index}"),
                core,
                move |rt| crate::worker::run(rt, s, index, intake, to_ingest, control, control_rx),
            )?;
        }

        listen_socket.set_nonblocking(true)?;
        if let Some(t) = &tls_socket {
            t.set_nonblocking(true)?;
        }
        let s = shared.clone();
        spawn_stage(&mut handles, &registry, "fs-acceptor", None, move |rt| {
            crate::acceptor::run(rt, s, listen_socket, tls_socket, to_workers)
        })?;

        if let Some(admin_socket) = admin_socket {
            admin_socket.set_nonblocking(true)?;
            let s = shared.clone();
            let to_ingest = to_ingest.clone();
            spawn_stage(&mut handles, &registry, "fs-admin", None, move |rt| {
                crate::admin::run(rt, s, admin_socket, to_ingest, control)
            })?;
        }
        if let Some(socket) = shoutcast_socket {
            socket.set_nonblocking(true)?;
            let s = shared.clone();
            let to_ingest = to_ingest.clone();
            spawn_stage(&mut handles, &registry, "fs-shoutcast", None, move |rt| {
                crate::shoutcast::run(rt, s, socket, to_ingest)
            })?;
        }
        tracing::info!(%listen_addr, admin = ?admin_addr, tls = ?tls_addr, shoutcast = ?shoutcast_addr, workers = nworkers, "fanstream started");
        // What to open first, as a browser on this host reaches it.
        let host = match listen_addr.ip() {
            ip if ip.is_unspecified() || ip.is_loopback() => "localhost".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let base = format!("http://{host}:{}", listen_addr.port());
        match &shared.config.load().startup {
            s if s.demo => tracing::info!("the page: {base}/ and the demo: {base}{}", s.demo_mount),
            _ => tracing::info!("the page: {base}/"),
        }
        Ok(Server {
            stop_tx,
            threads: handles,
            log_writer,
            listen_addr,
            admin_addr,
            tls_addr,
            shoutcast_addr,
            shared,
            files: playing,
            relays: relays_tx,
        })
    }

    /// Where the TLS port listens, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Where SHOUTcast v1 sources connect, when `shoutcast_listen` is set.
    pub fn shoutcast_addr(&self) -> Option<SocketAddr> {
        self.shoutcast_addr
    }

    /// Listeners connected now, across all mounts.
    pub fn listeners(&self) -> usize {
        self.shared.listeners_total.load(Ordering::Relaxed)
    }

    /// Applies a new configuration without dropping anyone: passwords, limits and mount
    /// settings take effect at once (new retention windows as the stream moves on). Settings
    /// bound at start-up (addresses, workers, the demo) keep their running values until a
    /// restart, with a warning. An invalid config is refused and the running one stays. With
    /// a TLS port, the certificate and key are read again from their files, and new
    /// handshakes get them (connections already made keep their session); if they do not
    /// load, the whole reload is refused and the running certificate and config stay.
    pub fn reload(&self, new: Config) -> Result<(), String> {
        new.validate()?;
        let intros = crate::file_source::load_intros(&new)?;
        warn_if_wrong_users_files(&new);
        let (new, restart_only) = self.shared.config.load().reloaded(new);
        let running = self.relays.borrow().clone();
        let plan = relay_plan(&new, Some(&running))?;
        if let Some(tls) = &self.shared.tls {
            let certificate = load_certificate(&new)
                .map_err(|e| format!("{e}; the running certificate stays"))?;
            tls.store(certificate);
            tracing::info!("TLS certificate reloaded");
        }
        // Only once the reload can no longer be refused.
        for file in new.fallback_files() {
            if !self.files.contains(file) {
                tracing::warn!(file = %file.display(), "fallback_file new to the config: it plays from the next restart");
            }
        }
        for setting in &restart_only {
            tracing::warn!(
                setting = setting.as_str(),
                "changed in the config; takes effect at the next restart"
            );
        }
        if !restart_only.is_empty() {
            if let Err(e) = check_startup_files(&new) {
                tracing::error!(error = %e, "the next restart would fail on this config");
            }
        }
        self.shared.intros.store(Arc::new(intros));
        self.shared.config.store(Arc::new(new));
        // The relays thread stops the relays that left or changed and starts the new ones.
        self.relays.send_replace(Arc::new(plan));
        // Ingest publishes each mount's new settings with its stream.
        self.shared.config_changed.notify_one();
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
        // Every listener and request has ended, and logged its line: the writer writes the
        // last ones and ends.
        if let Some(h) = self.log_writer.take() {
            self.shared.access_log.close();
            if h.join().is_err() {
                tracing::error!(thread = "fs-access-log", "thread panicked");
            }
        }
    }

    /// Reopens the access log (on `SIGHUP`, after logrotate moved it).
    pub fn reopen_logs(&self) {
        self.shared.access_log.reopen();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() || self.log_writer.is_some() {
            self.stop(Stop::Now);
            self.join_threads();
        }
    }
}

/// What the relays thread runs under `config`: its relays, and the TLS settings for `https://`
/// upstreams with its `relay_ca_file` read. Those of `running` are kept when the file and its
/// contents did not change, so that a reload restarts no `https://` relay for nothing.
fn relay_plan(
    config: &Config,
    running: Option<&crate::relay::Plan>,
) -> Result<crate::relay::Plan, String> {
    let ca = match &config.startup.relay_ca_file {
        Some(path) => Some((
            path.clone(),
            std::fs::read(path).map_err(|e| format!("relay_ca_file {}: {e}", path.display()))?,
        )),
        None => None,
    };
    let tls = match running {
        Some(plan) if plan.ca == ca => plan.tls.clone(),
        _ => crate::tls::client_config(config.startup.relay_ca_file.as_deref())?,
    };
    Ok(crate::relay::Plan {
        relays: config.startup.relays.clone(),
        master: config.startup.master.clone(),
        tls,
        ca,
    })
}

/// Opens the files start-up opens that a reload does not (the access log, the TLS certificate and
/// key of a config that adds a TLS port), for `--check-config` and a reload that changes them: a
/// restart must not fail on a file the check passed. The access log is opened for appending,
/// so it is created if missing, as start-up would.
pub fn check_startup_files(config: &Config) -> Result<(), String> {
    if let Some(path) = config.startup.access_log.as_deref().filter(|p| *p != "-") {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("access_log = {path:?}: {e}"))?;
    }
    if config.startup.tls_listen.is_some() {
        load_certificate(config)?;
    }
    Ok(())
}

/// Reads `relay_ca_file` as the server would, for `--check-config`.
pub fn check_relay_ca_file(config: &Config) -> Result<(), String> {
    relay_plan(config, None).map(|_| ())
}

/// The TLS settings with the certificate and key the config names.
fn load_certificate(config: &Config) -> Result<Arc<rustls::ServerConfig>, String> {
    match (&config.startup.tls_cert, &config.startup.tls_key) {
        (Some(cert), Some(key)) => crate::tls::server_config(cert, key),
        _ => Err("a TLS port needs tls_cert and tls_key".into()),
    }
}

/// An explicit `max_connections` is the operator's to set, but one that leaves less than the
/// reserve for the admin port, sources and the server's own files lets a flood take the
/// descriptors a config reload or a source needs: say so at start-up.
fn warn_if_over_budget(config: &Config, max_connections: usize) {
    let Some(open_files) = crate::open_files::soft_limit() else {
        return;
    };
    let open_files = open_files as usize;
    let reserve = config.descriptor_reserve(open_files);
    if max_connections + reserve > open_files {
        tracing::warn!(
            max_connections,
            open_files,
            reserve,
            "max_connections leaves less than the reserve free: a flood can exhaust descriptors"
        );
    }
}

/// A users file that cannot be read, or names no user it can check, refuses listeners until it
/// is mended: not a reason to refuse to start (it is read again for each listener), but worth a
/// line at once.
fn warn_if_wrong_users_files(config: &Config) {
    if let Err(e) = crate::listener_auth::check_users_files(config) {
        tracing::warn!("{e}");
    }
}

/// Reads and checks every users file the config names, for `--check-config`.
pub fn check_users_files(config: &Config) -> Result<(), String> {
    crate::listener_auth::check_users_files(config)
}

/// Reads every media file the config names (`intro_file`, `fallback_file`) as the server
/// would, for `--check-config`: a start or a reload cannot then fail on a file the check
/// passed.
pub fn check_media_files(config: &Config) -> Result<(), String> {
    crate::file_source::load_intros(config)?;
    for file in config.fallback_files() {
        crate::file_source::load(file)
            .map_err(|e| format!("fallback_file = {}: {e}", file.display()))?;
    }
    Ok(())
}

/// Starts one of our threads, named and registered ([`threads::spawn`]), running `body` on a
/// runtime built before the thread starts.
fn spawn_stage(
    handles: &mut Vec<JoinHandle<()>>,
    registry: &Arc<ThreadRegistry>,
    name: &str,
    core: Option<core_affinity::CoreId>,
    body: impl FnOnce(tokio::runtime::Runtime) + Send + 'static,
) -> io::Result<()> {
    let rt = runtime()?;
    handles.push(threads::spawn(name, core, registry, move || body(rt))?);
    Ok(())
}

/// A current-thread runtime for one of our threads, built before the thread starts: a failure
/// (out of descriptors) is a start-up error, and once `start` returns every thread's runtime,
/// with its descriptors, exists.
fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}
