//! Relays: mounts fed by pulling a stream from another server (fanstream or Icecast) instead of
//! by an encoder, as Icecast's `<relay>` does; an origin-edge tree is built from them.
//!
//! A relay sends what Icecast's relay sends (`GET` over HTTP/1.0, `Icy-MetaData: 1`, a
//! `User-Agent` naming fanstream, Basic credentials when configured), over TCP or TLS
//! (`https://`, [`crate::tls::connect`]), follows redirects (at most
//! [`MAX_REDIRECTS`]), takes the ICY blocks out of the stream ([`crate::icy::Deinterleaver`]) and
//! hands ingest the audio and the titles the same way the demo and `/admin/metadata` do: the
//! audio as a [`SourceConn`] fed by [`Feed::Pieces`], the titles as [`ToIngest::Title`]. Ingest
//! then treats it as any pushed source: the format layer finds frames, keeps Ogg header pages,
//! and fanstream's own ICY listeners and status pages get the titles.
//!
//! Each upstream connection is one source connection: when it ends, ingest keeps the listeners
//! for the mount's grace period, as for an encoder restart, and the next connection (to the same
//! or another upstream) continues the mount where it stood.
//!
//! # Failover
//!
//! On a failure (refused, garbage, closed, or silent for `source_timeout_secs`) the relay tries
//! the next upstream at once; once every upstream failed in a row, it waits (a backoff that
//! doubles from [`BACKOFF_FIRST`] to [`BACKOFF_MAX`], each wait drawn between half of it and
//! all of it, so that edges restarted together do not return together) and starts again with
//! the first. An upstream that streamed for [`STABLE`] or more (the silence before a stall not
//! counted) resets the backoff. With
//! `prefer_first`, a relay on a later upstream tries the first every `retry_secs` and moves
//! back to it as soon as it answers with the same content type.
//!
//! # Reload
//!
//! The thread runs a [`Plan`] (the config's relays, its `[master]`, the TLS settings); a reload
//! sends a new one, and the thread stops the relays that left or changed, waits until each is
//! gone (its upstream connection closed), starts the new ones, and leaves the others streaming.
//!
//! # Why a thread of their own
//!
//! Relays run as tasks on one thread (`fs-relays`), not on ingest's: ingest is the one thread
//! that publishes every mount, and pulling is network I/O (connecting, DNS lookups, slow or
//! stalled upstreams, redirects) that must never delay it. The price is one channel hop per
//! piece, which the demo pays too.
//!
//! # Memory
//!
//! An edge relays every mount of a hosting origin, so what a relay keeps is paid a thousand
//! times. The relays read into one buffer they share ([`read_copied`]) and copy each read out,
//! into allocations cut at the allocator's size classes, as ingest copies an encoder's reads.
//! Split off a buffer of its own, a read would keep that 64 KiB buffer alive for as long as
//! the mount retains any piece of it: up to three such buffers a mount behind a 64 KiB burst.
//! An edge relaying 1,000 mounts at 128 kbit/s to 10 listeners each took 174 MiB of RSS so,
//! 106 MiB with the copy (docs/performance/many-stations.md, tenth pass).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prometheus::{IntCounter, IntGauge};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, ReadBuf};
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::chunked::ChunkedDecoder;
use crate::config::{MasterSettings, RelaySettings};
use crate::conn::{Feed, SourceConn, TitleUpdate, ToIngest};
use crate::http::{clean_header_value, valid_mount_path};
use crate::http_client::{request_head, Failure, HttpUrl, Io, Response, READ_BUF_BYTES};
use crate::icy::{Deinterleaver, StreamTitle};
use crate::shared::{stopped, wait_until, Demand, Shared, Stop};
use crate::store::{copy_in, SourceState, StreamInfo, StreamMeta};

/// Redirects followed before an upstream counts as failed: Icecast follows a few, and a loop
/// must end.
pub(crate) const MAX_REDIRECTS: usize = 5;
/// Where an Icecast origin lists its mounts, one a line.
const STREAMLIST_PATH: &str = "/admin/streamlist.txt";
/// The longest mount list read: some 4,000 mounts of 256 bytes.
const MAX_STREAMLIST_BYTES: usize = 1 << 20;
/// Pieces in flight to ingest, as for the demo: a busy ingest thread costs no gap.
const PIECES_IN_FLIGHT: usize = 64;
/// The first wait after every upstream failed in a row.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait: an origin that comes back is pulled from within this.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An upstream that streamed this long was healthy: its failure is news, not part of a
/// failing streak, so the backoff starts over.
const STABLE: Duration = Duration::from_secs(5);
/// How long a relay waits for ingest to let its previous connection go before the next one
/// claims the mount: ingest releases it as soon as it sees the pieces end, within milliseconds.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// What the relays thread runs: the config's `[[relays]]` and `[master]`, and the TLS settings
/// for `https://` upstreams. A reload hands the thread a new one.
pub(crate) struct Plan {
    pub relays: Vec<RelaySettings>,
    pub master: Option<MasterSettings>,
    pub tls: Arc<ClientConfig>,
    /// The `relay_ca_file` that `tls` was made with, and its contents: a reload that finds the
    /// same keeps `tls`, so that relays over `https://` are not restarted for nothing.
    pub ca: Option<(std::path::PathBuf, Vec<u8>)>,
}

/// A relay's task and the settings it runs with.
struct Running {
    settings: RelaySettings,
    task: JoinHandle<()>,
}

/// Stops a task and waits until it is dropped: its upstream connection closed, its on-demand
/// registration gone, so that a successor starts clean.
async fn end(task: JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

/// The relays thread's body, beside the edge's registration: runs the plan's relays, and
/// the mirror of its `master` if set; on each new plan (a reload), stops the relays that left or
/// changed, starts the new and changed ones, and leaves the others streaming. Runs until the
/// server stops (dropping the runtime then drops every relay and its connections).
pub(crate) async fn run(
    shared: Arc<Shared>,
    to_ingest: UnboundedSender<ToIngest>,
    mut plans: watch::Receiver<Arc<Plan>>,
    mut stop: watch::Receiver<Stop>,
) {
    let mut relays: HashMap<String, Running> = HashMap::new();
    // The mirror, with its settings and the mounts it leaves to `[[relays]]`.
    let mut mirrored: Option<(MasterSettings, HashSet<String>, JoinHandle<()>)> = None;
    let mut tls: Option<Arc<ClientConfig>> = None;
    loop {
        let plan = plans.borrow_and_update().clone();
        let tls_changed = !tls.as_ref().is_some_and(|t| Arc::ptr_eq(t, &plan.tls));
        tls = Some(plan.tls.clone());
        let wanted: HashMap<&str, &RelaySettings> =
            plan.relays.iter().map(|r| (r.mount.as_str(), r)).collect();
        let mounts: Vec<String> = relays.keys().cloned().collect();
        for mount in mounts {
            let keep = wanted.get(mount.as_str()).is_some_and(|new| {
                **new == relays[&mount].settings && !(tls_changed && uses_tls(new))
            });
            if !keep {
                let old = relays.remove(&mount).expect("listed");
                end(old.task).await;
                let why = if wanted.contains_key(mount.as_str()) {
                    "restarted"
                } else {
                    "removed"
                };
                tracing::info!(%mount, "relay {why} by the reload");
            }
        }
        // A mirror whose settings changed starts over (its relays with it); so does one
        // that must yield a mount to a `[[relays]]` entry that is new.
        let configured: HashSet<String> = wanted.keys().map(|m| m.to_string()).collect();
        if let Some((master, left, task)) = mirrored.take() {
            let same = plan.master.as_ref() == Some(&master) && left == configured;
            if same && !tls_changed && !task.is_finished() {
                mirrored = Some((master, left, task));
            } else {
                end(task).await;
                shared.metrics.relay_mirrored.set(0);
                tracing::info!("mirror of the master stopped by the reload");
            }
        }
        for settings in &plan.relays {
            if relays.contains_key(&settings.mount) {
                continue;
            }
            if let Some(task) = spawn_relay(&shared, &to_ingest, &plan.tls, settings.clone()) {
                let settings = settings.clone();
                relays.insert(settings.mount.clone(), Running { settings, task });
            }
        }
        if mirrored.is_none() {
            if let Some(master) = plan.master.clone() {
                let task = tokio::spawn(mirror(
                    shared.clone(),
                    to_ingest.clone(),
                    master.clone(),
                    configured.clone(),
                    plan.tls.clone(),
                ));
                mirrored = Some((master, configured, task));
            }
        }
        tokio::select! {
            _ = stopped(&mut stop) => break,
            changed = plans.changed() => if changed.is_err() { break },
        }
    }
}

/// Whether a relay pulls from an `https://` upstream (its connections depend on the TLS
/// settings).
fn uses_tls(settings: &RelaySettings) -> bool {
    settings
        .upstreams
        .iter()
        .any(|u| HttpUrl::parse(u).is_ok_and(|u| u.tls))
}

/// Starts one relay as a task; None if its settings are unusable (which `Config::validate`
/// refused before the server started).
fn spawn_relay(
    shared: &Arc<Shared>,
    to_ingest: &UnboundedSender<ToIngest>,
    tls: &Arc<ClientConfig>,
    settings: RelaySettings,
) -> Option<JoinHandle<()>> {
    match Relay::new(shared.clone(), to_ingest.clone(), tls.clone(), settings) {
        Ok(relay) => Some(tokio::spawn(relay.run())),
        Err(e) => {
            tracing::error!(error = %e, "relay not started");
            None
        }
    }
}

/// The mirror's relays, stopped with it: when the server's reload stops the mirror, its
/// relays go too.
#[derive(Default)]
struct Mirrored(HashMap<String, JoinHandle<()>>);

impl Drop for Mirrored {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// Mirrors an origin: reads its `/admin/streamlist.txt` every `interval_secs` and keeps one
/// relay per mount listed (but those `[[relays]]` feeds), stopping the relay of a mount no
/// longer listed (its listeners then wait the grace period, as for any source that left). A
/// list that cannot be read changes nothing: the relays keep going on their own.
async fn mirror(
    shared: Arc<Shared>,
    to_ingest: UnboundedSender<ToIngest>,
    master: MasterSettings,
    configured: HashSet<String>,
    tls: Arc<ClientConfig>,
) {
    let Ok(base) = HttpUrl::parse(&master.url) else {
        tracing::error!(url = %master.url, "master.url is not usable; no mirror");
        return;
    };
    let list = HttpUrl {
        target: STREAMLIST_PATH.into(),
        ..base.clone()
    };
    let auth = master
        .password
        .clone()
        .map(|p| (master.user.clone().unwrap_or_else(|| "relay".into()), p));
    let request = list.request(
        &format!("fanstream/{} (relay)", env!("CARGO_PKG_VERSION")),
        auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
    );
    let mut running = Mirrored::default();
    let mut failing = None;
    let mut tick = tokio::time::interval(Duration::from_secs(master.interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let timeout = Duration::from_secs(shared.config.load().source_timeout_secs);
        let fetched = tokio::time::timeout(timeout, fetch_list(&list, &request, &tls)).await;
        let mounts = match fetched.unwrap_or(Err("timeout")) {
            Ok(mounts) => mounts,
            Err(why) => {
                shared
                    .metrics
                    .relay_failovers
                    .with_label_values(&[STREAMLIST_PATH, why])
                    .inc();
                if failing != Some(why) {
                    tracing::warn!(url = %list.public(), reason = why, "cannot read the master's mount list");
                    failing = Some(why);
                }
                continue;
            }
        };
        failing = None;
        let max = shared.config.load().source_limit();
        let wanted: HashSet<&String> = mounts
            .iter()
            .filter(|m| !configured.contains(*m))
            .take(max)
            .collect();
        running.0.retain(|mount, task| {
            let keep = wanted.contains(mount);
            if !keep {
                tracing::info!(%mount, "mount left the master: relay stopped");
                task.abort();
            }
            keep
        });
        for mount in wanted {
            if running.0.contains_key(mount) {
                continue;
            }
            let upstream = HttpUrl {
                target: mount.clone(),
                ..base.clone()
            };
            let settings = RelaySettings {
                mount: mount.clone(),
                upstreams: vec![upstream.public()],
                user: master.user.clone(),
                password: master.password.clone(),
                on_demand: master.on_demand,
                prefer_first: false,
                retry_secs: master.interval_secs,
            };
            tracing::info!(%mount, "mount found on the master: relay started");
            if let Some(task) = spawn_relay(&shared, &to_ingest, &tls, settings) {
                running.0.insert(mount.clone(), task);
            }
        }
        shared.metrics.relay_mirrored.set(running.0.len() as i64);
    }
}

/// Reads the master's mount list: one mount path a line; lines that are not mount paths are
/// skipped.
async fn fetch_list(
    url: &HttpUrl,
    request: &[u8],
    tls: &Arc<ClientConfig>,
) -> Result<Vec<String>, &'static str> {
    let (mut stream, head, mut body) = request_head(url, request, tls).await.map_err(|f| {
        if let Some(detail) = &f.detail {
            tracing::debug!(url = %url.public(), reason = f.reason, %detail, "mount list not read");
        }
        f.reason
    })?;
    match head.status {
        200..=299 => {}
        401 | 403 => return Err("unauthorized"),
        404 => return Err("not_found"),
        _ => return Err("status"),
    }
    loop {
        if body.len() > MAX_STREAMLIST_BYTES {
            return Err("bad_response");
        }
        match stream.read_buf(&mut body).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Err("read_error"),
        }
    }
    let text = if head
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        let mut decoded = BytesMut::new();
        ChunkedDecoder::default()
            .decode(&body, &mut decoded)
            .map_err(|_| "bad_chunked")?;
        decoded
    } else {
        body
    };
    let mut mounts = Vec::new();
    for line in String::from_utf8_lossy(&text).lines() {
        let mount = line.trim();
        if valid_mount_path(mount) && !mounts.iter().any(|m| m == mount) {
            mounts.push(mount.to_string());
        }
    }
    Ok(mounts)
}

/// One relay: a mount and the upstreams it pulls from.
struct Relay {
    shared: Arc<Shared>,
    to_ingest: UnboundedSender<ToIngest>,
    mount: String,
    upstreams: Vec<HttpUrl>,
    /// Basic credentials for the configured upstreams' server.
    auth: Option<(String, String)>,
    /// For `https://` upstreams (and those a redirect leads to).
    tls: Arc<ClientConfig>,
    prefer_first: bool,
    retry: Duration,
    user_agent: String,
    received: IntCounter,
    /// Set for an on-demand relay: what admission wakes it with.
    demand: Option<Arc<Demand>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(demand) = &self.demand {
            self.shared.on_demand.unregister(&self.mount, demand);
        }
    }
}

/// An upstream that answered `2xx`, past its response head.
struct Opened {
    stream: Box<dyn Io>,
    head: Response,
    /// Body bytes that arrived with the head.
    leftover: BytesMut,
}

impl Opened {
    /// The stream's content type, made safe to echo to listeners.
    fn content_type(&self) -> Option<String> {
        self.head
            .header("content-type")
            .map(clean_header_value)
            .filter(|t| !t.is_empty())
    }
}

/// How one upstream connection ended.
enum Ended {
    /// It failed, for this reason (a `fanstream_relay_failovers_total` label).
    Failed(&'static str),
    /// The first upstream answers again (`prefer_first`): here it is, ready to stream.
    Preferred(Opened),
    /// On demand: the mount has no listener, and none asked within `source_timeout_secs`.
    Unwanted,
}

impl Relay {
    fn new(
        shared: Arc<Shared>,
        to_ingest: UnboundedSender<ToIngest>,
        tls: Arc<ClientConfig>,
        settings: RelaySettings,
    ) -> Result<Relay, String> {
        let upstreams = settings
            .upstreams
            .iter()
            .map(|u| HttpUrl::parse(u).map_err(|e| format!("{u}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if upstreams.is_empty() {
            return Err(format!("relay for {}: no upstream", settings.mount));
        }
        let auth = settings.password.clone().map(|p| {
            let user = settings.user.clone().unwrap_or_else(|| "relay".into());
            (user, p)
        });
        let received = shared
            .metrics
            .relay_received_bytes
            .with_label_values(&[settings.mount.as_str()]);
        let demand = settings
            .on_demand
            .then(|| shared.on_demand.register(&settings.mount));
        Ok(Relay {
            shared,
            to_ingest,
            mount: settings.mount,
            upstreams,
            auth,
            tls,
            prefer_first: settings.prefer_first,
            retry: Duration::from_secs(settings.retry_secs),
            user_agent: format!("fanstream/{} (relay)", env!("CARGO_PKG_VERSION")),
            received,
            demand,
        })
    }

    /// Pulls from the upstreams in turn, forever (the thread's runtime ends it).
    async fn run(self) {
        // A relay restarted by a reload follows its predecessor on the mount.
        self.released().await;
        let Some(demand) = self.demand.clone() else {
            return self.pull().await;
        };
        loop {
            if !self.wanted() {
                demand.wake.notified().await;
            }
            self.pull().await;
        }
    }

    /// On demand: whether the mount has listeners or HLS players (those that polled its
    /// playlist lately), or one asked within `source_timeout_secs` (a listener waiting in
    /// admission for the mount to go live, an HLS request). Always true for other relays.
    fn wanted(&self) -> bool {
        let Some(demand) = &self.demand else {
            return true;
        };
        let listened = self
            .shared
            .mounts
            .get(&self.mount)
            .is_some_and(|m| m.listeners_and_relays() > 0 || m.hls_sessions_now() > 0);
        listened || demand.asked_within(self.timeout())
    }

    /// Pulls from the upstreams in turn until, on demand, the mount is no longer wanted (for
    /// other relays, forever).
    async fn pull(&self) {
        let n = self.upstreams.len();
        let mut index = 0;
        let mut failed_in_row = 0;
        let mut backoff = Backoff::default();
        let mut preferred = None;
        // The failures logged in this streak, as (upstream, reason): each is logged once.
        let mut logged = HashSet::new();
        loop {
            if !self.wanted() {
                tracing::info!(mount = %self.mount, "on-demand relay idle: no listeners");
                return;
            }
            let upstream = self.upstreams[index].public();
            let opened = match preferred.take() {
                Some(opened) => Ok(opened),
                None => self.open(index).await,
            };
            let (why, detail, healthy) = match opened {
                Err(f) => (f.reason, f.detail, false),
                Ok(opened) => {
                    let started = Instant::now();
                    match self.feed(index, opened).await {
                        Ended::Failed(why) => {
                            // A stall is seen a timeout after the last byte: that time was
                            // silence, not streaming. An upstream that answers and then sends
                            // nothing is a failing one, backed off and logged once.
                            let silent = if why == "stalled" {
                                self.timeout()
                            } else {
                                Duration::ZERO
                            };
                            let streamed = started.elapsed().saturating_sub(silent);
                            (why, None, streamed >= STABLE)
                        }
                        Ended::Unwanted => continue,
                        Ended::Preferred(opened) => {
                            self.count_failover("preferred");
                            tracing::info!(mount = %self.mount, from = %upstream, to = %self.upstreams[0].public(), "relay returns to its first upstream");
                            preferred = Some(opened);
                            (index, failed_in_row) = (0, 0);
                            logged.clear();
                            backoff = Backoff::default();
                            continue;
                        }
                    }
                }
            };
            self.count_failover(why);
            if healthy {
                // A new streak: the failure of an upstream that streamed is news.
                logged.clear();
            }
            if logged.insert((index, why)) {
                let detail = detail.unwrap_or_default();
                tracing::warn!(mount = %self.mount, %upstream, reason = why, %detail, "relay upstream failed");
            }
            if healthy {
                failed_in_row = 0;
                backoff = Backoff::default();
            }
            failed_in_row += 1;
            index = (index + 1) % n;
            if failed_in_row >= n {
                (index, failed_in_row) = (0, 0);
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }

    fn count_failover(&self, why: &str) {
        self.shared
            .metrics
            .relay_failovers
            .with_label_values(&[self.mount.as_str(), why])
            .inc();
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.shared.config.load().source_timeout_secs)
    }

    /// Connects to upstream `index`, following redirects, until a `2xx` answer; Err says why not.
    async fn open(&self, index: usize) -> Result<Opened, Failure> {
        let first = &self.upstreams[index];
        let mut url = first.clone();
        for _ in 0..=MAX_REDIRECTS {
            // The configured credentials go to the configured server only, not to wherever a
            // redirect points.
            let auth = self
                .auth
                .as_ref()
                .filter(|_| url.same_server(first))
                .map(|(u, p)| (u.as_str(), p.as_str()));
            let request = url.request(&self.user_agent, auth);
            let (stream, head, leftover) =
                tokio::time::timeout(self.timeout(), request_head(&url, &request, &self.tls))
                    .await
                    .map_err(|_| "timeout")??;
            match head.status {
                200..=299 => {
                    return Ok(Opened {
                        stream,
                        head,
                        leftover,
                    })
                }
                301 | 302 | 303 | 307 | 308 => {
                    let location = head.header("location").ok_or("bad_redirect")?;
                    url = url.join(location).map_err(|_| "bad_redirect")?;
                }
                status => {
                    let reason = match status {
                        401 | 403 => "unauthorized",
                        404 => "not_found",
                        _ => "status",
                    };
                    // What the upstream said: a 403 is bad credentials to one server and "max
                    // listeners reached" to Icecast.
                    return Err(Failure {
                        reason,
                        detail: Some(format!("{} answered {status}", url.public())),
                    });
                }
            }
        }
        Err("redirect_loop".into())
    }

    /// Opens the first upstream every `retry_secs`, until it answers with `content_type`.
    async fn probe_first(&self, content_type: &str) -> Opened {
        loop {
            tokio::time::sleep(self.retry).await;
            match self.open(0).await {
                Ok(opened) if opened.content_type().as_deref() == Some(content_type) => {
                    return opened
                }
                Ok(_) => {
                    tracing::debug!(mount = %self.mount, "first upstream's content type differs")
                }
                Err(f) => {
                    tracing::debug!(mount = %self.mount, reason = f.reason, "first upstream still failing")
                }
            }
        }
    }

    /// Feeds the mount from an open upstream until it fails (or, with `prefer_first`, until the
    /// first upstream answers again).
    async fn feed(&self, index: usize, opened: Opened) -> Ended {
        let Some(content_type) = opened.content_type() else {
            return Ended::Failed("no_content_type");
        };
        // Listeners kept through the grace period hold a stream of one type: another type would
        // reach them as garbage, so it waits until the mount has closed.
        if let Some(mount) = self.shared.mounts.get(&self.mount) {
            if mount.store.load().info.meta.content_type != content_type {
                return Ended::Failed("content_type");
            }
        }
        let metaint = match opened.head.header("icy-metaint") {
            None => None,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Ended::Failed("bad_response"),
            },
        };
        let chunked = opened
            .head
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let upstream = self.upstreams[index].public();
        let meta = stream_meta(&opened.head, content_type.clone(), upstream.clone());
        let info = StreamInfo::new(meta, Bytes::new());
        let (pieces, rx) = mpsc::channel(PIECES_IN_FLIGHT);
        let (claimed_tx, claimed_rx) = oneshot::channel();
        let source = SourceConn {
            mount: self.mount.clone(),
            info,
            feed: Feed::Pieces {
                rx,
                origin: format!("relay {upstream}"),
            },
            log: None,
            claimed: Some(claimed_tx),
        };
        if self
            .to_ingest
            .send(ToIngest::Source(Box::new(source)))
            .is_err()
        {
            return Ended::Failed("stopping");
        }
        match claimed_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(no)) => {
                tracing::debug!(mount = %self.mount, reason = no.reason(), "ingest refused the relay");
                return Ended::Failed("refused");
            }
            Err(_) => return Ended::Failed("stopping"),
        }
        tracing::info!(mount = %self.mount, %upstream, %content_type, "relay streaming");
        let m = &self.shared.metrics;
        let labels = [self.mount.as_str(), upstream.as_str()];
        m.relay_connects.with_label_values(&labels).inc();
        let up = Up::new(m.relay_up.with_label_values(&labels));
        let mut body = Body {
            decoder: chunked.then(ChunkedDecoder::default),
            icy: metaint.map(Deinterleaver::new),
            title: None,
            audio: Vec::new(),
            titles: Vec::new(),
        };
        let ended = self
            .stream(index, opened, &content_type, &mut body, pieces)
            .await;
        drop(up);
        self.released().await;
        ended
    }

    /// Reads the upstream's body into the mount's pieces and titles; returns how it ended.
    async fn stream(
        &self,
        index: usize,
        opened: Opened,
        content_type: &str,
        body: &mut Body,
        pieces: mpsc::Sender<Bytes>,
    ) -> Ended {
        let Opened {
            mut stream,
            leftover,
            ..
        } = opened;
        let timeout = self.timeout();
        // On demand, how often the relay looks whether its mount still has listeners.
        let mut idle = tokio::time::interval(Duration::from_secs(1));
        let mut probe: Option<Pin<Box<dyn Future<Output = Opened> + Send + '_>>> =
            (self.prefer_first && index > 0).then(|| {
                Box::pin(self.probe_first(content_type)) as Pin<Box<dyn Future<Output = _> + Send>>
            });
        // The body bytes that came with the head go first.
        if let Err(ended) = self.pass_on(body, &pieces, copy_in(&leftover)).await {
            return ended;
        }
        drop(leftover);
        loop {
            let preferred = async {
                match probe.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = idle.tick(), if self.demand.is_some() => if !self.wanted() {
                    return Ended::Unwanted;
                },
                got = tokio::time::timeout(timeout, read_copied(&mut stream)) => match got {
                    Err(_) => return Ended::Failed("stalled"),
                    Ok(Ok((head, _))) if head.is_empty() => return Ended::Failed("closed"),
                    Ok(Ok(read)) => if let Err(ended) = self.pass_on(body, &pieces, read).await {
                        return ended;
                    },
                    Ok(Err(_)) => return Ended::Failed("read_error"),
                },
                opened = preferred => return Ended::Preferred(opened),
            }
        }
    }

    /// Takes one read of the body (as [`copy_in`] cut it) and passes its audio on to ingest and
    /// its titles to the mount; Err says how the upstream ended.
    async fn pass_on(
        &self,
        body: &mut Body,
        pieces: &mpsc::Sender<Bytes>,
        (head, tail): (Bytes, Option<Bytes>),
    ) -> Result<(), Ended> {
        for raw in std::iter::once(head).chain(tail) {
            if raw.is_empty() {
                continue;
            }
            self.received.inc_by(raw.len() as u64);
            body.take(raw).map_err(Ended::Failed)?;
        }
        for piece in body.audio.drain(..) {
            if pieces.send(piece).await.is_err() {
                return Err(Ended::Failed("ingest_ended"));
            }
        }
        for title in body.titles.drain(..) {
            let update = TitleUpdate {
                mount: self.mount.clone(),
                title: Some(title.title).filter(|t| !t.is_empty()),
                artist: None,
                url: title.url,
            };
            let _ = self.to_ingest.send(ToIngest::Title(update));
        }
        if body.decoder.as_ref().is_some_and(|d| d.is_done()) {
            return Err(Ended::Failed("closed"));
        }
        Ok(())
    }

    /// Waits until ingest has let this relay's previous connection go (it sees the pieces end
    /// and releases the mount), so that the next connection's claim is not refused as a second
    /// source: at most [`RELEASE_WAIT`], woken by ingest when the mount's source state changes.
    async fn released(&self) {
        // A mount not in the table has no source to let go. The one found stays the mount at
        // this path until its source is gone (only then can ingest replace it).
        let Some(mount) = self.shared.mounts.get(&self.mount) else {
            return;
        };
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        let not_live = || (mount.store.load().state != SourceState::Live).then_some(());
        wait_until(&mount.source_changed, deadline, not_live).await;
    }
}

/// `fanstream_relay_up` for one upstream, 1 while this lives: a relay stopped in the middle of
/// a stream (its mount left the master, the server stops) sets it back too.
struct Up(IntGauge);

impl Up {
    fn new(gauge: IntGauge) -> Up {
        gauge.set(1);
        Up(gauge)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

/// What the upstream says about its stream (`icy-*` headers, as fanstream and Icecast send
/// them, or `ice-*`), for this mount's listeners and status pages.
fn stream_meta(head: &Response, content_type: String, upstream: String) -> StreamMeta {
    let pick = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| head.header(n))
            .map(clean_header_value)
            .filter(|v| !v.is_empty())
    };
    StreamMeta {
        content_type,
        name: pick(&["icy-name", "ice-name"]),
        description: pick(&["icy-description", "ice-description"]),
        genre: pick(&["icy-genre", "ice-genre"]),
        url: pick(&["icy-url", "ice-url"]),
        public: pick(&["icy-pub", "ice-public"]),
        bitrate_kbps: pick(&["icy-br", "ice-bitrate"]).and_then(|b| b.parse().ok()),
        audio_info: pick(&["ice-audio-info"]),
        started: Some(std::time::SystemTime::now()),
        subtype: None,
        relayed_from: Some(upstream),
        source_ip: None,
        user_agent: None,
    }
}

thread_local! {
    /// Where the relays on this thread read (see the module's doc, "Memory"): what a read
    /// brings is copied out before the read's future returns, so no relay holds it across an
    /// await.
    static READ_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF_BYTES]);
}

/// Reads what the upstream sent, up to [`READ_BUF_BYTES`], copied out of the relays' shared
/// buffer into memory the store may keep ([`copy_in`]); empty at the end of the stream.
/// Cancel-safe: bytes are taken from the stream only in the poll that returns them.
async fn read_copied(stream: &mut Box<dyn Io>) -> std::io::Result<(Bytes, Option<Bytes>)> {
    std::future::poll_fn(|cx| {
        READ_BUF.with_borrow_mut(|buf| {
            let mut room = ReadBuf::new(buf);
            match Pin::new(&mut **stream).poll_read(cx, &mut room) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => Poll::Ready(Ok(copy_in(room.filled()))),
            }
        })
    })
    .await
}

/// An upstream's body on its way to ingest: chunked decoding, then the ICY blocks taken out.
struct Body {
    decoder: Option<ChunkedDecoder>,
    icy: Option<Deinterleaver>,
    /// The title last passed on: an upstream repeating its block makes no update.
    title: Option<StreamTitle>,
    /// Audio pieces and new titles from the last [`Body::take`].
    audio: Vec<Bytes>,
    titles: Vec<StreamTitle>,
}

impl Body {
    /// Takes a piece of the body; Err says why the upstream is given up.
    fn take(&mut self, raw: Bytes) -> Result<(), &'static str> {
        let Some(d) = self.decoder.as_mut() else {
            return self.take_decoded(raw);
        };
        // Decoded into a buffer of its own and copied out, as the read was: the pieces the
        // store keeps hold no spare room, and the relay no buffer between reads.
        let mut decoded = BytesMut::new();
        d.decode(&raw, &mut decoded).map_err(|_| "bad_chunked")?;
        let (head, tail) = copy_in(&decoded);
        for piece in std::iter::once(head).chain(tail) {
            self.take_decoded(piece)?;
        }
        Ok(())
    }

    /// Takes a piece of the body after the chunked coding: audio, and the titles of its ICY
    /// blocks.
    fn take_decoded(&mut self, piece: Bytes) -> Result<(), &'static str> {
        if piece.is_empty() {
            return Ok(());
        }
        let Some(icy) = self.icy.as_mut() else {
            self.audio.push(piece);
            return Ok(());
        };
        let mut titles = Vec::new();
        icy.push(piece, &mut self.audio, &mut titles)
            .map_err(|_| "bad_metadata")?;
        for title in titles {
            if self.title.as_ref() != Some(&title) {
                self.titles.push(StreamTitle {
                    title: title.title.clone(),
                    url: title.url.clone(),
                });
                self.title = Some(title);
            }
        }
        Ok(())
    }
}

/// The wait before the next round once every upstream failed: doubling, capped, jittered.
#[derive(Default)]
struct Backoff {
    failed_rounds: u32,
}

impl Backoff {
    fn next_wait(&mut self) -> Duration {
        let full = BACKOFF_FIRST
            .saturating_mul(1 << self.failed_rounds.min(16))
            .min(BACKOFF_MAX);
        self.failed_rounds += 1;
        full.mul_f64(0.5 + 0.5 * unit_random())
    }
}

/// A number in [0, 1) that differs between calls and processes: std's hasher keys are seeded
/// randomly per thread and advanced per `RandomState`, which is all the jitter needs.
fn unit_random() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_is_jittered() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.next_wait()).collect();
        assert!(waits[0] >= BACKOFF_FIRST / 2 && waits[0] <= BACKOFF_FIRST);
        assert!(waits[3] >= BACKOFF_FIRST * 4 && waits[3] <= BACKOFF_FIRST * 8);
        assert!(waits.iter().all(|w| *w <= BACKOFF_MAX));
        assert!(waits[9] >= BACKOFF_MAX / 2);
        let draws: std::collections::HashSet<u64> =
            (0..20).map(|_| (unit_random() * 1e9) as u64).collect();
        assert!(draws.len() > 15, "jitter varies");
    }

    #[test]
    fn a_body_loses_its_chunking_and_icy_blocks_and_repeats_no_title() {
        let mut body = Body {
            decoder: Some(ChunkedDecoder::default()),
            icy: Some(Deinterleaver::new(4)),
            title: None,
            audio: Vec::new(),
            titles: Vec::new(),
        };
        let block = crate::icy::block("A - B", None);
        let inner = [b"abcd".as_slice(), &block, b"efgh", &block, b"ij"].concat();
        let chunked = [
            format!("{:x}\r\n", inner.len()).into_bytes(),
            inner,
            b"\r\n".to_vec(),
        ]
        .concat();
        for byte in chunked.chunks(3) {
            body.take(Bytes::copy_from_slice(byte)).unwrap();
        }
        assert_eq!(body.audio.concat(), b"abcdefghij");
        assert_eq!(body.titles.len(), 1, "the same title twice is one update");
        assert_eq!(body.titles[0].title, "A - B");
        assert_eq!(body.take(Bytes::from_static(b"zz\r\n")), Err("bad_chunked"));
    }

    /// Whether `piece` is the only view of an allocation that holds its bytes and no more: it
    /// keeps nothing alive beyond itself.
    fn owns_exactly(piece: Bytes) -> bool {
        let len = piece.len();
        piece.try_into_mut().is_ok_and(|m| m.capacity() == len)
    }

    /// What a relay passes on from a read holds no more memory than its bytes, and the relay no
    /// buffer: a piece split off a 64 KiB read buffer of the relay's own kept that buffer alive
    /// for as long as the mount retained it.
    #[test]
    fn a_read_is_copied_out_exactly_and_a_chunked_body_too() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut upstream, ours) = tokio::io::duplex(64 * 1024);
            let mut stream: Box<dyn Io> = Box::new(ours);
            let sent: Vec<u8> = (0..16_000u32).map(|i| (i % 251) as u8).collect();
            tokio::io::AsyncWriteExt::write_all(&mut upstream, &sent)
                .await
                .unwrap();
            let mut got = Vec::new();
            while got.len() < sent.len() {
                let (head, tail) = read_copied(&mut stream).await.unwrap();
                for piece in std::iter::once(head).chain(tail) {
                    got.extend_from_slice(&piece);
                    assert!(owns_exactly(piece), "a piece holds more than its bytes");
                }
            }
            assert_eq!(got, sent);
            drop(upstream);
            let (end, _) = read_copied(&mut stream).await.unwrap();
            assert!(end.is_empty(), "the end of the stream reads empty");
        });

        let mut body = Body {
            decoder: Some(ChunkedDecoder::default()),
            icy: None,
            title: None,
            audio: Vec::new(),
            titles: Vec::new(),
        };
        let inner: Vec<u8> = (0..10_000u32).map(|i| (i % 241) as u8).collect();
        let chunked = [
            format!("{:x}\r\n", inner.len()).into_bytes(),
            inner.clone(),
            b"\r\n".to_vec(),
        ]
        .concat();
        body.take(Bytes::from(chunked)).unwrap();
        assert_eq!(body.audio.concat(), inner);
        assert!(
            body.audio.drain(..).all(owns_exactly),
            "decoded pieces are exact"
        );
    }
}
