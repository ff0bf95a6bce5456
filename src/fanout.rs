//! The fan-out loop: one per worker, writing every listener of that worker.
//!
//! The loop owns all of its worker's listeners, grouped in shards by mount. When ingest
//! publishes, the worker is woken once; the loop loads each mount's snapshot once (stream and
//! settings in one load) and walks its listeners, writing each one's backlog with one vectored
//! write of shared `Bytes` (no copy, no allocation, no lock per listener). Listeners at the same
//! position (all who keep up) share one gathered slice list per round.
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
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntCounterVec};
use slab::Slab;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::config::{LagPolicy, MountSettings};
use crate::conn::{ConnGuard, Io, ListenerGuard, NewListener, WorkerCtx};
use crate::icy::Cadence;
use crate::mounts::{Mount, Snapshot};
use crate::reasons::Disconnect;
use crate::shared::{stopped, Stop};
use crate::store::{Position, SourceState};
use crate::usage::WorkerUsage;

/// Most slices in one vectored write: Linux's `IOV_MAX`, so that a write carries all a listener is
/// owed even when the source's pieces are small (std's `writev` caps a longer list at the
/// platform's own limit, so this is never too many elsewhere).
const MAX_WRITE_SLICES: usize = 1024;
/// Slices a write's list starts with room for: a coalesced write at 128 kbit/s carries about 50
/// encoder pieces; more grows the list, up to `MAX_WRITE_SLICES`.
const USUAL_WRITE_SLICES: usize = 64;
/// Most bytes offered to one write.
const MAX_WRITE_BYTES: usize = 256 * 1024;
/// How often listeners' lag is sampled into `fanstream_listener_lag_bytes`: each sample costs a
/// histogram update per listener, so not every round.
const LAG_SAMPLE_EVERY: Duration = Duration::from_secs(1);

struct Listener {
    /// Shared with the parked task while the socket is full.
    stream: Rc<Io>,
    /// Absolute offset of the next byte of the stream to send.
    pos: u64,
    /// Its ICY framing, when it asked for metadata blocks.
    /// Boxed, so that a plain listener pays a pointer for it, not the cadence.
    icy: Option<Box<Cadence>>,
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
    writes: IntCounter,
    skips: IntCounter,
    disconnects: IntCounterVec,
    lag: Histogram,
    /// Test hook: serving this shard's listeners panics (`Config::panic_injection_mount`).
    #[cfg(feature = "fault-injection")]
    inject_panic: bool,
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
            slices: Vec::with_capacity(USUAL_WRITE_SLICES),
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

/// Where parked listeners report back: their tasks push (shard id, listener key) and notify.
#[derive(Default)]
struct Parking {
    unparked: Rc<RefCell<Vec<(u64, usize)>>>,
    notify: Rc<Notify>,
}

impl Parking {
    /// Parks a listener whose socket is full until it drains.
    fn park(&self, l: &mut Listener, shard_id: u64, key: usize) {
        let stream = l.stream.clone();
        let unparked = self.unparked.clone();
        let notify = self.notify.clone();
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
}

/// Where a serving pass reports: the worker's parking and counters.
struct Outlets {
    parking: Parking,
    panics: IntCounter,
}

/// What a serving pass needs besides the shard: the same for every shard of a round.
struct Pass<'a> {
    now: Instant,
    /// Write whatever is pending, ignoring coalescing.
    force: bool,
    send_timeout: Duration,
    out: &'a Outlets,
}

impl<'a> Pass<'a> {
    fn new(ctx: &WorkerCtx, out: &'a Outlets, force: bool) -> Self {
        Pass {
            now: Instant::now(),
            force,
            send_timeout: Duration::from_secs(ctx.shared.config.load().send_timeout_secs),
            out,
        }
    }
}

impl Shard {
    /// Serves this shard's listeners (only the one at `only`, if given) against `snap`, the
    /// mount's snapshot loaded once for the round, acts on each outcome, and adds the work to the
    /// counters once. Returns the earliest instant a coalesced write falls due.
    fn serve(&mut self, snap: &Snapshot, only: Option<usize>, pass: &Pass) -> Option<Instant> {
        let round = Round {
            snap,
            settings: &snap.settings,
            now: pass.now,
            // With the source gone nothing more is coming to coalesce with: flush everything.
            force: pass.force || snap.state != SourceState::Live,
            send_timeout: pass.send_timeout,
            #[cfg(feature = "fault-injection")]
            inject_panic: self.inject_panic,
        };
        let mut gathered = Gathered::new();
        let mut tally = Tally::default();
        let mut next = None;
        let mut dropped = Vec::new();
        let Shard {
            id,
            listeners,
            skips,
            ..
        } = self;
        let mut visit = |key: usize, l: &mut Listener| match serve_guarded(
            l,
            &round,
            &mut gathered,
            &mut tally,
            &pass.out.panics,
        ) {
            Served::Idle(due) => next = earliest(next, due),
            Served::Done => {}
            Served::Skipped => skips.inc(),
            Served::Full => pass.out.parking.park(l, *id, key),
            Served::Drop(why) => dropped.push((key, why)),
        };
        match only {
            Some(key) => {
                if let Some(l) = listeners.get_mut(key) {
                    visit(key, l);
                }
            }
            None => listeners.iter_mut().for_each(|(key, l)| visit(key, l)),
        }
        self.writes.inc_by(tally.writes);
        self.sent_bytes.inc_by(tally.bytes);
        if tally.bytes > 0 {
            self.mount
                .sent_bytes
                .fetch_add(tally.bytes, Ordering::Relaxed);
        }
        for (key, why) in dropped {
            if self.listeners.try_remove(key).is_some() {
                self.count_disconnects(why, 1);
            }
        }
        next
    }

    fn drop_all(&mut self, why: Disconnect) {
        let n = self.listeners.len();
        self.listeners.clear();
        self.count_disconnects(why, n as u64);
    }

    fn count_disconnects(&self, why: Disconnect, n: u64) {
        if n > 0 {
            self.disconnects
                .with_label_values(&[self.mount.label.as_str(), why.reason()])
                .inc_by(n);
        }
    }
}

/// The fan-out loop of one worker.
pub(crate) struct FanOut {
    ctx: Rc<WorkerCtx>,
    admit_rx: mpsc::UnboundedReceiver<NewListener>,
    shards: Vec<Shard>,
    next_shard_id: u64,
    out: Outlets,
    wakeups: IntCounter,
    usage: WorkerUsage,
    next_lag_sample: Instant,
}

impl FanOut {
    pub fn new(ctx: Rc<WorkerCtx>, admit_rx: mpsc::UnboundedReceiver<NewListener>) -> Self {
        let m = &ctx.shared.metrics;
        let wakeups = m.worker_wakeups.with_label_values(&[&ctx.label]);
        let panics = m.panics.with_label_values(&["listener"]);
        let usage = WorkerUsage::new(m, &ctx.label);
        FanOut {
            ctx,
            admit_rx,
            shards: Vec::new(),
            next_shard_id: 0,
            out: Outlets {
                parking: Parking::default(),
                panics,
            },
            wakeups,
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
                _ = self.out.parking.notify.notified() => {
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
            icy: new.icy,
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
                let label = mount.label.as_str();
                self.next_shard_id += 1;
                self.shards.push(Shard {
                    id: self.next_shard_id,
                    mount: mount.clone(),
                    listeners: Slab::new(),
                    sent_bytes: metrics
                        .sent_bytes
                        .with_label_values(&[label, &self.ctx.label]),
                    writes: metrics
                        .write_syscalls
                        .with_label_values(&[label, &self.ctx.label]),
                    skips: metrics.listener_skips.with_label_values(&[label]),
                    disconnects: metrics.listener_disconnects.clone(),
                    lag: metrics.listener_lag.with_label_values(&[label]),
                    #[cfg(feature = "fault-injection")]
                    inject_panic: self.ctx.shared.config.load().panic_injection_mount.as_ref()
                        == Some(&mount.path),
                });
                self.shards.len() - 1
            }
        };
        let key = self.shards[idx].listeners.insert(listener);
        (idx, key)
    }

    /// Serves every listener; returns the earliest instant a coalesced write falls due.
    fn round(&mut self, force: bool) -> Option<Instant> {
        let pass = Pass::new(&self.ctx, &self.out, force);
        let mut next: Option<Instant> = None;
        let mut moves = Vec::new();
        for shard in &mut self.shards {
            let snap = shard.mount.store.load();
            next = earliest(next, shard.serve(&snap, None, &pass));
            // The mount ended: after that last flush, its listeners leave or move on.
            match &snap.state {
                SourceState::Closed => shard.drop_all(Disconnect::SourceGone),
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

    /// Serves one listener at once (a newcomer, or one whose socket drained): it is behind, so
    /// it is written without waiting for coalescing, and nothing is left pending.
    fn serve_one(&mut self, idx: usize, key: usize) {
        let pass = Pass::new(&self.ctx, &self.out, true);
        let shard = &mut self.shards[idx];
        let snap = shard.mount.store.load();
        shard.serve(&snap, Some(key), &pass);
    }

    /// Serves listeners whose sockets drained; they are behind, so they are written at once.
    fn serve_unparked(&mut self) {
        let ready = std::mem::take(&mut *self.out.parking.unparked.borrow_mut());
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
        let target = shared.mounts.get(fallback).and_then(|m| {
            let snap = m.store.load_full();
            (snap.state == SourceState::Live).then_some((m, snap))
        });
        let Some((target, snap)) = target else {
            shard.drop_all(Disconnect::SourceGone);
            return;
        };
        let pos = snap.join_point(snap.settings.burst_bytes);
        tracing::info!(from = %shard.mount.path, to = %target.path, listeners = shard.listeners.len(), "moving listeners to the fallback mount");
        for l in shard.listeners.drain() {
            let Listener {
                stream, conn, icy, ..
            } = l;
            // Moved listeners are not refused for the fallback's limits: they were admitted once.
            let Ok(guard) = ListenerGuard::enter(&shared, &target, &self.ctx.label, None) else {
                continue;
            };
            let (idx, key) = self.insert(
                &target,
                Listener {
                    stream,
                    pos,
                    icy,
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
                    _ = self.out.parking.notify.notified() => self.serve_unparked(),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        for shard in &mut self.shards {
            shard.drop_all(Disconnect::Shutdown);
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
    #[cfg(feature = "fault-injection")]
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
    #[cfg(feature = "fault-injection")]
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
        tally.writes += 1;
        let written = match &mut l.icy {
            None => l
                .stream
                .try_write_vectored(gathered.at(snap, l.pos))
                .map(|n| (n, n)),
            Some(cadence) => write_icy(&l.stream, cadence, snap, l.pos),
        };
        match written {
            Ok((0, _)) => return Served::Drop(Disconnect::ClientClosed),
            Ok((_, audio)) => {
                l.pos += audio as u64;
                tally.bytes += audio as u64;
                if l.pos >= snap.end && l.icy.as_ref().is_none_or(|c| c.between_blocks()) {
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

/// One write to a listener that takes ICY metadata: the shared audio from `pos`, with the mount's
/// shared metadata block (or the one-byte empty block) every `icy_metaint` bytes. Returns the
/// bytes written and how many of them were audio. The slice list is this listener's own (its
/// blocks fall at its own offsets), so it is laid out per write: once a second or so per
/// listener with the default coalescing, against a syscall that costs far more.
fn write_icy(
    stream: &Io,
    cadence: &mut Cadence,
    snap: &Snapshot,
    pos: u64,
) -> io::Result<(usize, usize)> {
    let mut budget = MAX_WRITE_BYTES;
    let audio = snap.pieces_from(pos).map_while(|p| {
        let take = p.len().min(budget);
        budget -= take;
        (take > 0).then(|| &p[..take])
    });
    let now = &snap.now_playing;
    let mut iov = Vec::with_capacity(USUAL_WRITE_SLICES);
    let mut plan = Vec::with_capacity(USUAL_WRITE_SLICES);
    cadence.lay_out(
        audio,
        (&now.icy_block, now.version),
        &mut iov,
        &mut plan,
        MAX_WRITE_SLICES,
    );
    let n = stream.try_write_vectored(&iov)?;
    drop(iov);
    Ok((n, cadence.wrote(n, &mut plan)))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What a listener costs the fan-out, every one of tens of thousands: a field added inline
    /// (an ICY cadence once took it from 104 to 176 bytes) shows here before it shows in
    /// `make load`'s RSS per listener.
    #[test]
    fn a_listener_stays_small() {
        let size = std::mem::size_of::<Listener>();
        assert!(size <= 128, "a listener takes {size} bytes in the fan-out");
    }
}
