//! Connections as they pass from one stage to the next, with the guards that count them, and the
//! one place that answers a refused request.
//!
//! - acceptor → worker: [`Accepted`], a socket with its [`ConnGuard`].
//! - the worker's router → a stage on the same worker: [`Incoming`], a request with its socket,
//!   served in the [`WorkerCtx`] every task of that worker shares.
//! - worker (source handshake), the demo or a relay → ingest: [`SourceConn`], a source for a mount, and
//!   worker or admin → ingest: [`TitleUpdate`], both as [`ToIngest`].
//! - admission → the worker's fan-out: [`NewListener`], with its [`ListenerGuard`].
//! - the admin API (on any worker or the admin thread) → the worker holding a listener:
//!   [`Control`]; → ingest: [`ToIngest::KillSource`] and [`ToIngest::Fallback`].

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::access_log::Record;
use crate::clients::Client;
use crate::heads::Pending;
use crate::http::{read_with, Request, RESPONSE_TIMEOUT};
use crate::icy::Cadence;
use crate::listener_auth::LeaveCall;
use crate::mounts::{Joining, Mount};
use crate::reasons::{Refusal, Unanswered};
use crate::series::Gauge;
use crate::shared::Shared;
use crate::store::StreamInfo;
use crate::tls::TlsConn;

/// After a refusal, how much of what the peer keeps sending we read before closing anyway.
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// A connection on its way from the acceptor to a worker.
pub(crate) struct Accepted {
    pub stream: std::net::TcpStream,
    pub guard: ConnGuard,
    /// Counts the connection among pending heads (its address's, and the idle ones that can be
    /// closed to make room) until the worker has read its head.
    pub head: Pending,
    /// How long it has to send its head, chosen when accepted (shorter under pressure).
    pub head_timeout: Duration,
    /// The client's address already holds `max_connections_per_ip`: the worker answers 429.
    pub over_ip_limit: bool,
    /// It came on the TLS port: the worker runs the handshake first.
    pub tls: bool,
}

/// Counts a connection against its worker's load and its address until dropped.
/// The acceptor creates it (incrementing), whoever holds the connection last drops it.
pub(crate) struct ConnGuard {
    shared: Arc<Shared>,
    /// A u32 (workers are at most 1024) so that the guard, inline in every listener of the
    /// fan-out, leaves room beside the address for the listener's other fields.
    worker: u32,
    /// Set when per-address counting is on.
    ip: Option<std::net::IpAddr>,
}

impl ConnGuard {
    /// Counts a connection in; the acceptor has already incremented the worker's count, which
    /// the guard gives back when dropped.
    pub fn new(shared: Arc<Shared>, worker: usize) -> Self {
        ConnGuard {
            shared,
            worker: worker as u32,
            ip: None,
        }
    }

    /// Stops counting the connection against its address: an edge's relay is not one of the
    /// address's clients, and an edge may hold many relays from one address.
    pub fn forget_address(&mut self) {
        if let Some(ip) = self.ip.take() {
            uncount(&self.shared, ip);
        }
    }

    /// Counts the connection against its client's address (`Config::client_key`) until it
    /// closes; returns whether the address now holds more than `limit`. The acceptor calls it
    /// for a direct client; for one behind a trusted proxy the worker does, once the proxy has
    /// said who the client is.
    pub fn count_address(&mut self, key: std::net::IpAddr, limit: usize) -> bool {
        debug_assert!(self.ip.is_none(), "a connection is counted once");
        let mut per_ip = self.shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(key).or_insert(0);
        *n += 1;
        self.ip = Some(key);
        *n > limit
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.workers[self.worker as usize]
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            uncount(&self.shared, ip);
        }
        // The acceptor may be waiting for room.
        self.shared.room.notify_one();
    }
}

fn uncount(shared: &Shared, ip: std::net::IpAddr) {
    let mut per_ip = shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = per_ip.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&ip);
        }
    }
}

/// The peer as logs and limits should name it: an IPv4 client reaching a dual-stack (`[::]`)
/// listener arrives as `::ffff:a.b.c.d`, and is the same client as `a.b.c.d` on an IPv4 one.
pub(crate) fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

/// A client's connection on a worker: plain, or TLS past its handshake. Stages read and write
/// it as any stream; the fan-out writes it with [`Io::try_write_vectored`], the encryption (if
/// any) per listener, from the same shared pieces.
pub(crate) enum Io {
    Plain(TcpStream),
    /// Boxed: a session is large, and most connections are plain.
    Tls(Box<TlsConn>),
}

impl Io {
    /// The address a connection over TLS came to (status pages build `https://` listen URLs
    /// with its port); None for a plain one.
    pub fn tls_local(&self) -> Option<std::net::SocketAddr> {
        match self {
            Io::Plain(_) => None,
            Io::Tls(t) => t.socket().local_addr().ok(),
        }
    }

    /// The TCP socket under it.
    pub fn socket(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Tls(t) => t.socket(),
        }
    }

    /// Writes without waiting; `WouldBlock` when the socket is full.
    pub fn try_write_vectored(&self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Io::Plain(s) => s.try_write_vectored(bufs),
            Io::Tls(t) => t.try_write_vectored(bufs),
        }
    }

    /// Sends what an earlier write left in a TLS session (the socket was full then); plain
    /// sockets keep nothing back. `WouldBlock` while some is left.
    pub fn send_unsent(&self) -> std::io::Result<()> {
        match self {
            Io::Plain(_) => Ok(()),
            Io::Tls(t) => t.send_unsent(),
        }
    }

    /// Whether a TLS session holds bytes an earlier write left ([`Io::send_unsent`]).
    pub fn holds_unsent(&self) -> bool {
        match self {
            Io::Plain(_) => false,
            Io::Tls(t) => t.holds_unsent(),
        }
    }

    /// Registers `cx`'s waker for when the socket may take more (a TLS session's pending bytes
    /// wait for the same socket), or says it may now.
    pub fn poll_write_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.socket().poll_write_ready(cx)
    }

    /// Waits until the socket may take more.
    pub async fn writable(&self) -> std::io::Result<()> {
        match self {
            Io::Plain(s) => s.writable().await,
            Io::Tls(t) => t.writable().await,
        }
    }
}

impl Io {
    /// Takes the connection off this thread's runtime, to be attached on another's.
    pub fn detach(self) -> std::io::Result<Detached> {
        match self {
            Io::Plain(tcp) => Ok(Detached::Plain(tcp.into_std()?)),
            Io::Tls(tls) => {
                let (tcp, session) = tls.into_parts();
                Ok(Detached::Tls(tcp.into_std()?, Box::new(session)))
            }
        }
    }
}

/// A connection between two threads' runtimes: a source on its way to ingest.
pub(crate) enum Detached {
    Plain(std::net::TcpStream),
    Tls(std::net::TcpStream, Box<rustls::ServerConnection>),
}

impl Detached {
    /// Registers the socket with the runtime of the thread calling.
    pub fn attach(self) -> std::io::Result<Io> {
        Ok(match self {
            Detached::Plain(tcp) => Io::Plain(TcpStream::from_std(tcp)?),
            Detached::Tls(tcp, session) => {
                Io::Tls(Box::new(TlsConn::new(TcpStream::from_std(tcp)?, *session)))
            }
        })
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Tls(t) => std::pin::Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Tls(t) => std::pin::Pin::new(&mut **t).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Tls(t) => std::pin::Pin::new(&mut **t).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Tls(t) => std::pin::Pin::new(&mut **t).poll_shutdown(cx),
        }
    }
}

impl std::os::fd::AsFd for Io {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket().as_fd()
    }
}

/// What every task on one worker shares.
pub(crate) struct WorkerCtx {
    pub shared: Arc<Shared>,
    pub index: usize,
    /// The worker index as a metric label.
    pub label: String,
    /// Admitted listeners, from their request tasks to this worker's fan-out loop.
    pub admit: UnboundedSender<NewListener>,
    /// Sources and title updates, to the ingest thread.
    pub to_ingest: UnboundedSender<ToIngest>,
    /// Turns for TLS handshakes, so that a flood of them takes a bounded share of the worker.
    pub handshakes: tokio::sync::Semaphore,
    /// Every worker's fan-out, by worker index: where the admin API sends a kill or a move.
    pub control: Arc<[UnboundedSender<Control>]>,
    /// Listeners admitted and not yet handed to the fan-out loop (their response head being
    /// written): a graceful stop waits for them.
    pub on_their_way: OnTheirWay,
}

/// Counts a worker's listeners between their admission and the fan-out loop, which takes them
/// in through [`WorkerCtx::admit`]. Only the worker's own tasks touch it.
#[derive(Default)]
pub(crate) struct OnTheirWay {
    count: std::cell::Cell<usize>,
    none_left: tokio::sync::Notify,
}

impl OnTheirWay {
    /// Counts one until the returned guard drops: after it is sent to the loop, or gone.
    pub fn enter(&self) -> OnItsWay<'_> {
        self.count.set(self.count.get() + 1);
        OnItsWay(self)
    }

    pub fn any(&self) -> bool {
        self.count.get() > 0
    }

    /// Resolves once none is left (wakes whoever waits when the last one arrives or goes).
    pub async fn none_left(&self) {
        if self.any() {
            self.none_left.notified().await
        }
    }
}

/// One listener on its way (see [`OnTheirWay::enter`]).
pub(crate) struct OnItsWay<'a>(&'a OnTheirWay);

impl Drop for OnItsWay<'_> {
    fn drop(&mut self) {
        let left = self.0.count.get() - 1;
        self.0.count.set(left);
        if left == 0 {
            self.0.none_left.notify_waiters();
        }
    }
}

/// What the admin API asks of the fan-out loop holding a listener; the answer comes back on
/// `reply` once done, so an admin response says what happened.
pub(crate) enum Control {
    /// How far behind the live edge (bytes) each of the worker's listeners of `mount` is, by id.
    Lags {
        mount: Arc<Mount>,
        reply: oneshot::Sender<Vec<(u64, u64)>>,
    },
    /// Close the listener with this id now; true if the worker held it.
    Kill {
        id: u64,
        reply: oneshot::Sender<bool>,
    },
    /// Move the worker's listeners of `from` to `to`, each joining at a sync point (after the
    /// destination's Ogg header pages), as many as `to`'s `max_listeners` takes; answers how
    /// many moved and how many stayed on `from` for want of room.
    Move {
        from: Arc<Mount>,
        to: Arc<Mount>,
        reply: oneshot::Sender<(usize, usize)>,
    },
}

/// A request whose head has been read, with its connection: what the router hands a stage.
pub(crate) struct Incoming {
    pub stream: Io,
    pub req: Request,
    /// Bytes that arrived after the head (a legacy source's first media).
    pub leftover: Vec<u8>,
    pub peer: SocketAddr,
    pub conn: ConnGuard,
    /// The request carries the relay credentials (`relay_user`/`relay_password`): an edge's
    /// relay, not audience.
    pub relay: bool,
}

impl Incoming {
    /// Refuses the request (see [`refuse`]), and logs it in the access log.
    pub async fn refuse(mut self, shared: &Shared, no: Refusal) {
        // With the CORS headers its answer would have had: a web player on another site can then
        // read the refusal (a station offline is a 404, not a network error).
        let cors = crate::cors::headers(&shared.config.load(), &self.req);
        let resp = crate::http::with_header_lines(no.response_for(&self.req), &cors);
        log_request(shared, &self.req, self.peer, no.status(), resp.len());
        refuse_with(shared, &mut self.stream, self.peer, no, resp).await;
    }
}

/// Writes the access log line of a request answered with `resp` (a whole response).
pub(crate) fn log_response(shared: &Shared, req: &Request, peer: SocketAddr, resp: &[u8]) {
    // `HTTP/1.0 200 ...`: every response fanstream writes starts so.
    let status = resp
        .get(9..12)
        .and_then(|s| std::str::from_utf8(s).ok()?.parse().ok())
        .unwrap_or(200);
    log_request(shared, req, peer, status, resp.len());
}

/// Writes a finished request's line to the access log, if there is one.
pub(crate) fn log_request(
    shared: &Shared,
    req: &Request,
    peer: SocketAddr,
    status: u16,
    bytes: usize,
) {
    if shared.access_log.enabled() {
        let record = Record::of(req, peer.ip(), status, bytes as u64);
        shared.access_log.record(record);
    }
}

/// A listener as the access log will show it when it leaves, carried from mount to mount by
/// its [`ListenerGuard`]s.
pub(crate) struct Listening {
    /// Its id among the clients of the mount it is on.
    pub id: u64,
    /// Its socket, still open whenever its guard is dropped (the guard is dropped first): the
    /// bytes it received are the kernel's count, so the fan-out counts nothing per listener.
    pub fd: RawFd,
    /// The line to write, but for the bytes; none without an access log, so that a listener
    /// costs no copy of its request then. Boxed, as is `_leave`: without an access log or URL
    /// auth, a listener then carries 16 bytes for the two, not some 250.
    pub record: Option<Box<Record>>,
    /// When it connected: `max_listener_duration_secs` counts from here, across moves.
    pub connected: Instant,
    /// What `listener_remove_url` is told when it leaves (URL auth only): sent when this is
    /// dropped, whether the listener played or was turned away after its auth call.
    pub _leave: Option<Box<LeaveCall>>,
}

/// Bytes the peer has acknowledged on a TCP socket (`tcpi_bytes_acked`), or 0 if unknown.
fn bytes_acked(fd: RawFd) -> u64 {
    // SAFETY: an all-zero tcp_info is a valid value of the plain C struct.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is an open socket (see `Listening::fd`), and `info` and `len` describe a
    // buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        info.tcpi_bytes_acked
    } else {
        0
    }
}

/// What the ingest thread is sent: it alone writes mounts.
pub(crate) enum ToIngest {
    /// Boxed: a source is far larger than a title update, and both share the channel.
    Source(Box<SourceConn>),
    Title(TitleUpdate),
    /// Disconnect the mount's source (`/admin/killsource`); its listeners then wait for
    /// another as for any source that left. Answers whether a source was live there.
    KillSource {
        mount: String,
        reply: oneshot::Sender<bool>,
    },
    /// Set the mount's fallback (None: clear it) until the next reload (`/admin/fallbacks`);
    /// answers whether the mount exists.
    Fallback {
        mount: String,
        fallback: Option<String>,
        reply: oneshot::Sender<bool>,
    },
}

/// A new title for a mount, from `/admin/metadata`.
pub(crate) struct TitleUpdate {
    pub mount: String,
    pub title: Option<String>,
    pub artist: Option<String>,
    pub url: Option<String>,
}

/// A source on its way to ingest, which claims the mount for it and reads what it feeds.
pub(crate) struct SourceConn {
    pub mount: String,
    pub info: StreamInfo,
    pub feed: Feed,
    /// Its access log line, but for the status and the bytes (none for the demo).
    pub log: Option<Record>,
    /// Told the claim's outcome, for a sender that must know it before going on (the server
    /// starting the demo: the mount is live before start-up ends; a relay, which sends titles
    /// only to a mount it holds). A oneshot, so that a blocking thread and a task can both wait.
    pub claimed: Option<tokio::sync::oneshot::Sender<Result<(), Refusal>>>,
}

/// Where a source's bytes come from.
pub(crate) enum Feed {
    /// An encoder's connection: ingest answers it and reads its body.
    Encoder(Encoder),
    /// Pieces made on another task or thread (the demo, a fallback file, a relay); the sender
    /// stops when the receiver is dropped. `origin` names it in log lines (`relay
    /// https://upstream/live`), as an encoder's address does.
    Pieces {
        rx: tokio::sync::mpsc::Receiver<Bytes>,
        origin: String,
    },
}

impl Feed {
    /// Who feeds the mount, for log lines.
    pub fn origin(&self) -> String {
        match self {
            Feed::Encoder(e) => e.peer.to_string(),
            Feed::Pieces { origin, .. } => origin.clone(),
        }
    }
}

/// An authenticated encoder, not answered yet.
pub(crate) struct Encoder {
    pub stream: Detached,
    pub peer: SocketAddr,
    /// The encoder waits for `100 Continue` before sending.
    pub expect_continue: bool,
    /// Ingest answers it `200 OK` once the mount is claimed; false for a SHOUTcast v1 source,
    /// answered `OK2` in its own protocol before its headers.
    pub answer: bool,
    /// The body is `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// Body bytes that arrived with the request head.
    pub leftover: Vec<u8>,
}

/// A listener whose response head is sent, on its way to its worker's fan-out loop.
pub(crate) struct NewListener {
    /// First, so that it is dropped while the socket is still open (see [`Listening::fd`]).
    pub guard: ListenerGuard,
    pub mount: Arc<Mount>,
    pub stream: Io,
    /// Absolute offset of the first byte to send it (its join point).
    pub pos: u64,
    /// The ICY framing it asked for, with what of its first interval the preamble used.
    /// Boxed: most listeners take no ICY, and the fan-out keeps this inline per listener.
    pub icy: Option<Box<Cadence>>,
    pub conn: ConnGuard,
    /// Keeps its join point in the store until the fan-out has served it once.
    pub joining: Joining,
    /// Where the header pages it was sent apply from (`Snapshot::headers_from` of the snapshot
    /// its join point came from): a join point gone by its first pass is taken again only
    /// behind the same pages.
    pub headers_from: u64,
}

/// Counts one listener on its mount, the server and the gauges while it lives.
pub(crate) struct ListenerGuard {
    shared: Arc<Shared>,
    mount: Arc<Mount>,
    gauge: Gauge,
    /// Set while it receives ICY metadata.
    icy_gauge: Option<Gauge>,
    /// An edge's relay: counted in the mount's `relays` (and `gauge` is
    /// `fanstream_relays`), not among its listeners; no listener limit applies to it.
    relay: bool,
    /// The listener's entry in the mount's [`crate::clients::Clients`] (by its id), removed
    /// when the guard goes, and its access log line, written then. None once handed to the
    /// guard of the mount it moves to, or for a listener refused.
    listening: Option<Box<Listening>>,
}

impl ListenerGuard {
    /// Counts a listener in, and lists it among the mount's clients. With `max_listeners` (the
    /// mount's limit, 0 for none) it is refused, and counted out again, when the mount or the
    /// server is full. A relay is counted as one, and never refused.
    pub fn enter(
        shared: &Arc<Shared>,
        mount: &Arc<Mount>,
        worker: &str,
        max_listeners: Option<usize>,
        client: Client,
        listening: Box<Listening>,
    ) -> Result<Self, Refusal> {
        let relay = client.relay;
        if relay {
            mount.relays.fetch_add(1, Ordering::Relaxed);
            let gauge = shared
                .metrics
                .relays
                .with_label_values(&[mount.label.as_str()]);
            gauge.inc();
            mount.clients.join(client);
            return Ok(ListenerGuard {
                shared: shared.clone(),
                mount: mount.clone(),
                gauge,
                icy_gauge: None,
                relay,
                listening: Some(listening),
            });
        }
        let on_mount = mount.listeners.fetch_add(1, Ordering::Relaxed);
        let total = shared.listeners_total.fetch_add(1, Ordering::Relaxed);
        let gauge = shared
            .metrics
            .listeners
            .with_label_values(&[mount.label.as_str(), worker]);
        gauge.inc();
        // Built before the checks so that dropping it undoes the increments on refusal too.
        let guard = ListenerGuard {
            shared: shared.clone(),
            mount: mount.clone(),
            gauge,
            icy_gauge: None,
            relay,
            listening: None,
        };
        let mut guard = guard;
        if let Some(max) = max_listeners {
            if max > 0 && on_mount >= max {
                return Err(Refusal::MountFull);
            }
            if total >= shared.config.load().max_listeners {
                return Err(Refusal::ServerFull);
            }
        }
        mount
            .listener_peak
            .fetch_max(on_mount + 1, Ordering::Relaxed);
        mount.clients.join(client);
        guard.listening = Some(listening);
        Ok(guard)
    }

    /// Whether it is an edge's relay rather than a listener.
    pub fn is_relay(&self) -> bool {
        self.relay
    }

    /// The listener's id, as the admin API names it (0 once it left).
    pub fn id(&self) -> u64 {
        self.listening.as_ref().map_or(0, |l| l.id)
    }

    /// When the listener connected (None once it left).
    pub fn connected(&self) -> Option<Instant> {
        self.listening.as_ref().map(|l| l.connected)
    }

    /// The listener leaves this mount for another: its client entry (taken off this mount's
    /// list) and its access log line, for the guard on the next mount.
    pub fn leave_for_another(&mut self) -> Option<(Client, Box<Listening>)> {
        let listening = self.listening.take()?;
        let client = self.mount.clients.leave(listening.id)?;
        Some((client, listening))
    }
}

impl ListenerGuard {
    /// Counts the listener among the mount's ICY listeners too, while it lives.
    pub fn count_icy(&mut self) {
        let gauge = self
            .shared
            .metrics
            .icy_listeners
            .with_label_values(&[self.mount.label.as_str()]);
        gauge.inc();
        self.icy_gauge = Some(gauge);
    }
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        if let Some(l) = self.listening.take() {
            self.mount.clients.leave(l.id);
            if let Some(mut record) = l.record {
                record.bytes = bytes_acked(l.fd);
                self.shared.access_log.record(*record);
            }
        }
        if self.relay {
            self.mount.relays.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.mount.listeners.fetch_sub(1, Ordering::Relaxed);
            self.shared.listeners_total.fetch_sub(1, Ordering::Relaxed);
        }
        self.gauge.dec();
        if let Some(g) = &self.icy_gauge {
            g.dec();
        }
    }
}

/// Answers a refused request, counts it, logs it once with the peer (or, past the first few of
/// its reason, in the summary: [`crate::logs`]), and lets the connection close.
pub(crate) async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    peer: SocketAddr,
    no: Refusal,
) {
    refuse_with(shared, stream, peer, no, no.response()).await
}

/// [`refuse`] with the refusal's response already made, in the form the request asked for
/// ([`Refusal::response_for`]).
pub(crate) async fn refuse_with<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    peer: SocketAddr,
    no: Refusal,
    resp: Vec<u8>,
) {
    shared.metrics.refused(no);
    if shared.logs.full(no.reason(), peer, Instant::now()) {
        tracing::info!(%peer, status = no.status(), reason = no.reason(), "refused request");
    }
    let _ = tokio::time::timeout(RESPONSE_TIMEOUT, async {
        stream.write_all(&resp).await?;
        stream.shutdown().await?;
        // Read what the peer still sends (a source's media) until it closes: closing a socket
        // with unread bytes sends a reset, which can destroy the response before it is read.
        let mut left = LINGER_MAX_BYTES;
        while left > 0 {
            match read_with(stream, left, |_| {}).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Counts a connection closed without an answer and logs it like a refusal: in full for the
/// first few of its reason, in the summary after. The caller drops the socket, which is reset
/// (as nginx's `reset_timedout_connection` does): the client sent nothing worth a goodbye, and a
/// storm of closes would otherwise leave the server's side of each in TIME_WAIT.
pub(crate) fn close_unanswered(
    shared: &Shared,
    why: Unanswered,
    peer: SocketAddr,
    socket: impl std::os::fd::AsFd,
) {
    let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
    shared.metrics.unanswered(why);
    if shared.logs.full(why.reason(), peer, Instant::now()) {
        tracing::info!(%peer, reason = why.reason(), "{}", why.message());
    }
}
