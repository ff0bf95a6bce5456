//! The admin listener: `/metrics` for Prometheus (and the status pages), on its own thread and
//! runtime so that a scrape is answered even when every worker is saturated.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::task::LocalSet;

use crate::auth;
use crate::http::{self, Method, Request};
use crate::server::{stopped, Shared};
use crate::status;
use crate::worker::read_head;

/// The challenge sent with 401.
const ADMIN_REALM: &str = "Basic realm=\"fanstream admin\"";
/// A scrape request must arrive within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn run(rt: Runtime, shared: Arc<Shared>, listener: std::net::TcpListener) {
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "admin listener cannot be registered");
                return;
            }
        };

        let mut stop = shared.stop.clone();
        loop {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tokio::task::spawn_local(serve(shared.clone(), stream, peer));
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

async fn serve(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    let Ok(Ok((req, _))) = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await
    else {
        return;
    };
    let resp = match authorize(&shared, &req, peer) {
        Ok(()) => route(&shared, &req),
        Err(refused) => refused,
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&resp)).await;
    let _ = stream.shutdown().await;
}

/// With `admin_password` set, every admin request must carry it (Prometheus sends it with
/// `basic_auth` in its scrape config); failures count towards the same per-address limit as
/// source logins.
fn authorize(shared: &Shared, req: &Request, peer: SocketAddr) -> Result<(), Vec<u8>> {
    let cfg = shared.config.load();
    let Some(expected) = cfg.admin_password.as_deref() else {
        return Ok(());
    };
    auth::check(
        &shared.auth_failures,
        &cfg,
        req,
        peer,
        &cfg.admin_user,
        expected,
        "admin",
    )
    .map_err(|no| {
        shared.metrics.reject(no.reason);
        tracing::info!(%peer, status = no.status, reason = no.reason, "refused admin request");
        let body = format!(
            "{} {}: {}\n",
            no.status,
            no.phrase,
            no.reason.replace('_', " ")
        );
        http::response(no.status, no.phrase, &no.headers(ADMIN_REALM), &body)
    })
}

fn route(shared: &Shared, req: &Request) -> Vec<u8> {
    match (&req.method, req.path.as_str()) {
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
        _ => http::response(
            405,
            "Method Not Allowed",
            &[("Allow", "GET, HEAD")],
            "405 Method Not Allowed\n",
        ),
    }
}
