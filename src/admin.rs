//! The admin listener: `/metrics` for Prometheus, the status pages and Icecast's admin API
//! ([`crate::admin_api`]), on its own thread and runtime so that a scrape is answered even when
//! every worker is saturated.
//!
//! Its connections are bounded apart from the listener port's: at most `max_admin_connections`
//! (part of the descriptor reserve, see `Config::descriptor_reserve`). At the limit it stops
//! accepting, except to take a newcomer in place of a connection that has sent no request for
//! [`REPLACE`], so idle connections cannot keep a scrape out. The accept loop
//! counts a connection in; its [`AdminConn`], dropped when its task ends, counts it out.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Notify;
use tokio::task::LocalSet;

use crate::admin_api;
use crate::auth;
use crate::conn::{close_unanswered, log_request, log_response, refuse_with, Control, ToIngest};
use crate::heads::{room_or, Heads, Pending, Replace};
use crate::http::{self, Method, Request, RESPONSE_TIMEOUT};
use crate::metadata;
use crate::reasons::{Realm, Refusal, Unanswered};
use crate::shared::{stopped, Shared};
use crate::status;

/// A scrape request must arrive within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// At the limit, an admin connection silent for 100 ms may be closed for a newcomer: Prometheus
/// and curl send the request with the connection, and this thread has nothing else to do than
/// read it, so shorter than on the listener port. At most 8 replacements still closing.
const REPLACE: Replace = Replace {
    min_age: Duration::from_millis(100),
    in_flight: 8,
};

/// Counts one admin connection while it lives; all of them live on the admin thread.
struct AdminConn {
    open: Rc<Cell<usize>>,
    room: Rc<Notify>,
}

impl Drop for AdminConn {
    fn drop(&mut self) {
        self.open.set(self.open.get() - 1);
        self.room.notify_one();
    }
}

pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    listen_socket: std::net::TcpListener,
    to_ingest: UnboundedSender<ToIngest>,
    control: Arc<[UnboundedSender<Control>]>,
) {
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let listen_socket = match tokio::net::TcpListener::from_std(listen_socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "admin listening socket cannot be registered");
                return;
            }
        };

        let mut stop = shared.stop.clone();
        let limit = shared.config.load().startup.max_admin_connections;
        let heads = Arc::new(Heads::default());
        let open = Rc::new(Cell::new(0));
        let room = Rc::new(Notify::new());
        loop {
            let at_limit = open.get() >= limit;
            if at_limit {
                let now = Instant::now();
                if let Err(until) = heads.room_by_replacing(REPLACE, open.get(), limit, now) {
                    tokio::select! {
                        _ = stopped(&mut stop) => break,
                        () = room_or(&room, until) => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = stopped(&mut stop) => break,
                _ = room.notified(), if at_limit => {}
                accepted = listen_socket.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let peer = crate::conn::canonical(peer);
                        let now = Instant::now();
                        if at_limit {
                            heads.evict_oldest(REPLACE.min_age, now);
                        }
                        let head = heads.enter(peer.ip(), 0, now).expect("no per-address limit");
                        open.set(open.get() + 1);
                        let conn = AdminConn { open: open.clone(), room: room.clone() };
                        let links = (to_ingest.clone(), control.clone());
                        let task = serve(shared.clone(), links, stream, peer, head, conn);
                        tokio::task::spawn_local(task);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
}

async fn serve(
    shared: Arc<Shared>,
    (to_ingest, control): (UnboundedSender<ToIngest>, Arc<[UnboundedSender<Control>]>),
    mut stream: TcpStream,
    peer: SocketAddr,
    head: Pending,
    _conn: AdminConn,
) {
    let read = tokio::select! {
        read = tokio::time::timeout(REQUEST_TIMEOUT, http::read_head(&mut stream)) => read,
        () = head.evicted() => {
            return close_unanswered(&shared, Unanswered::IdleHeadEvicted, peer, &stream);
        }
    };
    drop(head);
    let Ok(Ok((req, _))) = read else {
        return;
    };
    // A title update checks its own credentials: the mount's source password will do.
    let answer = if req.method == Method::Get && metadata::is_metadata_path(&req.path) {
        metadata::update(&shared, &to_ingest, &req, peer)
    } else if req.method == Method::Get && admin_api::is_admin_api_path(&req.path) {
        let to = admin_api::Links {
            to_ingest: &to_ingest,
            control: &control,
        };
        admin_api::answer(&shared, to, &req, peer, admin_api::Port::Admin).await
    } else if metadata::is_metadata_path(&req.path) || admin_api::is_admin_api_path(&req.path) {
        // Commands act on GET alone, as Icecast's do: a HEAD would run a kill or a move too.
        Err(Refusal::MethodNotAllowed("GET"))
    } else if req.method == Method::Get && req.path == "/metrics" {
        match authorize(&shared, &req, peer) {
            Ok(()) => return write_metrics(&shared, stream, &req, peer).await,
            Err(no) => Err(no),
        }
    } else {
        authorize(&shared, &req, peer).and_then(|()| route(&shared, &req))
    };
    let resp = match answer {
        Ok(resp) => resp,
        Err(no) => {
            let resp = no.response_for(&req);
            log_request(&shared, &req, peer, no.status(), resp.len());
            return refuse_with(&shared, &mut stream, peer, no, resp).await;
        }
    };
    log_response(&shared, &req, peer, &resp);
    http::write_and_close(stream, &resp).await;
}

/// A scrape's text goes out in writes of about this many bytes.
const METRICS_WRITE_BYTES: usize = 64 * 1024;

/// `/metrics`, written as it is rendered: at 1,000 mounts with listeners its text is 2.5 MB,
/// which a scrape then never holds whole (nor the allocator after it). HTTP/1.0 with no
/// Content-Length: the body ends where the connection closes, which Prometheus reads as such.
async fn write_metrics(shared: &Shared, mut stream: TcpStream, req: &Request, peer: SocketAddr) {
    refresh_hls_sessions(shared);
    // Edges leave without a word too: counted now, the silent ones forgotten.
    let edges = shared.edges.count(std::time::Instant::now());
    shared.metrics.edges.set(edges as i64);
    let mut buf = Vec::with_capacity(METRICS_WRITE_BYTES);
    buf.extend_from_slice(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nConnection: close\r\n\r\n",
    );
    let mut sent = 0;
    let _ = tokio::time::timeout(RESPONSE_TIMEOUT, async {
        let mut index = 0;
        loop {
            let more = shared.metrics.render_part(index, &mut buf);
            index += 1;
            if buf.len() >= METRICS_WRITE_BYTES || !more {
                stream.write_all(&buf).await?;
                sent += buf.len();
                buf.clear();
            }
            if !more {
                return stream.shutdown().await;
            }
        }
    })
    .await;
    log_request(shared, req, peer, 200, sent);
}

/// With `admin_password` set, every admin request must carry it (Prometheus sends it with
/// `basic_auth` in its scrape config); failures count towards the same per-address limit as
/// source logins.
fn authorize(shared: &Shared, req: &Request, peer: SocketAddr) -> Result<(), Refusal> {
    let cfg = shared.config.load();
    let Some(expected) = cfg.admin_password.as_deref() else {
        return Ok(());
    };
    let user = &cfg.admin_user;
    auth::check(
        &shared.auth_failures,
        &cfg,
        req,
        peer,
        Realm::Admin,
        user,
        expected,
    )
}

/// Sets `fanstream_hls_sessions` from the mounts' playlist polls, as they stand at the scrape:
/// players leave without a word, so only a count taken now says they left.
fn refresh_hls_sessions(shared: &Shared) {
    let mut by_label: std::collections::HashMap<String, i64> = Default::default();
    for m in shared.mounts.all() {
        if m.store.load().settings.hls {
            *by_label.entry(m.label.as_str().to_string()).or_default() +=
                m.hls_sessions_now() as i64;
        }
    }
    for (label, n) in by_label {
        shared
            .metrics
            .hls_sessions
            .with_label_values(&[&label])
            .set(n);
    }
}

fn route(shared: &Shared, req: &Request) -> Result<Vec<u8>, Refusal> {
    Ok(match (&req.method, req.path.as_str()) {
        (Method::Get | Method::Head, "/") => crate::page::response(shared, req),
        (Method::Get | Method::Head, p) if status::is_status_path(p) => {
            // The admin port is plain HTTP: Icecast's listen URLs.
            status::response(shared, req, &status::listen_base(shared, req, None))
        }
        (Method::Get, _) => http::response(
            404,
            "Not Found",
            &[],
            "404 Not Found: try /, /metrics, /status.json, /status-json.xsl or /admin/stats\n",
        ),
        _ => return Err(Refusal::MethodNotAllowed("GET, HEAD")),
    })
}
