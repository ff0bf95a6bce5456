//! A worker thread: its own current-thread tokio runtime, pinned to one core, serving a shard of the
//! connections. It takes sockets from the acceptor, reads each request head and routes it: a
//! status page is answered here ([`crate::status`]), and so is the admin API under `/admin/`
//! ([`crate::admin_api`]); a listener is admitted ([`crate::admission`])
//! into this worker's fan-out ([`crate::fanout`]); a source is checked ([`crate::source`]) and
//! handed to the ingest thread.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crossbeam::channel::Receiver;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::task::LocalSet;

use crate::conn::{
    close_unanswered, log_response, refuse, Accepted, ConnGuard, Control, Incoming, Io, ToIngest,
    WorkerCtx,
};
use crate::fanout::FanOut;
use crate::heads::Pending;
use crate::http::{self, Method, ReadHeadError};
use crate::proxy::ProxyHeaderError;
use crate::reasons::{Refusal, Unanswered};
use crate::shared::Shared;
use crate::tls::{HandshakeError, TlsConn};

/// What the listener port serves, for `Allow`.
const ALLOWED_METHODS: &str = "GET, HEAD, OPTIONS, SOURCE, PUT";

pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    index: usize,
    conns: Receiver<Accepted>,
    to_ingest: UnboundedSender<ToIngest>,
    control: Arc<[UnboundedSender<Control>]>,
    control_rx: mpsc::UnboundedReceiver<Control>,
) {
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let (admit_tx, admit_rx) = mpsc::unbounded_channel();
        let ctx = Rc::new(WorkerCtx {
            shared,
            index,
            label: index.to_string(),
            admit: admit_tx,
            to_ingest,
            handshakes: tokio::sync::Semaphore::new(MAX_HANDSHAKES_PER_WORKER),
            control,
            on_their_way: Default::default(),
        });
        let intake = tokio::task::spawn_local(intake(ctx.clone(), conns));
        FanOut::new(ctx.clone(), admit_rx, control_rx).run().await;
        intake.abort();
        tracing::debug!(worker = index, "worker stopped");
    });
}

/// Takes sockets handed over by the acceptor and starts a request task for each.
async fn intake(ctx: Rc<WorkerCtx>, conns: Receiver<Accepted>) {
    let link = &ctx.shared.workers[ctx.index];
    loop {
        link.conns_ready.notified().await;
        while let Ok(accepted) = conns.try_recv() {
            let Accepted {
                stream,
                guard,
                head,
                head_timeout,
                over_ip_limit,
                tls,
            } = accepted;
            match TcpStream::from_std(stream) {
                Ok(stream) => {
                    let task_ctx = ctx.clone();
                    spawn_isolated(&ctx, move || {
                        let first = First {
                            head,
                            head_timeout,
                            over_ip_limit,
                            tls,
                        };
                        handle(task_ctx, stream, guard, first)
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot register accepted socket"),
            }
        }
    }
}

/// Runs a request's task so that a panic in it (a bug) costs that one connection only: the panic
/// is caught where the task is polled, counted and logged, and the worker goes on. Caught here
/// rather than by a second task awaiting its `JoinHandle`, which would cost every connection,
/// idle ones included, a task of its own. The request's future is made inside the task's own:
/// one passed in made would be held twice there, once as given and once pinned.
fn spawn_isolated<F: Future<Output = ()> + 'static>(
    ctx: &Rc<WorkerCtx>,
    make: impl FnOnce() -> F + 'static,
) {
    let ctx = ctx.clone();
    tokio::task::spawn_local(async move {
        let mut task = pin!(make());
        let mut panicked = false;
        poll_fn(|cx| {
            catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(cx))).unwrap_or_else(|_| {
                panicked = true;
                Poll::Ready(())
            })
        })
        .await;
        if panicked {
            ctx.shared
                .metrics
                .panics
                .with_label_values(&["request"])
                .inc();
            tracing::error!(
                worker = ctx.index,
                "a request handler panicked; connection dropped"
            );
        }
    });
}

/// What the acceptor decided about a connection, for its first steps on the worker.
struct First {
    /// Counts it among pending heads until its head is read.
    head: Pending,
    head_timeout: Duration,
    over_ip_limit: bool,
    /// It came on the TLS port.
    tls: bool,
}

/// Most TLS handshakes one worker runs at once, counted from a whole ClientHello on (a client
/// still sending its ClientHello, or sending nothing, holds no turn: see
/// [`TlsConn::handshake`]). A handshake costs a worker a fraction of a millisecond of CPU (a
/// key exchange and a signature) in one poll of its connection's own task, between which the
/// fan-out runs; past this many, newcomers wait their turn without costing anything, within
/// their head timeout. So a flood of handshakes takes at most a bounded share of each worker,
/// not the worker.
const MAX_HANDSHAKES_PER_WORKER: usize = 16;

/// Reads the PROXY header when the connection must start with one, runs the TLS handshake if
/// the connection came on the TLS port, reads the request head, all within the time the
/// acceptor gave it, unless the acceptor closes it first to make room, and routes the request
/// by its method.
async fn handle(ctx: Rc<WorkerCtx>, mut stream: TcpStream, mut conn: ConnGuard, first: First) {
    let First {
        head,
        head_timeout,
        over_ip_limit,
        tls,
    } = first;
    let Ok(peer) = stream.peer_addr().map(crate::conn::canonical) else {
        return;
    };
    let shared = &ctx.shared;
    let (proxied, proxy_protocol) = {
        let cfg = shared.config.load();
        let proxied = cfg.trusts(peer.ip());
        // The acceptor has closed an untrusted peer's connection when proxy_protocol is on.
        (proxied, proxied && cfg.proxy_protocol)
    };
    // One deadline for the PROXY header, the handshake and the request head: a proxy sends its
    // header and the client's first bytes at once.
    let deadline = tokio::time::Instant::now() + head_timeout;
    // On both ports the PROXY header comes first, in clear: a TCP proxy passing TLS through
    // puts it before the client's handshake.
    let (named, after) = if proxy_protocol {
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, crate::proxy::read_header(&mut stream)) => read,
            () = head.evicted() => {
                return close_unanswered(shared, Unanswered::IdleHeadEvicted, peer, &stream);
            }
        };
        match read {
            Err(_) => return close_unanswered(shared, Unanswered::HeaderTimeout, peer, &stream),
            Ok(Err(ProxyHeaderError::Closed)) => return,
            Ok(Err(ProxyHeaderError::Bad)) => {
                return close_unanswered(shared, Unanswered::BadProxyHeader, peer, &stream)
            }
            Ok(Ok((named, after))) => (named, after),
        }
    } else {
        (None, Vec::new())
    };
    let (mut stream, after) = if tls {
        let Some(config) = shared.tls.as_ref().map(|t| t.load_full()) else {
            return;
        };
        // What came after the PROXY header is the start of the client's handshake.
        let handshake = TlsConn::handshake(config, &mut stream, &after, ctx.handshakes.acquire());
        let done = tokio::select! {
            done = tokio::time::timeout_at(deadline, handshake) => done,
            () = head.evicted() => {
                return close_unanswered(shared, Unanswered::IdleHeadEvicted, peer, &stream);
            }
        };
        match done {
            Err(_) => return close_unanswered(shared, Unanswered::HeaderTimeout, peer, &stream),
            Ok(Err(HandshakeError::PlainHttp)) => {
                drop(head);
                return refuse(shared, &mut stream, peer, Refusal::PlainHttpOnTls).await;
            }
            Ok(Err(HandshakeError::Failed(e))) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return close_unanswered(shared, Unanswered::TlsHandshakeFailed, peer, &stream);
            }
            Ok(Ok(session)) => (Io::Tls(Box::new(TlsConn::new(stream, session))), Vec::new()),
        }
    } else {
        (Io::Plain(stream), after)
    };
    // Answered in the connection's own protocol: over TLS, once the handshake is done. With a
    // relay identity, only the request's credentials tell an edge's relay, which the limit
    // does not bind, from a client: the head is read first then.
    if over_ip_limit && shared.config.load().relay_password.is_none() {
        drop(head);
        return refuse(shared, &mut stream, peer, Refusal::PerIpLimit).await;
    }
    let read = tokio::select! {
        read = tokio::time::timeout_at(deadline, http::read_head_after(&mut stream, after)) => read,
        () = head.evicted() => {
            return close_unanswered(shared, Unanswered::IdleHeadEvicted, peer, &stream);
        }
    };
    // Past its head, the connection no longer counts against its address's pending heads.
    drop(head);
    let (req, leftover) = match read {
        Err(_) => return close_unanswered(shared, Unanswered::HeaderTimeout, peer, &stream),
        Ok(Err(ReadHeadError::Closed)) => return,
        Ok(Err(ReadHeadError::Head(e))) => {
            return refuse(shared, &mut stream, peer, e.into()).await
        }
        Ok(Ok(r)) => r,
    };
    // Behind a trusted proxy, the client is whom the proxy names; it is logged, throttled and
    // counted against its own address from here on.
    let mut client = peer;
    let mut named_by_proxy = false;
    if proxied {
        let cfg = shared.config.load();
        let named = match named {
            Some(addr) => Some(addr),
            None if !proxy_protocol => crate::proxy::forwarded_client(&cfg, &req)
                .map(|ip| std::net::SocketAddr::new(ip, 0)),
            None => None,
        };
        if let Some(named) = named {
            tracing::debug!(%peer, client = %named, "client named by a trusted proxy");
            client = named;
            named_by_proxy = true;
        }
    }
    let relay = match is_relay(shared, &req, client) {
        Ok(relay) => relay,
        Err(no) => return refuse(shared, &mut stream, client, no).await,
    };
    if relay {
        // Not one of its address's clients: an edge may hold many relays from one address.
        conn.forget_address();
    } else if over_ip_limit {
        return refuse(shared, &mut stream, peer, Refusal::PerIpLimit).await;
    } else if named_by_proxy {
        let cfg = shared.config.load();
        let limit = cfg.max_connections_per_ip;
        if limit > 0 && conn.count_address(cfg.client_key(client.ip()), limit) {
            drop(cfg);
            return refuse(shared, &mut stream, client, Refusal::PerIpLimit).await;
        }
    }
    // The stages' futures are several KiB, and the head above may take seconds to come, or never:
    // boxed, they cost only the connections that got this far.
    let incoming = Incoming {
        stream,
        req,
        leftover,
        peer: client,
        conn,
        relay,
    };
    Box::pin(route(ctx, incoming)).await
}

/// Whether a request is an edge's relay asking for a stream (`GET`/`HEAD` with the relay
/// credentials; see [`crate::auth::relay`]). Other methods are never relays: a source or the
/// admin API checks its own credentials.
fn is_relay(shared: &Shared, req: &http::Request, client: SocketAddr) -> Result<bool, Refusal> {
    if !matches!(req.method, Method::Get | Method::Head) {
        return Ok(false);
    }
    let cfg = shared.config.load();
    crate::auth::relay(&shared.auth_failures, &cfg, req, client)
}

/// Hands a request whose head has been read to its stage.
async fn route(ctx: Rc<WorkerCtx>, incoming: Incoming) {
    let shared = &ctx.shared;
    let peer = incoming.peer;
    // Test hook: proves that a panic costs one connection only.
    #[cfg(feature = "fault-injection")]
    if let Some(m) = &shared.config.load().panic_injection_mount {
        if incoming.req.path == format!("{m}/panic") {
            panic!("panic injected for a test");
        }
    }
    match incoming.req.method {
        Method::Get if crate::metadata::is_metadata_path(&incoming.req.path) => {
            let answer = crate::metadata::update(shared, &ctx.to_ingest, &incoming.req, peer);
            answer_short(shared, incoming, answer).await
        }
        Method::Get if crate::admin_api::is_admin_api_path(&incoming.req.path) => {
            let to = crate::admin_api::Links {
                to_ingest: &ctx.to_ingest,
                control: &ctx.control,
            };
            let tls_local = incoming.stream.tls_local();
            let port = crate::admin_api::Port::Public { tls_local };
            let answer = crate::admin_api::answer(shared, to, &incoming.req, peer, port).await;
            answer_short(shared, incoming, answer).await
        }
        // Commands act on GET alone, as Icecast's do: a HEAD would run a kill or a move too.
        Method::Head
            if crate::metadata::is_metadata_path(&incoming.req.path)
                || crate::admin_api::is_admin_api_path(&incoming.req.path) =>
        {
            incoming
                .refuse(shared, Refusal::MethodNotAllowed("GET"))
                .await
        }
        Method::Get | Method::Head if incoming.req.path == "/" => {
            let resp = crate::page::response(shared, &incoming.req);
            http::write_and_close(incoming.stream, &resp).await
        }
        Method::Get | Method::Head if crate::status::is_status_path(&incoming.req.path) => {
            crate::status::serve(shared, incoming).await
        }
        Method::Get | Method::Head if crate::hls_http::is_hls_path(shared, &incoming.req.path) => {
            // Kept alive: the requests after HLS ones on the connection come back here.
            if let Some(next) = crate::hls_http::serve(shared, incoming).await {
                Box::pin(route(ctx.clone(), next)).await
            }
        }
        Method::Get | Method::Head if crate::playlists::is_playlist(shared, &incoming.req.path) => {
            crate::playlists::serve(shared, incoming).await
        }
        Method::Get | Method::Head => crate::admission::admit(&ctx, incoming).await,
        Method::Source | Method::Put => crate::source::handshake(&ctx, incoming).await,
        Method::Options => {
            let resp = crate::cors::preflight(&shared.config.load(), &incoming.req);
            http::write_and_close(incoming.stream, &resp).await
        }
        Method::Other(ref m) => {
            tracing::debug!(%peer, method = %m, "unsupported method");
            let no = Refusal::MethodNotAllowed(ALLOWED_METHODS);
            incoming.refuse(shared, no).await
        }
    }
}

/// Sends a short answer (or refusal) and closes, with its access log line.
async fn answer_short(shared: &Shared, incoming: Incoming, answer: Result<Vec<u8>, Refusal>) {
    match answer {
        Ok(resp) => {
            log_response(shared, &incoming.req, incoming.peer, &resp);
            http::write_and_close(incoming.stream, &resp).await
        }
        Err(no) => incoming.refuse(shared, no).await,
    }
}
