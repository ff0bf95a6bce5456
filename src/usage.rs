//! What a worker's listeners cost it: listener-seconds served, and CPU per listener per round.
//! Kept by the worker itself, with one child counter and histogram per worker, so nothing here is
//! shared between threads on the hot path.
//!
//! CPU per listener is then a ratio of two counters over the same window, in PromQL:
//! `rate(fanstream_thread_cpu_seconds_total)` over `rate(fanstream_listener_seconds_total)`. It is
//! exact whatever the listeners did in between, where dividing by a sampled listener gauge would
//! miss listeners who came and went between scrapes.

use std::time::{Duration, Instant};

use prometheus::{Counter, Histogram};

use crate::metrics::Metrics;
use crate::threads::clock_time;

pub(crate) struct WorkerUsage {
    listener_seconds: Counter,
    round_cpu_per_listener: Histogram,
    /// Listeners the worker has held since `since`.
    listeners: usize,
    since: Instant,
    /// The thread's CPU time after its previous round.
    cpu_after_last_round: Option<Duration>,
}

impl WorkerUsage {
    pub fn new(metrics: &Metrics, worker: &str) -> Self {
        WorkerUsage {
            listener_seconds: metrics.listener_seconds.with_label_values(&[worker]),
            round_cpu_per_listener: metrics.round_cpu_per_listener.with_label_values(&[worker]),
            listeners: 0,
            since: Instant::now(),
            cpu_after_last_round: None,
        }
    }

    /// Called on every pass of the fan-out loop, before it waits: credits the time since the
    /// previous pass to the listeners held then, and starts counting `listeners` from `now`.
    /// Listener counts change only while the loop runs, never while it waits, so the product is
    /// exact.
    pub fn pass(&mut self, now: Instant, listeners: usize) {
        let held = now.saturating_duration_since(self.since);
        if self.listeners > 0 {
            self.listener_seconds
                .inc_by(self.listeners as f64 * held.as_secs_f64());
        }
        self.listeners = listeners;
        self.since = now;
    }

    /// Called after each round with the listeners it served: one read of this thread's CPU clock
    /// (a syscall, so once per round and never per write). The CPU since the previous round
    /// includes admissions and unparked writes done in between: all of it is listeners' cost.
    /// A worker without listeners skips the read; its next round with listeners sets a new
    /// baseline.
    pub fn round_done(&mut self, listeners: usize) {
        if listeners == 0 {
            self.cpu_after_last_round = None;
            return;
        }
        let Some(cpu) = clock_time(libc::CLOCK_THREAD_CPUTIME_ID) else {
            return;
        };
        if let Some(prev) = self.cpu_after_last_round {
            let spent = cpu.saturating_sub(prev).as_secs_f64();
            self.round_cpu_per_listener
                .observe(spent / listeners as f64);
        }
        self.cpu_after_last_round = Some(cpu);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threads::ThreadRegistry;
    use std::sync::Arc;

    #[test]
    fn listener_seconds_credit_each_interval_to_the_listeners_held_during_it() {
        let metrics = Metrics::new(Arc::new(ThreadRegistry::default()));
        let mut usage = WorkerUsage::new(&metrics, "0");
        let t0 = usage.since;
        usage.pass(t0 + Duration::from_secs(5), 3); // nobody before: nothing credited
        usage.pass(t0 + Duration::from_secs(7), 1); // 3 listeners for 2 s
        usage.pass(t0 + Duration::from_secs(10), 0); // 1 listener for 3 s
        usage.pass(t0 + Duration::from_secs(60), 0);
        let total = metrics.listener_seconds.with_label_values(&["0"]).get();
        assert!((total - 9.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn round_cost_is_observed_per_listener_once_a_previous_round_exists() {
        let metrics = Metrics::new(Arc::new(ThreadRegistry::default()));
        let mut usage = WorkerUsage::new(&metrics, "0");
        usage.round_done(10);
        let h = metrics.round_cpu_per_listener.with_label_values(&["0"]);
        assert_eq!(h.get_sample_count(), 0, "the first round has no baseline");
        // Spend at least 5 ms of this thread's CPU (not of wall time: the machine may be shared).
        let cpu = || clock_time(libc::CLOCK_THREAD_CPUTIME_ID).unwrap();
        let start = cpu();
        while cpu() < start + Duration::from_millis(5) {
            std::hint::black_box(0u64);
        }
        usage.round_done(10);
        usage.round_done(0);
        usage.round_done(10);
        assert_eq!(
            h.get_sample_count(),
            1,
            "rounds without listeners are not observed, nor the first one after them"
        );
        let per_listener = h.get_sample_sum();
        assert!(
            (0.5e-3..0.1).contains(&per_listener),
            "5 ms over 10 listeners gave {per_listener} s each"
        );
    }
}
