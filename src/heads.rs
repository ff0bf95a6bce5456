//! Request heads not read yet, in the order their connections were accepted. Two defences against
//! a flood of idle connections rest on them:
//!
//! - `max_pending_heads_per_ip`: one address may hold only so many connections that have not
//!   sent their head. Listeners and sources past their handshake are not counted, so thousands of
//!   players behind one NAT are not limited, while one host opening idle connections is.
//! - At the connection limit, the oldest head still missing after a short while is closed to make
//!   room for a newcomer (nginx likewise closes idle keep-alive connections when it runs out):
//!   a client sends its head with its connection, so an encoder or a player coming back takes the
//!   slot of an idle connection instead of waiting in the kernel backlog behind a storm.
//!
//! Who counts: [`Heads::enter`] (the acceptor, or the admin listener for its own instance) counts
//! a head in and returns its [`Pending`]; dropping the `Pending` (the connection's task, once the
//! head is read or the connection ends) counts it out. [`Heads::evict_oldest`] only asks the
//! head's task to close; the head counts until that task drops its `Pending`.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

const PENDING: u8 = 0;
const DONE: u8 = 1;
const EVICTED: u8 = 2;

/// The pending heads of one listening port.
#[derive(Default)]
pub(crate) struct Heads {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// In accept order, so the front is the oldest; entries whose head is done are dropped when
    /// they reach the front, or all at once when they outnumber the pending ones.
    queue: VecDeque<Arc<Head>>,
    per_ip: HashMap<IpAddr, usize>,
    pending: usize,
}

struct Head {
    accepted: Instant,
    ip: IpAddr,
    state: AtomicU8,
    /// Tells the head's task, on a worker thread, that its connection is to close.
    evict: Notify,
}

/// One connection's head while it is being read; counted until dropped.
pub(crate) struct Pending {
    heads: Arc<Heads>,
    head: Arc<Head>,
}

/// How a port at its connection limit makes room: a newcomer takes the place of the oldest
/// connection that has sent no head for `min_age`, with at most `in_flight` such replacements
/// still closing.
#[derive(Clone, Copy)]
pub(crate) struct Replace {
    pub min_age: Duration,
    pub in_flight: usize,
}

/// Resolves when a slot frees (`room` is notified) or at `until`, whichever comes first.
pub(crate) async fn room_or(room: &Notify, until: Option<Instant>) {
    match until {
        Some(at) => {
            let _ = tokio::time::timeout_at(at.into(), room.notified()).await;
        }
        None => room.notified().await,
    }
}

impl Heads {
    /// Counts a new connection's head in; `None` when its address already has `per_ip_limit`
    /// heads pending (0: no limit).
    pub fn enter(
        self: &Arc<Self>,
        ip: IpAddr,
        per_ip_limit: usize,
        now: Instant,
    ) -> Option<Pending> {
        let mut inner = self.lock();
        let n = inner.per_ip.entry(ip).or_insert(0);
        if per_ip_limit > 0 && *n >= per_ip_limit {
            return None;
        }
        *n += 1;
        inner.pending += 1;
        let head = Arc::new(Head {
            accepted: now,
            ip,
            state: AtomicU8::new(PENDING),
            evict: Notify::new(),
        });
        inner.queue.push_back(head.clone());
        Some(Pending {
            heads: self.clone(),
            head,
        })
    }

    /// Whether a head has been pending for `min_age`; if not, when the oldest will have been
    /// (`None`: no head is pending).
    pub fn oldest_idle(&self, min_age: Duration, now: Instant) -> Result<(), Option<Instant>> {
        let mut inner = self.lock();
        inner.trim_front();
        match inner.queue.front() {
            None => Err(None),
            Some(h) if now.saturating_duration_since(h.accepted) >= min_age => Ok(()),
            Some(h) => Err(Some(h.accepted + min_age)),
        }
    }

    /// At a port's connection limit with `open` connections: Ok when a newcomer may be accepted
    /// now in place of the oldest head pending for `replace.min_age`, else when to look again
    /// (None: only once a slot frees). Replacements not yet closed count against
    /// `replace.in_flight`, so descriptors never exceed the limit by more than that.
    pub fn room_by_replacing(
        &self,
        replace: Replace,
        open: usize,
        limit: usize,
        now: Instant,
    ) -> Result<(), Option<Instant>> {
        if open >= limit + replace.in_flight {
            return Err(None);
        }
        self.oldest_idle(replace.min_age, now)
    }

    /// Asks the oldest head pending for `min_age` or more to close; false if there is none.
    pub fn evict_oldest(&self, min_age: Duration, now: Instant) -> bool {
        let mut inner = self.lock();
        loop {
            inner.trim_front();
            let Some(h) = inner.queue.front() else {
                return false;
            };
            if now.saturating_duration_since(h.accepted) < min_age {
                return false;
            }
            let h = inner.queue.pop_front().expect("front exists");
            // Loses only to the head's own task marking it done: then try the next one.
            if h.state
                .compare_exchange(PENDING, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                h.evict.notify_one();
                return true;
            }
        }
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.lock().pending
    }

    fn leave(&self, head: &Head) {
        if head.state.swap(DONE, Ordering::AcqRel) == DONE {
            return;
        }
        let mut inner = self.lock();
        inner.pending -= 1;
        if let Some(n) = inner.per_ip.get_mut(&head.ip) {
            *n -= 1;
            if *n == 0 {
                inner.per_ip.remove(&head.ip);
            }
        }
        inner.trim_front();
        // One slow head at the front would otherwise keep every later finished one queued.
        if inner.queue.len() > 2 * inner.pending + 1024 {
            inner
                .queue
                .retain(|h| h.state.load(Ordering::Acquire) == PENDING);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn trim_front(&mut self) {
        while self
            .queue
            .front()
            .is_some_and(|h| h.state.load(Ordering::Acquire) != PENDING)
        {
            self.queue.pop_front();
        }
    }
}

impl Pending {
    /// Resolves once the head was chosen to close to make room.
    pub async fn evicted(&self) {
        self.head.evict.notified().await
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.heads.leave(&self.head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn an_address_holds_at_most_its_limit_of_pending_heads_and_done_ones_free_their_place() {
        let heads = Arc::new(Heads::default());
        let now = Instant::now();
        let held: Vec<Pending> = (0..3)
            .map(|_| heads.enter(ip(1), 3, now).unwrap())
            .collect();
        assert!(heads.enter(ip(1), 3, now).is_none());
        let other = heads
            .enter(ip(2), 3, now)
            .expect("another address is not limited");
        assert!(heads.enter(ip(1), 0, now).is_some(), "0 is no limit");
        drop(held);
        assert!(heads.enter(ip(1), 3, now).is_some());
        drop(other);
        assert_eq!(heads.pending(), 0);
    }

    #[tokio::test]
    async fn the_oldest_idle_head_is_evicted_once_old_enough_and_finished_ones_are_skipped() {
        let heads = Arc::new(Heads::default());
        let t0 = Instant::now();
        let min = Duration::from_millis(250);
        assert_eq!(heads.oldest_idle(min, t0), Err(None));
        let first = heads.enter(ip(1), 0, t0).unwrap();
        let second = heads
            .enter(ip(2), 0, t0 + Duration::from_millis(10))
            .unwrap();
        let third = heads
            .enter(ip(3), 0, t0 + Duration::from_millis(20))
            .unwrap();
        assert_eq!(heads.oldest_idle(min, t0), Err(Some(t0 + min)));
        assert!(!heads.evict_oldest(min, t0 + Duration::from_millis(100)));
        drop(first); // its head arrived: no longer a candidate
        let later = t0 + Duration::from_secs(1);
        assert!(heads.evict_oldest(min, later));
        second.evicted().await;
        assert_eq!(heads.pending(), 2, "counted until its task lets go");
        drop(second);
        assert_eq!(heads.oldest_idle(min, later), Ok(()));
        assert!(heads.evict_oldest(min, later));
        third.evicted().await;
        drop(third);
        assert!(!heads.evict_oldest(min, later));
        assert_eq!(heads.pending(), 0);
    }
}
