//! The acceptor thread: accepts TCP connections and places each on the least-loaded worker.
//!
//! It never reads from a socket, so a slow client cannot hold it up. What it enforces, cheapest
//! first:
//! - `max_pending_heads_per_ip`: a connection from an address that already has that many
//!   connections still sending their request head is closed at once, unanswered, unless its
//!   head has already arrived: it cost one `accept`, and answering reliably would mean reading
//!   its head first (closing with unread bytes resets the connection, answer included).
//! - `max_connections`: at the limit it stops calling `accept()` (the kernel's backlog holds
//!   newcomers instead of the process running out of descriptors), except to take in a newcomer
//!   in place of a connection that has sent no head for [`REPLACE`] (see
//!   [`crate::heads`]). It resumes once a margin of slots is free (1% of the limit), so a storm
//!   is not one pause per slot freed. An episode ends only once the acceptor has kept accepting
//!   for [`SETTLE`]: a backlog of hundreds refills the margin in milliseconds, and that is the
//!   same storm. Each episode is counted and logged once.
//! - Above [`PRESSURE_PERCENT`] of the limit, newcomers get `header_timeout_under_pressure_secs`
//!   instead of `header_timeout_secs`, so idle connections clear in seconds.
//!
//! Accept errors are sorted: a connection reset before we took it is skipped; running out of
//! file descriptors backs off for a while instead of spinning on an error that will not clear
//! until something closes. This thread also writes the log summaries ([`crate::logs`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Sender;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

use crate::conn::{canonical, close_unanswered, Accepted, ConnGuard};
use crate::heads::{room_or, Replace};
use crate::reasons::Unanswered;
use crate::shared::{stopped, Shared};

/// How long to pause accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);
/// At the limit, a connection silent for 250 ms may be closed to make room: a client sends its
/// head with its connection, so one still silent after this (and after its worker had time to
/// read it, on a loaded machine) is idle or far too slow to serve. At most 32 such replacements
/// may still be closing on their workers: that bounds the descriptors replacing takes, within the
/// reserve.
const REPLACE: Replace = Replace {
    min_age: Duration::from_millis(250),
    in_flight: 32,
};
/// A pause within this time of the last resume continues the same episode (see [`Gate`]).
const SETTLE: Duration = Duration::from_secs(1);
/// Above this share of `max_connections`, newcomers get the short head timeout.
const PRESSURE_PERCENT: usize = 80;
/// How often held-back log lines are summarised (each reason at most once per interval).
const SUMMARY_TICK: Duration = Duration::from_secs(1);

/// Accepts on `listen_socket` until the server stops, handing each connection to a worker
/// through `workers` (one sender per worker, in the order of `shared.workers`).
pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    listen_socket: std::net::TcpListener,
    tls_socket: Option<std::net::TcpListener>,
    workers: Vec<Sender<Accepted>>,
) {
    rt.block_on(async move {
        let registered = TcpListener::from_std(listen_socket)
            .and_then(|l| Ok((l, tls_socket.map(TcpListener::from_std).transpose()?)));
        let (listen_socket, tls_socket) = match registered {
            Ok(both) => both,
            Err(e) => {
                tracing::error!(error = %e, "acceptor cannot register its listening socket");
                return;
            }
        };
        tokio::spawn(write_summaries(shared.clone()));
        let mut stop = shared.stop.clone();
        let limit = shared.max_connections;
        let mut gate = Gate::new(limit);
        // A storm that comes in waves is one episode per wave: past the first few, they are
        // summarised like refusals, and an episode's end is logged only if its start was.
        let mut pause_logged = false;
        // The most newcomers the kernel's backlog held when accepting resumed in this episode.
        let mut waiting = None;
        loop {
            let now = Instant::now();
            let open = shared.open_connections();
            match gate.update(open, now) {
                Some(Change::Paused) => {
                    waiting = None;
                    let full = Unanswered::WorkersFull;
                    shared.metrics.unanswered(full);
                    pause_logged = shared.logs.full(full.reason(), shared.listen_addr, now);
                    if pause_logged {
                        tracing::warn!(
                            limit,
                            "connection limit reached: newcomers wait in the kernel backlog or replace connections idle without a request head"
                        );
                    }
                }
                Some(Change::Resumed) => waiting = waiting.max(accept_queue(&listen_socket)),
                Some(Change::Ended { after, replaced }) if pause_logged => tracing::info!(
                    at_limit_secs = format!("{:.1}", after.as_secs_f64()),
                    replaced,
                    waiting,
                    "room again: accepting"
                ),
                Some(Change::Ended { .. }) | None => {}
            }
            if gate.paused() {
                if let Err(until) = shared.heads.room_by_replacing(REPLACE, open, limit, now) {
                    tokio::select! {
                        _ = stopped(&mut stop) => break,
                        () = room_or(&shared.room, until) => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = stopped(&mut stop) => break,
                // While paused, a slot freed may end the pause, or nobody is coming: look again.
                _ = shared.room.notified(), if gate.paused() => {}
                // Accepting again, the episode ends once it has settled, whether or not anyone
                // connects meanwhile.
                () = settled(gate.settles_at()) => {}
                // Both ports count against the same limits and feed the same workers; a TLS
                // connection's handshake is the worker's first step.
                (accepted, tls) = accept_either(&listen_socket, tls_socket.as_ref()) => match accepted {
                    Ok((stream, peer)) => {
                        let open = shared.open_connections();
                        if hand_off(&shared, &workers, stream, peer, open, tls) && gate.paused()
                            && shared.heads.evict_oldest(REPLACE.min_age, Instant::now())
                        {
                            gate.replaced += 1;
                        }
                    }
                    Err(e) if is_resource_exhaustion(&e) => {
                        shared.metrics.unanswered(Unanswered::AcceptResourcesExhausted);
                        let why = Unanswered::AcceptResourcesExhausted;
                        if shared.logs.full(why.reason(), shared.listen_addr, Instant::now()) {
                            tracing::warn!(error = %e, "accept failed: out of resources; pausing accepts");
                        }
                        tokio::time::sleep(RESOURCE_BACKOFF).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "accept failed; continuing"),
                },
            }
        }
        tracing::debug!("acceptor stopped");
    });
}

/// The next connection on either port, and whether it came on the TLS one.
async fn accept_either(
    plain: &TcpListener,
    tls: Option<&TcpListener>,
) -> (io::Result<(tokio::net::TcpStream, SocketAddr)>, bool) {
    match tls {
        None => (plain.accept().await, false),
        Some(tls) => tokio::select! {
            accepted = plain.accept() => (accepted, false),
            accepted = tls.accept() => (accepted, true),
        },
    }
}

/// Whether the acceptor is at its limit, with two hystereses. In slots: paused once `limit`
/// connections are open, accepting again once `margin` slots are free. In time: an episode, which
/// is what is counted and logged, begins with a pause and ends once accepting has lasted
/// [`SETTLE`]; pauses in between (the backlog refilling the margin) belong to it.
struct Gate {
    limit: usize,
    margin: usize,
    paused: bool,
    /// When the open episode began.
    episode: Option<Instant>,
    /// When accepting last resumed within the open episode.
    resumed: Option<Instant>,
    /// Idle connections closed to make room during this episode.
    replaced: u64,
}

#[derive(Debug, PartialEq)]
enum Change {
    /// A new episode: accepting paused.
    Paused,
    /// Accepting again, within the episode.
    Resumed,
    /// The episode is over: it lasted `after` up to its last resume.
    Ended { after: Duration, replaced: u64 },
}

impl Gate {
    fn new(limit: usize) -> Gate {
        Gate {
            limit,
            margin: (limit / 100).max(1),
            paused: false,
            episode: None,
            resumed: None,
            replaced: 0,
        }
    }

    fn paused(&self) -> bool {
        self.paused
    }

    /// When the episode ends if accepting goes on (nothing is due while paused or outside one).
    fn settles_at(&self) -> Option<Instant> {
        self.resumed.map(|r| r + SETTLE)
    }

    fn update(&mut self, open: usize, now: Instant) -> Option<Change> {
        if !self.paused && open >= self.limit {
            self.paused = true;
            self.resumed = None;
            if self.episode.is_some() {
                return None;
            }
            self.episode = Some(now);
            self.replaced = 0;
            return Some(Change::Paused);
        }
        if self.paused && open + self.margin <= self.limit {
            self.paused = false;
            self.resumed = Some(now);
            return Some(Change::Resumed);
        }
        match (self.episode, self.resumed) {
            (Some(began), Some(resumed)) if now >= resumed + SETTLE => {
                self.episode = None;
                self.resumed = None;
                Some(Change::Ended {
                    after: resumed.saturating_duration_since(began),
                    replaced: self.replaced,
                })
            }
            _ => None,
        }
    }
}

/// Waits until `at`, or forever without one.
async fn settled(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Connections in the kernel's accept queue now (Linux reports it for a listening socket in
/// `tcpi_unacked`): how many waited for the pause to end.
fn accept_queue(listener: &TcpListener) -> Option<u32> {
    // SAFETY: tcp_info is plain integers, for which all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large, on a
    // descriptor the listener keeps open for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info.tcpi_unacked)
}

/// Logs, once a second, the summaries of log lines held back ([`crate::logs`]).
async fn write_summaries(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SUMMARY_TICK);
    loop {
        tick.tick().await;
        for s in shared.logs.due(Instant::now()) {
            tracing::info!(
                reason = s.reason,
                count = s.count,
                sample = %s.sample,
                over_secs = s.over.as_secs(),
                "more of the same, not logged one by one"
            );
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Places a connection on the least-loaded worker, or closes it at once when its address has too
/// many heads pending. Returns whether it was placed.
fn hand_off(
    shared: &Arc<Shared>,
    workers: &[Sender<Accepted>],
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    open: usize,
    tls: bool,
) -> bool {
    let config = shared.config.load();
    let now = Instant::now();
    let peer = canonical(peer);
    // A trusted proxy's connections carry many clients: the worker counts each against its own
    // address once the proxy has named it, and the proxy's own address is not limited.
    let proxied = config.trusts(peer.ip());
    if config.proxy_protocol && !proxied {
        close_unanswered(shared, Unanswered::UntrustedProxy, peer, &stream);
        return false;
    }
    let client = config.client_key(peer.ip());
    let heads_limit = if proxied {
        0
    } else {
        config.max_pending_heads_per_ip
    };
    let heads = &shared.heads;
    let head = match heads.enter(client, heads_limit, now) {
        Some(head) => head,
        // Its head has arrived: it only waits for a worker to read it, as in a burst of players
        // behind one NAT reconnecting at once, so it is not the idle kind the limit is for.
        None if has_bytes(&stream) => heads.enter(client, 0, now).expect("no limit"),
        None => {
            close_unanswered(shared, Unanswered::PendingHeadsPerIp, peer, &stream);
            return false;
        }
    };
    // Streams are written in coalesced pieces; Nagle would only add delay to the last one.
    let _ = stream.set_nodelay(true);
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "cannot detach accepted socket");
            return false;
        }
    };
    let (index, worker) = shared
        .workers
        .iter()
        .enumerate()
        .min_by_key(|(_, w)| w.connections.load(Ordering::Relaxed))
        .expect("at least one worker");
    worker.connections.fetch_add(1, Ordering::Relaxed);
    let mut guard = ConnGuard::new(shared.clone(), index);
    let per_ip_limit = config.max_connections_per_ip;
    let over_ip_limit = per_ip_limit > 0 && !proxied && guard.count_address(client, per_ip_limit);
    let under_pressure = open * 100 >= shared.max_connections * PRESSURE_PERCENT;
    let accepted = Accepted {
        stream,
        guard,
        head,
        head_timeout: config.header_timeout(under_pressure),
        over_ip_limit,
        tls,
    };
    // Fails only when the worker has exited (shutting down): the socket is then dropped, closed.
    if workers[index].send(accepted).is_ok() {
        worker.conns_ready.notify_one();
    }
    true
}

/// Whether the peer has sent anything yet (without waiting or consuming it).
fn has_bytes(stream: &tokio::net::TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::uninit()];
    socket2::SockRef::from(stream)
        .peek(&mut byte)
        .is_ok_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_lasts_until_a_margin_of_slots_is_free_and_each_edge_is_reported_once() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut gate = Gate::new(2000);
        assert_eq!(gate.update(1999, at(0)), None);
        assert_eq!(gate.settles_at(), None);
        assert_eq!(gate.update(2000, at(1)), Some(Change::Paused));
        assert!(gate.paused());
        gate.replaced = 7;
        // Slots freed one at a time do not end it...
        for open in (1981..2000).rev() {
            assert_eq!(gate.update(open, at(2)), None, "{open} open");
            assert_eq!(gate.update(open + 1, at(2)), None);
        }
        // ...a margin of 1% does, once.
        assert_eq!(gate.update(1980, at(1500)), Some(Change::Resumed));
        assert!(!gate.paused());
        assert_eq!(gate.update(1980, at(1501)), None);
        // The episode ends after accepting has lasted SETTLE, with its length to the resume.
        assert_eq!(gate.settles_at(), Some(at(1500) + SETTLE));
        assert_eq!(
            gate.update(1990, at(1500) + SETTLE),
            Some(Change::Ended {
                after: Duration::from_millis(1499),
                replaced: 7
            })
        );
        assert_eq!(gate.settles_at(), None);
        assert_eq!(gate.update(2000, at(5000)), Some(Change::Paused));
    }

    #[test]
    fn a_backlog_refilling_the_margin_is_the_same_episode() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut gate = Gate::new(2000);
        assert_eq!(gate.update(2000, at(0)), Some(Change::Paused));
        // Twenty waves of closes and refills, a few milliseconds each, 200 ms apart.
        for wave in 0..20 {
            let t = 100 + wave * 200;
            assert_eq!(gate.update(1900, at(t)), Some(Change::Resumed));
            assert_eq!(gate.update(2000, at(t + 2)), None, "wave {wave}");
            assert!(gate.paused());
            gate.replaced += 1;
        }
        assert_eq!(gate.update(1900, at(4200)), Some(Change::Resumed));
        assert_eq!(gate.update(1900, at(5000)), None);
        assert_eq!(
            gate.update(1900, at(4200) + SETTLE),
            Some(Change::Ended {
                after: Duration::from_millis(4200),
                replaced: 20
            })
        );
    }

    #[test]
    fn a_small_limit_resumes_with_one_slot_free() {
        let mut gate = Gate::new(4);
        let now = Instant::now();
        assert_eq!(gate.update(4, now), Some(Change::Paused));
        assert_eq!(gate.update(3, now), Some(Change::Resumed));
    }
}
