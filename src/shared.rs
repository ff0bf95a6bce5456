//! The state every thread shares, and how a thread learns that the server is stopping.
//!
//! Channels between stages are not here: `server.rs` creates each one and hands its ends to the
//! stages that use them, so this file names no stage's types.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::{watch, Notify};

use crate::access_log::AccessLog;
use crate::auth::AuthFailures;
use crate::config::Config;
use crate::edges::Edges;
use crate::heads::Heads;
use crate::listener_auth::ListenerAuth;
use crate::logs::Summaries;
use crate::metrics::Metrics;
use crate::mounts::{Mount, Mounts, OnWorker};

/// How the server should be running; sent to every thread through a `watch` channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// Stop accepting, give listeners `shutdown_grace_secs` to receive what is pending, then close.
    Drain,
    /// Close everything at once.
    Now,
}

/// Resolves when the server is asked to stop, with how.
pub(crate) async fn stopped(stop: &mut watch::Receiver<Stop>) -> Stop {
    loop {
        let now = *stop.borrow_and_update();
        if now != Stop::Running {
            return now;
        }
        if stop.changed().await.is_err() {
            return Stop::Now;
        }
    }
}

/// A flag set once, which threads can wait for.
#[derive(Default)]
pub(crate) struct Latch {
    set: AtomicBool,
    notify: Notify,
}

impl Latch {
    pub fn set(&self) {
        self.set.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Resolves once the latch is set.
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before the flag is read: a `set` in between still wakes it.
        notified.as_mut().enable();
        if !self.set.load(Ordering::SeqCst) {
            notified.await;
        }
    }
}

/// Looks with `look` now and again each time `changed` is notified, until it finds what it looks
/// for (then `Some`), or until `deadline` (then `None`). `changed` must be notified with
/// `notify_waiters` after each change `look` can see is published.
pub(crate) async fn wait_until<T>(
    changed: &Notify,
    deadline: tokio::time::Instant,
    mut look: impl FnMut() -> Option<T>,
) -> Option<T> {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        // Registered before the look: a change published after it still wakes this wait.
        notified.as_mut().enable();
        if let Some(found) = look() {
            return Some(found);
        }
        tokio::time::timeout_at(deadline, notified).await.ok()?;
    }
}

/// One worker as the other threads see it.
#[derive(Default)]
pub(crate) struct WorkerLink {
    /// Wakes the worker's intake after the acceptor sent it a socket. A `Notify` keeps one permit
    /// when the worker is busy, so no hand-off is missed and bursts cost one wake-up.
    pub conns_ready: Notify,
    /// Wakes the worker's fan-out after ingest published on a mount it has listeners of, with
    /// something for them to do: at most one cross-thread wake-up per worker per publication,
    /// however many listeners it serves.
    pub data_ready: Notify,
    /// The mounts published on since the worker last looked, each once (see
    /// [`crate::mounts::OnWorker::queued`]). Pushed by ingest, drained by the worker.
    pub published: Mutex<Vec<Arc<Mount>>>,
    /// Connections the worker holds now (handshaking or listening): the acceptor's placement key,
    /// and summed, what it holds against `max_connections`. Incremented by the acceptor before
    /// the hand-off, decremented by the connection's guard (a source's, when ingest takes it).
    pub connections: AtomicUsize,
}

/// State every thread shares.
pub(crate) struct Shared {
    /// Settings, resolved (the source password is always set); replaced whole on reload.
    pub config: ArcSwap<Config>,
    /// Wakes ingest after `config` was replaced, so that it publishes each mount's new settings
    /// with its stream (readers take a mount's settings from its snapshot, never from `config`).
    pub config_changed: Notify,
    /// Connections the listener port may hold (`Config::connection_limit`, fixed at start-up):
    /// past it the acceptor waits for room.
    pub max_connections: usize,
    /// Connections on the listener port that have not sent their request head yet: counted per
    /// address, and the oldest idle one is what the acceptor closes to make room at the limit.
    pub heads: Arc<Heads>,
    /// Which log lines about refused and closed connections are written in full, and the
    /// summaries of the rest.
    pub logs: Summaries,
    /// Open connections per client address, kept only when `max_connections_per_ip` is set.
    /// Incremented by the acceptor, decremented by the connection's guard.
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Wakes the acceptor when a connection closes while it waits for room.
    pub room: Notify,
    /// Failed logins per address: the brake on password guessing.
    pub auth_failures: AuthFailures,
    /// Each `intro_file` of the config, as read at start-up or at the last reload (MP3 trimmed
    /// to whole frames, Ogg to whole pages).
    pub intros: ArcSwap<HashMap<PathBuf, Bytes>>,
    /// Listener authentication's turns and users files.
    pub listener_auth: ListenerAuth,
    pub mounts: Mounts,
    pub metrics: Metrics,
    pub workers: Vec<WorkerLink>,
    /// Listeners connected now, across mounts: admission checks it against `max_listeners`.
    pub listeners_total: AtomicUsize,
    pub stop: watch::Receiver<Stop>,
    /// Ingest has stopped publishing: on `Drain`, workers flush their listeners after it, so
    /// that what ingest read before the stop reaches them whatever order the threads saw it in.
    pub ingest_stopped: Latch,
    /// When the server started, on the wall clock (status pages show it).
    pub started: SystemTime,
    /// Where listeners connect (status pages build listen URLs with its port).
    pub listen_addr: SocketAddr,
    /// The TLS certificate and settings new handshakes use, when there is a TLS port; replaced
    /// whole on `SIGHUP`, so a connection's handshake sees one or the other.
    pub tls: Option<ArcSwap<rustls::ServerConfig>>,
    /// Finished requests and listeners, to the access log's writer (when `access_log` is set).
    pub access_log: AccessLog,
    /// Relays that pull only while listened to: admission asks one to connect when a listener
    /// comes for its mount.
    pub on_demand: OnDemand,
    /// Woken by ingest with every mount's [`Mount::source_changed`], and after a reload (which
    /// may give a mount without a source a fallback), never for stream data: a listener waiting
    /// in admission for an on-demand relay's mount looks again, at a mount that may not exist
    /// yet and at its fallbacks.
    pub mounts_changed: Notify,
    /// The edges registered with this server (`/admin/register`): where admission sends the
    /// listeners of a full mount.
    pub edges: Edges,
}

/// The on-demand relays, by mount. Registered by the relays thread, asked by admission.
#[derive(Default)]
pub(crate) struct OnDemand {
    relays: Mutex<HashMap<String, Arc<Demand>>>,
}

/// What wakes one on-demand relay.
#[derive(Default)]
pub(crate) struct Demand {
    /// Notified when a listener asks for the mount; keeps one permit when the relay is busy.
    pub wake: Notify,
    /// When a listener last asked: the relay stays connected a while after, so that the
    /// listener waiting in admission finds the mount live.
    asked: Mutex<Option<Instant>>,
}

impl OnDemand {
    /// Registers the relay of `mount`; it waits on what this returns.
    pub fn register(&self, mount: &str) -> Arc<Demand> {
        let demand = Arc::new(Demand::default());
        self.lock().insert(mount.to_string(), demand.clone());
        demand
    }

    /// Unregisters `demand`, if it is still the one registered for `mount`: a relay restarted by
    /// a reload registers anew before the old one's task is dropped.
    pub fn unregister(&self, mount: &str, demand: &Arc<Demand>) {
        let mut relays = self.lock();
        if relays.get(mount).is_some_and(|d| Arc::ptr_eq(d, demand)) {
            relays.remove(mount);
        }
    }

    /// Asks the relay of `mount` to pull; false if no on-demand relay feeds it.
    pub fn ask(&self, mount: &str) -> bool {
        let Some(demand) = self.lock().get(mount).cloned() else {
            return false;
        };
        *demand.asked.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        demand.wake.notify_one();
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Demand>>> {
        self.relays.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Demand {
    /// A listener asked within `within`.
    pub fn asked_within(&self, within: Duration) -> bool {
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < within)
    }
}

impl Shared {
    /// Connections the listener port holds now, across workers.
    pub fn open_connections(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.connections.load(Ordering::Relaxed))
            .sum()
    }

    /// Called by ingest after it published stream data on `mount`, up to `end`: queues the mount
    /// for, and wakes, each worker with listeners of it that have something to do by then.
    pub fn published(&self, mount: &Arc<Mount>, end: u64) {
        self.queue(mount, |on| end >= on.wake_at.load(Ordering::SeqCst));
    }

    /// Called by ingest after `mount`'s source state or settings changed: every worker with
    /// listeners of it must act on that, whatever their stream position, and whoever waits for
    /// a source looks again.
    pub fn changed(&self, mount: &Arc<Mount>) {
        self.queue(mount, |_| true);
        self.wake_source_waiters(mount);
    }

    /// Called by ingest once a snapshot with a new source state for `mount` is published: by
    /// `changed`, and after a source took the mount (created it, or came back to it), where
    /// workers are not queued since their listeners wait for the source's first publication.
    /// Wakes whoever waits for a source, there or at any mount.
    pub fn wake_source_waiters(&self, mount: &Mount) {
        mount.source_changed.notify_waiters();
        self.mounts_changed.notify_waiters();
    }

    /// Queues `mount` for worker `worker` and wakes it, unless it is queued there already. Ingest
    /// does so after a publication ([`Shared::published`]); a worker for itself, when the stream
    /// passed its shard's new threshold while it served the mount, to serve it at its loop's
    /// next turn.
    pub fn queue_for(&self, mount: &Arc<Mount>, worker: usize) {
        if !mount.on_workers[worker].queued.swap(true, Ordering::SeqCst) {
            let link = &self.workers[worker];
            link.published
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(mount.clone());
            link.data_ready.notify_one();
        }
    }

    fn queue(&self, mount: &Arc<Mount>, due: impl Fn(&OnWorker) -> bool) {
        // Pairs with the fence a worker puts between publishing its shard's `wake_at` and loading
        // the stream's end: either the worker sees this publication, or this sees its threshold.
        fence(Ordering::SeqCst);
        for (worker, on) in mount.on_workers.iter().enumerate() {
            if on.shard.load(Ordering::SeqCst) != 0 && due(on) {
                self.queue_for(mount, worker);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Wake, Waker};

    /// A waker that records that it was woken.
    #[derive(Default)]
    struct Woken(AtomicBool);

    impl Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    fn far_ahead() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(3600)
    }

    // The wait is polled by hand and the runtime never runs its timers in between, so only the
    // notification can wake it: a wait that looked again after a sleep would stay asleep.
    #[test]
    fn a_wait_is_woken_by_the_change_not_by_a_timer() {
        runtime().block_on(async {
            let changed = Notify::new();
            let live = AtomicBool::new(false);
            let wait = wait_until(&changed, far_ahead(), || {
                live.load(Ordering::SeqCst).then_some(())
            });
            tokio::pin!(wait);
            let woken = Arc::new(Woken::default());
            let waker = Waker::from(woken.clone());
            let mut cx = Context::from_waker(&waker);
            assert!(wait.as_mut().poll(&mut cx).is_pending());
            assert!(!woken.0.load(Ordering::SeqCst));
            live.store(true, Ordering::SeqCst);
            changed.notify_waiters();
            assert!(woken.0.load(Ordering::SeqCst), "the change woke the wait");
            assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(Some(())));
        });
    }

    // Ingest may publish and notify after a look found nothing and before the wait awaits: the
    // wait, registered before it looked, is already woken and looks again at once.
    #[test]
    fn a_change_between_the_look_and_the_await_is_not_missed() {
        runtime().block_on(async {
            let changed = Notify::new();
            let live = AtomicBool::new(false);
            let look = || {
                let found = live.load(Ordering::SeqCst);
                if !found {
                    live.store(true, Ordering::SeqCst);
                    changed.notify_waiters();
                }
                found.then_some(())
            };
            let wait = wait_until(&changed, far_ahead(), look);
            tokio::pin!(wait);
            let waker = Waker::from(Arc::new(Woken::default()));
            let mut cx = Context::from_waker(&waker);
            assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(Some(())));
        });
    }

    #[test]
    fn a_wait_gives_up_at_its_deadline() {
        runtime().block_on(async {
            let changed = Notify::new();
            let looks = AtomicUsize::new(0);
            let deadline = tokio::time::Instant::now();
            let found = wait_until(&changed, deadline, || {
                looks.fetch_add(1, Ordering::SeqCst);
                None::<()>
            })
            .await;
            assert_eq!(found, None);
            assert_eq!(looks.load(Ordering::SeqCst), 1, "looked once, then gave up");
        });
    }
}
