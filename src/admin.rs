//! The admin listener: `/metrics` for Prometheus (and the status pages), on its own thread and
//! runtime so that a scrape is answered even when every worker is saturated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::LocalSet;

use crate::auth;
use crate::conn::{refuse, ToIngest};
use crate::http::{self, Method, Request};
use crate::metadata;
use crate::reasons::{Realm, Refusal};
use crate::shared::{stopped, Shared};
use crate::status;

/// A scrape request must arrive within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    listen_socket: std::net::TcpListener,
    to_ingest: UnboundedSender<ToIngest>,
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
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                accepted = listen_socket.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let task = serve(shared.clone(), to_ingest.clone(), stream, peer);
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
    to_ingest: UnboundedSender<ToIngest>,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let Ok(Ok((req, _))) =
        tokio::time::timeout(REQUEST_TIMEOUT, http::read_head(&mut stream)).await
    else {
        return;
    };
    // A title update checks its own credentials: the mount's source password will do.
    let answer = if req.method == Method::Get && metadata::is_metadata_path(&req.path) {
        metadata::update(&shared, &to_ingest, &req, peer)
    } else {
        authorize(&shared, &req, peer).and_then(|()| route(&shared, &req))
    };
    let resp = match answer {
        Ok(resp) => resp,
        Err(no) => return refuse(&shared, &mut stream, peer, no).await,
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&resp)).await;
    let _ = stream.shutdown().await;
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

fn route(shared: &Shared, req: &Request) -> Result<Vec<u8>, Refusal> {
    Ok(match (&req.method, req.path.as_str()) {
        (Method::Get, "/metrics") => {
            let body = shared.metrics.render();
            let mut r = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(&body);
            r
        }
        (Method::Get | Method::Head, p) if status::is_status_path(p) => {
            status::response(shared, req)
        }
        (Method::Get, _) => http::response(
            404,
            "Not Found",
            &[],
            "404 Not Found: try /metrics, /status.json or /status-json.xsl\n",
        ),
        _ => return Err(Refusal::MethodNotAllowed("GET, HEAD")),
    })
}
