//! The fan-out loop: one per worker, writing every listener of that worker.
//!
//! The loop owns all of its worker's listeners, grouped in shards by mount. Its work follows what
//! is due, not how many mounts and listeners it holds: ingest wakes only the workers with
//! listeners of the mount that published, and only once the stream reached what each shard said
//! it waits for ([`crate::mounts::OnWorker::wake_at`]: the first byte past the edge, or enough
//! bytes for a coalesced write, or a parked listener's lag limit), and queues that mount for them
//! ([`crate::shared::Shared::published`]); the woken loop serves only the queued mounts' shards,
//! loading each snapshot once (stream and settings in one load) and writing each due listener's
//! backlog with one vectored write of shared `Bytes` (no copy, no allocation, no lock per
//! listener, and no allocation per shard either: the lists a pass fills are kept from one pass to
//! the next, [`Scratch`]). Listeners at the same position (all who keep up) share one gathered
//! slice list.
//!
//! Writes are coalesced: a listener is written once `min_write_bytes` (at most half the burst,
//! [`MountSettings::write_bytes`]) are pending or its oldest pending byte is `max_write_delay_ms`
//! old, since a syscall costs the same for 300 bytes as for 16 KiB. Each shard files its waiting listeners by stream offset ([`DueList`]), so the due ones
//! are taken without looking at the others; each shard's next deadline is filed per worker, which
//! keeps one timer for the earliest and on it serves only the shards whose deadline passed. An
//! idle mount, and a mount without listeners, cost a worker nothing.
//!
//! A listener whose socket is full is parked: its socket's readiness is registered with a waker
//! made once per listener, which hands it back to the loop when the socket drains; parking
//! allocates nothing and spawns no task. Parked listeners cost nothing but a lag check when their mount
//! publishes, and the lag policy drops or skips them when they fall too far behind, so they never
//! hold up others.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter};
use slab::Slab;
use tokio::sync::{mpsc, Notify};

use crate::config::{LagPolicy, MountSettings};
use crate::conn::{ConnGuard, Control, Io, ListenerGuard, NewListener, WorkerCtx};
use crate::fallbacks::live_fallback;
use crate::http::RESPONSE_TIMEOUT;
use crate::icy::Cadence;
use crate::mounts::{Joining, Mount, Snapshot};
use crate::reasons::Disconnect;
use crate::series::{Counter, CounterFamily};
use crate::shared::{stopped, Shared, Stop};
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
/// The most of an unfinished frame or page a moved listener is sent: an Ogg page is at most
/// 65,307 bytes; a stream without sync points (passed through as it came) has no frame to
/// finish, and gets no more than this.
const MAX_FRAME_REST_BYTES: usize = 65_307;

struct Listener {
    /// Counts the listener while it lives, and names it (its id) to the admin API. Declared
    /// before the socket, so dropped while the socket is still open (the access log reads the
    /// socket's byte count then).
    guard: ListenerGuard,
    /// Inline, not behind a pointer: a round reads it for every write, and at many mounts each
    /// extra allocation visited is a cache miss per listener.
    stream: Io,
    /// Absolute offset of the next byte of the stream to send.
    pos: u64,
    /// Its ICY framing, when it asked for metadata blocks.
    /// Boxed, so that a plain listener pays a pointer for it, not the cadence.
    icy: Option<Box<Cadence>>,
    /// Set while its socket is full.
    parked: Option<Parked>,
    /// What its socket wakes when it drains, made at its first parking and kept.
    waker: Option<Arc<ParkWaker>>,
    conn: ConnGuard,
}

struct Parked {
    /// When the socket filled: a listener parked longer than `send_timeout_secs` is dropped.
    since: Instant,
}

/// A shard's listeners that are neither parked nor being served, by the stream offset each waits
/// at: the fan-out's deadline structure. The listeners behind at the smallest offsets are the
/// most due (most bytes pending, oldest byte oldest), so those due form a prefix, taken without
/// looking at the others; and the first offset left gives the shard's next deadline. Listeners
/// that keep up all wait at one offset, so this is one entry for most of a shard.
#[derive(Default)]
struct DueList {
    by_pos: BTreeMap<u64, Vec<usize>>,
    /// Emptied lists, kept for the next offset: at many mounts a shard's few listeners move to a
    /// new offset on every write, and a list made and freed each time was an allocation per
    /// listener written.
    spare: Vec<Vec<usize>>,
}

/// Most emptied lists a shard keeps for reuse: listeners that keep up share one offset, so a
/// few cover the usual case; more would only hold memory after a burst of stragglers.
const SPARE_LISTS: usize = 4;

impl DueList {
    fn insert(&mut self, pos: u64, key: usize) {
        let spare = &mut self.spare;
        self.by_pos
            .entry(pos)
            .or_insert_with(|| spare.pop().unwrap_or_default())
            .push(key);
    }

    fn recycle(&mut self, mut keys: Vec<usize>) {
        if self.spare.len() < SPARE_LISTS {
            keys.clear();
            self.spare.push(keys);
        }
    }

    /// Moves into `out` the listeners at the leading offsets that `due` accepts, stopping at the
    /// first offset it refuses.
    fn take_due(&mut self, mut due: impl FnMut(u64) -> bool, out: &mut Vec<usize>) {
        while let Some(entry) = self.by_pos.first_entry() {
            if !due(*entry.key()) {
                return;
            }
            let keys = entry.remove();
            out.extend_from_slice(&keys);
            self.recycle(keys);
        }
    }

    /// Takes out one listener, waiting at `pos`.
    fn remove(&mut self, pos: u64, key: usize) {
        if let Some(keys) = self.by_pos.get_mut(&pos) {
            keys.retain(|&k| k != key);
            if keys.is_empty() {
                if let Some(keys) = self.by_pos.remove(&pos) {
                    self.recycle(keys);
                }
            }
        }
    }

    /// The smallest offset a listener waits at.
    fn first(&self) -> Option<u64> {
        self.by_pos.first_key_value().map(|(pos, _)| *pos)
    }

    fn clear(&mut self) {
        self.by_pos.clear();
    }
}

/// A worker's listeners of one mount.
struct Shard {
    /// Unique within the worker for its lifetime, never 0: parked tasks name their listener by
    /// it, and the mount names this shard by it to the worker ([`crate::mounts::OnWorker`]).
    id: u64,
    mount: Arc<Mount>,
    listeners: Slab<Listener>,
    /// Every listener is in exactly one of `due` and `parked`, except while being served.
    due: DueList,
    parked: Vec<usize>,
    /// When its next coalesced write falls due, as filed in [`Shards::deadlines`].
    deadline: Option<Instant>,
    sent_bytes: Counter,
    writes: Counter,
    skips: Counter,
    disconnects: CounterFamily,
    lag: Histogram,
    /// Test hook: serving this shard's listeners panics (`Config::panic_injection_mount`).
    #[cfg(feature = "fault-injection")]
    inject_panic: bool,
    /// Test hook: each pass over this shard takes this much longer (`Config::pass_delay_injection_ms`).
    #[cfg(feature = "fault-injection")]
    pass_delay: Duration,
}

/// Adds `listener` to a shard's slab. A small slab grows by a quarter when full rather than
/// doubling: at 1,000 mounts a worker holds 1,000 shards of a few listeners each, and doubling
/// left up to three of every eight 144-byte slots empty. A large one doubles as before: its
/// unused slots are never touched, so they take no memory, and it is copied less often while a
/// big mount ramps up.
fn add_listener<L>(listeners: &mut Slab<L>, listener: L) -> usize {
    let len = listeners.len();
    if len == listeners.capacity() && len < SMALL_SHARD {
        listeners.reserve_exact((len / 4).max(1));
    }
    listeners.insert(listener)
}

/// Up to this many listeners a shard's slab grows by a quarter ([`add_listener`]).
const SMALL_SHARD: usize = 64;

/// What serving one listener came to.
enum Served {
    /// Nothing to write now: what is pending waits for coalescing, or for the socket to drain.
    Idle,
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
    fn new(slices: Vec<IoSlice<'s>>) -> Self {
        Gathered {
            pos: None,
            slices,
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

/// Lists a serving pass fills and empties, kept by the worker from one pass to the next: at many
/// mounts a worker serves thousands of shards a second, and lists made and freed in each pass
/// were most of its allocations.
#[derive(Default)]
struct Scratch {
    /// The listeners a pass serves.
    batch: Vec<usize>,
    /// The gathered slices of a pass, emptied ([`reuse`]).
    slices: Vec<IoSlice<'static>>,
}

/// An emptied list of slices, its buffer kept for slices that borrow another snapshot. Collecting
/// a vector's own iterator into a vector of an element of the same size and alignment reuses its
/// buffer (std's in-place collection); with the list empty, no element is converted.
fn reuse<'a, 'b>(mut slices: Vec<IoSlice<'a>>) -> Vec<IoSlice<'b>> {
    slices.clear();
    slices.into_iter().map(|_| unreachable!()).collect()
}

/// Work counted in a round, added to the shared counters once per round.
#[derive(Default)]
struct Tally {
    writes: u64,
    bytes: u64,
}

/// Where parked listeners report back: their wakers push (shard id, listener key) and notify the
/// loop. Shared with the wakers, which the runtime may hold anywhere, hence a `Mutex`; only this
/// worker's thread takes it, so it is never contended.
#[derive(Default)]
struct Parking {
    unparked: Arc<Unparked>,
}

#[derive(Default)]
struct Unparked {
    keys: Mutex<Vec<(u64, usize)>>,
    notify: Notify,
}

/// One listener's waker: registered with its socket's write readiness whenever it parks.
struct ParkWaker {
    shard: u64,
    key: usize,
    to: Arc<Unparked>,
}

impl Wake for ParkWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.to.keys).push((self.shard, self.key));
        self.to.notify.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Parking {
    /// Parks a listener whose socket is full until it drains: registers the listener's waker
    /// (made once, at its first parking) with the socket's write readiness.
    fn park(&self, l: &mut Listener, shard_id: u64, key: usize) {
        l.parked = Some(Parked {
            since: Instant::now(),
        });
        let waker = l.waker.get_or_insert_with(|| {
            Arc::new(ParkWaker {
                shard: shard_id,
                key,
                to: self.unparked.clone(),
            })
        });
        // A `Waker` from the `Arc` costs a reference count, not an allocation.
        let waker = Waker::from(waker.clone());
        // Drained since the write that filled it (or failed: the next write reports that).
        if l.stream
            .poll_write_ready(&mut Context::from_waker(&waker))
            .is_ready()
        {
            waker.wake();
        }
    }

    async fn notified(&self) {
        self.unparked.notify.notified().await
    }

    fn take(&self) -> Vec<(u64, usize)> {
        std::mem::take(&mut *lock(&self.unparked.keys))
    }
}

/// Where a serving pass reports: the worker's parking and counters.
struct Outlets {
    parking: Parking,
    panics: IntCounter,
}

/// What a serving pass needs besides the shard: the same for every shard of a round.
struct Pass<'a> {
    shared: &'a Shared,
    now: Instant,
    /// Write whatever is pending, ignoring coalescing.
    force: bool,
    send_timeout: Duration,
    out: &'a Outlets,
}

impl<'a> Pass<'a> {
    fn new(ctx: &'a WorkerCtx, out: &'a Outlets, force: bool) -> Self {
        Pass {
            shared: &ctx.shared,
            now: Instant::now(),
            force,
            send_timeout: Duration::from_secs(ctx.shared.config.load().send_timeout_secs),
            out,
        }
    }
}

/// Which listeners of a shard a serving pass visits.
#[derive(Clone, Copy)]
enum Visit {
    /// Those whose coalesced write is due, and the parked ones (few), whose lag may have passed
    /// the limit or whose send timeout may have run out.
    Due,
    /// One listener, written at once: a newcomer, or one whose socket drained.
    One(usize),
    /// A newcomer's first pass, as `One`; should its join point be gone, it joins again at the
    /// burst of the snapshot it is served from, if that snapshot's header pages are the ones it
    /// was sent (they apply from `headers_from`) or it has none.
    Joining { key: usize, headers_from: u64 },
}

/// What is left to do with a shard after serving it.
enum After {
    Keep,
    /// It has no listener left.
    Empty,
    /// Its mount ended: its listeners leave.
    Closed,
    /// Its mount ended with a fallback: its listeners move there.
    MovedTo(String),
}

impl Shard {
    /// Serves the listeners `visit` names against `snap`, the mount's snapshot loaded once for
    /// the pass, files each by its outcome, and adds the work to the counters once. Returns when
    /// the first listener left waiting falls due, if bytes are pending for it.
    fn serve(
        &mut self,
        snap: &Snapshot,
        visit: Visit,
        pass: &Pass,
        scratch: &mut Scratch,
    ) -> Option<Instant> {
        let round = Round {
            snap,
            settings: &snap.settings,
            now: pass.now,
            // With the source gone nothing more is coming to coalesce with: flush everything.
            force: pass.force || snap.state != SourceState::Live,
            // The header pages it was sent still apply, or the stream has none to miss (an MP3
            // mount whose source changed since its join point was taken).
            rejoin: matches!(visit, Visit::Joining { headers_from, .. }
                if headers_from == snap.headers_from || snap.headers.is_empty()),
            send_timeout: pass.send_timeout,
            #[cfg(feature = "fault-injection")]
            inject_panic: self.inject_panic,
        };
        let mut batch = std::mem::take(&mut scratch.batch);
        batch.clear();
        // The first offset left waiting, with when it falls due: found while taking the due
        // ones, so that the stream is not searched for it twice.
        let mut refused = None;
        match visit {
            Visit::One(key) | Visit::Joining { key, .. } => batch.push(key),
            Visit::Due => {
                batch.append(&mut self.parked);
                let mut due = |pos| match due_at(&round, pos) {
                    Due::Now => true,
                    Due::At(at) => {
                        refused = Some((pos, Some(at)));
                        false
                    }
                    Due::OnData => {
                        refused = Some((pos, None));
                        false
                    }
                };
                self.due.take_due(&mut due, &mut batch);
            }
        }
        let mut gathered = Gathered::new(reuse(std::mem::take(&mut scratch.slices)));
        let mut tally = Tally::default();
        let mut dropped = Vec::new();
        for &key in &batch {
            let Some(l) = self.listeners.get_mut(key) else {
                continue;
            };
            match serve_guarded(l, &round, &mut gathered, &mut tally, &pass.out.panics) {
                Served::Drop(why) => {
                    dropped.push((key, why));
                    continue;
                }
                Served::Full => pass.out.parking.park(l, self.id, key),
                Served::Skipped => self.skips.inc(),
                Served::Idle | Served::Done => {}
            }
            if l.parked.is_some() {
                self.parked.push(key);
            } else {
                self.due.insert(l.pos, key);
            }
        }
        scratch.batch = batch;
        scratch.slices = reuse(gathered.slices);
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
        // Those served wait at or past the refused offset: it stays first unless none was.
        let first = self.due.first()?;
        // A pass forced for one listener does not make the others due.
        let unforced = Round {
            force: snap.state != SourceState::Live,
            ..round
        };
        match refused {
            Some((pos, at)) if pos == first => at,
            _ => match due_at(&unforced, first) {
                // Due already (it cannot be after a pass): served at the next deadline.
                Due::Now => Some(round.now),
                Due::At(at) => Some(at),
                Due::OnData => None,
            },
        }
    }

    /// The earlier of `coalesced` (when the first waiting listener falls due) and the first
    /// parked listener's send timeout.
    fn next_deadline(&self, coalesced: Option<Instant>, pass: &Pass) -> Option<Instant> {
        // A millisecond late: the timeout is "longer than", and timers round to milliseconds.
        let timeout = pass.send_timeout + Duration::from_millis(1);
        let parked = self
            .parked
            .iter()
            .filter_map(|&key| self.listeners.get(key)?.parked.as_ref())
            .map(|p| p.since + timeout)
            .min();
        match (coalesced, parked) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How far the stream must reach before this shard has anything to do (see
    /// [`crate::mounts::OnWorker::wake_at`]): only the first waiting listener's position counts,
    /// since those behind it fall due no sooner.
    fn wake_at(&self, snap: &Snapshot) -> u64 {
        let settings = &snap.settings;
        let waiting = self.due.first().map(|pos| {
            if pos >= snap.end || settings.max_write_delay_ms == 0 {
                // The next byte starts its coalescing delay, which the worker's timer keeps.
                pos + 1
            } else {
                pos + settings.write_bytes()
            }
        });
        let parked = self
            .parked
            .iter()
            .filter_map(|&key| self.listeners.get(key))
            .map(|l| l.pos + settings.max_lag_bytes + 1)
            .min();
        waiting.into_iter().chain(parked).min().unwrap_or(u64::MAX)
    }

    /// Takes a listener out of the shard (not while serving it).
    fn remove(&mut self, key: usize) -> Option<Listener> {
        let l = self.listeners.try_remove(key)?;
        self.parked.retain(|&k| k != key);
        self.due.remove(l.pos, key);
        Some(l)
    }

    /// The position of the furthest-behind listener, `u64::MAX` with none: what the shard
    /// needs the store to keep ([`crate::mounts::OnWorker::oldest`]).
    fn oldest(&self) -> u64 {
        let parked = self
            .parked
            .iter()
            .filter_map(|&key| self.listeners.get(key))
            .map(|l| l.pos);
        self.due
            .first()
            .into_iter()
            .chain(parked)
            .min()
            .unwrap_or(u64::MAX)
    }

    fn drop_all(&mut self, why: Disconnect) {
        let n = self.listeners.len();
        self.listeners.clear();
        self.due.clear();
        self.parked.clear();
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

/// When the listeners waiting at an offset are to be written.
enum Due {
    Now,
    /// When their coalescing delay runs out.
    At(Instant),
    /// Nothing is pending for them: they are at the live edge.
    OnData,
}

fn due_at(round: &Round, pos: u64) -> Due {
    let snap = round.snap;
    match snap.position(pos) {
        Position::AtEdge => Due::OnData,
        Position::Evicted => Due::Now,
        Position::Behind => match held_until(
            round.settings,
            snap.end - pos,
            round.now,
            round.force,
            || snap.arrival_of(pos),
        ) {
            None => Due::Now,
            Some(at) => Due::At(at),
        },
    }
}

/// Until when a write of `lag` pending bytes is held back to coalesce it with what comes next
/// (`arrival` is when the oldest of them arrived); None if it is due now.
fn held_until(
    settings: &MountSettings,
    lag: u64,
    now: Instant,
    force: bool,
    arrival: impl FnOnce() -> Option<Instant>,
) -> Option<Instant> {
    if force || settings.max_write_delay_ms == 0 || lag >= settings.write_bytes() {
        return None;
    }
    let due = arrival()? + Duration::from_millis(settings.max_write_delay_ms);
    (due > now).then_some(due)
}

/// A worker's shards by id, with their deadlines.
struct Shards {
    /// The worker's index, which names its hold on each mount ([`Mount::on_workers`]).
    worker: usize,
    by_id: HashMap<u64, Shard>,
    /// Listeners across the shards, kept as they come and go, since the loop reads it on every
    /// pass and summing it would visit every shard.
    listeners: usize,
    /// Every shard's next deadline: the worker keeps one timer, for the first of them, and on
    /// that timer visits only the shards whose deadline passed.
    deadlines: BTreeSet<(Instant, u64)>,
    scratch: Scratch,
}

impl Shards {
    /// Serves a shard's listeners as `visit` says, refiles its deadline, and says what is left
    /// to do with it.
    fn serve(&mut self, id: u64, visit: Visit, pass: &Pass) -> After {
        let Some(shard) = self.by_id.get_mut(&id) else {
            return After::Keep;
        };
        let snap = shard.mount.store.load();
        let before = shard.listeners.len();
        let coalesced = shard.serve(&snap, visit, pass, &mut self.scratch);
        self.listeners -= before - shard.listeners.len();
        #[cfg(feature = "fault-injection")]
        if !shard.pass_delay.is_zero() {
            std::thread::sleep(shard.pass_delay);
        }
        let wake_at = shard.wake_at(&snap);
        let on = &shard.mount.on_workers[self.worker];
        on.oldest.store(shard.oldest(), Ordering::Relaxed);
        on.wake_at.store(wake_at, Ordering::SeqCst);
        // Pairs with the fence in `Shared::queue`: a publication that came after this snapshot
        // and before the new threshold was seen is served at the loop's next turn, not missed.
        // Not in a loop here: on a core too slow for the stream, publications come faster than
        // passes end, and such a loop would never give the worker back.
        fence(Ordering::SeqCst);
        if shard.mount.store.load().end >= wake_at {
            pass.shared.queue_for(&shard.mount, self.worker);
        }
        let deadline = shard.next_deadline(coalesced, pass);
        if deadline != shard.deadline {
            if let Some(old) = shard.deadline {
                self.deadlines.remove(&(old, id));
            }
            if let Some(new) = deadline {
                self.deadlines.insert((new, id));
            }
            shard.deadline = deadline;
        }
        match &snap.state {
            // After that last flush, its listeners leave or move on.
            SourceState::Closed => After::Closed,
            SourceState::MovedTo(fallback) => After::MovedTo(fallback.clone()),
            SourceState::Live | SourceState::Gone(_) if shard.listeners.is_empty() => After::Empty,
            SourceState::Live | SourceState::Gone(_) => After::Keep,
        }
    }

    /// Takes the shards whose deadline has passed.
    fn take_due(&mut self, now: Instant, out: &mut Vec<u64>) {
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                return;
            }
            self.deadlines.pop_first();
            if let Some(shard) = self.by_id.get_mut(&id) {
                shard.deadline = None;
            }
            out.push(id);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }
}

/// How long the fan-out loop runs without waiting for each turn it then gives its worker's other
/// tasks. The loop is its worker's main task: the runtime runs the worker's other tasks (those
/// reading newcomers' request heads and answering them) and learns of its sockets' readiness
/// (parked listeners' sockets that drained) only while the loop waits. A loop that finds its
/// next round due before the last one ended (rounds slower than publications, on a saturated
/// core) never waits; on its own it would leave newcomers unanswered and parked listeners parked
/// until they time out.
const FAIR_SHARE: Duration = Duration::from_millis(5);
/// Most turns the loop gives at once, after a pass of a second or more.
const MAX_TURNS: u128 = 200;

/// The turns a loop that ran `busy` without waiting owes its worker's other tasks. Busy round
/// after round, as on a saturated core, the worker's other tasks and its sockets' readiness get
/// their turn, as when the loop waits. A turn runs up to 61 of those tasks (tokio's `LocalSet`
/// tick), so they get one for each `FAIR_SHARE` the loop ran: one pass over thousands of
/// listeners can take 100 ms there, while newcomers' requests wait.
fn turns_owed(busy: Duration) -> u128 {
    (busy.as_micros() / FAIR_SHARE.as_micros()).min(MAX_TURNS)
}

/// Awaits `event`, setting `waited_at` whenever it has to wait: the worker's runtime then has a
/// turn (see [`FAIR_SHARE`]).
async fn noting_waits<F: Future>(waited_at: &mut Instant, event: F) -> F::Output {
    let mut event = pin!(event);
    poll_fn(|cx| {
        let polled = event.as_mut().poll(cx);
        if polled.is_pending() {
            *waited_at = Instant::now();
        }
        polled
    })
    .await
}

/// The fan-out loop of one worker.
pub(crate) struct FanOut {
    ctx: Rc<WorkerCtx>,
    admit_rx: mpsc::UnboundedReceiver<NewListener>,
    /// The admin API's requests for this worker's listeners.
    control_rx: mpsc::UnboundedReceiver<Control>,
    shards: Shards,
    next_shard_id: u64,
    out: Outlets,
    wakeups: IntCounter,
    usage: WorkerUsage,
    next_lag_sample: Instant,
    /// Emptied lists a round fills, kept from one round to the next, as [`Scratch`]: the mounts
    /// ingest queued, swapped with the worker's link so that neither thread allocates for it...
    published: Vec<Arc<Mount>>,
    /// ...the shards whose deadline passed...
    due: Vec<u64>,
    /// ...and what is left to do with the shards served.
    after: Vec<(u64, After)>,
}

impl FanOut {
    pub fn new(
        ctx: Rc<WorkerCtx>,
        admit_rx: mpsc::UnboundedReceiver<NewListener>,
        control_rx: mpsc::UnboundedReceiver<Control>,
    ) -> Self {
        let m = &ctx.shared.metrics;
        let wakeups = m.worker_wakeups.with_label_values(&[&ctx.label]);
        let panics = m.panics.with_label_values(&["listener"]);
        let usage = WorkerUsage::new(m, &ctx.label);
        let index = ctx.index;
        FanOut {
            ctx,
            admit_rx,
            control_rx,
            shards: Shards {
                worker: index,
                by_id: HashMap::new(),
                listeners: 0,
                deadlines: BTreeSet::new(),
                scratch: Scratch::default(),
            },
            next_shard_id: 0,
            out: Outlets {
                parking: Parking::default(),
                panics,
            },
            wakeups,
            usage,
            next_lag_sample: Instant::now(),
            published: Vec::new(),
            due: Vec::new(),
            after: Vec::new(),
        }
    }

    pub async fn run(mut self) {
        let shared = self.ctx.shared.clone();
        let link = &shared.workers[self.ctx.index];
        let mut stop = shared.stop.clone();
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        let mut waited_at = Instant::now();
        loop {
            self.usage.pass(Instant::now(), self.listener_count());
            if armed != self.shards.next_deadline() {
                armed = self.shards.next_deadline();
                if let Some(at) = armed {
                    timer.as_mut().reset(at.into());
                }
            }
            let stop_now = noting_waits(&mut waited_at, async {
                tokio::select! {
                    how = stopped(&mut stop) => return Some(how),
                    Some(new) = self.admit_rx.recv() => self.add(new),
                    Some(control) = self.control_rx.recv() => self.control(control),
                    _ = link.data_ready.notified() => {
                        self.wakeups.inc();
                        self.measured(Self::serve_published);
                    }
                    _ = self.out.parking.notified() => self.serve_unparked(),
                    _ = &mut timer, if armed.is_some() => {
                        armed = None;
                        self.measured(Self::serve_deadlines);
                    }
                }
                None
            })
            .await;
            if let Some(how) = stop_now {
                self.stop(how).await;
                return;
            }
            let turns = turns_owed(waited_at.elapsed());
            if turns > 0 {
                for _ in 0..turns {
                    tokio::task::yield_now().await;
                }
                waited_at = Instant::now();
            }
        }
    }

    fn listener_count(&self) -> usize {
        self.shards.listeners
    }

    /// A round, with its CPU per listener accounted and, once a second, listeners' lag sampled.
    fn measured(&mut self, round: fn(&mut Self)) {
        let listeners = self.listener_count();
        round(self);
        self.usage.round_done(listeners);
        let now = Instant::now();
        if now >= self.next_lag_sample && listeners > 0 {
            self.next_lag_sample = now + LAG_SAMPLE_EVERY;
            for shard in self.shards.by_id.values() {
                let end = shard.mount.store.load().end;
                for (_, l) in shard.listeners.iter() {
                    shard.lag.observe(end.saturating_sub(l.pos) as f64);
                }
            }
        }
    }

    /// Serves the shards whose mount published since the last look.
    fn serve_published(&mut self) {
        let link = &self.ctx.shared.workers[self.ctx.index];
        let mut mounts = std::mem::take(&mut self.published);
        std::mem::swap(
            &mut *link.published.lock().unwrap_or_else(|e| e.into_inner()),
            &mut mounts,
        );
        let pass = Pass::new(&self.ctx, &self.out, false);
        let mut after = std::mem::take(&mut self.after);
        for mount in mounts.drain(..) {
            let on = &mount.on_workers[self.ctx.index];
            // Cleared before the snapshot is loaded: a publication after the load queues it again.
            on.queued.store(false, Ordering::SeqCst);
            let id = on.shard.load(Ordering::Relaxed);
            if id != 0 {
                after.push((id, self.shards.serve(id, Visit::Due, &pass)));
            }
        }
        self.published = mounts;
        self.settle(after);
    }

    /// Serves the shards whose coalescing deadline passed.
    fn serve_deadlines(&mut self) {
        let pass = Pass::new(&self.ctx, &self.out, false);
        let mut due = std::mem::take(&mut self.due);
        self.shards.take_due(pass.now, &mut due);
        let mut after = std::mem::take(&mut self.after);
        for id in due.drain(..) {
            after.push((id, self.shards.serve(id, Visit::Due, &pass)));
        }
        self.due = due;
        self.settle(after);
    }

    /// Does what is left to do with shards after serving them, and keeps the emptied list.
    fn settle(&mut self, mut after: Vec<(u64, After)>) {
        for (id, after) in after.drain(..) {
            match after {
                After::Keep => {}
                After::Empty => drop(self.remove_shard(id)),
                After::Closed => {
                    if let Some(mut shard) = self.remove_shard(id) {
                        shard.drop_all(Disconnect::SourceGone);
                    }
                }
                After::MovedTo(fallback) => self.move_to_fallback(id, &fallback),
            }
        }
        self.after = after;
    }

    fn add(&mut self, new: NewListener) {
        let listener = Listener {
            guard: new.guard,
            stream: new.stream,
            pos: new.pos,
            icy: new.icy,
            parked: None,
            waker: None,
            conn: new.conn,
        };
        let (id, key) = self.insert(&new.mount, listener);
        // A new listener has its burst pending: send it now, not at the next chunk.
        let headers_from = new.headers_from;
        self.serve_one(id, Visit::Joining { key, headers_from });
        // Its position is filed now: the store keeps what it needs by that.
        drop(new.joining);
    }

    /// Puts a listener in its mount's shard, creating the shard if needed.
    fn insert(&mut self, mount: &Arc<Mount>, listener: Listener) -> (u64, usize) {
        let on = &mount.on_workers[self.ctx.index];
        let id = match on.shard.load(Ordering::Relaxed) {
            0 => {
                let metrics = &self.ctx.shared.metrics;
                let label = mount.label.as_str();
                self.next_shard_id += 1;
                let id = self.next_shard_id;
                self.shards.by_id.insert(
                    id,
                    Shard {
                        id,
                        mount: mount.clone(),
                        listeners: Slab::new(),
                        due: DueList::default(),
                        parked: Vec::new(),
                        deadline: None,
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
                        #[cfg(feature = "fault-injection")]
                        pass_delay: Duration::from_millis(
                            self.ctx.shared.config.load().pass_delay_injection_ms,
                        ),
                    },
                );
                on.shard.store(id, Ordering::SeqCst);
                // Pairs with the fence in `Shared::published`: either ingest sees this shard and
                // queues the mount, or the snapshot loaded next (in `serve_one`) has its data.
                fence(Ordering::SeqCst);
                id
            }
            id => id,
        };
        let key = self
            .shards
            .by_id
            .get_mut(&id)
            .map(|s| add_listener(&mut s.listeners, listener));
        self.shards.listeners += 1;
        (
            id,
            key.expect("a mount names only a shard its worker holds"),
        )
    }

    fn remove_shard(&mut self, id: u64) -> Option<Shard> {
        let shard = self.shards.by_id.remove(&id)?;
        self.shards.listeners -= shard.listeners.len();
        if let Some(at) = shard.deadline {
            self.shards.deadlines.remove(&(at, id));
        }
        shard.mount.on_workers[self.ctx.index]
            .shard
            .store(0, Ordering::SeqCst);
        Some(shard)
    }

    /// Serves one listener at once (a newcomer, or one whose socket drained): it is behind, so
    /// it is written without waiting for coalescing, and nothing is left pending.
    fn serve_one(&mut self, id: u64, visit: Visit) {
        let pass = Pass::new(&self.ctx, &self.out, true);
        let mut after = std::mem::take(&mut self.after);
        after.push((id, self.shards.serve(id, visit, &pass)));
        self.settle(after);
    }

    /// Serves listeners whose sockets drained; they are behind, so they are written at once.
    fn serve_unparked(&mut self) {
        let ready = self.out.parking.take();
        for (id, key) in ready {
            let Some(shard) = self.shards.by_id.get_mut(&id) else {
                continue;
            };
            let Some(l) = shard.listeners.get_mut(key) else {
                continue;
            };
            // A stale notice (a listener since gone had this key) finds this one not parked, or
            // unparks it early: its write then finds the socket full and parks it again.
            if l.parked.is_none() {
                continue;
            }
            l.parked = None;
            shard.parked.retain(|&k| k != key);
            self.serve_one(id, Visit::One(key));
        }
    }

    /// The mount's grace period ended with a fallback: its listeners continue on the first
    /// mount of its fallback chain with a source in their stream's format (see
    /// [`live_fallback`]), from that mount's join point, so players resume at once; as many as
    /// that mount's `max_listeners` takes, and the others are closed.
    fn move_to_fallback(&mut self, id: u64, fallback: &str) {
        let Some(mut shard) = self.remove_shard(id) else {
            return;
        };
        let shared = &self.ctx.shared;
        let from = shard.mount.clone();
        let old = from.store.load_full();
        let format = Some(old.info.meta.content_type.as_str());
        let target = live_fallback(
            &shared.config.load(),
            &shared.mounts,
            &from.path,
            &old.settings,
            format,
        )
        .map(|(mount, _)| mount);
        let Some(target) = target else {
            tracing::info!(from = %from.path, %fallback, "no fallback in this stream's format has a source: its listeners are closed");
            shard.drop_all(Disconnect::SourceGone);
            return;
        };
        let listeners = shard.listeners.len();
        let moved = move_listeners(&self.ctx, &mut shard, &target);
        tracing::info!(from = %from.path, to = %target.path, listeners, moved, "moving listeners to the fallback mount");
        if !shard.listeners.is_empty() {
            tracing::warn!(from = %from.path, to = %target.path, closed = shard.listeners.len(), "the fallback mount is full (max_listeners): the listeners it has no room for are closed");
        }
        shard.drop_all(Disconnect::SourceGone);
    }

    /// Answers the admin API (see [`Control`]).
    fn control(&mut self, control: Control) {
        let index = self.ctx.index;
        match control {
            Control::Lags { mount, reply } => {
                let id = mount.on_workers[index].shard.load(Ordering::Relaxed);
                let lags = self.shards.by_id.get(&id).map(|shard| {
                    let end = shard.mount.store.load().end;
                    shard
                        .listeners
                        .iter()
                        .map(|(_, l)| (l.guard.id(), end.saturating_sub(l.pos)))
                        .collect()
                });
                let _ = reply.send(lags.unwrap_or_default());
            }
            Control::Kill { id, reply } => {
                let found = self.shards.by_id.iter().find_map(|(&shard, s)| {
                    let key = s.listeners.iter().find(|(_, l)| l.guard.id() == id)?.0;
                    Some((shard, key))
                });
                if let Some((shard_id, key)) = found {
                    if let Some(shard) = self.shards.by_id.get_mut(&shard_id) {
                        if shard.remove(key).is_some() {
                            self.shards.listeners -= 1;
                            shard.count_disconnects(Disconnect::Killed, 1);
                        }
                        if shard.listeners.is_empty() {
                            self.remove_shard(shard_id);
                        }
                    }
                }
                let _ = reply.send(found.is_some());
            }
            Control::Move { from, to, reply } => {
                let id = from.on_workers[index].shard.load(Ordering::Relaxed);
                let ctx = self.ctx.clone();
                let Some(shard) = self.shards.by_id.get_mut(&id) else {
                    let _ = reply.send((0, 0));
                    return;
                };
                let before = shard.listeners.len();
                let moved = move_listeners(&ctx, shard, &to);
                let stayed = shard.listeners.len();
                self.shards.listeners -= before - stayed;
                if stayed == 0 {
                    self.remove_shard(id);
                }
                let _ = reply.send((moved, stayed));
            }
        }
    }

    /// Stops: on `Drain`, gives listeners until the deadline to receive what is pending.
    async fn stop(&mut self, how: Stop) {
        if how == Stop::Drain {
            // Listeners admitted but not taken in yet (the stop won the race with them in the
            // loop's `select!`, or came before the loop ran) are served too: dropped, they
            // would leave with nothing of what they were promised.
            while let Ok(new) = self.admit_rx.try_recv() {
                self.add(new);
            }
            let grace = Duration::from_secs(self.ctx.shared.config.load().shutdown_grace_secs);
            let deadline = tokio::time::Instant::now() + grace;
            // Ingest may be publishing the last bytes it read as the stop comes. Listeners whose
            // response head is being written come in meanwhile, and are served as the others.
            let ctx = self.ctx.clone();
            let mut ingest_stopped = pin!(ctx.shared.ingest_stopped.wait());
            loop {
                tokio::select! {
                    _ = &mut ingest_stopped => break,
                    Some(new) = self.admit_rx.recv() => self.add(new),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let pass = Pass::new(&self.ctx, &self.out, true);
            let ids: Vec<u64> = self.shards.by_id.keys().copied().collect();
            let after = ids
                .into_iter()
                .map(|id| (id, self.shards.serve(id, Visit::Due, &pass)))
                .collect();
            self.settle(after);
            while self.any_pending() || ctx.on_their_way.any() {
                tokio::select! {
                    // The last of them is sent before it stops being counted: taken in first.
                    biased;
                    Some(new) = self.admit_rx.recv() => self.add(new),
                    _ = ctx.on_their_way.none_left(), if ctx.on_their_way.any() => {}
                    _ = self.out.parking.notified() => self.serve_unparked(),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        let ids: Vec<u64> = self.shards.by_id.keys().copied().collect();
        for id in ids {
            if let Some(mut shard) = self.remove_shard(id) {
                shard.drop_all(Disconnect::Shutdown);
            }
        }
    }

    /// Whether a listener still has bytes of the stream to get: some not written yet, or some
    /// its TLS session took in and its socket did not yet.
    fn any_pending(&self) -> bool {
        self.shards.by_id.values().any(|s| {
            let end = s.mount.store.load().end;
            s.listeners
                .iter()
                .any(|(_, l)| l.pos < end || l.stream.holds_unsent())
        })
    }
}

/// Moves the listeners of `shard` to `target`, as many as its `max_listeners` takes (an edge's
/// relays all: no limit applies to them); the others stay in `shard`. Each is handed back to its
/// worker's loop through the admission channel once the rest of its frame and the destination's
/// Ogg header pages are written to it (see [`rejoin`]), so it joins at a sync point with what a
/// decoder needs, as a newcomer does. Returns how many moved.
fn move_listeners(ctx: &WorkerCtx, shard: &mut Shard, target: &Arc<Mount>) -> usize {
    let shared = &ctx.shared;
    let old = shard.mount.store.load_full();
    let max = target.store.load().settings.max_listeners;
    let keys: Vec<usize> = shard.listeners.iter().map(|(key, _)| key).collect();
    let mut moved = 0;
    for key in keys {
        let place = if shard.listeners[key].guard.is_relay() {
            None
        } else {
            match target.hold_place(max) {
                Some(place) => Some(place),
                None => continue,
            }
        };
        let Some(Listener {
            mut guard,
            stream,
            pos,
            mut icy,
            conn,
            // A parked listener's waker may still fire: it names a listener that is gone.
            ..
        }) = shard.remove(key)
        else {
            continue;
        };
        // A listener stopped inside a frame or page (a partial write) first gets the rest of
        // it: decoders resync on the next stream's headers, not inside a torn page.
        let rest = match icy.as_mut() {
            None => old.rest_of_frame(pos, MAX_FRAME_REST_BYTES),
            Some(cadence) => {
                cadence.forget_title();
                Vec::new()
            }
        };
        let Some((client, listening)) = guard.leave_for_another() else {
            continue;
        };
        drop(guard);
        let Ok(guard) = ListenerGuard::enter(shared, target, &ctx.label, None, client, listening)
        else {
            continue;
        };
        // Counted in now: the place held for it goes.
        drop(place);
        moved += 1;
        let new = NewListener {
            guard,
            mount: target.clone(),
            stream,
            pos: 0,
            icy,
            conn,
            joining: Joining::new(target),
            headers_from: 0,
        };
        tokio::task::spawn_local(rejoin(ctx.admit.clone(), new, rest));
    }
    moved
}

/// A moved listener, on its way into the destination's shard: writes it the rest of the frame
/// or page it stopped in, then the destination's Ogg header pages (a chained Ogg stream, which
/// decoders follow), then hands it to the loop at the destination's join point. An ICY listener
/// gets neither: they would break its block cadence, and formats with header pages never carry
/// ICY blocks. A listener that does not take them within [`RESPONSE_TIMEOUT`], or whose
/// destination lost its source meanwhile, is closed.
async fn rejoin(admit: mpsc::UnboundedSender<NewListener>, mut new: NewListener, rest: Vec<u8>) {
    let snap = new.mount.store.load_full();
    if snap.state != SourceState::Live {
        return;
    }
    let headers: &[u8] = match new.icy {
        None => &snap.headers,
        Some(_) => &[],
    };
    let written = tokio::time::timeout(RESPONSE_TIMEOUT, async {
        write_all(&new.stream, &rest).await?;
        write_all(&new.stream, headers).await
    });
    if !matches!(written.await, Ok(Ok(()))) {
        return;
    }
    new.pos = snap.join_point(snap.settings.burst_bytes);
    new.headers_from = snap.headers_from;
    let _ = admit.send(new);
}

/// Whether the listener has had its mount's `max_listener_duration_secs` (checked whenever it
/// is served: at the latest once per `max_write_delay_ms` while the stream flows).
fn over_duration(l: &Listener, settings: &MountSettings, now: Instant) -> bool {
    let max = settings.max_listener_duration_secs;
    // A limit on a listener's session: an edge's relay carries all of the edge's sessions.
    max > 0
        && !l.guard.is_relay()
        && l.guard
            .connected()
            .is_some_and(|at| now.saturating_duration_since(at) >= Duration::from_secs(max))
}

/// Writes all of `buf` to a connection shared with the fan-out (over TLS, what the socket did
/// not take yet goes first with the next write).
async fn write_all(stream: &Io, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(&[IoSlice::new(buf)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What every listener of a shard is served against in one round.
struct Round<'s> {
    snap: &'s Snapshot,
    settings: &'s MountSettings,
    now: Instant,
    /// Write whatever is pending, ignoring coalescing.
    force: bool,
    /// A newcomer's first pass ([`Visit::Joining`]).
    rejoin: bool,
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
        gathered.pos = None;
        gathered.arrival = None;
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
    if over_duration(l, settings, now) {
        return Served::Drop(Disconnect::MaxDuration);
    }
    if round.rejoin && snap.position(l.pos) == Position::Evicted {
        // A newcomer's join point, gone before its first write. Ingest decides what to evict
        // before it publishes, so a listener counted as joining just after that decision took
        // its join point from the snapshot before, which the next one evicts (by the burst,
        // when nothing else holds the window); with a window no larger than the burst, any
        // publication before its first write does. It has had none of the stream: rather than
        // dropped for a lag it never had, it joins at the burst of this snapshot, which keeps
        // those bytes for the write.
        l.pos = snap.join_point(settings.burst_bytes);
        tracing::debug!(
            "a newcomer's join point was evicted before its first write: it joins at the burst now"
        );
    }
    let lag = match snap.position(l.pos) {
        Position::AtEdge if l.parked.is_none() => return caught_up(l),
        // Parked with the whole stream taken: its TLS session holds what the socket did not.
        Position::AtEdge => 0,
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
        return Served::Idle;
    }
    if held_until(settings, lag, now, force, || gathered.arrival(snap, l.pos)).is_some() {
        return Served::Idle;
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
                    return caught_up(l);
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

/// A listener that has been given the whole stream: done once its socket has it all too. A TLS
/// session may still hold the end of the last write, taken in while the socket was full; the
/// listener is parked until it drains, so that those bytes do not wait for the next write.
fn caught_up(l: &Listener) -> Served {
    match l.stream.send_unsent() {
        Ok(()) => Served::Done,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Served::Full,
        Err(e) => Served::Drop(Disconnect::from_io(&e)),
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
    let title_at = |at| {
        let now = snap.title_at(at);
        (&now.icy_block, now.version)
    };
    let mut iov = Vec::with_capacity(USUAL_WRITE_SLICES);
    let mut plan = Vec::with_capacity(USUAL_WRITE_SLICES);
    cadence.lay_out(audio, pos, title_at, &mut iov, &mut plan, MAX_WRITE_SLICES);
    let n = stream.try_write_vectored(&iov)?;
    drop(iov);
    Ok((n, cadence.wrote(n, &mut plan)))
}

/// A listener more than `max_lag_bytes` behind that cannot catch up: dropped, or moved to the
/// live edge, as the mount's `lag_policy` says. An edge's relay is always moved, never dropped:
/// dropping it would cut every listener of the edge at once (they wait out the grace period
/// while it reconnects, then hear a jump anyway), where skipping costs them that jump only.
/// Exempting it from the policy altogether is not possible: the store keeps only the window
/// (`max_lag_bytes`), so a relay further behind has nothing left to be sent. A relay that takes
/// nothing at all still goes at `send_timeout_secs`.
fn lag_policy(l: &mut Listener, snap: &Snapshot, settings: &MountSettings) -> Served {
    let relay = l.guard.is_relay();
    match settings.lag_policy {
        LagPolicy::Disconnect if !relay => Served::Drop(Disconnect::Slow),
        LagPolicy::Disconnect | LagPolicy::Skip => {
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
    /// `make load`'s RSS per listener. The socket is inline: 144 bytes, where the socket behind
    /// an `Rc` took 128 and allocated 48 more.
    #[test]
    fn a_listener_stays_small() {
        let size = std::mem::size_of::<Listener>();
        // tokio's socket holds 8 bytes more in debug builds.
        let most = if cfg!(debug_assertions) { 152 } else { 144 };
        assert!(size <= most, "a listener takes {size} bytes in the fan-out");
    }

    /// A shard of a few listeners holds slots for them and not many more: five take five slots
    /// (doubling took eight), 50 at most 62. A slot freed by a leaver is reused before the slab
    /// grows, and a large shard doubles.
    #[test]
    fn a_small_shards_slab_grows_by_a_quarter() {
        let mut slab = Slab::new();
        for i in 0..5u64 {
            add_listener(&mut slab, i);
        }
        assert_eq!(slab.capacity(), 5);
        let full = slab.capacity();
        slab.remove(3);
        add_listener(&mut slab, 7);
        assert_eq!(slab.capacity(), full);
        while slab.len() < 50 {
            add_listener(&mut slab, 0);
        }
        assert!(slab.capacity() <= 62, "{}", slab.capacity());
        while slab.len() < 1000 {
            add_listener(&mut slab, 0);
        }
        assert!(slab.capacity() >= 1024, "{}", slab.capacity());
    }

    /// A loop that waited within its fair share owes nothing; past it, a turn per share (a 100 ms
    /// pass on a saturated core: 20), up to the cap after a pass of a second or more.
    #[test]
    fn a_busy_loop_owes_a_turn_per_fair_share_it_ran() {
        let ms = Duration::from_millis;
        assert_eq!(turns_owed(ms(0)), 0);
        assert_eq!(turns_owed(FAIR_SHARE - Duration::from_micros(1)), 0);
        assert_eq!(turns_owed(FAIR_SHARE), 1);
        assert_eq!(turns_owed(ms(100)), 20);
        assert_eq!(turns_owed(ms(999)), 199);
        assert_eq!(turns_owed(ms(1000)), MAX_TURNS);
        assert_eq!(turns_owed(Duration::from_secs(30)), MAX_TURNS);
    }

    #[test]
    fn only_due_listeners_are_taken_and_the_rest_are_not_looked_at() {
        let mut due = DueList::default();
        // Keys 0..6 wait at three offsets; the listeners that keep up share the newest one.
        for (pos, key) in [(900, 0), (100, 1), (900, 2), (500, 3), (100, 4), (900, 5)] {
            due.insert(pos, key);
        }
        let mut asked = Vec::new();
        let mut out = Vec::new();
        due.take_due(
            |pos| {
                asked.push(pos);
                pos <= 500
            },
            &mut out,
        );
        out.sort();
        assert_eq!(
            out,
            [1, 3, 4],
            "the listeners at the due offsets, and only those"
        );
        assert_eq!(
            asked,
            [100, 500, 900],
            "each offset is asked once, and none past the first refused"
        );
        assert_eq!(
            due.first(),
            Some(900),
            "the first refused offset stays first"
        );

        let mut out = Vec::new();
        due.take_due(|_| false, &mut out);
        assert!(out.is_empty(), "nothing due, nothing taken");
        due.take_due(|_| true, &mut out);
        out.sort();
        assert_eq!(out, [0, 2, 5]);
        assert_eq!(due.first(), None);
    }

    #[test]
    fn a_shard_reuses_its_lists_instead_of_allocating_them_per_write() {
        let mut due = DueList::default();
        due.insert(100, 0);
        due.insert(100, 1);
        let list = due.by_pos[&100].as_ptr();
        let mut out = Vec::new();
        due.take_due(|_| true, &mut out);
        // Written to the edge, the listeners wait at a new offset, in the list they left.
        due.insert(200, 0);
        due.insert(200, 1);
        assert_eq!(due.by_pos[&200].as_ptr(), list);
        due.remove(200, 0);
        due.remove(200, 1);
        assert_eq!(due.first(), None);
        assert_eq!(due.spare.len(), 1, "an emptied list is kept");
        for pos in 0..(SPARE_LISTS as u64 * 2) {
            due.insert(pos, 7);
        }
        due.take_due(|_| true, &mut out);
        assert_eq!(due.spare.len(), SPARE_LISTS, "and no more than a few");

        // The slice list keeps its buffer from one snapshot's pass to the next.
        let data = [1u8; 8];
        let mut slices = vec![IoSlice::new(&data); USUAL_WRITE_SLICES];
        slices.clear();
        let (buffer, capacity) = (slices.as_ptr() as usize, slices.capacity());
        let again: Vec<IoSlice<'static>> = reuse(slices);
        assert_eq!(
            (again.as_ptr() as usize, again.capacity()),
            (buffer, capacity)
        );
    }

    #[test]
    fn a_write_is_held_until_enough_bytes_or_the_delay() {
        let settings = MountSettings {
            min_write_bytes: 1000,
            max_write_delay_ms: 500,
            ..MountSettings::default()
        };
        let now = Instant::now();
        let arrived = || Some(now);
        let later = now + Duration::from_millis(500);
        assert_eq!(held_until(&settings, 10, now, false, arrived), Some(later));
        assert_eq!(
            held_until(&settings, 1000, now, false, arrived),
            None,
            "enough bytes"
        );
        assert_eq!(
            held_until(&settings, 10, now, true, arrived),
            None,
            "forced"
        );
        assert_eq!(
            held_until(&settings, 10, later, false, arrived),
            None,
            "delay over"
        );
        let uncoalesced = MountSettings {
            max_write_delay_ms: 0,
            ..settings.clone()
        };
        assert_eq!(held_until(&uncoalesced, 10, now, false, arrived), None);

        // Never more than half the burst, the lead a player starts with: at 1 Mbit/s the
        // default 64 KiB burst is half a second, and a write held for 64 KiB more would find
        // the player's buffer empty.
        let high_rate = MountSettings {
            min_write_bytes: 65536,
            burst_bytes: 65536,
            max_write_delay_ms: 1000,
            ..settings.clone()
        };
        assert_eq!(
            held_until(&high_rate, 32767, now, false, arrived),
            Some(now + Duration::from_secs(1))
        );
        assert_eq!(held_until(&high_rate, 32768, now, false, arrived), None);
        let no_burst = MountSettings {
            burst_bytes: 0,
            ..high_rate
        };
        assert_eq!(
            held_until(&no_burst, 65535, now, false, arrived),
            Some(now + Duration::from_secs(1))
        );
    }
}
