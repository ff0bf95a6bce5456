//! The edges registered with this origin, for spill-over: an edge (`[master] register = true`)
//! says every `interval_secs` where listeners reach it and how many it holds of how many it
//! takes (`/admin/register`); when a mount here is full, admission redirects a new listener to
//! one of them with room, in turn (round-robin), instead of refusing it.
//!
//! An edge that falls silent for [`SILENT_INTERVALS`] of its intervals is forgotten: it has
//! stopped or lost the origin, and listeners sent there would find nothing. Between two
//! reports, each redirect counts against the room the edge last reported, so that an origin
//! does not send thousands of listeners to an edge that said it had room for ten.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An edge missing this many of its registrations in a row is forgotten.
pub(crate) const SILENT_INTERVALS: u32 = 3;
/// Edges remembered at most: registrations need the relay credentials, so this only bounds
/// a misconfigured fleet (an edge per container restart with a new URL each time).
const MAX_EDGES: usize = 1000;

/// What an edge says when it registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Registration {
    /// Where listeners reach it, `http(s)://host:port`; a redirect adds the mount's path.
    pub url: String,
    /// Listeners it holds now.
    pub listeners: usize,
    /// Listeners it takes at most.
    pub max_listeners: usize,
    /// How often it registers again.
    pub interval: Duration,
}

struct Edge {
    said: Registration,
    seen: Instant,
    /// Listeners redirected to it since its last report.
    sent: usize,
}

impl Edge {
    fn room(&self) -> usize {
        self.said
            .max_listeners
            .saturating_sub(self.said.listeners)
            .saturating_sub(self.sent)
    }

    fn silent(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.seen) > self.said.interval * SILENT_INTERVALS
    }
}

/// An edge as the status pages show it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct EdgeStatus {
    pub url: String,
    pub listeners: usize,
    pub max_listeners: usize,
    /// Listeners it may still be sent, as the origin reckons it (its report less the redirects
    /// since).
    pub room: usize,
    pub seconds_since_registered: u64,
}

/// The registered edges. Written by the admin API (registrations) and admission (redirects),
/// on any worker; a lock held for a scan of a short list.
#[derive(Default)]
pub(crate) struct Edges {
    table: Mutex<Vec<Edge>>,
    /// Where the next round-robin scan starts.
    next: AtomicUsize,
}

/// Why a registration was not taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooManyEdges;

impl Edges {
    fn table(&self, now: Instant) -> std::sync::MutexGuard<'_, Vec<Edge>> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.retain(|e| !e.silent(now));
        table
    }

    /// Takes an edge's report: a new edge, or news from one already known (by its URL).
    pub fn register(&self, said: Registration, now: Instant) -> Result<(), TooManyEdges> {
        let mut table = self.table(now);
        let known = table.iter().position(|e| e.said.url == said.url);
        let edge = Edge {
            said,
            seen: now,
            sent: 0,
        };
        match known {
            Some(i) => table[i] = edge,
            None if table.len() >= MAX_EDGES => return Err(TooManyEdges),
            None => table.push(edge),
        }
        Ok(())
    }

    /// The next edge with room, in turn, counted as sent one listener; None when none has room.
    pub fn pick(&self, now: Instant) -> Option<String> {
        let mut table = self.table(now);
        let n = table.len();
        let start = self.next.load(Ordering::Relaxed);
        let i = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| table[i].room() > 0)?;
        self.next.store(i + 1, Ordering::Relaxed);
        table[i].sent += 1;
        Some(table[i].said.url.clone())
    }

    /// Edges registered now.
    pub fn count(&self, now: Instant) -> usize {
        self.table(now).len()
    }

    pub fn list(&self, now: Instant) -> Vec<EdgeStatus> {
        self.table(now)
            .iter()
            .map(|e| EdgeStatus {
                url: e.said.url.clone(),
                listeners: e.said.listeners,
                max_listeners: e.said.max_listeners,
                room: e.room(),
                seconds_since_registered: now.saturating_duration_since(e.seen).as_secs(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(url: &str, listeners: usize, max: usize) -> Registration {
        Registration {
            url: url.into(),
            listeners,
            max_listeners: max,
            interval: Duration::from_secs(10),
        }
    }

    #[test]
    fn edges_with_room_are_picked_in_turn_and_full_ones_skipped() {
        let edges = Edges::default();
        let t = Instant::now();
        edges.register(said("http://a", 0, 100), t).unwrap();
        edges.register(said("http://full", 100, 100), t).unwrap();
        edges.register(said("http://b", 0, 100), t).unwrap();
        let picks: Vec<_> = (0..4).map(|_| edges.pick(t).unwrap()).collect();
        assert_eq!(picks, ["http://a", "http://b", "http://a", "http://b"]);
    }

    #[test]
    fn redirects_use_up_the_room_an_edge_reported_until_it_reports_again() {
        let edges = Edges::default();
        let t = Instant::now();
        edges.register(said("http://a", 8, 10), t).unwrap();
        assert!(edges.pick(t).is_some());
        assert!(edges.pick(t).is_some());
        assert_eq!(edges.pick(t), None, "its two places are taken");
        edges.register(said("http://a", 5, 10), t).unwrap();
        assert_eq!(edges.list(t)[0].room, 5);
        assert_eq!(edges.count(t), 1, "a report replaces the edge's last one");
    }

    #[test]
    fn a_silent_edge_is_forgotten_after_three_intervals() {
        let edges = Edges::default();
        let t = Instant::now();
        edges.register(said("http://a", 0, 10), t).unwrap();
        assert_eq!(edges.count(t + Duration::from_secs(30)), 1);
        assert_eq!(edges.count(t + Duration::from_secs(31)), 0);
        assert_eq!(edges.pick(t + Duration::from_secs(31)), None);
    }

    #[test]
    fn the_table_is_bounded() {
        let edges = Edges::default();
        let t = Instant::now();
        for i in 0..MAX_EDGES {
            edges
                .register(said(&format!("http://e{i}"), 0, 1), t)
                .unwrap();
        }
        assert_eq!(
            edges.register(said("http://one-more", 0, 1), t),
            Err(TooManyEdges)
        );
        // A known edge still reports.
        edges.register(said("http://e0", 1, 1), t).unwrap();
    }
}
