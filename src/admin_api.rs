//! Icecast 2.4's admin API, which station panels (AzuraCast, Centova, LibreTime) and operators'
//! scripts use: `/admin/stats`, `/admin/listmounts`, `/admin/listclients?mount=`,
//! `/admin/killclient?mount=&id=`, `/admin/killsource?mount=`,
//! `/admin/moveclients?mount=&destination=`, `/admin/streamlist.txt` and
//! `/admin/fallbacks?mount=&fallback=`. (`/admin/metadata` is [`crate::metadata`]'s.) And
//! fanstream's own `/admin/register?url=&listeners=&max_listeners=&interval=`, where an edge
//! registers for spill-over ([`crate::edges`]).
//!
//! Served on the admin port and under `/admin/` on the listener port. The answers have Icecast's
//! XML shapes (element names, nesting, alphabetical order of the stats), so clients written for
//! Icecast parse them; each is also given as JSON for `?format=json` or
//! `Accept: application/json`, built from the same tree.
//!
//! Credentials: the admin user's (HTTP Basic), or for a command on one mount (`listclients`,
//! `killclient`, `killsource`, `moveclients`, `fallbacks`, and `stats?mount=`) that mount's
//! source credentials too,
//! as Icecast takes them; for `streamlist.txt` and `register`, the relay user's too
//! (`relay_user`/`relay_password`), as Icecast serves its relays the list; failures count
//! towards the per-address 429 like other logins. The
//! admin port, kept on loopback, stays open without `admin_password`, as it was; the listener
//! port is public, so there the admin API answers 403 until `admin_password` is set.
//!
//! What a listener is doing lives on the worker that holds it: a kill, a move, or the lag shown
//! by `listclients` is a [`Control`] message to that worker, answered once done, so a response
//! says what happened.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::auth;
use crate::conn::{Control, ToIngest};
use crate::dates::Date;
use crate::framing::{carries_own_metadata, same_format};
use crate::http::{valid_mount_path, Request};
use crate::markup::escape_into;
use crate::mounts::Mount;
use crate::reasons::{Realm, Refusal};
use crate::shared::Shared;
use crate::status::{host_name, listen_base, server_id, sorted_mounts};
use crate::store::SourceState;

const PREFIX: &str = "/admin/";
/// How long an answer from a worker or ingest may take: they answer between two rounds, so a
/// missing answer means the thread is stopping.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Which port a request came on: the public listener port, or the admin port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Port {
    /// `tls_local`: the address a request over TLS came to.
    Public {
        tls_local: Option<SocketAddr>,
    },
    Admin,
}

/// Where the admin API sends what it cannot do itself.
pub(crate) struct Links<'a> {
    pub to_ingest: &'a UnboundedSender<ToIngest>,
    /// Every worker's fan-out, by worker index.
    pub control: &'a [UnboundedSender<Control>],
}

/// Paths answered here (after `/admin/metadata`, which the routers send to title updates).
pub(crate) fn is_admin_api_path(path: &str) -> bool {
    path.starts_with(PREFIX)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Stats,
    ListMounts,
    ListClients,
    KillClient,
    KillSource,
    MoveClients,
    StreamList,
    Fallbacks,
    Register,
}

impl Command {
    fn of(path: &str) -> Option<Command> {
        Some(match path.strip_prefix(PREFIX)? {
            // `stats.xml` is Icecast's older name for it.
            "stats" | "stats.xml" => Command::Stats,
            // `streamlist` is Icecast's XML form of `streamlist.txt`: the same document.
            "listmounts" | "streamlist" => Command::ListMounts,
            "listclients" => Command::ListClients,
            "killclient" => Command::KillClient,
            "killsource" => Command::KillSource,
            "moveclients" => Command::MoveClients,
            "streamlist.txt" => Command::StreamList,
            "fallbacks" => Command::Fallbacks,
            "register" => Command::Register,
            _ => return None,
        })
    }

    /// Commands an edge's relay runs, with the relay credentials.
    fn for_relays(self) -> bool {
        matches!(self, Command::StreamList | Command::Register)
    }

    /// Commands on one mount, which that mount's source credentials may run (`stats` when it
    /// names a mount).
    fn on_one_mount(self) -> bool {
        matches!(
            self,
            Command::Stats
                | Command::ListClients
                | Command::KillClient
                | Command::KillSource
                | Command::MoveClients
                | Command::Fallbacks
        )
    }
}

/// Answers an admin API request with the whole response, or why not.
pub(crate) async fn answer(
    shared: &Shared,
    to: Links<'_>,
    req: &Request,
    peer: SocketAddr,
    port: Port,
) -> Result<Vec<u8>, Refusal> {
    let command = Command::of(&req.path);
    let params = Params::of(req);
    let scoped_mount = command
        .filter(|c| c.on_one_mount())
        .and_then(|_| params.get("mount"));
    let for_relays = command.is_some_and(Command::for_relays);
    authorize(shared, req, peer, port, scoped_mount, for_relays)?;
    let command = command.ok_or(Refusal::UnknownCommand)?;
    let json = req.wants_json();
    let doc = match command {
        Command::Stats => {
            let tls_local = match port {
                Port::Public { tls_local } => tls_local,
                Port::Admin => None,
            };
            let base = listen_base(shared, req, tls_local);
            stats(shared, req, &base, params.get("mount").as_deref())
        }
        Command::ListMounts => list_mounts(shared, None),
        Command::StreamList => {
            let mounts = stream_list(shared);
            return Ok(if json {
                let body = serde_json::to_vec(&mounts).expect("strings serialize");
                respond("application/json", &body)
            } else {
                let text: String = mounts.iter().map(|m| format!("{m}\n")).collect();
                respond("text/plain; charset=utf-8", text.as_bytes())
            });
        }
        Command::Register => {
            let said = registration(&params).ok_or(Refusal::BadQuery)?;
            let url = said.url.clone();
            let room = said.max_listeners.saturating_sub(said.listeners);
            shared
                .edges
                .register(said, std::time::Instant::now())
                .map_err(|_| Refusal::TooManyEdges)?;
            tracing::debug!(%peer, edge = %url, room, "edge registered");
            response_doc(&format!("Edge {url} registered"), true)
        }
        Command::ListClients => {
            let mount = existing_mount(shared, &params)?;
            list_clients(&to, &mount).await
        }
        Command::KillClient => {
            let mount = existing_mount(shared, &params)?;
            let id = params
                .get("id")
                .and_then(|id| id.parse::<u64>().ok())
                .ok_or(Refusal::BadQuery)?;
            kill_client(&to, &mount, id, peer).await
        }
        Command::KillSource => {
            let mount = params.get("mount").ok_or(Refusal::BadQuery)?;
            let (reply, answer) = oneshot::channel();
            let msg = ToIngest::KillSource {
                mount: mount.clone(),
                reply,
            };
            if !ask(to.to_ingest, msg, answer).await.unwrap_or(false) {
                return Err(Refusal::NoSuchSource);
            }
            tracing::info!(%peer, %mount, "source killed by an admin request");
            response_doc("Source Removed", true)
        }
        Command::MoveClients => {
            let from = existing_mount(shared, &params)?;
            match params.get("destination") {
                // Without a destination, the mounts its listeners could go to, as Icecast lists
                // them for its page's choice.
                None => list_mounts(shared, Some(&from)),
                Some(dest) => move_clients_to(shared, &to, peer, &from, &dest).await?,
            }
        }
        Command::Fallbacks => {
            let mount = params.get("mount").ok_or(Refusal::BadQuery)?;
            // Given empty: no fallback, as Icecast takes it.
            if !params.has("fallback") {
                return Err(Refusal::BadQuery);
            }
            let fallback = params.get("fallback");
            if fallback
                .as_ref()
                .is_some_and(|f| !valid_mount_path(f) || *f == mount)
            {
                return Err(Refusal::BadQuery);
            }
            let (reply, answer) = oneshot::channel();
            let msg = ToIngest::Fallback {
                mount: mount.clone(),
                fallback: fallback.clone(),
                reply,
            };
            if !ask(to.to_ingest, msg, answer).await.unwrap_or(false) {
                return Err(Refusal::NoSuchSource);
            }
            let shown = fallback.as_deref().unwrap_or("none");
            tracing::info!(%peer, %mount, fallback = shown, "fallback set by an admin request");
            response_doc("Fallback configured", true)
        }
    };
    Ok(if json {
        let body = serde_json::to_vec(&doc.json_doc()).expect("a tree of strings serializes");
        respond("application/json", &body)
    } else {
        respond("text/xml; charset=utf-8", doc.xml_doc().as_bytes())
    })
}

/// An edge's registration from its query: `url` (where listeners reach it, as
/// `master.public_url` is checked), `listeners` and `max_listeners`, and `interval` (seconds
/// between its registrations, 1 to 3600). None if a part is missing or wrong.
fn registration(params: &Params) -> Option<crate::edges::Registration> {
    let number = |name| params.get(name)?.parse::<usize>().ok();
    let url = params.get("url")?;
    crate::config::check_public_url(&url).ok()?;
    let interval = number("interval").filter(|s| (1..=3600).contains(s))?;
    Some(crate::edges::Registration {
        url,
        listeners: number("listeners")?,
        max_listeners: number("max_listeners")?,
        interval: Duration::from_secs(interval as u64),
    })
}

/// Checks the credentials a command needs (see the module's doc). `for_relays`: the relay
/// credentials may run it too.
fn authorize(
    shared: &Shared,
    req: &Request,
    peer: SocketAddr,
    port: Port,
    mount: Option<String>,
    for_relays: bool,
) -> Result<(), Refusal> {
    let cfg = shared.config.load();
    let relay = cfg.relay_password.as_deref().filter(|_| for_relays);
    let mut accepted = Vec::new();
    match (cfg.admin_password.as_deref(), relay) {
        (Some(admin_password), _) => accepted.push((cfg.admin_user.as_str(), admin_password)),
        // The admin port, kept on loopback, is open without an admin password.
        (None, _) if port == Port::Admin => return Ok(()),
        (None, None) => return Err(Refusal::AdminPasswordNotSet),
        (None, Some(_)) => {}
    }
    if let Some(relay_password) = relay {
        accepted.push((cfg.relay_user.as_str(), relay_password));
    }
    if let Some(mount) = mount.as_deref() {
        if let Some(source_password) = cfg.source_password_for(mount) {
            accepted.push((cfg.source_user_for(mount), source_password));
        }
    }
    auth::check_given(
        &shared.auth_failures,
        &cfg,
        peer,
        &req.path,
        Realm::Admin,
        req.basic_auth(),
        &accepted,
    )
}

/// The start-up warning for an admin API that only the admin port serves.
pub(crate) fn warn_if_closed(admin_password: Option<&str>) {
    if admin_password.is_none() {
        tracing::warn!(
            "admin_password is not set: the admin API (/admin/stats, /admin/listclients, ...) answers 403 on the listener port, and the admin port serves it without authentication"
        );
    }
}

/// `moveclients` with a destination: moves what fits of `from`'s listeners to `dest`, a live
/// mount of the same format.
async fn move_clients_to(
    shared: &Shared,
    to: &Links<'_>,
    peer: SocketAddr,
    from: &Arc<Mount>,
    dest: &str,
) -> Result<El, Refusal> {
    let to_mount = shared
        .mounts
        .get(dest)
        .filter(|m| m.path != from.path && m.store.load().state == SourceState::Live)
        .ok_or(Refusal::BadDestination)?;
    let format = |m: &Mount| m.store.load().info.meta.content_type.clone();
    if !same_format(&format(from), &format(&to_mount)) {
        return Err(Refusal::OtherFormat);
    }
    let (moved, stayed) = move_clients(to, from, &to_mount).await;
    tracing::info!(%peer, from = %from.path, to = %dest, moved, stayed, "listeners moved by an admin request");
    Ok(if stayed == 0 {
        response_doc(&format!("Clients moved from {} to {dest}", from.path), true)
    } else {
        let max = to_mount.store.load().settings.max_listeners;
        let message = format!(
            "Moved {moved} of {} clients from {} to {dest}: {dest} holds its max_listeners ({max})",
            moved + stayed,
            from.path
        );
        response_doc(&message, moved > 0)
    })
}

/// The mount named by `mount=`, live or waiting for its source.
fn existing_mount(shared: &Shared, params: &Params) -> Result<Arc<Mount>, Refusal> {
    let path = params.get("mount").ok_or(Refusal::BadQuery)?;
    shared.mounts.get(&path).ok_or(Refusal::NoSuchSource)
}

/// Sends `msg` and waits for its answer; None if the receiver is gone or slow.
async fn ask<M, T>(to: &UnboundedSender<M>, msg: M, answer: oneshot::Receiver<T>) -> Option<T> {
    to.send(msg).ok()?;
    tokio::time::timeout(REPLY_TIMEOUT, answer).await.ok()?.ok()
}

/// Asks every worker, and collects the answers that came.
async fn ask_workers<T>(to: &Links<'_>, msg: impl Fn(oneshot::Sender<T>) -> Control) -> Vec<T> {
    let mut answers = Vec::new();
    for worker in to.control {
        let (reply, answer) = oneshot::channel();
        if worker.send(msg(reply)).is_ok() {
            answers.push(answer);
        }
    }
    let mut out = Vec::with_capacity(answers.len());
    for answer in answers {
        if let Ok(Ok(v)) = tokio::time::timeout(REPLY_TIMEOUT, answer).await {
            out.push(v);
        }
    }
    out
}

async fn list_clients(to: &Links<'_>, mount: &Arc<Mount>) -> El {
    let lags: HashMap<u64, u64> = ask_workers(to, |reply| Control::Lags {
        mount: mount.clone(),
        reply,
    })
    .await
    .into_iter()
    .flatten()
    .collect();
    let clients = mount.clients.list();
    let mut source = vec![El::num("Listeners", clients.len() as u64)];
    for c in clients {
        let mut listener = vec![
            El::text("IP", c.peer.ip().to_string()),
            // Icecast's word for a player that sent none.
            El::text(
                "UserAgent",
                if c.user_agent.is_empty() {
                    "Unknown".into()
                } else {
                    c.user_agent
                },
            ),
            El::num("Connected", c.connected.elapsed().as_secs()),
            El::num("ID", c.id),
        ];
        // An edge's relay (the relay credentials), not audience; absent for a listener.
        if c.relay {
            listener.push(El::num("relay", 1));
        }
        // Bytes behind the live edge (Icecast 2.5's `lag`); absent for a listener in transit
        // between mounts.
        if let Some(lag) = lags.get(&c.id) {
            listener.push(El::num("lag", *lag));
        }
        source.push(El::node("listener", listener));
    }
    let source = El::node("source", source)
        .with_mount(&mount.path)
        .listing(&["listener"]);
    El::node("icestats", vec![source]).listing(&["source"])
}

async fn kill_client(to: &Links<'_>, mount: &Mount, id: u64, peer: SocketAddr) -> El {
    let killed = match mount.clients.get(id) {
        Some(client) => match to.control.get(client.worker) {
            Some(worker) => {
                let (reply, answer) = oneshot::channel();
                ask(worker, Control::Kill { id, reply }, answer)
                    .await
                    .unwrap_or(false)
            }
            None => false,
        },
        None => false,
    };
    if killed {
        tracing::info!(%peer, mount = %mount.path, id, "listener killed by an admin request");
        response_doc(&format!("Client {id} removed"), true)
    } else {
        response_doc(&format!("Client {id} not found"), false)
    }
}

/// Moves the listeners of `from` to `dest` on every worker: how many moved, and how many stayed
/// for want of room on `dest`.
async fn move_clients(to: &Links<'_>, from: &Arc<Mount>, dest: &Arc<Mount>) -> (usize, usize) {
    ask_workers(to, |reply| Control::Move {
        from: from.clone(),
        to: dest.clone(),
        reply,
    })
    .await
    .into_iter()
    .fold((0, 0), |(m, s), (moved, stayed)| (m + moved, s + stayed))
}

/// Icecast's answer to a command: a message and 1 (done) or 0 (not done).
fn response_doc(message: &str, done: bool) -> El {
    El::node(
        "iceresponse",
        vec![
            El::text("message", message.to_string()),
            El::num("return", u64::from(done)),
        ],
    )
}

/// Sources live now, by path: Icecast lists sources, not mounts waiting for one.
fn live_mounts(shared: &Shared) -> Vec<(Arc<Mount>, Arc<crate::mounts::Snapshot>)> {
    sorted_mounts(shared)
        .into_iter()
        .filter_map(|m| {
            let snap = m.store.load_full();
            (snap.state == SourceState::Live).then_some((m, snap))
        })
        .collect()
}

/// `/admin/streamlist.txt`: what a relay polls to mirror every mount, hidden ones left out.
fn stream_list(shared: &Shared) -> Vec<String> {
    live_mounts(shared)
        .into_iter()
        .filter(|(_, snap)| !snap.settings.hidden)
        .map(|(m, _)| m.path.clone())
        .collect()
}

/// `listmounts`: every live source; for `moveclients` without a destination (`from`), Icecast's
/// `<current_source>` and the live sources its listeners could be moved to (another mount, the
/// same format).
fn list_mounts(shared: &Shared, from: Option<&Mount>) -> El {
    let now = SystemTime::now();
    let format = |m: &Mount| m.store.load().info.meta.content_type.clone();
    let sources = live_mounts(shared)
        .into_iter()
        .filter(|(m, _)| {
            from.is_none_or(|f| m.path != f.path && same_format(&format(f), &format(m)))
        })
        .map(|(m, snap)| {
            let meta = &snap.info.meta;
            let connected = meta
                .started
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            El::node(
                "source",
                vec![
                    El::text(
                        "fallback",
                        snap.settings.fallback_mount.clone().unwrap_or_default(),
                    ),
                    El::num("listeners", m.listeners.load(Ordering::Relaxed) as u64),
                    El::num("Connected", connected.as_secs()),
                    El::text("content-type", meta.content_type.clone()),
                ],
            )
            .with_mount(&m.path)
        })
        .collect::<Vec<_>>();
    let current = from.map(|f| El::text("current_source", f.path.clone()));
    let children = current.into_iter().chain(sources).collect();
    El::node("icestats", children).listing(&["source"])
}

/// The sum of a counter's series.
fn total(counter: &prometheus::IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    counter
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|series| series.get_counter().value() as u64)
        .sum()
}

/// `/admin/stats`: the server's counters, then each live source's, each group in alphabetical
/// order as Icecast keeps them; with `mount=` (which that mount's source credentials may ask, as
/// Icecast allows) that source's alone.
fn stats(shared: &Shared, req: &Request, base: &str, only: Option<&str>) -> El {
    let host = host_name(req.header("host"), shared.listen_addr);
    let m = &shared.metrics;
    let live = live_mounts(shared);
    let sources = live.len() as u64;
    let listener_connections = m.listener_connects.sum();
    let source_connections = m.source_connects.sum();
    let relay_connections = total(&m.relay_connects);
    let start = Date::of(shared.started);
    let mut children = vec![
        // Icecast's `<admin>` and `<location>` settings; fanstream has none: Icecast's defaults.
        El::text("admin", "icemaster@localhost".into()),
        El::num(
            "client_connections",
            listener_connections + source_connections,
        ),
        El::num("clients", shared.open_connections() as u64),
        El::num("connections", listener_connections + source_connections),
        El::num("file_connections", 0),
        El::text("host", host.clone()),
        El::num("listener_connections", listener_connections),
        El::num(
            "listeners",
            shared.listeners_total.load(Ordering::Relaxed) as u64,
        ),
        El::text("location", "Earth".into()),
        El::text("server_id", server_id()),
        El::text("server_start", start.rfc2822()),
        El::text("server_start_iso8601", start.iso8601()),
        El::num(
            "source_client_connections",
            source_connections.saturating_sub(relay_connections),
        ),
        El::num("source_relay_connections", relay_connections),
        El::num("source_total_connections", source_connections),
        El::num("sources", sources),
        El::num("stats", 0),
        El::num("stats_connections", 0),
    ];
    for (mount, snap) in live {
        if only.is_some_and(|path| path != mount.path) {
            continue;
        }
        let meta = &snap.info.meta;
        let label = mount.label.as_str();
        let started = Date::of(meta.started.unwrap_or(shared.started));
        let slow = m
            .listener_disconnects
            .with_label_values(&[label, crate::reasons::Disconnect::Slow.reason()])
            .get()
            + m.listener_skips.with_label_values(&[label]).get();
        let mut source = Vec::new();
        let mut opt = |name, value: &Option<String>| {
            if let Some(v) = value {
                source.push(El::text(name, v.clone()));
            }
        };
        let (artist, title) = snap
            .now_playing
            .icecast(carries_own_metadata(&meta.content_type));
        opt("artist", &artist);
        opt("audio_info", &meta.audio_info);
        if let Some(b) = meta.bitrate_kbps {
            source.push(El::num("bitrate", b.into()));
        }
        source.extend([
            El::text(
                "genre",
                meta.genre.clone().unwrap_or_else(|| "various".into()),
            ),
            El::num(
                "listener_peak",
                mount.listener_peak.load(Ordering::Relaxed) as u64,
            ),
            El::num("listeners", mount.listeners.load(Ordering::Relaxed) as u64),
            El::text("listenurl", format!("{base}{}", mount.path)),
            match snap.settings.max_listeners {
                0 => El::text("max_listeners", "unlimited".into()),
                n => El::num("max_listeners", n as u64),
            },
            El::num(
                "public",
                u64::from(meta.public.as_deref().is_some_and(|p| p.trim() == "1")),
            ),
            El::text(
                "server_description",
                meta.description
                    .clone()
                    .unwrap_or_else(|| "Unspecified description".into()),
            ),
            El::text(
                "server_name",
                meta.name
                    .clone()
                    .unwrap_or_else(|| "Unspecified name".into()),
            ),
            El::text("server_type", meta.content_type.clone()),
        ]);
        if let Some(url) = &meta.url {
            source.push(El::text("server_url", url.clone()));
        }
        // Icecast counts listeners slow now; fanstream's lag policy acts at once, so these are
        // the listeners it dropped or skipped for lag on this mount.
        source.push(El::num("slow_listeners", slow));
        let mut opt = |name, value: &Option<String>| {
            if let Some(v) = value {
                source.push(El::text(name, v.clone()));
            }
        };
        opt("source_ip", &meta.source_ip);
        source.extend([
            El::text("stream_start", started.rfc2822()),
            El::text("stream_start_iso8601", started.iso8601()),
        ]);
        let mut opt = |name, value: &Option<String>| {
            if let Some(v) = value {
                source.push(El::text(name, v.clone()));
            }
        };
        opt("subtype", &meta.subtype);
        opt("title", &title);
        source.extend([
            El::num(
                "total_bytes_read",
                mount.received_bytes.load(Ordering::Relaxed),
            ),
            El::num("total_bytes_sent", mount.sent_bytes.load(Ordering::Relaxed)),
        ]);
        if let Some(ua) = &meta.user_agent {
            source.push(El::text("user_agent", ua.clone()));
        }
        children.push(El::node("source", source).with_mount(&mount.path));
    }
    El::node("icestats", children).listing(&["source"])
}

/// The query's parameters, as text.
struct Params(Vec<(String, String)>);

impl Params {
    fn of(req: &Request) -> Self {
        Params(
            req.query_params()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).trim().to_string()))
                .collect(),
        )
    }

    /// A parameter's value; None if absent, empty, or holding control characters (no mount
    /// path, id or fallback has any, and they would forge log lines).
    /// Whether the query names `name`, even with no value.
    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.is_empty() && !v.chars().any(char::is_control))
            .map(|(_, v)| v.clone())
    }
}

fn respond(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.0 200 OK\r\nServer: fanstream/{}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache, no-store\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// One element of an answer: the tree both the XML and the JSON are written from.
#[derive(Debug)]
struct El {
    name: &'static str,
    /// Icecast's one attribute: `mount` on `source`.
    mount: Option<String>,
    body: Body,
    /// Children that may repeat (`source`, `listener`): an array in JSON however many there
    /// are, so that scripts need not tell one from several.
    lists: &'static [&'static str],
}

#[derive(Debug)]
enum Body {
    Text(String),
    Num(u64),
    Children(Vec<El>),
}

impl El {
    fn text(name: &'static str, text: String) -> El {
        El {
            name,
            mount: None,
            body: Body::Text(text),
            lists: &[],
        }
    }

    fn num(name: &'static str, n: u64) -> El {
        El {
            name,
            mount: None,
            body: Body::Num(n),
            lists: &[],
        }
    }

    fn node(name: &'static str, children: Vec<El>) -> El {
        El {
            name,
            mount: None,
            body: Body::Children(children),
            lists: &[],
        }
    }

    fn listing(mut self, lists: &'static [&'static str]) -> El {
        self.lists = lists;
        self
    }

    fn with_mount(mut self, mount: &str) -> El {
        self.mount = Some(mount.to_string());
        self
    }

    fn xml_doc(&self) -> String {
        let mut out = String::from("<?xml version=\"1.0\"?>\n");
        self.xml(&mut out);
        out.push('\n');
        out
    }

    fn xml(&self, out: &mut String) {
        out.push('<');
        out.push_str(self.name);
        if let Some(m) = &self.mount {
            out.push_str(" mount=\"");
            escape_into(m, out);
            out.push('"');
        }
        out.push('>');
        match &self.body {
            Body::Text(t) => escape_into(t, out),
            Body::Num(n) => out.push_str(&n.to_string()),
            Body::Children(children) => children.iter().for_each(|c| c.xml(out)),
        }
        out.push_str("</");
        out.push_str(self.name);
        out.push('>');
    }

    /// `{"icestats": {...}}`: an element with children is an object (its `mount` attribute a
    /// field), numbers are numbers, and repeated elements are arrays.
    fn json_doc(&self) -> serde_json::Value {
        serde_json::json!({ self.name: self.json() })
    }

    fn json(&self) -> serde_json::Value {
        use serde_json::{Map, Value};
        match &self.body {
            Body::Text(t) => Value::String(t.clone()),
            Body::Num(n) => Value::from(*n),
            Body::Children(children) => {
                let mut obj = Map::new();
                if let Some(m) = &self.mount {
                    obj.insert("mount".into(), Value::String(m.clone()));
                }
                for name in self.lists {
                    obj.insert(name.to_string(), Value::Array(Vec::new()));
                }
                for c in children {
                    match obj.get_mut(c.name) {
                        Some(Value::Array(list)) if self.lists.contains(&c.name) => {
                            list.push(c.json())
                        }
                        _ => {
                            obj.insert(c.name.into(), c.json());
                        }
                    }
                }
                Value::Object(obj)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_known_by_their_icecast_paths() {
        assert_eq!(Command::of("/admin/stats"), Some(Command::Stats));
        assert_eq!(Command::of("/admin/stats.xml"), Some(Command::Stats));
        assert_eq!(
            Command::of("/admin/streamlist.txt"),
            Some(Command::StreamList)
        );
        assert_eq!(Command::of("/admin/streamlist"), Some(Command::ListMounts));
        assert_eq!(Command::of("/admin/nope"), None);
        assert_eq!(Command::of("/stats"), None);
        assert!(Command::KillClient.on_one_mount());
        assert!(Command::Stats.on_one_mount(), "with mount=, its own stats");
        assert!(!Command::ListMounts.on_one_mount());
    }

    #[test]
    fn one_tree_makes_escaped_xml_and_typed_json() {
        let doc = El::node(
            "icestats",
            vec![
                El::num("listeners", 2),
                El::node("source", vec![El::text("title", "a<b & \"c\"".into())])
                    .with_mount("/m")
                    .listing(&["listener"]),
            ],
        )
        .listing(&["source"]);
        assert_eq!(
            doc.xml_doc(),
            "<?xml version=\"1.0\"?>\n<icestats><listeners>2</listeners><source mount=\"/m\"><title>a&lt;b &amp; &quot;c&quot;</title></source></icestats>\n"
        );
        assert_eq!(
            doc.json_doc(),
            serde_json::json!({"icestats": {"listeners": 2, "source": [{"mount": "/m", "title": "a<b & \"c\"", "listener": []}]}})
        );
        let empty = El::node("icestats", vec![]).listing(&["source"]);
        assert_eq!(
            empty.json_doc(),
            serde_json::json!({"icestats": {"source": []}})
        );
    }
}
