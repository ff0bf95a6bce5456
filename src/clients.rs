//! Who listens to a mount: one entry per listener, for the admin API's `listclients`,
//! `killclient` and `moveclients`.
//!
//! An entry is written when a listener joins a mount and removed when it leaves (both by the
//! listener's guard, in `conn`, above this module), so the table costs a lock per join and per
//! leave, which are rare next to the bytes sent, and nothing per write. What changes per write
//! (how far behind a listener is) stays with the worker that holds it; the admin API asks the
//! worker.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Listener ids come from one counter for the whole process: unique per server (and across
/// servers a test starts in one process), and never reused while a listener holds one.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh listener id.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// One listener as the admin API shows it.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    /// Stable for the connection's life, whichever mount it moves to.
    pub id: u64,
    pub peer: SocketAddr,
    /// As the player sent it, cut to a bounded length; empty if it sent none.
    pub user_agent: String,
    /// When it connected (not when it joined this mount, if it was moved).
    pub connected: Instant,
    /// The worker that holds it: where a kill or a move for it is sent.
    pub worker: usize,
    /// An edge's relay (it gave the relay credentials), not a listener.
    pub relay: bool,
}

/// A mount's HLS players, counted from their playlist polls: a player holds no connection
/// between requests, so a client (an address and a `User-Agent`) that fetched the playlist
/// within the last few target durations is taken to be playing. Behind a cache, the cache is one
/// client: the origin sees its polls, not its viewers'.
#[derive(Default)]
pub(crate) struct HlsSessions {
    /// When each client, by a hash of its address and `User-Agent`, last fetched the playlist.
    seen: Mutex<HashMap<u64, Instant>>,
}

/// Most HLS clients remembered per mount; past it, new ones are not counted. Bounds what a flood
/// of playlist requests from many addresses can make a mount hold.
const MAX_HLS_SESSIONS: usize = 1 << 20;

impl HlsSessions {
    /// A playlist poll by the client `key` at `now`; forgets those silent for `ttl`.
    pub fn poll(&self, key: u64, now: Instant, ttl: Duration) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_HLS_SESSIONS {
            seen.retain(|_, at| now.saturating_duration_since(*at) < ttl);
        }
        if seen.len() < MAX_HLS_SESSIONS {
            seen.insert(key, now);
        }
    }

    /// Clients that polled within `ttl` of `now`; the others are forgotten.
    pub fn count(&self, now: Instant, ttl: Duration) -> usize {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, at| now.saturating_duration_since(*at) < ttl);
        seen.len()
    }
}

/// Longest user agent kept: the table lives as long as the listeners, and a header can be 8 KiB.
const MAX_USER_AGENT_BYTES: usize = 256;

impl Client {
    pub fn new(id: u64, peer: SocketAddr, user_agent: Option<&str>, worker: usize) -> Self {
        let mut user_agent: String = user_agent
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        if user_agent.len() > MAX_USER_AGENT_BYTES {
            let mut end = MAX_USER_AGENT_BYTES;
            while !user_agent.is_char_boundary(end) {
                end -= 1;
            }
            user_agent.truncate(end);
        }
        Client {
            id,
            peer,
            user_agent,
            connected: Instant::now(),
            worker,
            relay: false,
        }
    }
}

/// A mount's listeners, by id (so they list in the order they came).
#[derive(Default)]
pub(crate) struct Clients {
    table: Mutex<BTreeMap<u64, Client>>,
}

impl Clients {
    pub fn join(&self, client: Client) {
        self.lock().insert(client.id, client);
    }

    pub fn leave(&self, id: u64) -> Option<Client> {
        self.lock().remove(&id)
    }

    pub fn get(&self, id: u64) -> Option<Client> {
        self.lock().get(&id).cloned()
    }

    pub fn list(&self) -> Vec<Client> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Client>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_entries_come_and_go() {
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let (a, b) = (next_id(), next_id());
        assert_ne!(a, b);
        let clients = Clients::default();
        clients.join(Client::new(a, peer, Some("mpv\n0.35"), 1));
        clients.join(Client::new(b, peer, Some(&"x".repeat(1000)), 0));
        assert_eq!(clients.get(a).unwrap().user_agent, "mpv0.35");
        assert_eq!(
            clients.get(b).unwrap().user_agent.len(),
            MAX_USER_AGENT_BYTES
        );
        assert_eq!(
            clients.list().iter().map(|c| c.id).collect::<Vec<_>>(),
            [a, b]
        );
        assert_eq!(clients.leave(a).unwrap().worker, 1);
        assert!(clients.get(a).is_none());
        assert_eq!(clients.list().len(), 1);
    }
}
