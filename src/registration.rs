//! An edge registering with its origin for spill-over (`[master] register = true`): every
//! `interval_secs`, `GET /admin/register` on the origin, with the relay credentials, this
//! server's `public_url`, the listeners it holds and the most it takes (`max_listeners`) and the
//! interval, so that the origin can send it listeners while it has room ([`crate::edges`] on
//! the origin's side) and forget it once it falls silent.
//!
//! It runs on a thread of its own (`fs-register`), apart from the relays: it is one small
//! request an interval, and a registration that hangs on an unreachable origin must hold up
//! no relay.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::config::MasterSettings;
use crate::http::MAX_HEAD_BYTES;
use crate::http_client::{parse_response, HttpUrl};
use crate::shared::{stopped, Shared, Stop};

/// Where an origin takes registrations.
const REGISTER_PATH: &str = "/admin/register";
/// How long one registration may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The thread's body: registers every `interval_secs` until the server stops.
pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    master: MasterSettings,
    mut stop: watch::Receiver<Stop>,
) {
    rt.block_on(async move {
        tokio::select! {
            () = register_forever(&shared, &master) => {}
            _ = stopped(&mut stop) => {}
        }
    });
}

async fn register_forever(shared: &Shared, master: &MasterSettings) {
    let (Ok(origin), Some(public_url), Some(password)) = (
        HttpUrl::parse(&master.url),
        master.public_url.as_deref(),
        master.password.as_deref(),
    ) else {
        // `Config::validate` refused these before the server started.
        tracing::error!(
            "master.register needs master.url, public_url and password; not registering"
        );
        return;
    };
    let user = master.user.as_deref().unwrap_or("relay");
    let mut tick = tokio::time::interval(Duration::from_secs(master.interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A failing origin is logged once per streak, as relays log a failing upstream.
    let mut failing = false;
    loop {
        tick.tick().await;
        let mut url = origin.clone();
        url.target = format!(
            "{REGISTER_PATH}?url={}&listeners={}&max_listeners={}&interval={}",
            percent_encode(public_url),
            shared.listeners_total.load(Ordering::Relaxed),
            shared.config.load().max_listeners,
            master.interval_secs,
        );
        let request = url.request(
            concat!("fanstream/", env!("CARGO_PKG_VERSION"), " (edge)"),
            Some((user, password)),
        );
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, status_of(&url, &request)).await {
            Ok(Ok(200)) => Ok(()),
            Ok(Ok(status)) => Err(format!("answered {status}")),
            Ok(Err(why)) => Err(why.to_string()),
            Err(_) => Err("timeout".to_string()),
        };
        shared
            .metrics
            .edge_registered
            .set(i64::from(result.is_ok()));
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(origin = %master.url, %public_url, "registered with the origin again");
            }
            Ok(()) => tracing::debug!(origin = %master.url, "registered with the origin"),
            Err(why) if !failing => {
                failing = true;
                tracing::warn!(origin = %master.url, reason = %why, "cannot register with the origin; the origin sends this edge no listeners until it can");
            }
            Err(_) => {}
        }
    }
}

/// Sends `request` to `url`'s server and reads the status of its answer.
async fn status_of(url: &HttpUrl, request: &[u8]) -> Result<u16, &'static str> {
    let mut stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|_| "connect")?;
    stream.write_all(request).await.map_err(|_| "connect")?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err("closed"),
            Ok(_) => {}
            Err(_) => return Err("read_error"),
        }
        match parse_response(&buf) {
            Ok(Some((head, _))) => return Ok(head.status),
            Ok(None) if buf.len() <= MAX_HEAD_BYTES => {}
            _ => return Err("bad_response"),
        }
    }
}

/// `text` as a query value: unreserved characters as they are, every other byte `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_goes_in_a_query_value_escaped() {
        assert_eq!(
            percent_encode("https://edge-1.example:8443"),
            "https%3A%2F%2Fedge-1.example%3A8443"
        );
    }
}
