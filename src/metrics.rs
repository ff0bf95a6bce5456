//! Prometheus metrics, in one owned registry so that servers started by tests stay apart.
//!
//! Labels come only from bounded sets: worker index, mount path (declared or admitted by a source),
//! reason, thread name. Nothing is labelled per listener or per address. Hot-path counters are
//! resolved to their label child once per worker (or per worker and mount), so a write touches
//! one uncontended atomic.

use std::sync::Arc;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::reasons::{Disconnect, Refusal, Unanswered};
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

pub(crate) struct Metrics {
    pub registry: Registry,
    /// Listeners connected now, by mount and worker.
    pub listeners: IntGaugeVec,
    /// Listeners admitted, by mount.
    pub listener_connects: IntCounterVec,
    /// Listeners gone, by mount and reason (`client_closed`, `slow`, `source_gone`, ...).
    pub listener_disconnects: IntCounterVec,
    /// Slow listeners moved to the live edge under `lag_policy = "skip"`, by mount.
    pub listener_skips: IntCounterVec,
    /// Payload bytes written to listeners, by mount and worker.
    pub sent_bytes: IntCounterVec,
    /// Write syscalls to listeners, by mount and worker.
    pub write_syscalls: IntCounterVec,
    /// Times a worker was woken by ingest for new data, by worker.
    pub worker_wakeups: IntCounterVec,
    /// Payload bytes received from sources, by mount.
    pub source_received_bytes: IntCounterVec,
    /// 1 while a source feeds the mount.
    pub source_up: IntGaugeVec,
    /// Source connections accepted, by mount.
    pub source_connects: IntCounterVec,
    /// Source connections ended, by mount and reason.
    pub source_disconnects: IntCounterVec,
    /// Payload bytes a mount retains now.
    pub retained_bytes: IntGaugeVec,
    /// Chunks a mount retains now: each costs memory and a slice in a listener's write beyond
    /// its bytes, so a source writing tiny pieces shows here.
    pub retained_pieces: IntGaugeVec,
    /// Title changes, by mount: from `/admin/metadata` or the stream's own tags.
    pub metadata_updates: IntCounterVec,
    /// Source bytes the format layer could not place on a frame or page, by mount and action
    /// (`passed` on as they came, or `dropped`: garbage, a torn or corrupt Ogg page).
    pub source_unsynced_bytes: IntCounterVec,
    /// Listeners receiving ICY metadata blocks now, by mount.
    pub icy_listeners: IntGaugeVec,
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
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(format!("fanstream_{name}"), help), labels)
        .expect("valid metric definition");
    reg.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(format!("fanstream_{name}"), help), labels)
        .expect("valid metric definition");
    reg.register(Box::new(g.clone()))
        .expect("metric names are unique");
    g
}

fn histogram(
    reg: &Registry,
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
    pub fn new(threads: Arc<ThreadRegistry>) -> Metrics {
        let reg = Registry::new();
        reg.register(Box::new(ProcessCollector::new()))
            .expect("process collector registers once");
        reg.register(Box::new(ThreadCpuCollector::new(threads)))
            .expect("thread collector registers once");
        Metrics {
            listeners: gauge(
                &reg,
                "listeners",
                "Listeners connected now.",
                &["mount", "worker"],
            ),
            listener_connects: counter(
                &reg,
                "listener_connects_total",
                "Listeners admitted.",
                &["mount"],
            ),
            listener_disconnects: counter(
                &reg,
                "listener_disconnects_total",
                "Listeners gone, by reason.",
                &["mount", "reason"],
            ),
            listener_skips: counter(
                &reg,
                "listener_skips_total",
                "Slow listeners moved to the live edge (lag_policy = skip).",
                &["mount"],
            ),
            sent_bytes: counter(
                &reg,
                "sent_bytes_total",
                "Payload bytes written to listeners.",
                &["mount", "worker"],
            ),
            write_syscalls: counter(
                &reg,
                "write_syscalls_total",
                "Write syscalls to listeners.",
                &["mount", "worker"],
            ),
            worker_wakeups: counter(
                &reg,
                "worker_wakeups_total",
                "Times ingest woke a worker for new data.",
                &["worker"],
            ),
            source_received_bytes: counter(
                &reg,
                "source_received_bytes_total",
                "Payload bytes received from sources.",
                &["mount"],
            ),
            source_up: gauge(
                &reg,
                "source_up",
                "1 while a source feeds the mount.",
                &["mount"],
            ),
            source_connects: counter(
                &reg,
                "source_connects_total",
                "Sources accepted.",
                &["mount"],
            ),
            source_disconnects: counter(
                &reg,
                "source_disconnects_total",
                "Sources gone, by reason.",
                &["mount", "reason"],
            ),
            retained_bytes: gauge(
                &reg,
                "retained_bytes",
                "Payload bytes a mount retains.",
                &["mount"],
            ),
            retained_pieces: gauge(
                &reg,
                "retained_pieces",
                "Chunks (pieces as ingest stored them) a mount retains.",
                &["mount"],
            ),
            metadata_updates: counter(
                &reg,
                "metadata_updates_total",
                "Title changes, from /admin/metadata or the stream's own tags.",
                &["mount"],
            ),
            source_unsynced_bytes: counter(
                &reg,
                "source_unsynced_bytes_total",
                "Source bytes not on a frame or page boundary: passed on as they came, or dropped.",
                &["mount", "action"],
            ),
            icy_listeners: gauge(
                &reg,
                "icy_listeners",
                "Listeners receiving ICY metadata blocks now.",
                &["mount"],
            ),
            rejected_requests: counter(
                &reg,
                "rejected_requests_total",
                "Requests refused, by reason.",
                &["reason"],
            ),
            panics: counter(
                &reg,
                "panics_total",
                "Panics caught and contained to one connection (bugs), by where.",
                &["where"],
            ),
            listener_seconds: {
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
            },
            round_cpu_per_listener: histogram(
                &reg,
                "fanout_round_cpu_per_listener_seconds",
                "A worker's CPU since its previous fan-out round, divided by its listeners.",
                &ROUND_CPU_BUCKETS,
                &["worker"],
            ),
            listener_lag: histogram(
                &reg,
                "listener_lag_bytes",
                "Bytes between listeners' positions and the live edge, sampled once a second.",
                &LAG_BUCKETS,
                &["mount"],
            ),
            registry: reg,
        }
    }

    /// Creates a new mount's counters at zero, so that rates and alerts over them have data
    /// before the first event (a missing series is not a zero in PromQL).
    pub fn new_mount(&self, mount: &str) {
        self.listener_connects.with_label_values(&[mount]);
        self.listener_skips.with_label_values(&[mount]);
        self.source_received_bytes.with_label_values(&[mount]);
        self.metadata_updates.with_label_values(&[mount]);
        for why in Disconnect::ALL {
            self.listener_disconnects
                .with_label_values(&[mount, why.reason()]);
        }
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

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
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
