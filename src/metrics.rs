//! Prometheus metrics, in one owned registry so that servers started by tests stay apart.
//!
//! Labels come only from bounded sets: worker index, mount path (declared or admitted by a source),
//! reason, thread name. Nothing is labelled per listener or per address. Hot-path counters are
//! resolved to their label child once per worker (or per worker and mount), so a write touches
//! one uncontended atomic.
//!
//! Mount labels are leased ([`MountLabel`]): a mount holds one from the moment it appears, and
//! every series labelled with it goes when the last holder lets go, so sources that come and go
//! on ever new names leave nothing behind. Past `max_mount_series` mounts, newcomers share the
//! label `other`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::reasons::{Disconnect, Refusal, Unanswered};
use crate::series::{CounterFamily, Family, GaugeFamily, Labelled, Value};
use crate::threads::{clock_time, ThreadRegistry};

/// Buckets of `fanstream_fanout_round_cpu_per_listener_seconds`: 100 ns to 1 ms. A listener that
/// keeps up costs well under a microsecond per round; the top buckets catch rounds that did
/// something expensive (a burst of joins, a slow syscall).
const ROUND_CPU_BUCKETS: [f64; 13] = [
    1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3,
];
/// Buckets of `fanstream_listener_lag_bytes`: from "keeping up" (under one coalesced write) to
/// past the default `max_lag_bytes` (512 KiB).
const LAG_BUCKETS: [f64; 10] = [
    1024.0, 4096.0, 16384.0, 65536.0, 131072.0, 262144.0, 524288.0, 1048576.0, 4194304.0,
    16777216.0,
];

/// The `mount` label shared by the mounts that appeared past `max_mount_series`. Mount paths
/// start with `/`, so no mount is named that.
pub(crate) const OTHER_MOUNTS: &str = "other";

/// `fanstream_source_unsynced_bytes_total`'s `action`: source bytes passed on as they came, or
/// dropped.
pub(crate) fn unsynced_action(dropped: bool) -> &'static str {
    if dropped {
        "dropped"
    } else {
        "passed"
    }
}

pub(crate) struct Metrics {
    exposition: Exposition,
    /// Listeners connected now, by mount and worker.
    pub listeners: GaugeFamily,
    /// Listeners admitted, by mount.
    pub listener_connects: CounterFamily,
    /// Listeners gone, by mount and reason (`client_closed`, `slow`, `source_gone`, ...).
    pub listener_disconnects: CounterFamily,
    /// Slow listeners moved to the live edge under `lag_policy = "skip"`, by mount.
    pub listener_skips: CounterFamily,
    /// Payload bytes written to listeners, by mount and worker.
    pub sent_bytes: CounterFamily,
    /// Write syscalls to listeners, by mount and worker.
    pub write_syscalls: CounterFamily,
    /// Times a worker was woken by ingest for new data, by worker.
    pub worker_wakeups: IntCounterVec,
    /// Payload bytes received from sources, by mount.
    pub source_received_bytes: CounterFamily,
    /// 1 while a source feeds the mount, 0 while a declared mount (or one in its grace period)
    /// has none; under `mount="other"`, how many of those mounts have a source.
    pub source_up: GaugeFamily,
    /// Source connections accepted, by mount.
    pub source_connects: CounterFamily,
    /// Source connections ended, by mount and reason: counted through
    /// [`Metrics::source_disconnected`].
    source_disconnects: CounterFamily,
    /// Payload bytes a mount retains now.
    pub retained_bytes: GaugeFamily,
    /// Chunks a mount retains now: each costs memory and a slice in a listener's write beyond
    /// its bytes, so a source writing tiny pieces shows here.
    pub retained_pieces: GaugeFamily,
    /// Title changes, by mount: from `/admin/metadata` or the stream's own tags.
    pub metadata_updates: CounterFamily,
    /// Source bytes the format layer could not place on a frame or page, by mount and action
    /// (`passed` on as they came, or `dropped`: garbage, a torn or corrupt Ogg page).
    pub source_unsynced_bytes: CounterFamily,
    /// Listeners receiving ICY metadata blocks now, by mount.
    pub icy_listeners: GaugeFamily,
    /// Relays connected now (requests with the relay credentials), by mount: not audience,
    /// so not in `listeners`.
    pub relays: GaugeFamily,
    /// Listeners of a full mount (or a full server) redirected to a registered edge, by mount.
    pub listener_redirects: CounterFamily,
    /// Edges registered now with room or not (`/admin/register`), set when `/metrics` is read.
    pub edges: prometheus::IntGauge,
    /// On an edge with `[master] register = true`: 1 while its last registration with the
    /// origin was taken.
    pub edge_registered: prometheus::IntGauge,
    /// HLS playlist and segment requests answered (not refused), by mount and `kind`
    /// (`playlist`, `segment`): behind caches, about one per segment per cache.
    pub hls_requests: CounterFamily,
    /// HLS players now, by mount, from their playlist polls; set when `/metrics` is read.
    pub hls_sessions: GaugeFamily,
    /// Requests refused, by reason.
    pub rejected_requests: IntCounterVec,
    /// Panics caught (bugs), by where: `request` or `listener`.
    pub panics: IntCounterVec,
    /// Listener-seconds served, by worker: the denominator of CPU per listener. Each worker adds
    /// (listeners it held) x (time since its previous pass) on every pass of its fan-out loop.
    pub listener_seconds: CounterVec,
    /// A worker's CPU since its previous round divided by the listeners it holds, once per round
    /// (one read of the thread's CPU clock per round, none per write), by worker.
    pub round_cpu_per_listener: HistogramVec,
    /// How far listeners are behind the live edge, sampled for every listener once a second, by
    /// mount.
    pub listener_lag: HistogramVec,
    /// Which mount labels are in use; removes a label's series when it is no longer.
    labels: Arc<MountLabels>,
    // Relays: labelled by the relay's mount and upstream URL as configured (a bounded set, not
    // leased like mount labels), so that a relay's series stay while it waits for an upstream.
    /// 1 while a relay streams from this upstream, by mount and upstream.
    pub relay_up: IntGaugeVec,
    /// Upstream connections a relay made that ingest took, by mount and upstream.
    pub relay_connects: IntCounterVec,
    /// Times a relay left an upstream or could not use it, by mount and reason.
    pub relay_failovers: IntCounterVec,
    /// Bytes a relay read from its upstreams' response bodies (ICY blocks included), by mount.
    pub relay_received_bytes: IntCounterVec,
    /// Mounts relayed from `[master]`'s list now.
    pub relay_mirrored: prometheus::IntGauge,
}

/// What `/metrics` shows. The prometheus registry checks each metric as it is registered (a
/// well-formed name, unique, consistent labels), but its `gather` builds every series of every
/// metric as a protobuf message before a byte is encoded: at 1,000 mounts, some 40,000 series and
/// 30 MiB held for the length of a scrape, and kept by the allocator for a while after. Here the
/// metrics are encoded one at a time (the per-mount families of [`crate::series`] straight to
/// text), and the admin thread writes each out before the next, so a scrape never holds the
/// whole text (2.5 MB at 1,000 mounts with listeners) either.
#[derive(Default)]
struct Exposition {
    registry: Registry,
    /// What is shown, in the order of the metrics' names (as `gather` sorts them).
    parts: Mutex<Vec<(String, Part)>>,
}

enum Part {
    Collector(Arc<dyn Collector>),
    Series(Box<dyn Labelled>),
}

/// A collector registered both with the registry (for its checks) and in the exposition's list.
struct Shared(Arc<dyn Collector>);

impl Collector for Shared {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

fn label_values(m: &prometheus::proto::Metric) -> impl Iterator<Item = &str> {
    m.get_label().iter().map(|l| l.value())
}

impl Exposition {
    fn register(&self, collector: Box<dyn Collector>) -> prometheus::Result<()> {
        let collector: Arc<dyn Collector> = Arc::from(collector);
        self.registry
            .register(Box::new(Shared(collector.clone())))?;
        let name = collector
            .desc()
            .first()
            .map_or_else(String::new, |d| d.fq_name.clone());
        self.add(name, Part::Collector(collector));
        Ok(())
    }

    fn add(&self, name: String, part: Part) {
        let mut parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            parts.iter().all(|(n, _)| *n != name),
            "metric names are unique: {name}"
        );
        let at = parts.partition_point(|(n, _)| *n <= name);
        parts.insert(at, (name, part));
    }

    /// Appends the text of the `index`th metric (in name order) to `out`; false past the last.
    fn render_part(&self, index: usize, out: &mut Vec<u8>) -> bool {
        let parts = self.parts.lock().unwrap_or_else(|e| e.into_inner());
        let Some((_, part)) = parts.get(index) else {
            return false;
        };
        let collector = match part {
            Part::Series(family) => {
                family.render(out);
                return true;
            }
            Part::Collector(collector) => collector.clone(),
        };
        drop(parts);
        let mut families = collector.collect();
        // As `gather` does: no family without series, series in order of their labels.
        families.retain(|f| !f.get_metric().is_empty());
        for family in &mut families {
            family
                .mut_metric()
                .sort_by(|a, b| label_values(a).cmp(label_values(b)));
        }
        if let Err(e) = TextEncoder::new().encode(&families, out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        true
    }
}

/// A counter or gauge with a `mount` label first ([`crate::series`]).
fn by_mount<V: Value>(
    reg: &Exposition,
    name: &str,
    help: &'static str,
    labels: &'static [&'static str],
) -> Family<V> {
    let family = Family::<V>::new(format!("fanstream_{name}"), help, labels);
    reg.add(
        family.name().to_string(),
        Part::Series(Box::new(family.clone())),
    );
    family
}

fn counter(reg: &Exposition, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(format!("fanstream_{name}"), help), labels)
        .expect("valid metric definition");
    reg.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn gauge(reg: &Exposition, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(format!("fanstream_{name}"), help), labels)
        .expect("valid metric definition");
    reg.register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

fn histogram(
    reg: &Exposition,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    let opts = HistogramOpts::new(format!("fanstream_{name}"), help).buckets(buckets.to_vec());
    let h = HistogramVec::new(opts, labels).expect("valid metric definition");
    reg.register(Box::new(h.clone()))
        .expect("metric names are unique");
    h
}

impl Metrics {
    /// The server's metrics.
    pub fn new(threads: Arc<ThreadRegistry>) -> Metrics {
        let reg = Exposition::default();
        reg.register(Box::new(ProcessCollector::new()))
            .expect("process collector registers once");
        reg.register(Box::new(ThreadCpuCollector::new(threads)))
            .expect("thread collector registers once");
        let overflow = IntCounter::new(
            "fanstream_mount_series_overflow_total",
            "Mounts counted under the mount label \"other\": max_mount_series mounts had their own.",
        )
        .expect("valid metric definition");
        reg.register(Box::new(overflow.clone()))
            .expect("metric names are unique");
        let listeners = by_mount(
            &reg,
            "listeners",
            "Listeners connected now.",
            &["mount", "worker"],
        );
        let listener_connects = by_mount(
            &reg,
            "listener_connects_total",
            "Listeners admitted.",
            &["mount"],
        );
        let listener_disconnects = by_mount(
            &reg,
            "listener_disconnects_total",
            "Listeners gone, by reason.",
            &["mount", "reason"],
        );
        let listener_skips = by_mount(
            &reg,
            "listener_skips_total",
            "Slow listeners moved to the live edge (lag_policy = skip).",
            &["mount"],
        );
        let sent_bytes = by_mount(
            &reg,
            "sent_bytes_total",
            "Payload bytes written to listeners.",
            &["mount", "worker"],
        );
        let write_syscalls = by_mount(
            &reg,
            "write_syscalls_total",
            "Write syscalls to listeners.",
            &["mount", "worker"],
        );
        let worker_wakeups = counter(
            &reg,
            "worker_wakeups_total",
            "Times ingest woke a worker for new data.",
            &["worker"],
        );
        let source_received_bytes = by_mount(
            &reg,
            "source_received_bytes_total",
            "Payload bytes received from sources.",
            &["mount"],
        );
        let source_up = by_mount(
            &reg,
            "source_up",
            "1 while a source feeds the mount.",
            &["mount"],
        );
        let source_connects = by_mount(
            &reg,
            "source_connects_total",
            "Sources accepted.",
            &["mount"],
        );
        let source_disconnects = by_mount(
            &reg,
            "source_disconnects_total",
            "Sources gone, by reason.",
            &["mount", "reason"],
        );
        let retained_bytes = by_mount(
            &reg,
            "retained_bytes",
            "Payload bytes a mount retains.",
            &["mount"],
        );
        let retained_pieces = by_mount(
            &reg,
            "retained_pieces",
            "Chunks (pieces as ingest stored them) a mount retains.",
            &["mount"],
        );
        let metadata_updates = by_mount(
            &reg,
            "metadata_updates_total",
            "Title changes, from /admin/metadata or the stream's own tags.",
            &["mount"],
        );
        let source_unsynced_bytes = by_mount(
            &reg,
            "source_unsynced_bytes_total",
            "Source bytes not on a frame or page boundary: passed on as they came, or dropped.",
            &["mount", "action"],
        );
        let icy_listeners = by_mount(
            &reg,
            "icy_listeners",
            "Listeners receiving ICY metadata blocks now.",
            &["mount"],
        );
        let relays = by_mount(
            &reg,
            "relays",
            "Relays connected now (the relay credentials): not counted as listeners.",
            &["mount"],
        );
        let listener_redirects = by_mount(
            &reg,
            "listener_redirects_total",
            "Listeners of a full mount or server redirected to a registered edge.",
            &["mount"],
        );
        let edges = prometheus::IntGauge::new(
            "fanstream_edges",
            "Edges registered now (forgotten after three of their intervals without a word).",
        )
        .expect("valid metric definition");
        reg.register(Box::new(edges.clone()))
            .expect("metric names are unique");
        let edge_registered = prometheus::IntGauge::new(
            "fanstream_edge_registered",
            "1 while this edge's last registration with its origin was taken.",
        )
        .expect("valid metric definition");
        reg.register(Box::new(edge_registered.clone()))
            .expect("metric names are unique");
        let hls_requests = by_mount(
            &reg,
            "hls_requests_total",
            "HLS playlist and segment requests answered, by kind (playlist, segment).",
            &["mount", "kind"],
        );
        let hls_sessions = by_mount(
            &reg,
            "hls_sessions",
            "HLS players now: clients (address and User-Agent) that fetched the playlist within three target durations.",
            &["mount"],
        );
        let rejected_requests = counter(
            &reg,
            "rejected_requests_total",
            "Requests refused, by reason.",
            &["reason"],
        );
        let panics = counter(
            &reg,
            "panics_total",
            "Panics caught and contained to one connection (bugs), by where.",
            &["where"],
        );
        let listener_seconds = {
            let c = CounterVec::new(
                Opts::new(
                    "fanstream_listener_seconds_total",
                    "Listener-seconds served: the time each listener was connected, summed.",
                ),
                &["worker"],
            )
            .expect("valid metric definition");
            reg.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        };
        let round_cpu_per_listener = histogram(
            &reg,
            "fanout_round_cpu_per_listener_seconds",
            "A worker's CPU since its previous fan-out round, divided by its listeners.",
            &ROUND_CPU_BUCKETS,
            &["worker"],
        );
        let listener_lag = histogram(
            &reg,
            "listener_lag_bytes",
            "Bytes between listeners' positions and the live edge, sampled once a second.",
            &LAG_BUCKETS,
            &["mount"],
        );
        let labels = Arc::new(MountLabels {
            held: Mutex::default(),
            series: MountSeries {
                listeners: listeners.clone(),
                listener_connects: listener_connects.clone(),
                listener_disconnects: listener_disconnects.clone(),
                listener_skips: listener_skips.clone(),
                sent_bytes: sent_bytes.clone(),
                source_received_bytes: source_received_bytes.clone(),
                source_up: source_up.clone(),
                source_connects: source_connects.clone(),
                source_disconnects: source_disconnects.clone(),
                retained_bytes: retained_bytes.clone(),
                retained_pieces: retained_pieces.clone(),
                write_syscalls: write_syscalls.clone(),
                metadata_updates: metadata_updates.clone(),
                source_unsynced_bytes: source_unsynced_bytes.clone(),
                icy_listeners: icy_listeners.clone(),
                relays: relays.clone(),
                listener_redirects: listener_redirects.clone(),
                hls_requests: hls_requests.clone(),
                hls_sessions: hls_sessions.clone(),
                listener_lag: listener_lag.clone(),
            },
            overflow,
        });
        let relay_up = gauge(
            &reg,
            "relay_up",
            "1 while a relay streams from this upstream.",
            &["mount", "upstream"],
        );
        let relay_connects = counter(
            &reg,
            "relay_connects_total",
            "Upstream connections a relay fed into its mount.",
            &["mount", "upstream"],
        );
        let relay_failovers = counter(
            &reg,
            "relay_failovers_total",
            "Times a relay left an upstream or could not use it, by reason.",
            &["mount", "reason"],
        );
        let relay_received_bytes = counter(
            &reg,
            "relay_received_bytes_total",
            "Bytes a relay read from its upstreams.",
            &["mount"],
        );
        let relay_mirrored = prometheus::IntGauge::new(
            "fanstream_relay_mirrored_mounts",
            "Mounts relayed from the master's list now.",
        )
        .expect("valid metric definition");
        reg.register(Box::new(relay_mirrored.clone()))
            .expect("metric names are unique");
        Metrics {
            relay_mirrored,
            relay_up,
            relay_connects,
            relay_failovers,
            relay_received_bytes,
            listeners,
            listener_connects,
            listener_disconnects,
            listener_skips,
            sent_bytes,
            write_syscalls,
            worker_wakeups,
            source_received_bytes,
            source_up,
            source_connects,
            source_disconnects,
            retained_bytes,
            retained_pieces,
            metadata_updates,
            source_unsynced_bytes,
            icy_listeners,
            relays,
            listener_redirects,
            edges,
            edge_registered,
            hls_requests,
            hls_sessions,
            rejected_requests,
            panics,
            listener_seconds,
            round_cpu_per_listener,
            listener_lag,
            exposition: reg,
            labels,
        }
    }

    /// The label for a mount appearing at `path`: its path while fewer than `max_mount_series`
    /// undeclared mounts have their own (a declared mount always has), else `other`. Its
    /// listener counters and received bytes exist at zero from now on, so that rates and alerts
    /// over them have data before the first event (a missing series is not a zero in PromQL).
    pub fn mount_label(&self, path: &str, max_mount_series: usize) -> MountLabel {
        let labels = &self.labels;
        let mut held = labels.lock();
        let own = held.contains_key(path)
            || held
                .iter()
                .filter(|(label, hold)| !hold.declared && *label != OTHER_MOUNTS)
                .count()
                < max_mount_series;
        let name = if own {
            path
        } else {
            labels.overflow.inc();
            OTHER_MOUNTS
        };
        held.entry(name.to_string()).or_default().mounts += 1;
        labels.series.create(name);
        MountLabel {
            name: name.to_string(),
            labels: labels.clone(),
        }
    }

    /// The mounts declared in the config (and the demo mount): each keeps its series whether or
    /// not a source is there, `fanstream_source_up` 0 while none is, so that an alert can tell
    /// that it is missing. Mounts no longer declared lose their series once no mount carries
    /// their label.
    pub fn declare_mounts<'a>(&self, paths: impl IntoIterator<Item = &'a str>) {
        let paths: Vec<&str> = paths.into_iter().collect();
        let labels = &self.labels;
        let mut held = labels.lock();
        let undeclared: Vec<String> = held
            .iter()
            .filter(|(label, hold)| hold.declared && !paths.contains(&label.as_str()))
            .map(|(label, _)| label.clone())
            .collect();
        for label in undeclared {
            if let Some(hold) = held.get_mut(&label) {
                hold.declared = false;
            }
            labels.drop_if_unheld(&mut held, &label);
        }
        for path in paths {
            let hold = held.entry(path.to_string()).or_default();
            if !hold.declared {
                hold.declared = true;
                labels.series.create(path);
                labels.series.source_up.with_label_values(&[path]);
            }
        }
    }

    /// Counts a source gone from the mount labelled `label`, by reason.
    pub fn source_disconnected(&self, label: &MountLabel, reason: &'static str) {
        self.source_disconnects
            .with_label_values(&[&label.name, reason])
            .inc();
    }

    /// Counts a request refused with an answer.
    pub fn refused(&self, refusal: Refusal) {
        self.rejected_requests
            .with_label_values(&[refusal.reason()])
            .inc();
    }

    /// Counts a connection turned away without one.
    pub fn unanswered(&self, why: Unanswered) {
        self.rejected_requests
            .with_label_values(&[why.reason()])
            .inc();
    }

    /// Appends the text exposition of the `index`th metric to `out`; false past the last. A
    /// scrape writes out each metric's text before it renders the next.
    pub fn render_part(&self, index: usize, out: &mut Vec<u8>) -> bool {
        self.exposition.render_part(index, out)
    }

    /// The text exposition of every metric at once.
    #[cfg(test)]
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut index = 0;
        while self.render_part(index, &mut out) {
            index += 1;
        }
        out
    }
}

/// A mount's hold on its `mount` label. Whoever may still count something for the mount holds
/// the mount (and so this): the mount table and ingest while it exists, each worker's shard and
/// each listener's guard while they serve it. So the label's series are removed only after the
/// last count for the mount, and nothing counts for it afterwards to bring a series back. A source
/// that takes the path again while the old mount's listeners are still being closed shares the
/// label; once both have gone, a later one starts from zero.
pub(crate) struct MountLabel {
    name: String,
    labels: Arc<MountLabels>,
}

impl MountLabel {
    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl Drop for MountLabel {
    fn drop(&mut self) {
        let mut held = self.labels.lock();
        if let Some(hold) = held.get_mut(&self.name) {
            hold.mounts -= 1;
        }
        self.labels.drop_if_unheld(&mut held, &self.name);
    }
}

/// The mount labels in use, and what holds each.
struct MountLabels {
    held: Mutex<HashMap<String, Hold>>,
    series: MountSeries,
    /// `fanstream_mount_series_overflow_total`.
    overflow: IntCounter,
}

#[derive(Default)]
struct Hold {
    /// Mounts carrying the label: one, or a leaving mount and its successor on the same path, or
    /// any number under `other`.
    mounts: usize,
    /// Declared in the config: the series stay without a mount.
    declared: bool,
}

impl MountLabels {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Hold>> {
        // The map stays consistent across a panic: every change to it is a single step.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes `label` and its series once neither a mount nor the config holds it. Runs under
    /// the lock, so a mount appearing on the same path meanwhile finds the label either still
    /// held or gone with all its series.
    fn drop_if_unheld(&self, held: &mut HashMap<String, Hold>, label: &str) {
        if held
            .get(label)
            .is_some_and(|hold| hold.mounts == 0 && !hold.declared)
        {
            held.remove(label);
            self.series.remove(label);
        }
    }
}

/// The `kind` labels of `fanstream_hls_requests_total`.
pub(crate) const HLS_KINDS: [&str; 2] = ["playlist", "segment"];

/// Every metric with a `mount` label, to create and remove a label's series.
struct MountSeries {
    listeners: GaugeFamily,
    listener_connects: CounterFamily,
    listener_disconnects: CounterFamily,
    listener_skips: CounterFamily,
    sent_bytes: CounterFamily,
    source_received_bytes: CounterFamily,
    source_up: GaugeFamily,
    source_connects: CounterFamily,
    source_disconnects: CounterFamily,
    retained_bytes: GaugeFamily,
    retained_pieces: GaugeFamily,
    write_syscalls: CounterFamily,
    metadata_updates: CounterFamily,
    source_unsynced_bytes: CounterFamily,
    icy_listeners: GaugeFamily,
    relays: GaugeFamily,
    listener_redirects: CounterFamily,
    hls_requests: CounterFamily,
    hls_sessions: GaugeFamily,
    listener_lag: HistogramVec,
}

impl MountSeries {
    /// The counters that exist at zero for every mount.
    fn create(&self, label: &str) {
        self.listener_connects.with_label_values(&[label]);
        self.listener_skips.with_label_values(&[label]);
        self.listener_redirects.with_label_values(&[label]);
        self.source_received_bytes.with_label_values(&[label]);
        self.metadata_updates.with_label_values(&[label]);
        for why in Disconnect::ALL {
            self.listener_disconnects
                .with_label_values(&[label, why.reason()]);
        }
    }

    /// Removes every series labelled `label`. An error only says that a series never existed.
    fn remove(&self, label: &str) {
        let families: [&dyn Labelled; 19] = [
            &self.listener_connects,
            &self.listener_disconnects,
            &self.listener_skips,
            &self.sent_bytes,
            &self.write_syscalls,
            &self.source_received_bytes,
            &self.source_connects,
            &self.source_disconnects,
            &self.metadata_updates,
            &self.source_unsynced_bytes,
            &self.listener_redirects,
            &self.hls_requests,
            &self.listeners,
            &self.source_up,
            &self.retained_bytes,
            &self.retained_pieces,
            &self.icy_listeners,
            &self.relays,
            &self.hls_sessions,
        ];
        for family in families {
            family.remove_first(label);
        }
        // An error only says that the series never existed.
        let _ = self.listener_lag.remove_label_values(&[label]);
    }
}

/// `fanstream_thread_cpu_seconds_total{thread}`, read from each thread's CPU clock at scrape time:
/// one clock_gettime per thread per scrape, nothing on the hot path.
struct ThreadCpuCollector {
    threads: Arc<ThreadRegistry>,
    desc: Desc,
    vec: CounterVec,
}

impl ThreadCpuCollector {
    fn new(threads: Arc<ThreadRegistry>) -> Self {
        let opts = Opts::new(
            "fanstream_thread_cpu_seconds_total",
            "CPU time used by each fanstream thread (user + system), from its kernel clock.",
        );
        let vec = CounterVec::new(opts, &["thread"]).expect("valid metric definition");
        let desc = vec.desc()[0].clone();
        ThreadCpuCollector { threads, desc, vec }
    }
}

impl Collector for ThreadCpuCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.vec.reset();
        for (name, cpu) in self.threads.cpu_times() {
            self.vec
                .with_label_values(&[name.as_str()])
                .inc_by(cpu.as_secs_f64());
        }
        self.vec.collect()
    }
}

/// The process metrics (`process_open_fds`, `process_max_fds`, `process_resident_memory_bytes`,
/// ...) from the prometheus crate, except `process_cpu_seconds_total`: the crate truncates it to
/// whole seconds, too coarse to set against per-thread CPU or to rate over a short window. It is
/// read here from the process's CPU clock instead, in nanoseconds, at scrape time.
struct ProcessCollector {
    inner: prometheus::process_collector::ProcessCollector,
    descs: Vec<Desc>,
}

const PROCESS_CPU: &str = "process_cpu_seconds_total";
const PROCESS_CPU_HELP: &str =
    "Total user and system CPU time spent in seconds, from the process's CPU clock.";

impl ProcessCollector {
    fn new() -> Self {
        let inner = prometheus::process_collector::ProcessCollector::for_self();
        let cpu = process_cpu(Duration::ZERO);
        let descs = inner
            .desc()
            .into_iter()
            .filter(|d| d.fq_name != PROCESS_CPU)
            .chain(cpu.desc())
            .cloned()
            .collect();
        ProcessCollector { inner, descs }
    }
}

/// A counter holding `value`, built afresh for each scrape: the clock is the state.
fn process_cpu(value: Duration) -> Counter {
    let c = Counter::new(PROCESS_CPU, PROCESS_CPU_HELP).expect("valid metric definition");
    c.inc_by(value.as_secs_f64());
    c
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families: Vec<MetricFamily> = self
            .inner
            .collect()
            .into_iter()
            .filter(|f| f.name() != PROCESS_CPU)
            .collect();
        if let Some(cpu) = clock_time(libc::CLOCK_PROCESS_CPUTIME_ID) {
            families.extend(process_cpu(cpu).collect());
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(Arc::new(ThreadRegistry::default()))
    }

    fn lines_with(m: &Metrics, label: &str) -> usize {
        let text = String::from_utf8(m.render()).unwrap();
        let needle = format!("mount=\"{label}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&needle))
            .count()
    }

    /// Creates a series in every metric with a `mount` label, as the stages do.
    fn touch_every_series(m: &Metrics, label: &MountLabel) {
        let l = label.as_str();
        for w in ["0", "1"] {
            m.listeners.with_label_values(&[l, w]).inc();
            m.sent_bytes.with_label_values(&[l, w]).inc();
        }
        m.source_up.with_label_values(&[l]).inc();
        m.source_connects.with_label_values(&[l]).inc();
        m.source_disconnected(label, "closed");
        m.retained_bytes.with_label_values(&[l]).add(5);
        m.icy_listeners.with_label_values(&[l]).inc();
        m.relays.with_label_values(&[l]).inc();
        m.listener_redirects.with_label_values(&[l]).inc();
        m.listener_lag.with_label_values(&[l]).observe(1.0);
        for dropped in [false, true] {
            m.source_unsynced_bytes
                .with_label_values(&[l, unsynced_action(dropped)])
                .inc();
        }
    }

    #[test]
    fn a_mount_label_takes_every_series_with_it_when_its_last_holder_goes() {
        let m = metrics();
        let first = m.mount_label("/a", 10);
        touch_every_series(&m, &first);
        assert!(lines_with(&m, "/a") > 20);
        // A successor on the same path while the first is still held shares the label.
        let second = m.mount_label("/a", 10);
        drop(first);
        assert!(lines_with(&m, "/a") > 20, "still held by the successor");
        drop(second);
        assert_eq!(lines_with(&m, "/a"), 0);
        // A later mount on the path starts from zero.
        let again = m.mount_label("/a", 10);
        assert_eq!(m.source_connects.with_label_values(&["/a"]).get(), 0);
        drop(again);
    }

    #[test]
    fn past_the_limit_mounts_share_other_and_free_their_slots_when_they_go() {
        let m = metrics();
        let a = m.mount_label("/a", 2);
        let b = m.mount_label("/b", 2);
        let c = m.mount_label("/c", 2);
        let d = m.mount_label("/d", 2);
        assert_eq!(
            [a.as_str(), b.as_str(), c.as_str(), d.as_str()],
            ["/a", "/b", OTHER_MOUNTS, OTHER_MOUNTS]
        );
        assert_eq!(m.labels.overflow.get(), 2);
        touch_every_series(&m, &c);
        drop(c);
        assert!(lines_with(&m, OTHER_MOUNTS) > 0, "still held by /d");
        drop(d);
        assert_eq!(lines_with(&m, OTHER_MOUNTS), 0);
        drop(a);
        assert_eq!(m.mount_label("/e", 2).as_str(), "/e", "/a's slot is free");
        drop(b);
    }

    #[test]
    fn declared_mounts_keep_their_series_and_never_count_against_the_limit() {
        let m = metrics();
        m.declare_mounts(["/live"]);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("fanstream_source_up{mount=\"/live\"} 0\n"),
            "{text}"
        );
        let other = m.mount_label("/x", 0);
        assert_eq!(other.as_str(), OTHER_MOUNTS);
        let live = m.mount_label("/live", 0);
        assert_eq!(live.as_str(), "/live");
        touch_every_series(&m, &live);
        drop(live);
        assert!(
            lines_with(&m, "/live") > 20,
            "a declared mount keeps its series"
        );
        m.declare_mounts([]);
        assert_eq!(lines_with(&m, "/live"), 0, "undeclared and unheld");
        drop(other);
    }
}
