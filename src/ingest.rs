//! The ingest thread: reads every source, appends what arrives to its mount's store, publishes the
//! new snapshot and wakes, once, each worker with listeners of that mount that have something to
//! do.
//!
//! It is the only writer of the stores and of the mount table, so claiming a mount (exactly one
//! source wins), publishing and the grace timers need no locks: they run on one thread, in one
//! current-thread runtime, borrowing the state between awaits only. Every source arrives the same
//! way, as a [`SourceConn`] on one channel, whether an encoder's connection or pieces made on
//! another thread (the demo); ingest claims the mount for it and appends what it feeds.
//!
//! It also applies a reload to its mounts: each mount's settings are published in its snapshots,
//! so readers see the stream and the settings that govern it in one load.
//!
//! # Small reads are merged
//!
//! Each piece ingest publishes costs it a wake-up, a read and a publication, and costs every
//! listener a slice in its next write. An encoder writes a few hundred bytes every 20-26 ms; a
//! source writing a byte at a time would make every byte a chunk; and a hosting server with 1,000
//! such encoders makes 50,000 pieces a second. So once a source's read is smaller than
//! [`SMALL_PIECE_BYTES`], ingest stops waiting for its reads: it looks at the socket once per the
//! mount's *merge gap* and takes, in one read, all that arrived meanwhile, published as one piece.
//! A mount thus gets a small piece once per gap. Meanwhile the kernel is told not to signal the
//! socket readable for less than [`MERGE_BYTES`] (`SO_RCVLOWAT`): otherwise each piece the source
//! sends would still wake the ingest thread, which costs more than the read it no longer makes.
//! The looks fall on points shared by all sources, the multiples of the gap on one clock
//! ([`look_point`]), so that one wake-up of the thread serves every merging source whose mount
//! has that gap, and their listeners' writes fall due together. A look that finds nothing (the
//! source paused) or a full [`MERGE_BYTES`] (it is fast) goes back to waiting for each read. The
//! merged piece is one read into a buffer all merging sources share (each look's bytes are copied
//! out before the next), so a merging source keeps no read buffer of its own.
//!
//! The gap is a fifth of the mount's `max_write_delay_ms`, at most [`MAX_MERGE_GAP`]: with the
//! default delay (1 s), 200 ms, so a 128 kbit/s encoder's 320-byte pieces go out ten at a time.
//! With 1,000 such sources this took ingest from 27% of a core (a hold per read, with two
//! `setsockopt`s and a timer each) to 11% with a gap of 100 ms, and to 6% with 200 ms
//! (docs/performance/many-stations.md). A listener's coalesced write falls due
//! `max_write_delay_ms` after its oldest pending byte arrived, and a merged piece is stamped
//! with the last look that found the socket empty, the earliest its first byte can have arrived
//! (plus [`LOOK_MARGIN`]): so a gap shorter than that delay makes no byte later than its
//! deadline by more than that margin (a write that falls due within a gap goes without the bytes
//! still in the socket, which follow by their own). A source's looks stay a gap apart, so with
//! the default delay a write falls due at a look. Reads of [`SMALL_PIECE_BYTES`]
//! and more (encoders at 2 Mbit/s and up) are never held. `max_write_delay_ms = 0` asks for
//! every piece at once: nothing is held, and a source writing tiny pieces to such a mount costs
//! a chunk, and a write to every listener, per read, which is what that mount asked for.
//!
//! The merge is of raw bytes, before the format layer: the sync points stored are the ones the
//! parser finds in the merged bytes. Frame and page boundaries are found however the bytes were
//! split; only a stream the parser passes through as it came (no format, or MPEG not yet locked)
//! has its join points at read boundaries, which merging makes at most one per gap.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::LocalSet;

use crate::access_log::Record;
use crate::chunked::ChunkedDecoder;
use crate::config::{file_mount_path, MountSettings};
use crate::conn::{refuse, Control, Encoder, Feed, Io, SourceConn, TitleUpdate, ToIngest};
use crate::fallbacks::live_fallback;
use crate::format::{runs, Event};
use crate::framing::{same_format, Format};
use crate::hls::{source_for, Params, Segmenter, Title};
use crate::http::RESPONSE_TIMEOUT;
use crate::metrics::unsynced_action;
use crate::mounts::{Mount, StoreWriter};
use crate::reasons::Refusal;
use crate::series::{Counter, Gauge};
use crate::shared::{stopped, Shared};
use crate::store::{copy_in, Keep, SourceState, StreamInfo, StreamMeta};

/// A source waited on read by read has a buffer reused from one read to the next: what a read
/// brings is copied out into a piece of its own size (one copy per byte, at ingest, once for all
/// listeners), so a piece keeps only its own bytes alive and the store gives memory back a piece
/// at a time. (Pieces that were slices of shared read buffers kept whole 16 KiB buffers alive for
/// a few 1-2 KB pieces: with 1,000 mounts the buffers held half as much again as the stores
/// retained.) A merging source gives its buffer up (see the module's doc). The buffer starts at
/// this size...
const FIRST_READ_BYTES: usize = 4 * 1024;
/// ...and grows to this for a source whose reads fill it.
const READ_BUF_BYTES: usize = 16 * 1024;
/// A read at least this big is published at once: a chunk of it costs a listener's write little
/// per byte, and a 2 Mbit/s encoder's pieces (5 KB) are bigger.
const SMALL_PIECE_BYTES: usize = 4096;
/// The longest gap between two looks at a merging source: eight to ten of an encoder's piece
/// times (20-26 ms), so that a mount's pieces come at most 5 times a second, well inside the
/// default coalescing delay. (A byte-at-a-time source's one-byte segments fill the socket's
/// receive buffer within about 10 ms, and the kernel then signals it readable whatever
/// `SO_RCVLOWAT` says: its pieces come about every 10 ms.)
const MAX_MERGE_GAP: Duration = Duration::from_millis(200);
/// The merge gap is at most this fraction of the mount's `max_write_delay_ms`.
const MERGE_GAP_PER_WRITE_DELAY: u32 = 5;
/// A merging source is read before its gap ends once this much waits: merging more saves
/// nothing (a 2 Mbit/s encoder's pieces are 5 KB).
const MERGE_BYTES: usize = 16 * 1024;

/// One mount as ingest keeps it.
struct Entry {
    writer: StoreWriter,
    mount: Arc<Mount>,
    /// Bumped on every claim: a grace timer or a source task from an earlier claim sees that it
    /// no longer owns the mount.
    generation: u64,
    /// What this mount has added to `fanstream_retained_bytes` and `fanstream_retained_pieces`:
    /// the gauges go by differences, since under `mount="other"` they add up several mounts.
    retained: i64,
    retained_pieces: i64,
    /// Those two gauges for the mount's label, looked up once: every publication updates them,
    /// and a lookup by label hashes and locks.
    retained_gauge: Gauge,
    pieces_gauge: Gauge,
    /// `fanstream_source_unsynced_bytes_total` for the mount's label, passed on and dropped:
    /// a stream that is not what its type says is unsynced in every piece.
    unsynced: [Counter; 2],
    /// Ends the current claim's source (`/admin/killsource`); replaced on every claim.
    kill: Rc<Notify>,
    /// What the current source said of its stream, before the mount's overrides
    /// (`stream_name`...): a reload that changes them starts again from it.
    source_meta: StreamMeta,
    /// A source came back to a mount with `fallback_override`: once its stream has a first
    /// piece (and an Ogg stream its headers), the fallback's listeners move back.
    override_pending: bool,
    /// Cuts the stream into HLS segments while the mount's `hls` is on; kept across sources,
    /// so that its media sequence goes on. Boxed: it is half of an entry's size, and most
    /// mounts of a hosting server have no HLS: an entry takes 600 bytes, not 1,160 (allocated
    /// as 640 and 1,280).
    hls: Option<Box<Segmenter>>,
    /// Where the last source's Ogg stream stood for the listeners kept through the grace
    /// period: the next source's stream follows it as a new chain.
    ogg_tail: Option<crate::ogg::Tail>,
}

impl Entry {
    /// Feeds a piece of the stream to the mount's HLS segmenter (made when `hls` is turned on,
    /// dropped when it is turned off); a new window goes out with the next publication. True if
    /// a segment was completed.
    fn segment(&mut self, settings: &MountSettings, bytes: &Bytes, join: Option<usize>) -> bool {
        let Some(params) = hls_params(settings) else {
            if self.hls.take().is_some() {
                self.writer.set_hls(None);
            }
            return false;
        };
        let snap = self.writer.store().load();
        let hls = self.hls.get_or_insert_with(|| {
            let mut segmenter = Segmenter::new(params);
            segmenter.start_source(source_for(&snap.info.meta.content_type));
            Box::new(segmenter)
        });
        let np = &snap.now_playing;
        let title = Title {
            version: np.version,
            title: np.title.as_deref(),
            artist: np.artist.as_deref(),
        };
        // What the segmenter logs (a block of a WebM stream passed over) says which mount.
        let _mount = tracing::info_span!("hls", mount = %self.mount.path).entered();
        let mut completed = false;
        for (run, sync) in runs(bytes, join) {
            completed |= hls.push(&run, sync, params, title);
        }
        if completed {
            self.writer.set_hls(hls.window());
        }
        completed
    }
}

/// A mount's HLS settings, None when its `hls` is off.
fn hls_params(settings: &MountSettings) -> Option<Params> {
    settings.hls.then_some(Params {
        segment_secs: settings.hls_segment_secs,
        segments: settings.hls_segments,
    })
}

/// Ingest's state; lives on the ingest thread only.
struct Ingest {
    shared: Arc<Shared>,
    /// Every worker's fan-out: where `fallback_override` asks for listeners to move back.
    control: Arc<[UnboundedSender<Control>]>,
    /// Boxed: an entry is over a kilobyte, and the table keeps up to twice as many slots as
    /// entries; a lookup also probes only keys and pointers.
    entries: RefCell<HashMap<String, Box<Entry>>>,
    /// Where merging looks read: one buffer for every source, since what a look takes is
    /// copied out before the next await, so a merging source holds no read buffer of its own.
    scratch: RefCell<BytesMut>,
}

/// A source's hold on a mount, from a successful claim.
#[derive(Clone, Copy)]
struct Claim {
    generation: u64,
}

impl Ingest {
    /// Takes `path` for a new source: creates the mount, or revives it within its grace period.
    fn claim(&self, path: &str, info: StreamInfo) -> Result<(Claim, Arc<Mount>), Refusal> {
        let mut entries = self.entries.borrow_mut();
        let shared = &self.shared;
        let live = entries
            .values()
            .filter(|e| *e.writer.state() == SourceState::Live)
            .count();
        let taken = entries
            .get(path)
            .is_some_and(|e| *e.writer.state() == SourceState::Live);
        if taken {
            return Err(Refusal::MountInUse);
        }
        let limit = shared.config.load().source_limit();
        if live >= limit {
            tracing::warn!(mount = %path, live, limit, "source refused: max_sources sources are live; raise max_sources");
            return Err(Refusal::TooManySources);
        }
        // A source back within the grace period in another format (an MP3 encoder replaced by
        // an Ogg one): the listeners waiting could not go on decoding, so the grace period ends
        // for them as if no source had come (closed, or moved to a fallback in their format),
        // and the source starts the mount anew. The generation goes on, so that the old grace
        // timer cannot end the new source's.
        let mut generation = 0;
        let other_format = entries.get(path).is_some_and(|e| {
            matches!(e.writer.state(), SourceState::Gone(_))
                && !same_format(&e.source_meta.content_type, &info.meta.content_type)
        });
        if other_format {
            drop(entries);
            generation = self.end_grace(
                path,
                "source back in another format: the grace period ends for the listeners waiting",
            );
            entries = self.entries.borrow_mut();
        }
        let entry = entries.entry(path.to_string()).or_insert_with(|| {
            let config = shared.config.load();
            let writer = StoreWriter::new(Arc::new(config.mount(path)));
            let mount = Arc::new(Mount::new(
                path,
                shared.metrics.mount_label(path, config.max_mount_series),
                writer.store().clone(),
                shared.workers.len(),
            ));
            shared.mounts.insert(mount.clone());
            let label = [mount.label.as_str()];
            Box::new(Entry {
                writer,
                generation,
                retained: 0,
                retained_pieces: 0,
                retained_gauge: shared.metrics.retained_bytes.with_label_values(&label),
                pieces_gauge: shared.metrics.retained_pieces.with_label_values(&label),
                unsynced: [false, true].map(|dropped| {
                    shared
                        .metrics
                        .source_unsynced_bytes
                        .with_label_values(&[label[0], unsynced_action(dropped)])
                }),
                kill: Rc::default(),
                override_pending: false,
                source_meta: StreamMeta::default(),
                hls: None,
                ogg_tail: None,
                mount,
            })
        });
        entry.generation += 1;
        entry.kill = Rc::default();
        entry.override_pending = entry.writer.settings().fallback_override;
        entry.source_meta = info.meta.clone();
        let info = described(&info, &entry.source_meta, entry.writer.settings());
        if let Some(hls) = entry.hls.as_mut() {
            if hls.start_source(source_for(&info.meta.content_type)) {
                entry.writer.set_hls(hls.window());
            }
        }
        entry.writer.go_live(info);
        shared.wake_source_waiters(&entry.mount);
        let label = [entry.mount.label.as_str()];
        // Up and down by one, not set: under `mount="other"` it counts several mounts' sources.
        shared.metrics.source_up.with_label_values(&label).inc();
        shared
            .metrics
            .source_connects
            .with_label_values(&label)
            .inc();
        let claim = Claim {
            generation: entry.generation,
        };
        Ok((claim, entry.mount.clone()))
    }

    /// Publishes what the format layer made of a piece of the stream (and the stream's subtype,
    /// when it changed), then wakes the mount's workers. False if the claim is stale.
    fn publish(
        &self,
        path: &str,
        claim: Claim,
        events: &mut Vec<Event>,
        subtype: Option<Option<String>>,
        arrived: Instant,
    ) -> bool {
        let mut entries = self.entries.borrow_mut();
        let Some(entry) = entries
            .get_mut(path)
            .filter(|e| e.generation == claim.generation)
        else {
            return false;
        };
        let m = &self.shared.metrics;
        // Held apart from `entry`, which the segmenter borrows mutably.
        let mount = entry.mount.clone();
        let label = mount.label.as_str();
        // What the furthest-behind listener still needs, over the burst: a mount whose
        // listeners keep up keeps little more than its burst, and memory returns as they catch
        // up or leave.
        let oldest = entry.mount.oldest_listener();
        let settings = entry.writer.settings().clone();
        let mut segmented = false;
        let mut pushed = false;
        for event in events.drain(..) {
            match event {
                Event::Data { bytes, join } => {
                    segmented |= entry.segment(&settings, &bytes, join);
                    // Counted from the end the piece makes: counted from before it, the piece's
                    // length would be evicted from under the furthest-behind listener.
                    let end = entry.writer.end() + bytes.len() as u64;
                    let keep = Keep {
                        burst: settings.burst_bytes,
                        behind: settings.behind_bytes(end, oldest),
                    };
                    entry.writer.push(bytes, arrived, keep, join);
                    pushed = true;
                }
                Event::Headers(pages) => entry.writer.set_headers(pages),
                Event::Tags { title, artist } => {
                    entry.writer.set_now_playing(title, artist, None);
                    m.metadata_updates.with_label_values(&[label]).inc();
                }
                Event::Unsynced { bytes, dropped } => {
                    entry.unsynced[usize::from(dropped)].inc_by(bytes as u64);
                }
            }
        }
        if pushed {
            entry.writer.publish();
        }
        if let Some(subtype) = subtype {
            entry.writer.set_subtype(subtype);
        }
        let snap = entry.writer.store().load();
        let retained = snap.retained_bytes() as i64;
        entry.retained_gauge.add(retained - entry.retained);
        entry.retained = retained;
        let pieces = entry.writer.retained_pieces() as i64;
        entry.pieces_gauge.add(pieces - entry.retained_pieces);
        entry.retained_pieces = pieces;
        let end = snap.end;
        let override_now = entry.override_pending && end > 0;
        entry.override_pending &= !override_now;
        drop(entries);
        self.shared.published(&mount, end);
        if segmented {
            mount.hls_published.notify_waiters();
        }
        if override_now {
            self.take_back(&mount, &settings);
        }
        true
    }

    /// `fallback_override`: the source of `mount` is back, so the listeners of the fallback
    /// its listeners would be on now move back to it, on every worker. The fallback found is
    /// the one they were moved to (the first of its chain with a source in its format), so the
    /// listeners who came from here are among those moved; like Icecast, it moves that
    /// fallback's other listeners too, as many as the mount's `max_listeners` takes.
    fn take_back(&self, mount: &Arc<Mount>, settings: &MountSettings) {
        let shared = &self.shared;
        let config = shared.config.load();
        let format = mount.store.load().info.meta.content_type.clone();
        let found = live_fallback(
            &config,
            &shared.mounts,
            &mount.path,
            settings,
            Some(&format),
        );
        let Some((from, _)) = found else {
            return;
        };
        tracing::info!(mount = %mount.path, from = %from.path, "source back: moving the fallback's listeners back (fallback_override)");
        for worker in self.control.iter() {
            let (reply, _) = oneshot::channel();
            let _ = worker.send(Control::Move {
                from: from.clone(),
                to: mount.clone(),
                reply,
            });
        }
    }

    /// A title update for `path` (from `/admin/metadata`); false when no source is live there.
    fn set_title(&self, update: TitleUpdate) -> bool {
        let mut entries = self.entries.borrow_mut();
        let Some(entry) = entries
            .get_mut(&update.mount)
            .filter(|e| *e.writer.state() == SourceState::Live)
        else {
            return false;
        };
        entry
            .writer
            .set_now_playing(update.title, update.artist, update.url);
        self.shared
            .metrics
            .metadata_updates
            .with_label_values(&[entry.mount.label.as_str()])
            .inc();
        drop(entries);
        // ICY listeners get the new block at their next interval; nothing to write now.
        true
    }

    /// Ends the live source on `path`, if any, as if it had left (`/admin/killsource`).
    fn kill_source(&self, path: &str) -> bool {
        let entries = self.entries.borrow();
        let Some(entry) = entries
            .get(path)
            .filter(|e| *e.writer.state() == SourceState::Live)
        else {
            return false;
        };
        entry.kill.notify_one();
        true
    }

    /// Sets (or with None clears) the mount's fallback (`/admin/fallbacks`) until the config is
    /// next applied: the file stays the one place settings are kept, so a reload puts its own
    /// value back.
    fn set_fallback(&self, path: &str, fallback: Option<String>) -> bool {
        let mut entries = self.entries.borrow_mut();
        let Some(entry) = entries.get_mut(path) else {
            return false;
        };
        let settings = MountSettings {
            fallback_mount: fallback,
            ..MountSettings::clone(entry.writer.settings())
        };
        entry.writer.set_settings(Arc::new(settings));
        let mount = entry.mount.clone();
        drop(entries);
        self.shared.changed(&mount);
        true
    }

    /// The source went away: listeners wait `source_grace_secs` for another, then move to the
    /// fallback mount or are closed.
    fn release(self: &Rc<Self>, path: &str, claim: Claim, reason: &'static str) {
        let (grace, mount) = {
            let mut entries = self.entries.borrow_mut();
            let Some(entry) = entries
                .get_mut(path)
                .filter(|e| e.generation == claim.generation)
            else {
                return;
            };
            if let Some(hls) = entry.hls.as_mut() {
                if hls.end_source() {
                    entry.writer.set_hls(hls.window());
                }
            }
            entry.writer.set_state(SourceState::Gone(Instant::now()));
            let grace = Duration::from_secs(entry.writer.settings().source_grace_secs);
            (grace, entry.mount.clone())
        };
        let m = &self.shared.metrics;
        m.source_up.with_label_values(&[mount.label.as_str()]).dec();
        m.source_disconnected(&mount.label, reason);
        self.shared.changed(&mount);
        // The segment the source's end closed, for reloads blocked on it.
        mount.hls_published.notify_waiters();
        let this = self.clone();
        let path = path.to_string();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(grace).await;
            this.expire(&path, claim);
        });
    }

    /// The grace period ended: if no source came back, the mount ends it ([`Ingest::end_grace`]).
    fn expire(&self, path: &str, claim: Claim) {
        let gone = self.entries.borrow().get(path).is_some_and(|e| {
            e.generation == claim.generation && matches!(e.writer.state(), SourceState::Gone(_))
        });
        if gone {
            self.end_grace(path, "source did not return within the grace period");
        }
    }

    /// Ends the grace period of `path`'s mount, whose source is gone: the mount closes (or moves
    /// its listeners to its fallback) and leaves the table. Its series go once the workers have
    /// let its listeners go (see [`crate::metrics::MountLabel`]), unless it is declared. Returns
    /// the generation it had reached.
    fn end_grace(&self, path: &str, why: &str) -> u64 {
        let mut entries = self.entries.borrow_mut();
        let Some(entry) = entries.get_mut(path) else {
            return 0;
        };
        let settings = entry.writer.settings();
        let fallback = settings.fallback_mount.as_deref().filter(|f| *f != path);
        let next = match (fallback, &settings.fallback_file) {
            (Some(f), _) => SourceState::MovedTo(f.to_string()),
            (None, Some(file)) => SourceState::MovedTo(file_mount_path(file)),
            (None, None) => SourceState::Closed,
        };
        tracing::info!(mount = %path, then = ?next, "{why}");
        entry.writer.set_state(next);
        self.shared.mounts.remove(&entry.mount);
        entry.retained_gauge.sub(entry.retained);
        entry.pieces_gauge.sub(entry.retained_pieces);
        let generation = entry.generation;
        let mount = entries.remove(path).map(|e| e.mount);
        drop(entries);
        self.declare_mounts();
        if let Some(mount) = mount {
            self.shared.changed(&mount);
        }
        generation
    }

    /// Gives the mounts the config declares their series (see [`Metrics::declare_mounts`]). A
    /// mount keeps the label it appeared with: one counted under `other` before its path was
    /// declared gets its own series once it has left.
    ///
    /// [`Metrics::declare_mounts`]: crate::metrics::Metrics::declare_mounts
    fn declare_mounts(&self) {
        let config = self.shared.config.load();
        let entries = self.entries.borrow();
        let declared = config.declared_mounts().filter(|path| {
            entries
                .get(*path)
                .is_none_or(|e| e.mount.label.as_str() == *path)
        });
        self.shared.metrics.declare_mounts(declared);
    }

    /// The config was replaced: each mount publishes its new settings with its stream.
    fn apply_config(&self) {
        let config = self.shared.config.load();
        let mut changed = Vec::new();
        for (path, entry) in self.entries.borrow_mut().iter_mut() {
            let settings = config.mount(path);
            if *entry.writer.settings().as_ref() != settings {
                if *entry.writer.state() == SourceState::Live {
                    let info = entry.writer.store().load().info.clone();
                    entry
                        .writer
                        .set_info(described(&info, &entry.source_meta, &settings));
                }
                entry.writer.set_settings(Arc::new(settings));
                changed.push(entry.mount.clone());
            }
        }
        self.declare_mounts();
        for mount in &changed {
            self.shared.changed(mount);
        }
        // A declared mount without a source has its fallbacks in the config alone: whoever waits
        // for it looks again at the new ones.
        self.shared.mounts_changed.notify_waiters();
    }
}

/// The stream as the mount describes it: the source's own name, genre, description, URL and
/// `public`, each replaced by the mount's setting when it has one; the rest as `info` has it.
fn described(info: &StreamInfo, source: &StreamMeta, settings: &MountSettings) -> StreamInfo {
    let pick = |own: &Option<String>, sent: &Option<String>| own.clone().or_else(|| sent.clone());
    let public = settings
        .public
        .map(|p| if p { "1" } else { "0" }.to_string());
    let meta = StreamMeta {
        name: pick(&settings.stream_name, &source.name),
        genre: pick(&settings.genre, &source.genre),
        description: pick(&settings.description, &source.description),
        url: pick(&settings.url, &source.url),
        public: pick(&public, &source.public),
        ..info.meta.clone()
    };
    StreamInfo::new(meta, info.preamble.clone())
}

/// Runs ingest until the server stops: takes each source from `sources` and serves it.
pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    mut inbox: mpsc::UnboundedReceiver<ToIngest>,
    control: Arc<[UnboundedSender<Control>]>,
) {
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let ingest = Rc::new(Ingest {
            shared: shared.clone(),
            control,
            entries: RefCell::new(HashMap::new()),
            scratch: RefCell::new(BytesMut::with_capacity(READ_BUF_BYTES)),
        });
        ingest.declare_mounts();
        let mut stop = shared.stop.clone();
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                _ = shared.config_changed.notified() => ingest.apply_config(),
                Some(msg) = inbox.recv() => match msg {
                    ToIngest::Source(conn) => {
                        if let Some((mut src, feed)) = accept_source(&ingest, *conn) {
                            // Lent, not passed: an async fn keeps what it takes by value twice
                            // in its state (the argument, and the binding it moves to), and a
                            // `Source` is ~500 bytes of a task that lives as long as the source.
                            tokio::task::spawn_local(
                                async move { serve_source(&mut src, feed).await },
                            );
                        }
                    }
                    ToIngest::Title(update) => {
                        let mount = update.mount.clone();
                        if !ingest.set_title(update) {
                            tracing::debug!(%mount, "title update for a mount without a source");
                        }
                    }
                    ToIngest::KillSource { mount, reply } => {
                        let _ = reply.send(ingest.kill_source(&mount));
                    }
                    ToIngest::Fallback { mount, fallback, reply } => {
                        let _ = reply.send(ingest.set_fallback(&mount, fallback));
                    }
                },
            }
        }
        tracing::debug!("ingest stopped");
        // No source task runs while this one does: every publication is complete.
        shared.ingest_stopped.set();
    });
    // Dropping the LocalSet drops every source task, closing the encoders' connections.
}

/// Claims the mount for a source, at once and in order of arrival; a refused source is told so
/// by a task of its own. Done here rather than in the source's task, which then holds only what
/// reading the stream needs for as long as it lasts (at 1,000 sources, its size is memory).
fn accept_source(ingest: &Rc<Ingest>, conn: SourceConn) -> Option<(Source, Feed)> {
    let SourceConn {
        mount,
        info,
        feed,
        log,
        claimed,
    } = conn;
    let origin = feed.origin();
    let mut format = Format::for_content_type(&info.meta.content_type);
    let claim = ingest.claim(&mount, info);
    if let Some(tx) = claimed {
        let _ = tx.send(claim.as_ref().map(|_| ()).map_err(|no| *no));
    }
    let (claim, claimed_mount) = match claim {
        Ok(claimed) => claimed,
        Err(no) => {
            if let Some(mut record) = log {
                record.status = no.status();
                ingest.shared.access_log.record(record);
            }
            match feed {
                // A SHOUTcast source speaks no HTTP: it is told by the connection closing.
                Feed::Encoder(Encoder {
                    stream,
                    peer,
                    answer: false,
                    ..
                }) => {
                    ingest.shared.metrics.refused(no);
                    tracing::info!(%peer, %mount, reason = no.reason(), "source refused");
                    drop(stream);
                }
                Feed::Encoder(Encoder { stream, peer, .. }) => {
                    if let Ok(mut stream) = stream.attach() {
                        let shared = ingest.shared.clone();
                        tokio::task::spawn_local(async move {
                            refuse(&shared, &mut stream, peer, no).await;
                        });
                    }
                }
                Feed::Pieces { .. } => {
                    tracing::warn!(%mount, %origin, reason = no.reason(), "source refused")
                }
            }
            return None;
        }
    };
    let (tail, kill) = ingest
        .entries
        .borrow_mut()
        .get_mut(&mount)
        .map(|e| (e.ogg_tail.take(), e.kill.clone()))
        .unwrap_or_default();
    if let Some(tail) = tail {
        format.follow(tail);
    }
    tracing::info!(source = %origin, %mount, "source connected");
    let received = ingest
        .shared
        .metrics
        .source_received_bytes
        .with_label_values(&[claimed_mount.label.as_str()]);
    let src = Source {
        ingest: ingest.clone(),
        mount,
        origin,
        kill,
        counted: claimed_mount,
        received,
        claim,
        format,
        events: Vec::new(),
        subtype: None,
        bytes: 0,
        log,
    };
    Some((src, feed))
}

/// Answers a source whose claim was granted, then reads its stream until it ends.
async fn serve_source(src: &mut Source, feed: Feed) {
    let kill = src.kill.clone();
    let reason = {
        let reading = read_feed(src, feed);
        tokio::select! {
            reason = reading => reason,
            () = kill.notified() => "killed",
        }
    };
    src.finish();
    tracing::info!(source = %src.origin, mount = %src.mount, reason, "source disconnected");
    src.ingest.release(&src.mount, src.claim, reason);
}

/// Reads a source's stream until it ends; returns why it ended.
async fn read_feed(src: &mut Source, feed: Feed) -> &'static str {
    match feed {
        Feed::Encoder(encoder) => read_encoder(src, encoder).await,
        Feed::Pieces { rx, .. } => read_pieces(src, rx).await,
    }
}

/// A claimed source as ingest reads it: its mount, its claim, and its format parser. Its task
/// holds it for as long as the source streams, so it owns what it needs rather than borrowing
/// it from the task's other state.
struct Source {
    ingest: Rc<Ingest>,
    mount: String,
    /// Who sends it (an encoder's address), for the log.
    origin: String,
    /// Notified when an operator kills the source.
    kill: Rc<Notify>,
    /// The mount it feeds, whose received bytes it counts.
    counted: Arc<Mount>,
    /// `fanstream_source_received_bytes_total` for the mount's label.
    received: Counter,
    claim: Claim,
    format: Format,
    /// What the parser yields, reused from piece to piece.
    events: Vec<Event>,
    /// The subtype last published: the parser is asked again only until it knows, or when new
    /// header pages may name other codecs, not for every piece.
    subtype: Option<String>,
    /// Bytes of stream received from it, for its access log line.
    bytes: u64,
    /// Its access log line, written when it is dropped: when it ends, or when the server stops
    /// and drops its task.
    log: Option<Record>,
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(mut record) = self.log.take() {
            record.bytes = self.bytes;
            self.ingest.shared.access_log.record(record);
        }
    }
}

impl Source {
    /// Parses a piece of the stream, whose first byte was read at `arrived`, and publishes the
    /// result; Err says why the source must end.
    fn append(
        &mut self,
        pieces: impl IntoIterator<Item = Bytes>,
        arrived: Instant,
    ) -> Result<(), &'static str> {
        let mut received = 0;
        let mut refused = None;
        for piece in pieces {
            received += piece.len() as u64;
            if let Err(e) = self.format.push(piece, &mut self.events) {
                refused = Some(e.reason());
                break;
            }
        }
        // Counted once per read, not per piece: two shared atomics less for a piece cut in two.
        self.received.inc_by(received);
        self.bytes += received;
        self.counted
            .received_bytes
            .fetch_add(received, Ordering::Relaxed);
        if let Some(why) = refused {
            tracing::warn!(mount = %self.mount, reason = why, "source's stream refused");
            return Err(why);
        }
        if self.events.is_empty() {
            return Ok(());
        }
        let subtype = self.subtype_change();
        if self
            .ingest
            .publish(&self.mount, self.claim, &mut self.events, subtype, arrived)
        {
            Ok(())
        } else {
            Err("replaced")
        }
    }

    /// The source ended: what the parser still holds goes out.
    fn finish(&mut self) {
        self.format.finish(&mut self.events);
        if let Some(entry) = self
            .ingest
            .entries
            .borrow_mut()
            .get_mut(&self.mount)
            .filter(|e| e.generation == self.claim.generation)
        {
            entry.ogg_tail = self.format.tail();
        }
        if !self.events.is_empty() {
            let subtype = self.subtype_change();
            self.ingest.publish(
                &self.mount,
                self.claim,
                &mut self.events,
                subtype,
                Instant::now(),
            );
        }
    }

    /// How long a small read is held for more to merge with (see the module's doc); zero when
    /// the mount wants every piece at once.
    fn merge_gap(&self) -> Duration {
        let delay_ms = self
            .ingest
            .entries
            .borrow()
            .get(&self.mount)
            .map_or(0, |e| e.writer.settings().max_write_delay_ms);
        (Duration::from_millis(delay_ms) / MERGE_GAP_PER_WRITE_DELAY).min(MAX_MERGE_GAP)
    }

    /// The stream's subtype, if it changed with the events at hand.
    fn subtype_change(&mut self) -> Option<Option<String>> {
        let may_change =
            self.subtype.is_none() || self.events.iter().any(|e| matches!(e, Event::Headers(_)));
        if !may_change {
            return None;
        }
        let now = self.format.subtype();
        (now != self.subtype).then(|| {
            self.subtype = now.clone();
            now
        })
    }
}

/// Answers an encoder (`100 Continue` if it waits for one, then `200 OK`) and reads its stream.
async fn read_encoder(src: &mut Source, encoder: Encoder) -> &'static str {
    let Ok(mut stream) = encoder.stream.attach() else {
        return "read_error";
    };
    let mut answer = Vec::new();
    if encoder.expect_continue {
        answer.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    if encoder.answer {
        answer.extend_from_slice(b"HTTP/1.0 200 OK\r\nServer: fanstream\r\n\r\n");
    }
    let answered = async {
        stream.write_all(&answer).await?;
        stream.flush().await
    };
    // Bound apart from the match: a temporary in its scrutinee would live, and take room in
    // this future, for as long as the stream is read.
    let answered = tokio::time::timeout(RESPONSE_TIMEOUT, answered).await;
    match answered {
        Ok(Ok(())) => read_stream(src, &mut stream, encoder.chunked, encoder.leftover).await,
        _ => "write_error",
    }
}

/// Appends pieces made on another thread until their maker stops or stalls.
async fn read_pieces(src: &mut Source, mut pieces: mpsc::Receiver<Bytes>) -> &'static str {
    let timeout = Duration::from_secs(src.ingest.shared.config.load().source_timeout_secs);
    loop {
        match tokio::time::timeout(timeout, pieces.recv()).await {
            Err(_) => return "source_timeout",
            Ok(None) => return "end_of_stream",
            Ok(Some(piece)) => {
                if let Err(why) = src.append([piece], Instant::now()) {
                    return why;
                }
            }
        }
    }
}

/// Reads the body until the encoder closes, stalls, or breaks the framing; returns why it ended.
async fn read_stream(
    src: &mut Source,
    stream: &mut Io,
    chunked: bool,
    leftover: Vec<u8>,
) -> &'static str {
    let timeout = Duration::from_secs(src.ingest.shared.config.load().source_timeout_secs);
    // A handle of its own: a look at a merging source borrows ingest's shared read buffer while
    // `src` is lent to `emit`.
    let ingest = src.ingest.clone();
    let mut decoder = chunked.then(ChunkedDecoder::default);
    let mut buf = BytesMut::from(&leftover[..]);
    buf.reserve(FIRST_READ_BYTES);
    let mut decoded = BytesMut::new();
    // When the first byte of what `buf` holds may have arrived.
    let mut read_at = Instant::now();
    // While the source's reads are small, ingest looks at its socket once per merge gap instead
    // of waiting for each read (see the module's doc): `Some(when it last found it drained)`.
    let mut merging: Option<Instant> = None;
    // Why the stream ended while a piece was held: the piece goes out first.
    let mut ended = None;
    loop {
        if !buf.is_empty() {
            let filled = buf.len() == buf.capacity();
            if let Some(why) = emit(src, &mut decoder, &mut decoded, &buf, read_at) {
                return why;
            }
            buf.clear();
            if filled && buf.capacity() < READ_BUF_BYTES {
                buf.reserve(READ_BUF_BYTES);
            }
        }
        if let Some(why) = ended {
            return why;
        }
        if let (Some(drained_at), Io::Plain(tcp)) = (merging, &*stream) {
            // While merging, the source holds no buffer of its own: it gets one back when it is
            // waited on read by read again.
            buf = BytesMut::new();
            let gap = src.merge_gap();
            let at = look_point(drained_at + gap, gap);
            tick(tcp, at).await;
            // The look's point, which keeps the looks a gap apart; or now, if the socket filled
            // before it.
            let looked = at.min(Instant::now());
            let scratch = &mut *ingest.scratch.borrow_mut();
            let closed = recv_waiting(tcp, scratch);
            let found = scratch.len();
            let done = emit(
                src,
                &mut decoder,
                &mut decoded,
                scratch,
                drained_at + LOOK_MARGIN,
            );
            scratch.clear();
            if let Some(why) = done.or(closed) {
                return why;
            }
            if found == 0 || found >= MERGE_BYTES || gap.is_zero() {
                // Silent for a gap, or fast enough to fill `MERGE_BYTES` within one: wait for
                // each read again (a silent source's next bytes are then not held a gap).
                set_wake_bytes(tcp, 1);
                merging = None;
                buf.reserve(FIRST_READ_BYTES);
            } else {
                merging = Some(looked);
            }
            continue;
        }
        match tokio::time::timeout(timeout, stream.read_buf(&mut buf)).await {
            Err(_) => return "source_timeout",
            Ok(Ok(0)) => return "closed",
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "read_error",
        }
        read_at = Instant::now();
        // Over TLS the socket holds records, not the stream's bytes: nothing to merge there.
        if let Io::Plain(tcp) = &*stream {
            // Only small reads merge; the mount's gap is looked up for those alone.
            let small = buf.len() < SMALL_PIECE_BYTES;
            let gap = if small {
                src.merge_gap()
            } else {
                Duration::ZERO
            };
            if !gap.is_zero() {
                set_wake_bytes(tcp, MERGE_BYTES);
                // What else waits goes out with this read; the socket is drained from here on.
                ended = take_waiting(tcp, &mut buf);
                merging = Some(Instant::now());
            }
        }
    }
}

/// Publishes what one read brought, decoded first if the body is chunked; Some says why the
/// stream ended.
fn emit(
    src: &mut Source,
    decoder: &mut Option<ChunkedDecoder>,
    decoded: &mut BytesMut,
    read: &[u8],
    read_at: Instant,
) -> Option<&'static str> {
    let (head, tail) = match decoder.as_mut() {
        None => copy_in(read),
        Some(d) => {
            if let Err(e) = d.decode(read, decoded) {
                return Some(e.reason());
            }
            let pieces = copy_in(decoded);
            decoded.clear();
            pieces
        }
    };
    if !head.is_empty() {
        if let Err(why) = src.append(std::iter::once(head).chain(tail), read_at) {
            return Some(why);
        }
    }
    decoder
        .as_ref()
        .is_some_and(|d| d.is_done())
        .then_some("end_of_stream")
}

/// A merged piece is stamped this long after the last look that found the socket drained (the
/// earliest its first byte can have arrived). A write falling due at a look point then comes
/// after ingest's looks at that point, which may bring it more: with the looks a gap apart and the
/// delay a whole number of gaps, a listener is written once per delay, not sometimes a gap sooner
/// for want of bytes still in a socket (1.2 writes a second instead of 1.0 at the defaults). The
/// price: a byte may leave this much past `max_write_delay_ms`.
const LOOK_MARGIN: Duration = Duration::from_millis(5);

/// The first look point at or after `at` for a merge gap of `gap`: the multiples of the gap on
/// one clock every source shares, so that all merging sources of mounts with the same gap (every
/// mount at the defaults) are looked at together, whenever each started. One wake-up of ingest
/// then serves them all, and their listeners' writes, which fall due a delay after a look, come
/// together too: the workers write in a few large rounds a second instead of a small one at each
/// of a hundred points, as when one mount's listeners are written. At 1,000 mounts × 10
/// listeners that took the workers' CPU per listener-second from 1.3-1.7 times one mount's to
/// 1.0-1.2, and ingest's by about 40%, for a byte waiting up to a round's length past the delay
/// (docs/performance/many-stations.md, fourteenth pass).
fn look_point(at: Instant, gap: Duration) -> Instant {
    static CLOCK: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    if gap.is_zero() {
        return at;
    }
    let clock = *CLOCK.get_or_init(Instant::now);
    let gap = gap.as_nanos();
    let since = at.saturating_duration_since(clock).as_nanos();
    let late = (gap - since % gap) % gap;
    at + Duration::from_nanos(late as u64)
}

/// Waits for a merging source's next look: until `until`, or until `MERGE_BYTES` wait, or the
/// stream ends.
async fn tick(stream: &TcpStream, until: Instant) {
    tokio::select! {
        _ = tokio::time::sleep_until(until.into()) => {}
        // With `SO_RCVLOWAT` at `MERGE_BYTES`, the socket is readable only once that much
        // waits, or at its end.
        _ = stream.readable() => {}
    }
}

/// As [`take_waiting`], but asking the kernel rather than the runtime: with `SO_RCVLOWAT` high
/// the runtime has not been told that bytes wait, so it would answer "would block" without a
/// read.
fn recv_waiting(stream: &TcpStream, buf: &mut BytesMut) -> Option<&'static str> {
    let socket = socket2::SockRef::from(stream);
    while buf.len() < READ_BUF_BYTES {
        if buf.len() == buf.capacity() {
            buf.reserve(READ_BUF_BYTES - buf.len());
        }
        let room = buf.spare_capacity_mut();
        let asked = room.len();
        match socket.recv(room) {
            Ok(0) => return Some("closed"),
            Ok(n) => {
                // SAFETY: `recv` initialized the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                // Less than asked: the socket was drained, and asking again would only be
                // told so (bytes arriving meanwhile are the next tick's).
                if n < asked {
                    return None;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Some("read_error"),
        }
    }
    None
}

/// Sets `SO_RCVLOWAT`: the kernel signals the socket readable (and wakes the ingest thread) only
/// once this many bytes wait. A failure only costs wake-ups, so it is not reported.
fn set_wake_bytes(stream: &TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is the open socket `stream` owns, and the option value is a c_int
    // of the length given, as SO_RCVLOWAT takes.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Reads what waits in the socket without waiting for more, up to a read buffer's worth; Some
/// says why the stream ended.
fn take_waiting(stream: &TcpStream, buf: &mut BytesMut) -> Option<&'static str> {
    while buf.len() < READ_BUF_BYTES {
        if buf.len() == buf.capacity() {
            buf.reserve(READ_BUF_BYTES - buf.len());
        }
        match stream.try_read_buf(buf) {
            Ok(0) => return Some("closed"),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Some("read_error"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_look_together_whenever_they_started() {
        let gap = Duration::from_millis(200);
        let start = Instant::now();
        // Sources that started merging at 37 moments over two gaps.
        let firsts: Vec<Instant> = (0..37)
            .map(|i| start + Duration::from_millis(i * 11))
            .map(|at| look_point(at + gap, gap))
            .collect();
        let first = *firsts.iter().min().unwrap();
        for (i, at) in firsts.iter().enumerate() {
            let began = start + Duration::from_millis(i as u64 * 11);
            assert!(
                *at >= began + gap && *at < began + 2 * gap,
                "source {i}: within a gap"
            );
            let apart = at.duration_since(first).as_nanos();
            assert_eq!(
                apart % gap.as_nanos(),
                0,
                "source {i}: on the shared points"
            );
        }
        // From a point, the next look is a gap on, exactly.
        assert_eq!(look_point(first + gap, gap), first + gap);
        // A mount with half the gap looks at every point of this one and one between.
        assert_eq!(look_point(first, gap / 2), first);
        assert_eq!(
            look_point(first + Duration::from_millis(1), gap / 2),
            first + gap / 2
        );
        // No gap: no waiting for a point.
        assert_eq!(
            look_point(first + Duration::from_millis(3), Duration::ZERO),
            first + Duration::from_millis(3)
        );
    }
}
