//! An edge registering with its origin for spill-over (`[master] register = true`): every
//! `interval_secs`, `GET /admin/register` on the origin (`http://` or `https://`, the
//! certificate checked as a relay's upstream's is), with the relay credentials, this server's
//! `public_url`, the listeners it holds and the most it takes (`max_listeners`) and the
//! interval, so that the origin can send it listeners while it has room ([`crate::edges`] on
//! the origin's side) and forget it once it falls silent.
//!
//! It is a task on the relays' thread (`fs-relays`), and follows the same plan: a reload that
//! turns registration on starts it, and one that turns it off, or points it at another origin,
//! first tells the origin registered with that this edge has no room left (as a graceful stop
//! does), so that it is sent no one in the three intervals before it is forgotten. A
//! registration is one small request an interval, each bounded by a timeout: an origin that
//! does not answer holds up no relay.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::sync::watch;

use crate::config::MasterSettings;
use crate::http_client::{request_head, HttpUrl};
use crate::relay::Plan;
use crate::shared::{stopped, Shared, Stop};

/// Where an origin takes registrations.
const REGISTER_PATH: &str = "/admin/register";
/// How long one registration may take, connecting (and a TLS handshake) included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the last report of an edge that is stopping, or stops registering, may take: the
/// server's stop (or the next registration) waits for it.
const LEAVING_TIMEOUT: Duration = Duration::from_secs(1);

/// The task's body: registers as each plan's `[master]` says until the server stops. On a
/// graceful stop (`SIGTERM`) it reports no room once more, so that the origin sends no listener
/// to an edge that is going away in the three intervals before it forgets it.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut plans: watch::Receiver<Arc<Plan>>,
    mut stop: watch::Receiver<Stop>,
) {
    let mut registrar: Option<Registrar> = None;
    loop {
        let plan = plans.borrow_and_update().clone();
        let wanted = plan.master.as_ref().filter(|m| m.register);
        let same = registrar
            .as_ref()
            .is_some_and(|r| Some(&r.master) == wanted && Arc::ptr_eq(&r.tls, &plan.tls));
        if !same {
            if let Some(old) = registrar.take() {
                old.leave(wanted.map(|m| m.url.as_str())).await;
            }
            registrar = wanted.and_then(|m| Registrar::new(shared.clone(), m, &plan.tls));
            if wanted.is_some() && registrar.is_none() {
                // `Config::validate` refused this before the server started or reloaded.
                tracing::error!(
                    "master.register needs master.url, public_url and password; not registering"
                );
            }
        }
        let how = tokio::select! {
            () = async {
                match registrar.as_mut() {
                    Some(r) => r.register_forever().await,
                    None => std::future::pending().await,
                }
            } => return,
            how = stopped(&mut stop) => how,
            changed = plans.changed() => match changed {
                Ok(()) => continue,
                Err(_) => Stop::Now,
            },
        };
        if let (Stop::Drain, Some(r)) = (how, registrar.as_mut()) {
            let _ = tokio::time::timeout(LEAVING_TIMEOUT, r.report(Some(0))).await;
        }
        return;
    }
}

/// What an edge tells its origin, and how its last attempts went.
struct Registrar {
    shared: Arc<Shared>,
    master: MasterSettings,
    tls: Arc<ClientConfig>,
    origin: HttpUrl,
    public_url: String,
    auth: (String, String),
    /// Every `interval_secs`, from the first registration: kept across reloads that leave
    /// registration as it was, which then register no sooner than they would have.
    tick: tokio::time::Interval,
    /// The last registration failed: a failing origin is logged once per streak, as relays log
    /// a failing upstream.
    failing: bool,
    /// Some registration was taken: the origin may be sending listeners here.
    registered: bool,
}

impl Registrar {
    fn new(shared: Arc<Shared>, master: &MasterSettings, tls: &Arc<ClientConfig>) -> Option<Self> {
        Some(Registrar {
            shared,
            origin: HttpUrl::parse(&master.url).ok()?,
            public_url: master.public_url.clone()?,
            auth: (
                master.user.clone().unwrap_or_else(|| "relay".into()),
                master.password.clone()?,
            ),
            tick: {
                let mut tick = tokio::time::interval(Duration::from_secs(master.interval_secs));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick
            },
            master: master.clone(),
            tls: tls.clone(),
            failing: false,
            registered: false,
        })
    }

    async fn register_forever(&mut self) {
        loop {
            self.tick.tick().await;
            self.report(None).await;
        }
    }

    /// Stops registering with this origin (a reload turned registration off, or moved it to
    /// `next_origin`): an origin that took a registration is told there is no room here, unless
    /// the next registration goes to it anyway.
    async fn leave(mut self, next_origin: Option<&str>) {
        if self.registered && next_origin != Some(self.master.url.as_str()) {
            let _ = tokio::time::timeout(LEAVING_TIMEOUT, self.report(Some(0))).await;
        }
        self.shared.metrics.edge_registered.set(0);
        let how = if next_origin.is_some() {
            "restarted"
        } else {
            "stopped"
        };
        tracing::info!(origin = %self.master.url, "registration with the origin {how} by the reload");
    }

    /// Registers once: the listeners held now, and the most this server takes (`max_listeners`,
    /// or `room_for` instead).
    async fn report(&mut self, room_for: Option<usize>) {
        let mut url = self.origin.clone();
        url.target = format!(
            "{REGISTER_PATH}?url={}&listeners={}&max_listeners={}&interval={}",
            percent_encode(&self.public_url),
            self.shared.listeners_total.load(Ordering::Relaxed),
            room_for.unwrap_or(self.shared.config.load().max_listeners),
            self.master.interval_secs,
        );
        let request = url.request(
            concat!("fanstream/", env!("CARGO_PKG_VERSION"), " (edge)"),
            Some((self.auth.0.as_str(), self.auth.1.as_str())),
        );
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, request_head(&url, &request, &self.tls));
        let result = match answer.await {
            Ok(Ok((_, head, _))) if head.status == 200 => Ok(()),
            Ok(Ok((_, head, _))) => Err(format!("answered {}", head.status)),
            Ok(Err(failure)) => Err(failure.to_string()),
            Err(_) => Err("timeout".to_string()),
        };
        self.registered |= result.is_ok();
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
