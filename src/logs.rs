//! Log lines that summarise. Refusals, head timeouts and connections closed at accept can come by
//! the ten thousand in a flood, and one line each buries everything else (and costs the server
//! a write per connection). So each reason gets its first few events of an interval in full,
//! with the peer; the rest are counted, and one summary line per reason per interval gives their
//! number and a sample peer. Metrics are not affected: counters count every event.
//!
//! Who calls what: `conn::refuse` and `conn::close_unanswered` ask [`Summaries::full`] before
//! logging an event; the acceptor thread calls [`Summaries::due`] every second and logs what it
//! returns.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Events of one reason logged in full per interval, before the rest are only counted.
pub(crate) const FULL_PER_INTERVAL: u32 = 5;
/// How often a reason with events held back gets its summary line.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

/// Per reason, what was logged and held back in the current interval.
pub(crate) struct Summaries {
    windows: Mutex<HashMap<&'static str, Window>>,
    full_per_interval: u32,
    interval: Duration,
}

struct Window {
    start: Instant,
    logged: u32,
    held: u64,
    sample: Option<SocketAddr>,
}

/// One summary line: `count` events of `reason` were not logged over the last `over`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Summary {
    pub reason: &'static str,
    pub count: u64,
    pub sample: SocketAddr,
    pub over: Duration,
}

impl Default for Summaries {
    fn default() -> Self {
        Summaries::new(FULL_PER_INTERVAL, INTERVAL)
    }
}

impl Summaries {
    pub fn new(full_per_interval: u32, interval: Duration) -> Self {
        Summaries {
            windows: Mutex::new(HashMap::new()),
            full_per_interval,
            interval,
        }
    }

    /// Whether this event is to be logged in full; if not, it is counted for the summary.
    pub fn full(&self, reason: &'static str, peer: SocketAddr, now: Instant) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let w = windows.entry(reason).or_insert(Window {
            start: now,
            logged: 0,
            held: 0,
            sample: None,
        });
        if w.logged < self.full_per_interval {
            w.logged += 1;
            return true;
        }
        w.held += 1;
        w.sample.get_or_insert(peer);
        false
    }

    /// The summaries of the intervals that ended by `now`. A reason that had events held back
    /// stays quiet for the next interval too (summary only), so a storm lasting minutes costs
    /// one line per interval; after an interval without any, it is logged in full again.
    pub fn due(&self, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let interval = self.interval;
        let quiet = self.full_per_interval;
        windows.retain(|&reason, w| {
            let over = now.saturating_duration_since(w.start);
            if over < interval {
                return true;
            }
            let Some(sample) = w.sample.filter(|_| w.held > 0) else {
                return false;
            };
            out.push(Summary {
                reason,
                count: w.held,
                sample,
                over,
            });
            *w = Window {
                start: now,
                logged: quiet,
                held: 0,
                sample: None,
            };
            true
        });
        out.sort_by_key(|s| s.reason);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_first_few_are_logged_in_full_then_one_summary_per_interval_counts_the_rest() {
        let s = Summaries::new(5, Duration::from_secs(10));
        let t0 = Instant::now();
        let full: Vec<bool> = (0..1000)
            .map(|i| {
                s.full(
                    "header_timeout",
                    peer(i),
                    t0 + Duration::from_millis(i as u64),
                )
            })
            .collect();
        assert!(full[..5].iter().all(|&f| f));
        assert!(full[5..].iter().all(|&f| !f));
        assert!(s.due(t0 + Duration::from_secs(9)).is_empty(), "not yet");
        let due = s.due(t0 + Duration::from_secs(10));
        assert_eq!(
            due,
            [Summary {
                reason: "header_timeout",
                count: 995,
                sample: peer(5),
                over: Duration::from_secs(10),
            }]
        );
        assert!(
            s.due(t0 + Duration::from_secs(11)).is_empty(),
            "one line per interval"
        );
    }

    #[test]
    fn a_storm_that_goes_on_is_summarised_only_and_a_quiet_interval_restores_full_lines() {
        let s = Summaries::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        for _ in 0..3 {
            s.full("workers_full", peer(1), at(0));
        }
        assert_eq!(s.due(at(10)).len(), 1);
        // The storm goes on: no full line in the next interval, one summary at its end.
        assert!(!s.full("workers_full", peer(2), at(11)));
        assert!(!s.full("workers_full", peer(3), at(12)));
        let due = s.due(at(20));
        assert_eq!((due.len(), due[0].count, due[0].sample), (1, 2, peer(2)));
        // A quiet interval ends summary mode.
        assert!(s.due(at(30)).is_empty());
        assert!(s.full("workers_full", peer(4), at(31)));
    }

    #[test]
    fn reasons_are_counted_apart_and_an_interval_with_nothing_held_says_nothing() {
        let s = Summaries::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(s.full("bad_path", peer(1), t0));
        assert!(s.full("unknown_mount", peer(2), t0));
        assert!(!s.full("bad_path", peer(3), t0));
        let due = s.due(t0 + Duration::from_secs(10));
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].reason, due[0].count), ("bad_path", 1));
        assert!(s.full("unknown_mount", peer(4), t0 + Duration::from_secs(10)));
    }
}
