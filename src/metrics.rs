//! Prometheus metrics, in one owned registry so that servers started by tests stay apart.
//!
//! Labels come only from bounded sets: worker index, mount path (declared or admitted by a source),
//! reason, thread name. Nothing is labelled per listener or per address. Hot-path counters are
//! resolved to their label child once per worker (or per worker and mount), so a write touches
//! one uncontended atomic.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    CounterVec, Encoder, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::threads::ThreadRegistry;

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
    /// Write syscalls to listeners, by worker.
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
    /// Requests refused, by reason.
    pub rejected_requests: IntCounterVec,
    /// Panics caught (bugs), by where: `request` or `listener`.
    pub panics: IntCounterVec,
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

impl Metrics {
    pub fn new(threads: Arc<ThreadRegistry>) -> Metrics {
        let reg = Registry::new();
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        reg.register(Box::new(pc))
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
                &["worker"],
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
            registry: reg,
        }
    }

    pub fn reject(&self, reason: &str) -> IntCounter {
        let c = self.rejected_requests.with_label_values(&[reason]);
        c.inc();
        c
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
