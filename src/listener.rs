//! Listeners: admission, and the fan-out loop that writes every listener of one worker.
//!
//! One loop per worker owns all of that worker's listeners, grouped in shards by mount. When
//! ingest publishes, the worker is woken once; the loop loads each mount's snapshot once and walks
//! its listeners, writing each one's backlog with one vectored write of shared `Bytes` (no copy,
//! no allocation, no lock per listener). Listeners at the same position (all who keep up) share
//! one gathered slice list per round.
//!
//! Writes are coalesced: a listener is written once `min_write_bytes` are pending or its oldest
//! pending byte is `max_write_delay_ms` old, since a syscall costs the same for 300 bytes as for
//! 16 KiB. The loop keeps one timer for the earliest such deadline, not one per listener.
//!
//! A listener whose socket is full is parked: a small task waits for the socket to become writable
//! and hands it back to the loop. Parked listeners cost nothing per round but a lag check, and the
//! lag policy drops or skips them when they fall too far behind, so they never hold up others.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge};
use slab::Slab;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::acceptor::ConnGuard;
use crate::config::{LagPolicy, MountSettings};
use crate::http::{valid_mount_path, Method, Request};
use crate::mounts::Mount;
use crate::server::{stopped, Shared, Stop};
use crate::store::{Position, Snapshot, SourceState};
use crate::usage::WorkerUsage;
use crate::worker::{refuse, WorkerCtx, RESPONSE_TIMEOUT};

/// Most slices in one vectored write (Linux allows 1024; beyond a few dozen nothing is gained).
const MAX_WRITE_SLICES: usize = 64;
/// Most bytes offered to one write.
const MAX_WRITE_BYTES: usize = 256 * 1024;
/// Asked of clients refused for load: when to try again.
const RETRY_AFTER_SECS: &str = "10";
/// How often listeners' lag is sampled into `fanstream_listener_lag_bytes`: each sample costs a
/// histogram update per listener, so not every round.
const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Why a listener was let go: the `reason` label of `fanstream_listener_disconnects_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Disconnect {
    /// The peer closed or reset the connection.
    ClientClosed,
    /// A write failed for another reason.
    WriteError,
    /// Fell more than `max_lag_bytes` behind under `lag_policy = "disconnect"`.
    Slow,
    /// The source left and did not come back within the grace period.
    SourceGone,
    /// The server is shutting down.
    Shutdown,
    /// Its socket accepted no byte for `send_timeout_secs`.
    SendTimeout,
    /// Serving it panicked (a bug); only this listener is lost.
    Panic,
}

impl Disconnect {
    /// Every reason, so that each mount's counters start at zero.
    pub const ALL: [Disconnect; 7] = [
        Disconnect::ClientClosed,
        Disconnect::WriteError,
        Disconnect::Slow,
        Disconnect::SourceGone,
        Disconnect::Shutdown,
        Disconnect::SendTimeout,
        Disconnect::Panic,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Disconnect::ClientClosed => "client_closed",
            Disconnect::WriteError => "write_error",
            Disconnect::Slow => "slow",
            Disconnect::SourceGone => "source_gone",
            Disconnect::Shutdown => "shutdown",
            Disconnect::SendTimeout => "send_timeout",
            Disconnect::Panic => "panic",
        }
    }

    fn from_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected => Disconnect::ClientClosed,
            _ => Disconnect::WriteError,
        }
    }
}

/// Counts one listener on its mount, the server and the gauges while it lives.
pub(crate) struct ListenerGuard {
    shared: Arc<Shared>,
    mount: Arc<Mount>,
    gauge: IntGauge,
}

impl ListenerGuard {
    /// Counts a listener in, or returns the limit it would exceed.
    fn enter(
        shared: &Arc<Shared>,
        mount: &Arc<Mount>,
        worker: &str,
        enforce: bool,
    ) -> Result<Self, &'static str> {
        let on_mount = mount.listeners.fetch_add(1, Ordering::Relaxed);
        let total = shared.listeners_total.fetch_add(1, Ordering::Relaxed);
        let gauge = shared
            .metrics
            .listeners
            .with_label_values(&[&mount.path, worker]);
        gauge.inc();
        // Built before the checks so that dropping it undoes the increments on refusal too.
        let guard = ListenerGuard {
            shared: shared.clone(),
            mount: mount.clone(),
            gauge,
        };
        if enforce {
            let max = mount.settings.load().max_listeners;
            if max > 0 && on_mount >= max {
                return Err("mount_full");
            }
            if total >= shared.config.load().max_listeners {
                return Err("server_full");
            }
        }
        mount
            .listener_peak
            .fetch_max(on_mount + 1, Ordering::Relaxed);
        Ok(guard)
    }
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.mount.listeners.fetch_sub(1, Ordering::Relaxed);
        self.shared.listeners_total.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// A listener whose response head is sent, on its way to the fan-out loop.
pub(crate) struct NewListener {
    mount: Arc<Mount>,
    stream: TcpStream,
    pos: u64,
    guard: ListenerGuard,
    conn: ConnGuard,
}

/// Handles `GET`/`HEAD` on a mount: checks it, sends the response head and hands the listener to
/// this worker's fan-out.
pub(crate) async fn admit(
    ctx: &Rc<WorkerCtx>,
    mut stream: TcpStream,
    req: Request,
    peer: SocketAddr,
    conn: ConnGuard,
) {
    let shared = &ctx.shared;
    if !valid_mount_path(&req.path) {
        refuse(
            &ctx.shared,
            &mut stream,
            peer,
            400,
            "Bad Request",
            &[],
            "bad_path",
        )
        .await;
        return;
    }
    let Some(mount) = shared.mounts.get(&req.path) else {
        refuse(
            &ctx.shared,
            &mut stream,
            peer,
            404,
            "Not Found",
            &[],
            "unknown_mount",
        )
        .await;
        return;
    };
    let snap = mount.store.load_full();
    if snap.state != SourceState::Live {
        refuse(
            &ctx.shared,
            &mut stream,
            peer,
            404,
            "Not Found",
            &[],
            "mount_idle",
        )
        .await;
        return;
    }
    let guard = match ListenerGuard::enter(shared, &mount, &ctx.label, true) {
        Ok(g) => g,
        Err(reason) => {
            let retry = [("Retry-After", RETRY_AFTER_SECS)];
            refuse(
                &ctx.shared,
                &mut stream,
                peer,
                503,
                "Service Unavailable",
                &retry,
                reason,
            )
            .await;
            return;
        }
    };
    let sndbuf = shared.config.load().listener_send_buffer_bytes;
    if sndbuf > 0 {
        if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(sndbuf) {
            tracing::warn!(%peer, error = %e, "cannot bound the listener's send buffer");
        }
    }
    let head = async {
        stream.write_all(&snap.info.response_head).await?;
        if req.method == Method::Get {
            stream.write_all(&snap.info.preamble).await?;
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
    shared
        .metrics
        .listener_connects
        .with_label_values(&[&mount.path])
        .inc();
    tracing::debug!(%peer, mount = %mount.path, worker = ctx.index, "listener joined");
    let pos = snap.join_point(mount.settings.load().burst_bytes);
    // The fan-out loop lives as long as the worker; if it is gone, so is the listener.
    let _ = ctx.admit.send(NewListener {
        mount,
        stream,
        pos,
        guard,
        conn,
    });
}

struct Listener {
    /// Shared with the parked task while the socket is full.
    stream: Rc<TcpStream>,
    /// Absolute offset of the next byte to send.
    pos: u64,
    /// The task waiting for the socket to become writable, while parked.
    parked: Option<Parked>,
    /// Held for its `Drop`: counts the listener while it lives.
    _guard: ListenerGuard,
    conn: ConnGuard,
}

/// A parked listener's waiting task, cancelled when the listener goes.
struct Parked {
    task: JoinHandle<()>,
    /// When the socket filled: a listener parked longer than `send_timeout_secs` is dropped.
    since: Instant,
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A worker's listeners of one mount.
struct Shard {
    /// Unique within the worker for its lifetime: parked tasks name their listener by it.
    id: u64,
    mount: Arc<Mount>,
    listeners: Slab<Listener>,
    sent_bytes: IntCounter,
    skips: IntCounter,
    disconnects: IntCounterVec,
    lag: Histogram,
}

/// What serving one listener came to.
enum Served {
    /// Nothing due; if bytes are pending, they are due at this instant.
    Idle(Option<Instant>),
    /// Caught up with the live edge.
    Done,
    /// Fell too far behind and was moved to the live edge (`lag_policy = "skip"`).
    Skipped,
    /// The socket is full: park the listener.
    Full,
    Drop(Disconnect),
}

/// Lookups for one position, reused by every listener at that position in a round: listeners
/// that keep up all stand at the same offset, so a round costs one lookup, not one per listener.
struct Gathered<'s> {
    pos: Option<u64>,
    slices: Vec<IoSlice<'s>>,
    /// When the byte at this position arrived.
    arrival: Option<(u64, Option<Instant>)>,
}

impl<'s> Gathered<'s> {
    fn new() -> Self {
        Gathered {
            pos: None,
            slices: Vec::with_capacity(MAX_WRITE_SLICES),
            arrival: None,
        }
    }

    fn arrival(&mut self, snap: &Snapshot, pos: u64) -> Option<Instant> {
        match self.arrival {
            Some((p, at)) if p == pos => at,
            _ => {
                let at = snap.arrival_of(pos);
                self.arrival = Some((pos, at));
                at
            }
        }
    }

    fn at(&mut self, snap: &'s Snapshot, pos: u64) -> &[IoSlice<'s>] {
        if self.pos != Some(pos) {
            self.slices.clear();
            snap.gather(pos, &mut self.slices, MAX_WRITE_SLICES, MAX_WRITE_BYTES);
            self.pos = Some(pos);
        }
        &self.slices
    }
}

/// Work counted in a round, added to the shared counters once per round.
#[derive(Default)]
struct Tally {
    writes: u64,
    bytes: u64,
}

/// The fan-out loop of one worker.
pub(crate) struct FanOut {
    ctx: Rc<WorkerCtx>,
    admit_rx: mpsc::UnboundedReceiver<NewListener>,
    shards: Vec<Shard>,
    next_shard_id: u64,
    /// Parked listeners whose socket became writable: (shard id, listener key).
    unparked: Rc<RefCell<Vec<(u64, usize)>>>,
    unparked_notify: Rc<Notify>,
    writes: IntCounter,
    wakeups: IntCounter,
    panics: IntCounter,
    usage: WorkerUsage,
    next_lag_sample: Instant,
}

impl FanOut {
    pub fn new(ctx: Rc<WorkerCtx>, admit_rx: mpsc::UnboundedReceiver<NewListener>) -> Self {
        let m = &ctx.shared.metrics;
        let writes = m.write_syscalls.with_label_values(&[&ctx.label]);
        let wakeups = m.worker_wakeups.with_label_values(&[&ctx.label]);
        let panics = m.panics.with_label_values(&["listener"]);
        let usage = WorkerUsage::new(m, &ctx.label);
        FanOut {
            ctx,
            admit_rx,
            shards: Vec::new(),
            next_shard_id: 0,
            unparked: Rc::default(),
            unparked_notify: Rc::default(),
            writes,
            wakeups,
            panics,
            usage,
            next_lag_sample: Instant::now(),
        }
    }

    pub async fn run(mut self) {
        let shared = self.ctx.shared.clone();
        let link = &shared.workers[self.ctx.index];
        let mut stop = shared.stop.clone();
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut timer_armed = false;
        loop {
            self.usage.pass(Instant::now(), self.listener_count());
            let next = tokio::select! {
                how = stopped(&mut stop) => {
                    self.stop(how).await;
                    return;
                }
                Some(new) = self.admit_rx.recv() => {
                    self.add(new);
                    continue;
                }
                _ = link.data_ready.notified() => {
                    self.wakeups.inc();
                    self.measured_round()
                }
                _ = self.unparked_notify.notified() => {
                    self.serve_unparked();
                    continue;
                }
                _ = &mut timer, if timer_armed => self.measured_round(),
            };
            timer_armed = next.is_some();
            if let Some(at) = next {
                timer.as_mut().reset(at.into());
            }
        }
    }

    fn listener_count(&self) -> usize {
        self.shards.iter().map(|s| s.listeners.len()).sum()
    }

    /// A round, with its CPU per listener accounted and, once a second, listeners' lag sampled.
    fn measured_round(&mut self) -> Option<Instant> {
        let listeners = self.listener_count();
        let next = self.round(false);
        self.usage.round_done(listeners);
        let now = Instant::now();
        if now >= self.next_lag_sample && listeners > 0 {
            self.next_lag_sample = now + LAG_SAMPLE_EVERY;
            for shard in &self.shards {
                let end = shard.mount.store.load().end;
                for (_, l) in shard.listeners.iter() {
                    shard.lag.observe(end.saturating_sub(l.pos) as f64);
                }
            }
        }
        next
    }

    fn add(&mut self, new: NewListener) {
        let listener = Listener {
            stream: Rc::new(new.stream),
            pos: new.pos,
            parked: None,
            _guard: new.guard,
            conn: new.conn,
        };
        let (idx, key) = self.insert(&new.mount, listener);
        // A new listener has its burst pending: send it now, not at the next chunk.
        self.serve_one(idx, key);
    }

    /// Puts a listener in its mount's shard, creating the shard if needed.
    fn insert(&mut self, mount: &Arc<Mount>, listener: Listener) -> (usize, usize) {
        let idx = match self
            .shards
            .iter()
            .position(|s| Arc::ptr_eq(&s.mount, mount))
        {
            Some(i) => i,
            None => {
                let metrics = &self.ctx.shared.metrics;
                self.next_shard_id += 1;
                self.shards.push(Shard {
                    id: self.next_shard_id,
                    mount: mount.clone(),
                    listeners: Slab::new(),
                    sent_bytes: metrics
                        .sent_bytes
                        .with_label_values(&[&mount.path, &self.ctx.label]),
                    skips: metrics.listener_skips.with_label_values(&[&mount.path]),
                    disconnects: metrics.listener_disconnects.clone(),
                    lag: metrics.listener_lag.with_label_values(&[&mount.path]),
                });
                self.shards.len() - 1
            }
        };
        let key = self.shards[idx].listeners.insert(listener);
        (idx, key)
    }

    /// Serves every listener; returns the earliest instant a coalesced write falls due.
    fn round(&mut self, force: bool) -> Option<Instant> {
        let now = Instant::now();
        let send_timeout = self.send_timeout();
        let mut next: Option<Instant> = None;
        let mut moves = Vec::new();
        for shard in &mut self.shards {
            let snap = shard.mount.store.load();
            let settings = shard.mount.settings.load();
            let round = Round {
                snap: &snap,
                settings: &settings,
                now,
                // With the source gone nothing more is coming to coalesce with: flush everything.
                force: force || snap.state != SourceState::Live,
                send_timeout,
                inject_panic: shard.mount.inject_panic,
            };
            let mut gathered = Gathered::new();
            let mut tally = Tally::default();
            let mut dropped = Vec::new();
            for (key, l) in shard.listeners.iter_mut() {
                match serve_guarded(l, &round, &mut gathered, &mut tally, &self.panics) {
                    Served::Idle(due) => next = earliest(next, due),
                    Served::Done => {}
                    Served::Skipped => shard.skips.inc(),
                    Served::Full => park(l, shard.id, key, &self.unparked, &self.unparked_notify),
                    Served::Drop(why) => dropped.push((key, why)),
                }
            }
            self.writes.inc_by(tally.writes);
            shard.sent_bytes.inc_by(tally.bytes);
            for (key, why) in dropped {
                remove(shard, key, why);
            }
            // The mount ended: after that last flush, its listeners leave or move on.
            match &snap.state {
                SourceState::Closed => drop_all(shard, Disconnect::SourceGone),
                SourceState::MovedTo(fallback) => moves.push((shard.id, fallback.clone())),
                SourceState::Live | SourceState::Gone(_) => {}
            }
        }
        for (shard_id, fallback) in moves {
            self.move_to_fallback(shard_id, &fallback);
        }
        self.shards.retain(|s| !s.listeners.is_empty());
        next
    }

    fn send_timeout(&self) -> Duration {
        Duration::from_secs(self.ctx.shared.config.load().send_timeout_secs)
    }

    /// Serves one listener at once (a newcomer, or one whose socket drained): it is behind, so
    /// it is written without waiting for coalescing.
    fn serve_one(&mut self, idx: usize, key: usize) {
        let send_timeout = self.send_timeout();
        let shard = &mut self.shards[idx];
        let Some(l) = shard.listeners.get_mut(key) else {
            return;
        };
        let snap = shard.mount.store.load();
        let settings = shard.mount.settings.load();
        let round = Round {
            snap: &snap,
            settings: &settings,
            now: Instant::now(),
            force: true,
            send_timeout,
            inject_panic: shard.mount.inject_panic,
        };
        let mut gathered = Gathered::new();
        let mut tally = Tally::default();
        let served = serve_guarded(l, &round, &mut gathered, &mut tally, &self.panics);
        self.writes.inc_by(tally.writes);
        shard.sent_bytes.inc_by(tally.bytes);
        match served {
            Served::Full => park(l, shard.id, key, &self.unparked, &self.unparked_notify),
            Served::Drop(why) => remove(shard, key, why),
            Served::Skipped => shard.skips.inc(),
            // Forced, so nothing is left pending.
            Served::Idle(_) | Served::Done => {}
        }
    }

    /// Serves listeners whose sockets drained; they are behind, so they are written at once.
    fn serve_unparked(&mut self) {
        let ready = std::mem::take(&mut *self.unparked.borrow_mut());
        for (shard_id, key) in ready {
            let Some(idx) = self.shards.iter().position(|s| s.id == shard_id) else {
                continue;
            };
            let Some(l) = self.shards[idx].listeners.get_mut(key) else {
                continue;
            };
            // A stale notice (the listener was replaced at this key) must not unpark another.
            if !l.parked.as_ref().is_some_and(|p| p.task.is_finished()) {
                continue;
            }
            l.parked = None;
            self.serve_one(idx, key);
        }
        self.shards.retain(|s| !s.listeners.is_empty());
    }

    /// The mount's grace period ended with a fallback: its listeners continue there, from the
    /// fallback's join point, so players resume at once.
    fn move_to_fallback(&mut self, shard_id: u64, fallback: &str) {
        let Some(idx) = self.shards.iter().position(|s| s.id == shard_id) else {
            return;
        };
        let mut shard = self.shards.swap_remove(idx);
        let shared = self.ctx.shared.clone();
        let target = shared
            .mounts
            .get(fallback)
            .filter(|m| m.store.load().state == SourceState::Live);
        let Some(target) = target else {
            drop_all(&mut shard, Disconnect::SourceGone);
            return;
        };
        let pos = target
            .store
            .load()
            .join_point(target.settings.load().burst_bytes);
        tracing::info!(from = %shard.mount.path, to = %target.path, listeners = shard.listeners.len(), "moving listeners to the fallback mount");
        for l in shard.listeners.drain() {
            let Listener { stream, conn, .. } = l;
            // Moved listeners are not refused for the fallback's limits: they were admitted once.
            let Ok(guard) = ListenerGuard::enter(&shared, &target, &self.ctx.label, false) else {
                continue;
            };
            let (idx, key) = self.insert(
                &target,
                Listener {
                    stream,
                    pos,
                    parked: None,
                    _guard: guard,
                    conn,
                },
            );
            self.serve_one(idx, key);
        }
    }

    /// Stops: on `Drain`, gives listeners until the deadline to receive what is pending.
    async fn stop(&mut self, how: Stop) {
        if how == Stop::Drain {
            let grace = Duration::from_secs(self.ctx.shared.config.load().shutdown_grace_secs);
            let deadline = tokio::time::Instant::now() + grace;
            self.round(true);
            while self.any_pending() {
                tokio::select! {
                    _ = self.unparked_notify.notified() => self.serve_unparked(),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        for shard in &mut self.shards {
            drop_all(shard, Disconnect::Shutdown);
        }
        self.shards.clear();
    }

    fn any_pending(&self) -> bool {
        self.shards.iter().any(|s| {
            let end = s.mount.store.load().end;
            s.listeners.iter().any(|(_, l)| l.pos < end)
        })
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// What every listener of a shard is served against in one round.
struct Round<'s> {
    snap: &'s Snapshot,
    settings: &'s MountSettings,
    now: Instant,
    /// Write whatever is pending, ignoring coalescing.
    force: bool,
    send_timeout: Duration,
    /// Test hook: serving this mount's listeners panics (see `Config::panic_injection_mount`).
    inject_panic: bool,
}

/// [`serve`], with a panic contained to the listener being served: it is dropped and counted,
/// and the worker goes on serving everyone else.
fn serve_guarded<'s>(
    l: &mut Listener,
    round: &Round<'s>,
    gathered: &mut Gathered<'s>,
    tally: &mut Tally,
    panics: &IntCounter,
) -> Served {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve(l, round, gathered, tally)
    }));
    result.unwrap_or_else(|_| {
        panics.inc();
        tracing::error!("serving a listener panicked; that listener is dropped");
        // The shared lookups may be half-made: start them afresh.
        *gathered = Gathered::new();
        Served::Drop(Disconnect::Panic)
    })
}

/// Writes what is due to one listener, applying the lag policy first.
fn serve<'s>(
    l: &mut Listener,
    round: &Round<'s>,
    gathered: &mut Gathered<'s>,
    tally: &mut Tally,
) -> Served {
    let Round {
        snap,
        settings,
        now,
        force,
        ..
    } = *round;
    if round.inject_panic {
        panic!("panic injected for a test");
    }
    let lag = match snap.position(l.pos) {
        Position::AtEdge => return Served::Done,
        // Its next bytes are gone from the window: it cannot be served from where it is.
        Position::Evicted => return lag_policy(l, snap, settings),
        Position::Behind => snap.end - l.pos,
    };
    if let Some(p) = &l.parked {
        // Its socket is full: the listener, not the server, is behind.
        if lag > settings.max_lag_bytes {
            return lag_policy(l, snap, settings);
        }
        if now.saturating_duration_since(p.since) > round.send_timeout {
            return Served::Drop(Disconnect::SendTimeout);
        }
        return Served::Idle(None);
    }
    if !force && settings.max_write_delay_ms > 0 && lag < settings.min_write_bytes as u64 {
        let delay = Duration::from_millis(settings.max_write_delay_ms);
        if let Some(due) = gathered.arrival(snap, l.pos).map(|t| t + delay) {
            if due > now {
                return Served::Idle(Some(due));
            }
        }
    }
    loop {
        let slices = gathered.at(snap, l.pos);
        tally.writes += 1;
        match l.stream.try_write_vectored(slices) {
            Ok(0) => return Served::Drop(Disconnect::ClientClosed),
            Ok(n) => {
                l.pos += n as u64;
                tally.bytes += n as u64;
                if l.pos >= snap.end {
                    return Served::Done;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A listener far behind whose socket takes no more cannot keep up. One that is
                // far behind only because this worker came late (a busy round, a burst of
                // newcomers) takes what it is owed and stays.
                if snap.end - l.pos > settings.max_lag_bytes {
                    return lag_policy(l, snap, settings);
                }
                return Served::Full;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Served::Drop(Disconnect::from_io(&e)),
        }
    }
}

/// A listener more than `max_lag_bytes` behind that cannot catch up: dropped, or moved to the
/// live edge, as the mount's `lag_policy` says.
fn lag_policy(l: &mut Listener, snap: &Snapshot, settings: &MountSettings) -> Served {
    match settings.lag_policy {
        LagPolicy::Disconnect => Served::Drop(Disconnect::Slow),
        LagPolicy::Skip => {
            l.pos = snap.end;
            Served::Skipped
        }
    }
}

/// Parks a listener whose socket is full until it drains.
fn park(
    l: &mut Listener,
    shard_id: u64,
    key: usize,
    unparked: &Rc<RefCell<Vec<(u64, usize)>>>,
    notify: &Rc<Notify>,
) {
    let stream = l.stream.clone();
    let unparked = unparked.clone();
    let notify = notify.clone();
    let task = tokio::task::spawn_local(async move {
        // An error also makes the socket "ready"; the next write reports it.
        let _ = stream.writable().await;
        unparked.borrow_mut().push((shard_id, key));
        notify.notify_one();
    });
    l.parked = Some(Parked {
        task,
        since: Instant::now(),
    });
}

fn remove(shard: &mut Shard, key: usize, why: Disconnect) {
    if shard.listeners.try_remove(key).is_some() {
        count_disconnects(shard, why, 1);
    }
}

fn drop_all(shard: &mut Shard, why: Disconnect) {
    let n = shard.listeners.len();
    shard.listeners.clear();
    count_disconnects(shard, why, n as u64);
}

fn count_disconnects(shard: &Shard, why: Disconnect, n: u64) {
    if n > 0 {
        shard
            .disconnects
            .with_label_values(&[&shard.mount.path, why.reason()])
            .inc_by(n);
    }
}
