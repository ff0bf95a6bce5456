//! Every fanstream thread starts here: named, optionally pinned to a core, and registered so that
//! its CPU time can be read at scrape time from the kernel's per-thread clock. A thread that exits
//! leaves its CPU time behind, so the counters stay monotonic.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Every thread started so far, with its CPU clock while it runs; read by the metrics collector.
#[derive(Default)]
pub(crate) struct ThreadRegistry {
    threads: Mutex<Vec<Entry>>,
}

/// One thread name's CPU account.
struct Entry {
    name: String,
    /// The running thread's clock; None once it exited.
    clock: Option<libc::clockid_t>,
    /// CPU used by earlier threads of this name, which exited. Kept so that the exported counter
    /// never goes down: a series that vanished or restarted from zero would read as a reset, and
    /// a sum over threads would drop the work they did.
    retired: Duration,
}

impl ThreadRegistry {
    /// CPU time consumed so far by the threads of each name.
    pub fn cpu_times(&self) -> Vec<(String, Duration)> {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads
            .iter()
            .map(|e| {
                let running = e.clock.and_then(clock_time).unwrap_or_default();
                (e.name.clone(), e.retired + running)
            })
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
        match threads
            .iter_mut()
            .find(|e| e.name == name && e.clock.is_none())
        {
            Some(e) => e.clock = Some(clock),
            None => threads.push(Entry {
                name: name.to_string(),
                clock: Some(clock),
                retired: Duration::ZERO,
            }),
        }
        Some(clock)
    }

    /// Called by the thread itself just before it exits, while its clock is still valid: its
    /// final CPU time is kept under its name.
    fn unregister(&self, clock: libc::clockid_t) {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = threads.iter_mut().find(|e| e.clock == Some(clock)) {
            e.retired += clock_time(clock).unwrap_or_default();
            e.clock = None;
        }
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
    fn registered_threads_report_cpu_and_keep_it_after_exit() {
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
        let after = reg.cpu_times();
        assert_eq!(after.len(), 1);
        assert!(after[0].1 >= times[0].1, "{after:?} went below {times:?}");

        // A new thread of the same name adds to the same account.
        let h = spawn("fs-test", None, &reg, || {
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_millis(10) {
                std::hint::black_box(0u64);
            }
        })
        .unwrap();
        h.join().unwrap();
        let again = reg.cpu_times();
        assert_eq!(again.len(), 1);
        assert!(again[0].1 > after[0].1, "{again:?} not above {after:?}");
    }
}
