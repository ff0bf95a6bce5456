//! Every fanstream thread starts here: named, optionally pinned to a core, and registered so that
//! its CPU time can be read at scrape time from the kernel's per-thread clock.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Threads alive now, with their CPU clocks; read by the metrics collector.
#[derive(Default)]
pub(crate) struct ThreadRegistry {
    threads: Mutex<Vec<(String, libc::clockid_t)>>,
}

impl ThreadRegistry {
    /// CPU time consumed so far by each registered thread, by name.
    pub fn cpu_times(&self) -> Vec<(String, Duration)> {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads
            .iter()
            .filter_map(|(name, clock)| clock_time(*clock).map(|t| (name.clone(), t)))
            .collect()
    }

    fn register(&self, name: &str) -> Option<libc::clockid_t> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self() is always a valid handle for the calling thread, and `clock` is
        // a valid out-pointer for the duration of the call.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        if rc != 0 {
            tracing::warn!(
                thread = name,
                rc,
                "no CPU clock for thread; its CPU is not exported"
            );
            return None;
        }
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.push((name.to_string(), clock));
        Some(clock)
    }

    fn unregister(&self, clock: libc::clockid_t) {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|(_, c)| *c != clock);
    }
}

/// Reads one CPU clock; None if the thread is gone.
pub(crate) fn clock_time(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; an invalid clock id yields an error return, not UB.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Spawns a named thread (at most 15 bytes, the kernel's limit), pins it to `core` if given, and
/// registers it for CPU accounting while it runs.
pub(crate) fn spawn<F, T>(
    name: &str,
    core: Option<core_affinity::CoreId>,
    registry: &Arc<ThreadRegistry>,
    f: F,
) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    debug_assert!(name.len() <= 15, "thread name {name:?} is over 15 bytes");
    let registry = registry.clone();
    let label = name.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(core) = core {
                if !core_affinity::set_for_current(core) {
                    tracing::warn!(thread = %label, core = core.id, "could not pin thread to core");
                }
            }
            let clock = registry.register(&label);
            let out = f();
            if let Some(clock) = clock {
                registry.unregister(clock);
            }
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_threads_report_cpu_and_leave_on_exit() {
        let reg = Arc::new(ThreadRegistry::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = spawn("fs-test", None, &reg, move || {
            let start = std::time::Instant::now();
            let mut x = 0u64;
            while start.elapsed() < Duration::from_millis(30) {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            tx.send(x).unwrap();
            done_rx.recv().unwrap();
        })
        .unwrap();
        rx.recv().unwrap();
        let times = reg.cpu_times();
        assert_eq!(times.len(), 1);
        assert_eq!(times[0].0, "fs-test");
        assert!(times[0].1 >= Duration::from_millis(5), "{:?}", times[0].1);
        done_tx.send(()).unwrap();
        h.join().unwrap();
        assert!(reg.cpu_times().is_empty());
    }
}
