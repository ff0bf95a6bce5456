//! Checking credentials (sources and the admin listener), and slowing down password guessing:
//! after `auth_max_failures` failed logins of one kind (source, admin, relay, listener) from one
//! address within the window, that address gets 429 for that kind until the window ends. Kinds
//! are counted apart so that a panel with a stale admin password, or a listener mistyping theirs,
//! does not lock out the encoder on the same host.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::http::{secrets_equal, Request};
use crate::reasons::{Realm, Refusal};

/// Checks `Authorization: Basic` against `user` and `expected` (see [`check_given`]).
pub(crate) fn check(
    failures: &AuthFailures,
    cfg: &Config,
    req: &Request,
    peer: SocketAddr,
    realm: Realm,
    user: &str,
    expected: &str,
) -> Result<(), Refusal> {
    let given = req.basic_auth();
    check_given(
        failures,
        cfg,
        peer,
        &req.path,
        realm,
        given,
        &[(user, expected)],
    )
}

/// Checks credentials a client gave (from `Authorization: Basic`, or a SHOUTcast `pass=`)
/// against each accepted (user, password) pair, counting failures per address and refusing an
/// address that failed too often. Every part is compared in constant time, so timing tells a
/// guesser nothing about which part, or how much of it, was wrong. An empty password accepts
/// nothing. A failure logs a warning naming the realm, the path and the peer (never the
/// password).
pub(crate) fn check_given(
    failures: &AuthFailures,
    cfg: &Config,
    peer: SocketAddr,
    path: &str,
    realm: Realm,
    given: Option<(String, String)>,
    accepted: &[(&str, &str)],
) -> Result<(), Refusal> {
    let now = Instant::now();
    let client = cfg.client_key(peer.ip());
    let limits = AuthLimits::of(cfg);
    if let Some(wait) = failures.blocked(client, realm, now, limits) {
        return Err(Refusal::AuthRateLimited {
            retry_after_secs: wait.as_secs() + 1,
        });
    }
    let (given_user, given_pass) = given.ok_or(Refusal::AuthRequired(realm))?;
    let matches = accepted.iter().fold(false, |ok, (user, expected)| {
        let user_ok = secrets_equal(&given_user, user);
        let pass_ok = !expected.is_empty() && secrets_equal(&given_pass, expected);
        ok | (user_ok & pass_ok)
    });
    if !matches {
        failures.failed(client, realm, now, limits);
        tracing::warn!(%peer, %path, ?realm, "authentication failed");
        return Err(Refusal::BadCredentials(realm));
    }
    failures.succeeded(client, realm);
    Ok(())
}

/// Whether a request comes from an edge's relay: its Basic credentials name `relay_user` with
/// `relay_password`. Ok(false) when no relay password is set or the credentials name another
/// user (a listener of an `htpasswd` mount), so they are left for the mount's own check;
/// Err when they name the relay user with a wrong password: a relay refused is told so (401),
/// not taken for an anonymous listener, and the failure counts toward the per-address 429.
pub(crate) fn relay(
    failures: &AuthFailures,
    cfg: &Config,
    req: &Request,
    peer: SocketAddr,
) -> Result<bool, Refusal> {
    let Some(expected) = cfg.relay_password.as_deref() else {
        return Ok(false);
    };
    let given = req.basic_auth();
    if !given
        .as_ref()
        .is_some_and(|(user, _)| secrets_equal(user, &cfg.relay_user))
    {
        return Ok(false);
    }
    check_given(
        failures,
        cfg,
        peer,
        &req.path,
        Realm::Relay,
        given,
        &[(&cfg.relay_user, expected)],
    )?;
    Ok(true)
}

/// Addresses tracked at most; past it, expired entries are dropped, and if that is not enough
/// the table starts afresh (a flood from that many addresses is not stopped by a table anyway).
const MAX_TRACKED: usize = 10_000;

/// The limits in force; read from the config at each check, so a reload applies at once.
#[derive(Clone, Copy)]
pub(crate) struct AuthLimits {
    pub max_failures: u32,
    pub window: Duration,
}

impl AuthLimits {
    pub fn of(cfg: &Config) -> Self {
        AuthLimits {
            max_failures: cfg.auth_max_failures,
            window: Duration::from_secs(cfg.auth_failure_window_secs),
        }
    }
}

#[derive(Default)]
pub(crate) struct AuthFailures {
    /// Failures counted since the window's start, per address and kind of login.
    table: Mutex<HashMap<(IpAddr, Realm), (u32, Instant)>>,
}

impl AuthFailures {
    /// How long `ip` must wait before trying again, if it is blocked now.
    pub fn blocked(
        &self,
        ip: IpAddr,
        realm: Realm,
        now: Instant,
        limits: AuthLimits,
    ) -> Option<Duration> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (count, since) = *table.get(&(ip, realm))?;
        let ends = since + limits.window;
        (count >= limits.max_failures && now < ends).then(|| ends - now)
    }

    pub fn failed(&self, ip: IpAddr, realm: Realm, now: Instant, limits: AuthLimits) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= MAX_TRACKED {
            table.retain(|_, (_, since)| now < *since + limits.window);
            if table.len() >= MAX_TRACKED {
                table.clear();
            }
        }
        let entry = table.entry((ip, realm)).or_insert((0, now));
        if now >= entry.1 + limits.window {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    pub fn succeeded(&self, ip: IpAddr, realm: Realm) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.remove(&(ip, realm));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_failures: u32) -> AuthLimits {
        AuthLimits {
            max_failures,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let f = AuthFailures::default();
        let l = limits(3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..2 {
            f.failed(ip, Realm::Source, t0, l);
        }
        assert_eq!(f.blocked(ip, Realm::Source, t0, l), None);
        f.failed(ip, Realm::Source, t0, l);
        assert_eq!(
            f.blocked(ip, Realm::Source, t0 + Duration::from_secs(10), l),
            Some(Duration::from_secs(50))
        );
        assert_eq!(f.blocked(other, Realm::Source, t0, l), None);
        assert_eq!(
            f.blocked(ip, Realm::Source, t0 + Duration::from_secs(60), l),
            None
        );
        // A new window starts afresh.
        f.failed(ip, Realm::Source, t0 + Duration::from_secs(61), l);
        assert_eq!(
            f.blocked(ip, Realm::Source, t0 + Duration::from_secs(61), l),
            None
        );
    }

    /// A panel guessing the admin password (or left with a stale one) on the encoder's host
    /// does not lock the encoder out, nor does a listener's wrong password.
    #[test]
    fn each_kind_of_login_is_counted_apart() {
        let f = AuthFailures::default();
        let l = limits(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..2 {
            f.failed(ip, Realm::Admin, t0, l);
            f.failed(ip, Realm::Listener, t0, l);
        }
        assert!(f.blocked(ip, Realm::Admin, t0, l).is_some());
        assert!(f.blocked(ip, Realm::Listener, t0, l).is_some());
        assert_eq!(f.blocked(ip, Realm::Source, t0, l), None);
    }

    #[test]
    fn success_clears_the_count() {
        let f = AuthFailures::default();
        let l = limits(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        f.failed(ip, Realm::Source, t0, l);
        f.succeeded(ip, Realm::Source);
        f.failed(ip, Realm::Source, t0, l);
        assert_eq!(f.blocked(ip, Realm::Source, t0, l), None);
    }

    #[test]
    fn the_table_stays_bounded() {
        let f = AuthFailures::default();
        let l = limits(2);
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 50) {
            f.failed(IpAddr::from(i.to_be_bytes()), Realm::Source, t0, l);
        }
        assert!(f.table.lock().unwrap().len() <= MAX_TRACKED);
    }
}
