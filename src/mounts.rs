//! The mount table: which mounts exist now, each with its store.
//!
//! Published as one immutable map through an `ArcSwap`; the ingest thread is its only writer
//! (mounts appear when a source takes them and go when their grace period ends), and workers read
//! it once per listener admission. A mount's settings travel in its snapshots, not here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::clients::{Clients, HlsSessions};
use crate::config::MountSettings;
use crate::metrics::MountLabel;
use crate::store;

/// A mount's published state, with the settings in force for it.
pub(crate) type Snapshot = store::Snapshot<MountSettings>;
pub(crate) type Store = store::Store<MountSettings>;
pub(crate) type StoreWriter = store::StoreWriter<MountSettings>;

pub(crate) struct Mount {
    pub path: String,
    /// The `mount` label of everything counted for it. Held as long as the mount is (by the
    /// table, ingest, and the workers' shards and listeners), so its series go with the last of
    /// them.
    pub label: MountLabel,
    pub store: Arc<Store>,
    /// Listeners on this mount across all workers: admission checks it against `max_listeners`.
    /// Incremented by the admitting worker, decremented when the listener is dropped.
    pub listeners: AtomicUsize,
    /// Relays on this mount across all workers (requests with the relay credentials): counted
    /// apart from `listeners`, so that they are not audience and no limit applies to them.
    /// Incremented by the admitting worker, decremented when the relay is dropped.
    pub relays: AtomicUsize,
    /// Most listeners the mount had at once since it appeared (the status pages' `listener_peak`).
    /// Raised by the admitting worker.
    pub listener_peak: AtomicUsize,
    /// Payload bytes received since the mount appeared, for the status pages (its metric may add
    /// up several mounts under `other`). Added to by ingest.
    pub received_bytes: AtomicU64,
    /// Payload bytes sent to its listeners since it appeared, likewise. Added to by each worker
    /// once per fan-out round.
    pub sent_bytes: AtomicU64,
    /// Its listeners now, for the admin API; kept by their guards.
    pub clients: Clients,
    /// Its HLS players, from their playlist polls (on any worker).
    pub hls_sessions: HlsSessions,
    /// Woken by ingest each time a new HLS segment is published (after the snapshot holding it
    /// is): blocking playlist reloads (`_HLS_msn`) wait on it on their workers, where a poll
    /// would cost a timer per waiting client.
    pub hls_published: tokio::sync::Notify,
    /// Woken by ingest after it published a new source state or new settings for the mount (a
    /// source took it, left it, or it closed or moved), never for stream data: a relay waits on
    /// it for ingest to let its previous connection go (ingest wakes it through `Shared::changed`).
    pub source_changed: tokio::sync::Notify,
    /// The mount as each worker holds it, indexed by worker: a publication wakes only the
    /// workers with listeners here, and tells each which mount to serve, so that idle mounts and
    /// other mounts' listeners cost a worker nothing.
    pub on_workers: Box<[OnWorker]>,
    /// Listeners between taking their join point from a snapshot and their worker's first pass
    /// (which files their position in [`OnWorker::oldest`]): while any is, ingest keeps the
    /// whole window, since a source writing fast can move the burst past a join point taken a
    /// few milliseconds ago. Counted by [`Joining`].
    pub joining: AtomicUsize,
}

/// One listener joining a mount, from before its join point is taken until its worker has
/// served it once (see [`Mount::joining`]).
pub(crate) struct Joining(Arc<Mount>);

impl Joining {
    pub fn new(mount: &Arc<Mount>) -> Joining {
        // Before the snapshot its join point comes from is loaded, so that every publication
        // decided after this keeps the window. The one ingest decided just before may still
        // evict the join point: the worker then takes it again (`FanOut::add`).
        mount.joining.fetch_add(1, Ordering::SeqCst);
        Joining(mount.clone())
    }
}

impl Drop for Joining {
    fn drop(&mut self) {
        self.0.joining.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A listener's place held on a mount (see [`Mount::hold_place`]).
pub(crate) struct Place<'a>(&'a Mount);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One worker's hold on a mount.
#[derive(Default)]
pub(crate) struct OnWorker {
    /// The id of the worker's shard of this mount (never 0), 0 while the worker has no listener
    /// here. Written by that worker only, when it creates or removes the shard; read by ingest
    /// after each publication.
    pub shard: AtomicU64,
    /// How far the stream must reach before the worker has anything to do here (the first
    /// waiting listener's coalescing threshold, or the first byte past a listener at the edge,
    /// or a parked listener's lag limit): publications short of it wake nobody, since the
    /// worker's own timer covers coalescing by time. Written by the worker after each serving
    /// pass, compared by ingest with the stream's end after each publication.
    pub wake_at: AtomicU64,
    /// The mount waits in the worker's queue of published mounts. Set by ingest when it queues
    /// the mount, cleared by the worker when it takes it, before it loads the snapshot: a
    /// publication is queued once however many come before the worker runs, and none is missed.
    pub queued: AtomicBool,
    /// The stream position of the worker's furthest-behind listener here (`u64::MAX` with
    /// none): ingest keeps what the furthest behind of all still needs, and no more
    /// ([`crate::config::MountSettings::behind_bytes`]). Written by the worker after each
    /// serving pass; a stale value is older, so it only keeps more.
    pub oldest: AtomicU64,
}

impl Mount {
    /// A new mount at `path`, reading `store`, with nobody on it yet and a hold for each of
    /// `workers` workers.
    pub fn new(path: &str, label: MountLabel, store: Arc<Store>, workers: usize) -> Mount {
        Mount {
            path: path.to_string(),
            label,
            store,
            listeners: AtomicUsize::new(0),
            relays: AtomicUsize::new(0),
            listener_peak: AtomicUsize::new(0),
            received_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            clients: Default::default(),
            hls_sessions: Default::default(),
            hls_published: Default::default(),
            source_changed: Default::default(),
            joining: AtomicUsize::new(0),
            on_workers: (0..workers).map(|_| Default::default()).collect(),
        }
    }

    /// Holds a place for a listener moving here from another mount, within `max` (the mount's
    /// `max_listeners`, 0 for no limit); None when the mount is full. The place counts as a
    /// listener until it is dropped, after the listener is counted in: workers moving listeners
    /// here at once then never exceed the limit together.
    pub fn hold_place(&self, max: usize) -> Option<Place<'_>> {
        self.listeners
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Place(self))
    }

    /// Everyone the mount serves: its listeners and the relays of edges further down (an
    /// edge's relay keeps an on-demand relay here pulling as a listener would).
    pub fn listeners_and_relays(&self) -> usize {
        self.listeners.load(Ordering::Relaxed) + self.relays.load(Ordering::Relaxed)
    }

    /// HLS players counted now: those that fetched the playlist within three target durations
    /// (a player polls it about once per target duration); 0 for a mount without HLS.
    pub fn hls_sessions_now(&self) -> usize {
        let settings = &self.store.load().settings;
        if !settings.hls {
            return 0;
        }
        let ttl = std::time::Duration::from_secs(3 * settings.hls_segment_secs);
        self.hls_sessions.count(std::time::Instant::now(), ttl)
    }

    /// The position of the furthest-behind listener across workers, if any (0, all of the
    /// window, while a listener is joining).
    pub fn oldest_listener(&self) -> Option<u64> {
        if self.joining.load(Ordering::SeqCst) > 0 {
            return Some(0);
        }
        self.on_workers
            .iter()
            .filter(|on| on.shard.load(Ordering::Relaxed) != 0)
            .map(|on| on.oldest.load(Ordering::Relaxed))
            .filter(|&pos| pos != u64::MAX)
            .min()
    }
}

#[derive(Default)]
pub(crate) struct Mounts {
    table: ArcSwap<HashMap<String, Arc<Mount>>>,
}

impl Mounts {
    pub fn get(&self, path: &str) -> Option<Arc<Mount>> {
        self.table.load().get(path).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Mount>> {
        self.table.load().values().cloned().collect()
    }

    /// Ingest only: adds or replaces a mount.
    pub fn insert(&self, mount: Arc<Mount>) {
        self.table.rcu(|t| {
            let mut t = HashMap::clone(t);
            t.insert(mount.path.clone(), mount.clone());
            t
        });
    }

    /// Ingest only: removes the mount if it is still this one.
    pub fn remove(&self, mount: &Arc<Mount>) {
        self.table.rcu(|t| {
            let mut t = HashMap::clone(t);
            if t.get(&mount.path).is_some_and(|m| Arc::ptr_eq(m, mount)) {
                t.remove(&mount.path);
            }
            t
        });
    }
}
