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

/// How long the last report of an edge that is stopping may take: the server's stop waits
/// for it.
const LEAVING_TIMEOUT: Duration = Duration::from_secs(1);

/// The thread's body: registers every `interval_secs` until the server stops. On a graceful
/// stop (`SIGTERM`) it reports no room once more, so that the origin sends no listener to an
/// edge that is going away in the three intervals before it forgets it.
pub(crate) fn run(
    rt: Runtime,
    shared: Arc<Shared>,
    master: MasterSettings,
    mut stop: watch::Receiver<Stop>,
) {
    rt.block_on(async move {
        let Some(mut registrar) = Registrar::new(&shared, &master) else {
            // `Config::validate` refused this before the server started.
            tracing::error!(
                "master.register needs master.url, public_url and password; not registering"
            );
            return;
        };
        let how = tokio::select! {
            () = registrar.register_forever() => return,
            how = stopped(&mut stop) => how,
        };
        if how == Stop::Drain {
            let _ = tokio::time::timeout(LEAVING_TIMEOUT, registrar.report(Some(0))).await;
        }
    });
}

/// What an edge tells its origin, and how its last attempts went.
struct Registrar<'a> {
    shared: &'a Shared,
    master: &'a MasterSettings,
    origin: HttpUrl,
    public_url: &'a str,
    auth: (&'a str, &'a str),
    /// The last registration failed: a failing origin is logged once per streak, as relays log
    /// a failing upstream.
    failing: bool,
}

impl<'a> Registrar<'a> {
    fn new(shared: &'a Shared, master: &'a MasterSettings) -> Option<Self> {
        Some(Registrar {
            shared,
            master,
            origin: HttpUrl::parse(&master.url).ok()?,
            public_url: master.public_url.as_deref()?,
            auth: (
                master.user.as_deref().unwrap_or("relay"),
                master.password.as_deref()?,
            ),
            failing: false,
        })
    }

    async fn register_forever(&mut self) {
        let every = Duration::from_secs(self.master.interval_secs);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.report(None).await;
        }
    }

    /// Registers once: the listeners held now, and the most this server takes (`max_listeners`,
    /// or `room_for` instead).
    async fn report(&mut self, room_for: Option<usize>) {
        let mut url = self.origin.clone();
        url.target = format!(
            "{REGISTER_PATH}?url={}&listeners={}&max_listeners={}&interval={}",
            percent_encode(self.public_url),
            self.shared.listeners_total.load(Ordering::Relaxed),
            room_for.unwrap_or(self.shared.config.load().max_listeners),
            self.master.interval_secs,
        );
        let request = url.request(
            concat!("fanstream/", env!("CARGO_PKG_VERSION"), " (edge)"),
            Some(self.auth),
        );
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, status_of(&url, &request)).await {
            Ok(Ok(200)) => Ok(()),
            Ok(Ok(status)) => Err(format!("answered {status}")),
            Ok(Err(why)) => Err(why.to_string()),
            Err(_) => Err("timeout".to_string()),
        };
        let origin = &self.master.url;
        self.shared
            .metrics
            .edge_registered
            .set(i64::from(result.is_ok()));
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(%origin, public_url = %self.public_url, "registered with the origin again");
            }
            Ok(()) => tracing::debug!(%origin, "registered with the origin"),
            Err(why) if !self.failing => {
                self.failing = true;
                tracing::warn!(%origin, reason = %why, "cannot register with the origin; the origin sends this edge no listeners until it can");
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
