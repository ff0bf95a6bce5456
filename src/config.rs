//! Settings: embedded defaults, overridden by a TOML file (`--config`), overridden by flags.
//!
//! Every field carries its unit in its name and its default in its doc comment. [`Config::validate`]
//! rejects nonsense, naming the setting, before anything binds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{AddrParseError, IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::{DeserializeOwned, Error as _, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// What to do with a listener that falls more than `max_lag_bytes` behind the live edge.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LagPolicy {
    /// Close it, as Icecast does.
    Disconnect,
    /// Move it to the live edge at a chunk boundary; it loses the bytes in between.
    Skip,
}

/// The request header a trusted proxy names the client in.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum ForwardedHeader {
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// An address or a range of them, as `trusted_proxies` writes it: `10.0.0.0/8`, `::1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Whether `ip` is in the range. An IPv4 address arriving as `::ffff:a.b.c.d` is the IPv4
    /// address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        let (addr, bits) = match text.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|e| format!("{text:?} is not an address or a range ({e})"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|&b| b <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { net, bits })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| D::Error::custom(format!("trusted_proxies: {e}")))
    }
}

/// Per-mount settings. `[defaults]` sets them for every mount; in `[mounts."/path"]` each key
/// given overrides `[defaults]`, the rest come from it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MountSettings {
    /// User a source must give for this mount (Icecast's `<mount><username>`). Default: the
    /// global `source_user`.
    pub source_user: Option<String>,
    /// Password a source must give for this mount. Default: the global `source_password`.
    pub source_password: Option<String>,
    /// File holding this mount's source password (first line), instead of writing it in the
    /// config. Default none.
    pub source_password_file: Option<PathBuf>,
    /// Most listeners this mount admits at once. Default 0 = only the global limit.
    pub max_listeners: usize,
    /// How far behind the live edge a new listener starts. Default 65536 (64 KiB).
    pub burst_bytes: u64,
    /// How far a listener may fall behind before `lag_policy` applies. Default 524288 (512 KiB).
    pub max_lag_bytes: u64,
    /// Default `disconnect`.
    pub lag_policy: LagPolicy,
    /// How long listeners wait for a source that went away. Default 10.
    pub source_grace_secs: u64,
    /// Where listeners go when the source is away: new listeners at once, those already here
    /// when the grace period ends. Followed in a chain (A → B → C) to the first mount with a
    /// source; it need not be declared. A mount's fallback naming the mount itself is ignored,
    /// so `[defaults]` may name a fallback every mount shares. Default none.
    pub fallback_mount: Option<String>,
    /// A listener is written once this many bytes are pending (at most half of `burst_bytes`,
    /// the lead its player started with: [`MountSettings::write_bytes`])... Default 65536.
    pub min_write_bytes: usize,
    /// ...or once its oldest pending byte is this old (0 = write every chunk at once). Default
    /// 1000. Both chosen from `fanstream-load coalesce` (README, "Performance"): a write costs
    /// about 10 µs whatever its size, so one write a second per listener at 128 kbit/s (or one
    /// per 64 KiB at higher bitrates) is what keeps a listener cheap; the price is up to this
    /// much added latency, which players' buffers of several seconds absorb.
    pub max_write_delay_ms: u64,
    /// Audio bytes between two ICY metadata blocks, for listeners that ask for them with
    /// `Icy-MetaData: 1` (never in Ogg or WebM streams, which carry their own). Default 16000,
    /// as Icecast.
    pub icy_metaint: usize,
    /// Leave the mount out of the status pages, `/admin/streamlist.txt` and playlists; it still
    /// plays for whoever knows its path, and the admin API still lists it. Default false.
    pub hidden: bool,
    /// When the source comes back, the listeners of the fallback it had sent them to (the
    /// first of the chain with a source) move back here, as Icecast's `fallback-override`:
    /// every listener of that fallback, as Icecast moves them. Default false.
    pub fallback_override: bool,
    /// An MP3 (`.mp3`) or Ogg Vorbis/Opus (`.ogg`, `.oga`, `.opus`) file played in a loop, at
    /// its own pace, as the last link of the fallback chain: listeners go there when no mount
    /// of the chain has a source. Read once into memory at start-up (or at the reload that
    /// names it) and fed by its own thread to a hidden mount under `/fallback-file/`. Default
    /// none.
    pub fallback_file: Option<PathBuf>,
    /// A listener is closed once it has listened this long (counted from when it connected,
    /// across moves; `fanstream_listener_disconnects_total{reason="max_duration"}`), as
    /// Icecast's `max-listener-duration`. Default 0 = no limit.
    pub max_listener_duration_secs: u64,
    /// The stream's name, genre, description and URL as listeners (`icy-*` headers), status
    /// pages and the admin API see them, instead of what the source sends (`ice-*`/`icy-*`).
    /// Default none: the source's.
    pub stream_name: Option<String>,
    pub genre: Option<String>,
    pub description: Option<String>,
    pub url: Option<String>,
    /// Whether the stream says it may be listed in directories (`icy-pub`), instead of what the
    /// source says. Default none: the source's.
    pub public: Option<bool>,
    /// Listener authentication: `url` asks `listener_add_url` about each listener, as
    /// Icecast's URL auth; `htpasswd` checks its Basic credentials against `htpasswd_file`.
    /// Default none: anyone may listen.
    pub auth: Option<ListenerAuthKind>,
    /// Where `auth = "url"` POSTs `action=listener_add` with `server`, `port`, `client`,
    /// `mount` (with the listener's query string), `user`, `pass`, `ip` and `agent`, form-encoded;
    /// the listener is let in when the answer has `icecast-auth-user: 1`. An `http://` URL.
    /// Default none.
    pub listener_add_url: Option<String>,
    /// Where `auth = "url"` POSTs `action=listener_remove` (the same fields and `duration`, in
    /// seconds) when a listener it let in leaves. Default none.
    pub listener_remove_url: Option<String>,
    /// How long `listener_add_url` may take to answer (connecting included). Default 5000.
    pub auth_timeout_ms: u64,
    /// Let the listener in when `listener_add_url` does not answer in time (or cannot be
    /// reached); otherwise it gets 503. Default false.
    pub auth_allow_on_timeout: bool,
    /// The users file of `auth = "htpasswd"`: `user:hash` lines, the hash bcrypt (`$2y$`...,
    /// as `htpasswd -B` writes) or Icecast's own (the password's MD5 in hex). Read again when
    /// it changes. Default none.
    pub htpasswd_file: Option<PathBuf>,
    /// An MP3 or Ogg file sent to each new listener before the live stream (which then starts
    /// at a sync point, with its Ogg headers), when its format is the stream's. Read at start-up
    /// and at each reload. Default none.
    pub intro_file: Option<PathBuf>,
    /// Serve the mount as HLS too: `/MOUNT/index.m3u8` and its segments, cut from the stream at
    /// ingest (MP3 and AAC in ADTS as packed audio, Ogg Opus, Vorbis and FLAC as fMP4; other formats answer 404
    /// saying so). Default false.
    pub hls: bool,
    /// Segments the live playlist lists; as many again stay fetchable after leaving it. At least
    /// 4: a playlist must span three target durations (RFC 8216, 6.2.2), and segments end a
    /// frame short of the target. Default 6.
    pub hls_segments: usize,
    /// Most seconds of audio in a segment (`EXT-X-TARGETDURATION`); segments end at the last
    /// whole frame within it. Default 4.
    pub hls_segment_secs: u64,
}

/// How a mount authenticates its listeners (`auth`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerAuthKind {
    Url,
    Htpasswd,
}

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings {
            source_user: None,
            source_password: None,
            source_password_file: None,
            max_listeners: 0,
            burst_bytes: 64 * 1024,
            max_lag_bytes: 512 * 1024,
            lag_policy: LagPolicy::Disconnect,
            source_grace_secs: 10,
            fallback_mount: None,
            min_write_bytes: 64 * 1024,
            max_write_delay_ms: 1000,
            icy_metaint: 16000,
            hidden: false,
            fallback_override: false,
            fallback_file: None,
            max_listener_duration_secs: 0,
            stream_name: None,
            genre: None,
            description: None,
            url: None,
            public: None,
            auth: None,
            listener_add_url: None,
            listener_remove_url: None,
            auth_timeout_ms: 5000,
            auth_allow_on_timeout: false,
            htpasswd_file: None,
            intro_file: None,
            hls: false,
            hls_segments: 6,
            hls_segment_secs: 4,
        }
    }
}

/// The demo mount's burst, unless the config declares the mount. Chromium reads 224 KiB of a WAV
/// stream before it has its metadata and 48 KiB more before it plays (measured 2026-12-03, the
/// same from a plain file server): at the demo's 16 KB/s a 64 KiB burst left a browser silent
/// for 10-15 s. With this one (20 s of the demo, which plays that far ahead from its start) it
/// starts at once.
pub const DEMO_BURST_BYTES: u64 = 320 * 1024;

impl MountSettings {
    /// Pending bytes that make a listener's write due: `min_write_bytes`, but never more than
    /// half the burst. A player starts with its burst as its lead, and its buffer sinks by what
    /// a coalesced write holds back: at 1 Mbit/s the default 64 KiB burst is half a second,
    /// and waiting for 64 KiB more would leave the player nothing just as the write comes (mpv
    /// underran at join so, where Icecast, which writes as data comes, did not). Below 512
    /// kbit/s `max_write_delay_ms` falls due first and this changes nothing.
    pub fn write_bytes(&self) -> u64 {
        let held = self.min_write_bytes.max(1) as u64;
        match self.burst_bytes / 2 {
            0 => held,
            half => held.min(half),
        }
    }

    /// Bytes behind the live edge the store must keep readable: a newcomer's burst, a listener
    /// up to the lag limit, and what write coalescing holds back for a listener that keeps up.
    pub fn window_bytes(&self) -> u64 {
        self.burst_bytes
            .max(self.max_lag_bytes)
            .max(self.min_write_bytes as u64)
    }

    /// Bytes behind the live edge (`end`) that the furthest-behind listener still needs, given
    /// its position (None without listeners), never more than the window. The store keeps
    /// these and the burst, which is always there for a newcomer (`store::Keep`).
    pub fn behind_bytes(&self, end: u64, oldest: Option<u64>) -> u64 {
        oldest
            .map_or(0, |pos| end.saturating_sub(pos))
            .min(self.window_bytes())
    }
}

/// Settings bound at start-up (sockets, threads, the demo): a reload keeps them whole until the
/// next restart ([`Config::reloaded`]). In the file they are top-level keys like the others.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Startup {
    /// Where listeners and sources connect. Default `0.0.0.0:8000` (Icecast's port).
    pub listen: SocketAddr,
    /// Where `/metrics` and the status pages are served, on its own thread. Default
    /// `127.0.0.1:8001`; none disables it.
    #[serde(deserialize_with = "deserialize_admin_listen")]
    pub admin_listen: Option<SocketAddr>,
    /// Worker threads serving listeners. Default 0 = one per core.
    pub workers: usize,
    /// Pin each worker to a core. Default true.
    pub pin_workers: bool,
    /// Most open connections on the listener port (listeners, requests in progress, sources in
    /// their handshake). At the limit the acceptor stops accepting until there is room again,
    /// except to replace a connection that has sent no request head for 250 ms. Default 0 = the
    /// process's open file limit less the reserve: 1% of that limit (at least 64) for the
    /// server's own files (a config reload, logs), `max_admin_connections`, and `max_sources`
    /// (sources past their handshake leave this pool).
    pub max_connections: usize,
    /// Most connections the admin listener holds at once, counted apart from `max_connections`.
    /// At the limit it stops accepting, except to replace a connection that has sent no request
    /// for 100 ms. Default 64.
    pub max_admin_connections: usize,
    /// Serve the built-in demo mount (a tone as WAV). Default true.
    pub demo: bool,
    /// Path of the demo mount. Default `/demo`.
    pub demo_mount: String,
    /// Where the access log goes: a file (appended to, reopened on `SIGHUP` for logrotate), or
    /// `-` for stderr. Default none: no access log.
    pub access_log: Option<String>,
    /// Where SHOUTcast v1 sources connect (DSP plugins, hardware encoders, butt in SHOUTcast
    /// mode: a password line, then `icy-*` headers, then the stream), feeding `shoutcast_mount`
    /// with that mount's source password. By SHOUTcast's convention, the listener port plus one.
    /// Default none.
    pub shoutcast_listen: Option<SocketAddr>,
    /// Where listeners and sources connect over TLS (HTTPS, `icecast://` with `-tls 1`), beside
    /// `listen`: the same mounts and snapshot, encrypted per connection. Default none.
    pub tls_listen: Option<SocketAddr>,
    /// The certificate chain, PEM, the server's own first. Read at start-up and on `SIGHUP`
    /// (new handshakes get the new one; a file that does not load is refused, the running one
    /// stays). Required with `tls_listen`.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1). Required with `tls_listen`.
    pub tls_key: Option<PathBuf>,
    /// Mounts fed by pulling from another server (`[[relays]]`), started with the server.
    /// Default none.
    pub relays: Vec<RelaySettings>,
    /// Mirror every mount of an origin (`[master]`). Default none.
    pub master: Option<MasterSettings>,
    /// Certificates (PEM) trusted for `https://` upstreams of `[[relays]]` and `[master]`,
    /// besides the system's roots (`/etc/ssl/certs`, or `SSL_CERT_FILE`): an origin whose
    /// certificate a private CA signed. Read at start-up and on `SIGHUP`. Default none.
    pub relay_ca_file: Option<PathBuf>,
    /// Most listener authentication calls in progress at once, server-wide (`auth = "url"`
    /// requests, `auth = "htpasswd"` bcrypt checks, each off the workers' listeners); a
    /// listener waits for a turn within its mount's `auth_timeout_ms`. Default 64.
    pub max_listener_auth_calls: usize,
}

/// `[master]`: keep one relay per mount an origin lists in its `/admin/streamlist.txt` (one
/// mount path a line, as Icecast serves it to its relay user and its admin), adding and
/// removing relays as the origin's mounts come and go. A `[[relays]]` entry for the same mount
/// wins over the mirrored one.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MasterSettings {
    /// The origin's base URL, `http://host:port`: the list is at `/admin/streamlist.txt` under
    /// it, each mount at its path under it.
    pub url: String,
    /// User for the origin's Basic authentication. Default `relay` when `password` is set.
    #[serde(default)]
    pub user: Option<String>,
    /// Password for the origin's Basic authentication (its `relay_password`, or the admin's).
    /// Default none.
    #[serde(default)]
    pub password: Option<String>,
    /// How often the list is read again. Default 120, as Icecast's `<master-update-interval>`.
    #[serde(default = "default_master_interval_secs")]
    pub interval_secs: u64,
    /// Mirrored relays pull only while they have listeners (as `on_demand` of `[[relays]]`).
    /// Default true, as Icecast's `<relays-on-demand>` is usually set for a mirror: an edge
    /// costs its origin nothing for mounts nobody listens to there. Also accepted as
    /// `master_on_demand`, the name issue 12 gives it (both mean this one setting).
    #[serde(default = "default_true", alias = "master_on_demand")]
    pub on_demand: bool,
    /// Register this server with the origin as an edge with room for its listeners: every
    /// `interval_secs`, a `GET /admin/register` with the relay credentials, `public_url` and
    /// how many listeners it holds of how many it takes. An origin whose mount is full then
    /// redirects new listeners here. Default false.
    #[serde(default)]
    pub register: bool,
    /// Where listeners reach this server, as the origin's redirects will name it:
    /// `http://host:port` or `https://host:port`, no path (the mount's path follows it).
    /// Required with `register`. Default none.
    #[serde(default)]
    pub public_url: Option<String>,
}

fn default_true() -> bool {
    true
}

fn default_master_interval_secs() -> u64 {
    120
}

/// One `[[relays]]` entry: a mount fed by pulling a stream from an upstream server (fanstream or
/// Icecast) instead of by an encoder.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    /// The local mount it feeds.
    pub mount: String,
    /// `http://` URLs of the stream, tried in this order. At least one.
    pub upstreams: Vec<String>,
    /// User for the upstream's Basic authentication. Default `relay` when `password` is set.
    #[serde(default)]
    pub user: Option<String>,
    /// Password for the upstream's Basic authentication. Default none: no credentials (or
    /// those written in the URL).
    #[serde(default)]
    pub password: Option<String>,
    /// Pull only while the mount has listeners: the first listener's request wakes the relay
    /// (and waits, up to `source_timeout_secs`, for the mount to go live); the relay lets the
    /// upstream go within a second of its last listener leaving (and no listener asking for
    /// `source_timeout_secs`). Default false.
    #[serde(default)]
    pub on_demand: bool,
    /// While on a later upstream, go back to the first as soon as it answers again. Default
    /// false.
    #[serde(default)]
    pub prefer_first: bool,
    /// With `prefer_first`, how often the first upstream is tried again. Default 30.
    #[serde(default = "default_relay_retry_secs")]
    pub retry_secs: u64,
}

fn default_relay_retry_secs() -> u64 {
    30
}

impl Default for Startup {
    fn default() -> Self {
        Startup {
            listen: "0.0.0.0:8000".parse().expect("literal address"),
            admin_listen: Some("127.0.0.1:8001".parse().expect("literal address")),
            workers: 0,
            pin_workers: true,
            max_connections: 0,
            max_admin_connections: 64,
            demo: true,
            demo_mount: "/demo".into(),
            access_log: None,
            shoutcast_listen: None,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            relays: Vec::new(),
            master: None,
            relay_ca_file: None,
            max_listener_auth_calls: 64,
        }
    }
}

impl Startup {
    /// Names of the settings whose values differ between `self` and `other`, as the file spells
    /// them: serde walks the fields, so a setting added to the group is compared too.
    fn changed_in(&self, other: &Startup) -> Vec<String> {
        let (old, new) = (by_name(self), by_name(other));
        old.into_iter()
            .filter(|(name, value)| new.get(name) != Some(value))
            .map(|(name, _)| name)
            .collect()
    }
}

fn by_name(startup: &Startup) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(startup) {
        Ok(serde_json::Value::Object(fields)) => fields,
        other => unreachable!("a struct of plain fields serializes to an object: {other:?}"),
    }
}

/// `admin_listen` as the file and `--admin-listen` write it: an address, or `none`, `off` or an
/// empty string for no admin listener.
pub fn parse_admin_listen(text: &str) -> Result<Option<SocketAddr>, AddrParseError> {
    match text {
        "" | "none" | "off" => Ok(None),
        addr => addr.parse().map(Some),
    }
}

fn deserialize_admin_listen<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    parse_admin_listen(&text).map_err(|e| D::Error::custom(format!("admin_listen = {text:?}: {e}")))
}

/// The whole configuration. Read files with [`Config::from_toml`]: it gives the [`Startup`] keys
/// to `startup` and resolves each mount over `[defaults]`, which this type's own `Deserialize`
/// (the other settings) does not.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Settings bound at start-up.
    #[serde(skip)]
    pub startup: Startup,
    /// User name for the admin listener, when `admin_password` is set. Default `admin`.
    pub admin_user: String,
    /// Password the admin listener (`/metrics`, status pages, the admin API) asks for with HTTP
    /// Basic auth, and the admin API under `/admin/` on the listener port. Default none: no
    /// authentication on an admin listener kept on loopback, and no admin API (403) on the
    /// listener port.
    pub admin_password: Option<String>,
    /// File holding the admin password (first line). Default none.
    pub admin_password_file: Option<PathBuf>,
    /// User name sources authenticate with. Default `source`.
    pub source_user: String,
    /// User name the edges' relays authenticate with (HTTP Basic), as Icecast's `relay-user`.
    /// Default `relay`.
    pub relay_user: String,
    /// Password of `relay_user`. A listener request with these credentials is a relay: it
    /// passes `max_listeners` and `max_connections_per_ip`, is counted as a relay rather than
    /// audience, is never dropped by the lag policy (it skips instead), and is never redirected
    /// to an edge; they also read `/admin/streamlist.txt` and register edges
    /// (`/admin/register`). Default none: no relay identity.
    pub relay_password: Option<String>,
    /// Password for mounts without their own; also admits sources on mounts not in the file.
    /// Default none: the binary then reads the systemd credential `source_password` or the file
    /// `source_password` beside the config, or else generates one at start-up and prints it.
    pub source_password: Option<String>,
    /// File holding the global source password (first line). Default none.
    pub source_password_file: Option<PathBuf>,
    /// Most listeners the server admits at once; past it, 503. Default 100000.
    pub max_listeners: usize,
    /// Most sources live at once (the demo counts); past it, 503. Default 0 = derived from the
    /// open-file limit ([`Config::source_limit`]): 1% of it, at least 100, so a hosting server
    /// with a raised limit (the systemd unit's 1,048,576) takes thousands of stations unasked.
    pub max_sources: usize,
    /// Most mounts not declared in `[mounts]` whose metrics carry their own `mount` label at
    /// once (each has some 15 to 30 series). Past it, the series of further mounts add up under
    /// `mount="other"`, counted by `fanstream_mount_series_overflow_total`; a mount keeps the
    /// label it appeared with, and a label is free again once its mount has left. Declared
    /// mounts and the demo always have their own. Default 1000; 0 = every undeclared mount
    /// under `other`.
    pub max_mount_series: usize,
    /// Most connections from one IP address; past it, 429. Default 0 = no limit (listeners behind
    /// one NAT share an address).
    pub max_connections_per_ip: usize,
    /// Most connections from one IP address still sending their request head; past it, a new
    /// connection from that address is closed at once, unanswered. Listeners and sources past
    /// their handshake do not count, so listeners behind one NAT are not limited. Default 64;
    /// 0 = no limit.
    pub max_pending_heads_per_ip: usize,
    /// Failed source logins from one address within `auth_failure_window_secs` before further
    /// attempts get 429 until the window ends. Default 10.
    pub auth_max_failures: u32,
    /// Default 60.
    pub auth_failure_window_secs: u64,
    /// A listener that accepts no byte for this long is dropped. Default 30.
    pub send_timeout_secs: u64,
    /// Kernel send buffer of each listener socket (`SO_SNDBUF`; Linux doubles it for its own
    /// bookkeeping). Left to autotuning, a stalled listener can hold megabytes in the kernel, and
    /// the lag policy sees it only once they are full; bounded, a listener costs at most this in
    /// the kernel and `max_lag_bytes` means what it says. Default 65536; 0 = the kernel's choice.
    pub listener_send_buffer_bytes: usize,
    /// A request's head must arrive within this. Default 10.
    pub header_timeout_secs: u64,
    /// ...or within this, for a connection accepted while the listener port holds over 80% of
    /// `max_connections`: a storm of idle connections then clears in seconds (never longer than
    /// `header_timeout_secs`). Default 2.
    pub header_timeout_under_pressure_secs: u64,
    /// A source that sends nothing for this long is dropped. Default 10.
    pub source_timeout_secs: u64,
    /// On SIGTERM, listeners get this long to receive what is pending. Default 5.
    pub shutdown_grace_secs: u64,
    /// The mount SHOUTcast v1 sources (on `shoutcast_listen`) feed, and `/admin.cgi` title
    /// updates without `mount=` go to. Default `/stream`, as Icecast.
    pub shoutcast_mount: String,
    /// Web origins whose pages may read streams and status pages (`Access-Control-Allow-Origin`),
    /// such as `"https://radio.example"`; `"*"` lets any page. Default `["*"]`, as Icecast: a
    /// stream is public anyway, and web players on other sites are the point. An empty list
    /// sends no CORS headers.
    pub cors_allowed_origins: Vec<String>,
    /// Per-address limits (`max_connections_per_ip`, `max_pending_heads_per_ip`, failed logins)
    /// count IPv6 clients by their first this many bits. Default 128 (each address); 64 counts
    /// each /64 as one client, since one subscriber usually holds a whole /64 and could
    /// otherwise open connections from as many addresses as it likes.
    pub ipv6_prefix_bits: u8,
    /// Proxies in front whose word on the client's address is taken: addresses or CIDR ranges
    /// (`"127.0.0.1"`, `"10.0.0.0/8"`, `"::1"`). From them alone, the client's address comes
    /// from `forwarded_header` or the PROXY protocol header, and their own connections do not
    /// count against the per-address limits (their clients' do). Default none.
    pub trusted_proxies: Vec<Cidr>,
    /// Every connection on the listener ports (plain and TLS: there, before the handshake)
    /// starts with a PROXY protocol header (v1 or v2:
    /// HAProxy's `send-proxy`/`send-proxy-v2`, nginx's `proxy_protocol on`), which gives the
    /// client's address; a connection from outside `trusted_proxies` is closed unanswered
    /// (`untrusted_proxy`), since anyone could claim any address with one. Default false.
    pub proxy_protocol: bool,
    /// Which request header names the client, on a connection from a trusted proxy:
    /// `x-forwarded-for` (HAProxy's `option forwardfor`, nginx's
    /// `$proxy_add_x_forwarded_for`) or `forwarded` (RFC 7239's `for=`). One only: a proxy that
    /// writes one of them passes the other through from the client, who could then forge it.
    /// Default `x-forwarded-for`.
    pub forwarded_header: ForwardedHeader,
    /// Settings for every mount, unless overridden in `mounts`.
    pub defaults: MountSettings,
    /// Mounts declared in the file, by path, with their resolved settings.
    pub mounts: BTreeMap<String, MountSettings>,
    /// Test hook, not settable from the file: serving listeners of this mount panics, and so
    /// does a request for `<mount>/panic`, so tests can prove a panic costs one connection only.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    #[serde(skip)]
    pub panic_injection_mount: Option<String>,
    /// Test hook, not settable from the file: a listener's hand-off from admission to its
    /// fan-out is delayed this long, as on a machine too busy to run the worker at once.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    #[serde(skip)]
    pub join_delay_injection_ms: u64,
    /// Test hook, not settable from the file: each pass a fan-out loop makes over its listeners
    /// of a mount takes this much longer, as on a core too busy to keep up with the stream.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    #[serde(skip)]
    pub pass_delay_injection_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            startup: Startup::default(),
            admin_user: "admin".into(),
            admin_password: None,
            admin_password_file: None,
            source_user: "source".into(),
            relay_user: "relay".into(),
            relay_password: None,
            source_password: None,
            source_password_file: None,
            max_listeners: 100_000,
            max_sources: 0,
            max_mount_series: 1000,
            max_connections_per_ip: 0,
            max_pending_heads_per_ip: 64,
            auth_max_failures: 10,
            auth_failure_window_secs: 60,
            send_timeout_secs: 30,
            listener_send_buffer_bytes: 64 * 1024,
            header_timeout_secs: 10,
            header_timeout_under_pressure_secs: 2,
            source_timeout_secs: 10,
            shutdown_grace_secs: 5,
            shoutcast_mount: "/stream".into(),
            cors_allowed_origins: vec!["*".into()],
            ipv6_prefix_bits: 128,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            forwarded_header: ForwardedHeader::XForwardedFor,
            defaults: MountSettings::default(),
            mounts: BTreeMap::new(),
            #[cfg(feature = "fault-injection")]
            panic_injection_mount: None,
            #[cfg(feature = "fault-injection")]
            join_delay_injection_ms: 0,
            #[cfg(feature = "fault-injection")]
            pass_delay_injection_ms: 0,
        }
    }
}

/// The setting names a struct's derived `Deserialize` accepts, asked of serde itself: it hands
/// them to `deserialize_struct`, which here records them and stops.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("only the field names were asked for"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut names: &'static [&'static str] = &[];
    // The error is the expected way out: the names are all that was wanted.
    let _ = T::deserialize(Fields(&mut names));
    names
}

/// Gives each `[mounts."/path"]` table every key of `[defaults]` it does not set itself, so that
/// deserializing it yields the mount's resolved settings (the embedded defaults fill the rest).
/// Values that are not tables are left for serde to refuse.
/// A settings error as an operator fixes it: the file is read as tables first, so serde names
/// the key (`in `defaults.burst_bytes``, `unknown field `burts_bytes``) but not where it is.
/// This adds the line, and for an unknown key the known one it is likely a typo of.
fn located(text: &str, error: String) -> String {
    let unknown = error
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    let place = error
        .rsplit_once("\nin `")
        .and_then(|(_, rest)| rest.strip_suffix('`').or(rest.strip_suffix("`\n")));
    // The section and the key within it.
    let (section, key) = match (unknown, place) {
        (Some(key), Some(section)) => (section, key),
        (Some(key), None) => ("", key),
        (None, Some(path)) => path.rsplit_once('.').unwrap_or(("", path)),
        (None, None) => return error,
    };
    let mut message = error.trim_end().replace('\n', " ");
    if let Some(key) = unknown {
        let known = error.split("expected one of ").nth(1).unwrap_or_default();
        let closest = known
            .split(", ")
            .map(|k| k.trim_matches(|c: char| c == '`' || c.is_whitespace()))
            .map(|k| (edit_distance(k, key), k))
            .filter(|&(d, k)| d <= 2.max(k.len() / 4))
            .min();
        if let Some((_, meant)) = closest {
            let within = if section.is_empty() {
                String::new()
            } else {
                format!(" in `{section}`")
            };
            message = format!("unknown field `{key}`{within}: did you mean `{meant}`?");
        }
    }
    // A mount's settings are read over `[defaults]`: what is wrong in a mount may be written
    // there.
    let line = line_of(text, section, key).or_else(|| {
        section
            .starts_with("mounts.")
            .then(|| line_of(text, "defaults", key))
            .flatten()
    });
    match line {
        Some(line) => format!("line {line}: {message}"),
        None => message,
    }
}

/// The line (from 1) where `key` is set in the table `section` (`""` for the top level,
/// `mounts./live` for `[mounts."/live"]`, as serde writes its paths).
fn line_of(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = header.replace(['"', ' '], "");
        } else if current == section
            && line
                .split('=')
                .next()
                .is_some_and(|k| k.trim().trim_matches('"') == key && line.contains('='))
        {
            return Some(n + 1);
        }
    }
    None
}

/// Levenshtein distance: single-character edits from `a` to `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

fn merge_mounts_over_defaults(file: &mut toml::Table) {
    let defaults = match file.get("defaults") {
        Some(toml::Value::Table(defaults)) => defaults.clone(),
        _ => toml::Table::new(),
    };
    let Some(toml::Value::Table(mounts)) = file.get_mut("mounts") else {
        return;
    };
    for (_, mount) in mounts.iter_mut() {
        if let toml::Value::Table(own) = mount {
            let mut merged = defaults.clone();
            merged.extend(std::mem::take(own));
            *own = merged;
        }
    }
}

impl Config {
    /// Reads a TOML file over the embedded defaults.
    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        // An operator moving from Icecast may point the server at its icecast.xml: a TOML parse
        // error at line 1 would not tell them what to do.
        if text.trim_start().starts_with('<') {
            return Err(format!(
                "config {}: this is XML (an icecast.xml?); fanstream reads TOML: see \"Moving from Icecast\" in the README for each Icecast setting's key",
                path.display()
            ));
        }
        Config::from_toml(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Parses the file's text. Its top level holds the [`Startup`] settings and the others side
    /// by side; they are told apart by the names serde knows for each struct, which also refuse
    /// a key that neither knows (`deny_unknown_fields` cannot see through one struct flattened
    /// into another, and a flattened field's errors would not name their key).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let mut file: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let startup_names = field_names::<Startup>();
        let known: Vec<&str> = startup_names
            .iter()
            .chain(field_names::<Config>())
            .copied()
            .collect();
        if let Some(key) = file.keys().find(|key| !known.contains(&key.as_str())) {
            return Err(located(
                text,
                format!(
                    "unknown field `{key}`, expected one of `{}`",
                    known.join("`, `")
                ),
            ));
        }
        let startup: toml::Table = startup_names
            .iter()
            .filter_map(|&name| Some((name.to_string(), file.remove(name)?)))
            .collect();
        merge_mounts_over_defaults(&mut file);
        let error = |e: toml::de::Error| located(text, e.to_string());
        Ok(Config {
            startup: Startup::deserialize(startup).map_err(error)?,
            ..Config::deserialize(file).map_err(error)?
        })
    }

    /// The config to install when a server running `self` reloads `new`, and the names of the
    /// Whether `ip` is one of `trusted_proxies`.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|range| range.contains(ip))
    }

    /// The client an address counts as for the per-address limits: itself, or for IPv6 its
    /// first `ipv6_prefix_bits` bits (the rest zero).
    pub fn client_key(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) if self.ipv6_prefix_bits < 128 => {
                let mask = u128::MAX << (128 - u32::from(self.ipv6_prefix_bits));
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
            ip => ip,
        }
    }

    /// [`Startup`] settings `new` changes: the running group is kept whole, since those settings
    /// are bound until the next restart. The running source password stays when `new` sets none
    /// (it may have been generated at start-up), and so does the test hook.
    pub fn reloaded(&self, mut new: Config) -> (Config, Vec<String>) {
        // Relays are the relays thread's to restart, one by one: a reload applies them.
        let relays = std::mem::take(&mut new.startup.relays);
        let master = new.startup.master.take();
        let relay_ca_file = new.startup.relay_ca_file.take();
        let mut changed = self.startup.changed_in(&new.startup);
        changed.retain(|name| !matches!(name.as_str(), "relays" | "master" | "relay_ca_file"));
        new.startup = Startup {
            relays,
            master,
            relay_ca_file,
            ..self.startup.clone()
        };
        if new.source_password.is_none() {
            new.source_password = self.source_password.clone();
        }
        #[cfg(feature = "fault-injection")]
        {
            new.panic_injection_mount = self.panic_injection_mount.clone();
            new.join_delay_injection_ms = self.join_delay_injection_ms;
            new.pass_delay_injection_ms = self.pass_delay_injection_ms;
        }
        (new, changed)
    }

    /// Reads the password files into the passwords they stand for, so that secrets can live
    /// outside the config (mounted secrets, files readable only by the service user).
    pub fn resolve_password_files(&mut self) -> Result<(), String> {
        let read = read_password_file;
        if let Some(path) = &self.source_password_file {
            self.source_password = Some(read("source_password_file", path)?);
        }
        if let Some(path) = &self.admin_password_file {
            self.admin_password = Some(read("admin_password_file", path)?);
        }
        if let Some(path) = &self.defaults.source_password_file {
            self.defaults.source_password = Some(read("defaults.source_password_file", path)?);
        }
        for (mount, m) in self.mounts.iter_mut() {
            if let Some(path) = &m.source_password_file {
                m.source_password = Some(read(
                    &format!("mounts.\"{mount}\".source_password_file"),
                    path,
                )?);
            }
        }
        Ok(())
    }

    /// The listener port's connection limit in force: `max_connections`, or the open-file limit
    /// less [`Config::descriptor_reserve`].
    pub fn connection_limit(&self) -> usize {
        if self.startup.max_connections > 0 {
            return self.startup.max_connections;
        }
        let soft = crate::open_files::soft_limit().unwrap_or(1024) as usize;
        soft.saturating_sub(self.descriptor_reserve(soft)).max(16)
    }

    /// Descriptors that connections on the listener port must leave free under an open-file
    /// limit of `open_files`: 1% (at least 64) for the server's own (runtimes, a config reload,
    /// logs), the admin listener's connections, and sources, which leave the listener port's
    /// count once handed to ingest.
    pub fn descriptor_reserve(&self, open_files: usize) -> usize {
        (open_files / 100).max(64)
            + self.startup.max_admin_connections
            + self.source_limit_under(open_files)
    }

    /// The most sources live at once: `max_sources`, or when 0, derived from the process's
    /// open-file limit.
    pub fn source_limit(&self) -> usize {
        self.source_limit_under(crate::open_files::soft_limit().unwrap_or(1024) as usize)
    }

    /// Each live source holds a descriptor, which the reserve keeps for it: 1% of the limit
    /// leaves 99% to listeners (19,600 of 20,000 here) and still gives 10,000 sources under the
    /// systemd unit's limit.
    fn source_limit_under(&self, open_files: usize) -> usize {
        match self.max_sources {
            0 => (open_files / 100).max(100),
            n => n,
        }
    }

    /// How long a connection accepted now has to send its request head.
    pub fn header_timeout(&self, under_pressure: bool) -> std::time::Duration {
        let secs = if under_pressure {
            self.header_timeout_under_pressure_secs
                .min(self.header_timeout_secs)
        } else {
            self.header_timeout_secs
        };
        std::time::Duration::from_secs(secs)
    }

    /// Settings for a mount: its own if declared, else the defaults. A fallback file's mount
    /// is hidden and has no fallback of its own: it is the end of a chain.
    pub fn mount(&self, path: &str) -> MountSettings {
        if path.starts_with(FILE_MOUNT_PREFIX) {
            return MountSettings {
                hidden: true,
                fallback_mount: None,
                fallback_file: None,
                fallback_override: false,
                ..self.defaults.clone()
            };
        }
        if let Some(own) = self.mounts.get(path) {
            return own.clone();
        }
        if self.startup.demo && path == self.startup.demo_mount {
            // Within what the lag limit allows, as any burst.
            let burst = self
                .defaults
                .burst_bytes
                .max(DEMO_BURST_BYTES)
                .min(self.defaults.max_lag_bytes);
            return MountSettings {
                burst_bytes: burst,
                ..self.defaults.clone()
            };
        }
        self.defaults.clone()
    }

    /// Every `intro_file` the config names, once each.
    pub fn intro_files(&self) -> BTreeSet<&Path> {
        self.files_named(|m| m.intro_file.as_deref())
    }

    /// Every `fallback_file` the config names, once each.
    pub fn fallback_files(&self) -> BTreeSet<&Path> {
        self.files_named(|m| m.fallback_file.as_deref())
    }

    /// Every `htpasswd_file` that a mount with `auth = "htpasswd"` reads, once each.
    pub fn htpasswd_files(&self) -> BTreeSet<&Path> {
        self.files_named(|m| {
            m.htpasswd_file
                .as_deref()
                .filter(|_| m.auth == Some(ListenerAuthKind::Htpasswd))
        })
    }

    /// The files `file` finds in the defaults (for mounts not declared) and in each declared
    /// mount's settings, once each.
    fn files_named<'a>(
        &'a self,
        file: impl Fn(&'a MountSettings) -> Option<&'a Path>,
    ) -> BTreeSet<&'a Path> {
        std::iter::once(&self.defaults)
            .chain(self.mounts.values())
            .filter_map(file)
            .collect()
    }

    /// The mounts an operator expects a source on: those in `[mounts]`, and the demo's.
    pub fn declared_mounts(&self) -> impl Iterator<Item = &str> {
        let demo = self
            .startup
            .demo
            .then_some(self.startup.demo_mount.as_str());
        self.mounts.keys().map(String::as_str).chain(demo)
    }

    /// The user a source of `path` names: the mount's `source_user`, else the global one.
    pub fn source_user_for(&self, path: &str) -> &str {
        match self.mounts.get(path) {
            Some(m) => m.source_user.as_deref(),
            None => self.defaults.source_user.as_deref(),
        }
        .unwrap_or(&self.source_user)
    }

    /// Whether a source may create `path` (declared, the demo, or admitted by a global password).
    pub fn source_password_for(&self, path: &str) -> Option<&str> {
        match self.mounts.get(path) {
            Some(m) => m.source_password.as_deref(),
            None => self.defaults.source_password.as_deref(),
        }
        .or(self.source_password.as_deref())
    }

    /// Number of workers to start: `workers`, or one per core when 0.
    pub fn worker_count(&self) -> usize {
        if self.startup.workers > 0 {
            self.startup.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Rejects settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.startup.workers > 1024 {
            return Err(format!("workers = {}: at most 1024", self.startup.workers));
        }
        if self.source_user.is_empty() || self.source_user.contains(':') {
            return Err("source_user must be non-empty and contain no ':'".into());
        }
        if self.header_timeout_secs == 0 {
            return Err("header_timeout_secs must be at least 1".into());
        }
        if self.header_timeout_under_pressure_secs == 0 {
            return Err("header_timeout_under_pressure_secs must be at least 1".into());
        }
        if self.startup.max_listener_auth_calls == 0 {
            return Err("max_listener_auth_calls must be at least 1".into());
        }
        if !(1..=65536).contains(&self.startup.max_admin_connections) {
            return Err(format!(
                "max_admin_connections = {}: 1 to 65536",
                self.startup.max_admin_connections
            ));
        }
        if self.source_timeout_secs == 0 {
            return Err("source_timeout_secs must be at least 1".into());
        }
        if self.max_listeners == 0 {
            return Err("max_listeners must be at least 1".into());
        }
        if self.send_timeout_secs == 0 {
            return Err("send_timeout_secs must be at least 1".into());
        }
        let sndbuf = self.listener_send_buffer_bytes;
        if sndbuf != 0 && !(4096..=64 << 20).contains(&sndbuf) {
            return Err(format!(
                "listener_send_buffer_bytes = {sndbuf}: 0 (the kernel's choice) or 4096 to 64 MiB"
            ));
        }
        if self.auth_max_failures == 0 {
            return Err("auth_max_failures must be at least 1".into());
        }
        if let Some(p) = &self.source_password {
            if p.is_empty() {
                return Err("source_password must not be empty".into());
            }
        }
        if self.admin_password.as_deref() == Some("") {
            return Err(
                "admin_password must not be empty (leave it out for no authentication)".into(),
            );
        }
        if self.admin_user.is_empty() || self.admin_user.contains(':') {
            return Err("admin_user must be non-empty and contain no ':'".into());
        }
        if self.relay_user.is_empty() || self.relay_user.contains(':') {
            return Err("relay_user must be non-empty and contain no ':'".into());
        }
        if self.relay_password.as_deref() == Some("") {
            return Err(
                "relay_password must not be empty (leave it out for no relay identity)".into(),
            );
        }
        for origin in &self.cors_allowed_origins {
            let plausible = origin == "*"
                || (origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && origin.bytes().all(|b| b.is_ascii_graphic());
            if !plausible {
                return Err(format!(
                    "cors_allowed_origins: {origin:?} is not an origin (\"*\", or scheme://host[:port] with no path, as browsers send it)"
                ));
            }
        }
        if !(1..=128).contains(&self.ipv6_prefix_bits) {
            return Err(format!(
                "ipv6_prefix_bits = {}: 1 to 128",
                self.ipv6_prefix_bits
            ));
        }
        let st = &self.startup;
        if st.tls_listen.is_some() && (st.tls_cert.is_none() || st.tls_key.is_none()) {
            return Err("tls_listen needs tls_cert and tls_key (PEM files)".into());
        }
        check_mount_path("demo_mount", &self.startup.demo_mount)?;
        check_mount_path("shoutcast_mount", &self.shoutcast_mount)?;
        self.check_relays()?;
        check_mount("defaults", &self.defaults)?;
        for (path, m) in &self.mounts {
            check_mount_path(&format!("mounts.\"{path}\""), path)?;
            if path.starts_with(FILE_MOUNT_PREFIX) {
                return Err(format!(
                    "mounts.\"{path}\": mounts under {FILE_MOUNT_PREFIX} are where fallback files play"
                ));
            }
            check_mount(&format!("mounts.\"{path}\""), m)?;
        }
        check_fallback_loops(self)?;
        Ok(())
    }
}

impl Config {
    fn check_relays(&self) -> Result<(), String> {
        let mut mounts = std::collections::HashSet::new();
        for (i, r) in self.startup.relays.iter().enumerate() {
            let what = format!("relays[{i}]");
            check_mount_path(&format!("{what}.mount"), &r.mount)?;
            if !mounts.insert(r.mount.as_str()) {
                return Err(format!(
                    "{what}.mount = {:?}: another relay feeds it",
                    r.mount
                ));
            }
            if self.startup.demo && r.mount == self.startup.demo_mount {
                return Err(format!(
                    "{what}.mount = {:?}: the demo plays there",
                    r.mount
                ));
            }
            if r.upstreams.is_empty() {
                return Err(format!("{what}.upstreams: at least one URL"));
            }
            for (j, url) in r.upstreams.iter().enumerate() {
                crate::http_client::HttpUrl::parse(url)
                    .map_err(|e| format!("{what}.upstreams[{j}] = {url:?}: {e}"))?;
            }
            if r.user
                .as_deref()
                .is_some_and(|u| u.is_empty() || u.contains(':'))
            {
                return Err(format!("{what}.user must be non-empty and contain no ':'"));
            }
            if r.user.is_some() && r.password.is_none() {
                return Err(format!("{what}.user is set without a password"));
            }
            if r.retry_secs == 0 {
                return Err(format!("{what}.retry_secs must be at least 1"));
            }
        }
        if let Some(m) = &self.startup.master {
            let url = crate::http_client::HttpUrl::parse(&m.url)
                .map_err(|e| format!("master.url = {:?}: {e}", m.url))?;
            if url.target != "/" || url.user_info.is_some() {
                return Err(format!(
                    "master.url = {:?}: a base URL, http://host:port, without a path or credentials (they go in master.user and master.password)",
                    m.url
                ));
            }
            if m.user
                .as_deref()
                .is_some_and(|u| u.is_empty() || u.contains(':'))
            {
                return Err("master.user must be non-empty and contain no ':'".into());
            }
            if m.user.is_some() && m.password.is_none() {
                return Err("master.user is set without a password".into());
            }
            if m.interval_secs == 0 {
                return Err("master.interval_secs must be at least 1".into());
            }
            if m.register {
                let url = m.public_url.as_deref().ok_or(
                    "master.register needs master.public_url, where listeners reach this server",
                )?;
                check_public_url(url).map_err(|e| format!("master.public_url = {url:?}: {e}"))?;
                if m.password.is_none() {
                    return Err("master.register needs master.password: the origin takes registrations from its relay user only".into());
                }
            }
        }
        if self.startup.relays.len() > self.source_limit() {
            return Err(format!(
                "{} relays but at most {} sources (max_sources): each relay is a source",
                self.startup.relays.len(),
                self.source_limit()
            ));
        }
        Ok(())
    }
}

/// An edge's public URL as a redirect's `Location` starts with: `http://` or `https://`, a host
/// and maybe a port, no path, printable ASCII only (it goes in a header).
pub fn check_public_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() || rest.len() > 256 {
        return Err("needs a host (at most 256 bytes)");
    }
    if rest.contains('/') || rest.contains('@') {
        return Err("a host and port only: no path, no credentials");
    }
    if !rest.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("holds spaces or characters that are not printable ASCII");
    }
    Ok(())
}

/// The password a file holds: its first line, trimmed. `what` names the setting (or the source)
/// that points at the file, for the error.
pub fn read_password_file(what: &str, path: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{what} = {}: {e}", path.display()))?;
    let pw = text.lines().next().unwrap_or("").trim().to_string();
    if pw.is_empty() {
        return Err(format!(
            "{what} = {}: the file holds no password",
            path.display()
        ));
    }
    Ok(pw)
}

fn check_mount_path(what: &str, path: &str) -> Result<(), String> {
    if crate::http::valid_mount_path(path) {
        Ok(())
    } else {
        Err(format!(
            "{what}: {path:?} is not a mount path (must start with '/', at most 256 bytes of letters, digits and -_.~/, no '..')"
        ))
    }
}

fn check_mount(what: &str, m: &MountSettings) -> Result<(), String> {
    if m.max_lag_bytes < 4096 {
        return Err(format!(
            "{what}.max_lag_bytes = {}: at least 4096",
            m.max_lag_bytes
        ));
    }
    if m.max_lag_bytes > 1 << 30 {
        return Err(format!(
            "{what}.max_lag_bytes = {}: at most 1 GiB",
            m.max_lag_bytes
        ));
    }
    if m.burst_bytes > m.max_lag_bytes {
        return Err(format!(
            "{what}.burst_bytes = {} exceeds max_lag_bytes = {}: a new listener would start already too far behind",
            m.burst_bytes, m.max_lag_bytes
        ));
    }
    if m.min_write_bytes > 1 << 20 {
        return Err(format!(
            "{what}.min_write_bytes = {}: at most 1 MiB",
            m.min_write_bytes
        ));
    }
    if !(256..=1 << 20).contains(&m.icy_metaint) {
        return Err(format!(
            "{what}.icy_metaint = {}: 256 to 1 MiB",
            m.icy_metaint
        ));
    }
    if m.max_write_delay_ms > 10_000 {
        return Err(format!(
            "{what}.max_write_delay_ms = {}: at most 10000",
            m.max_write_delay_ms
        ));
    }
    if !(4..=100).contains(&m.hls_segments) {
        return Err(format!(
            "{what}.hls_segments = {}: 4 to 100",
            m.hls_segments
        ));
    }
    if !(1..=60).contains(&m.hls_segment_secs) {
        return Err(format!(
            "{what}.hls_segment_secs = {}: 1 to 60",
            m.hls_segment_secs
        ));
    }
    if let Some(p) = &m.source_password {
        if p.is_empty() {
            return Err(format!("{what}.source_password must not be empty"));
        }
    }
    if let Some(u) = &m.source_user {
        if u.is_empty() || u.contains(':') {
            return Err(format!(
                "{what}.source_user must be non-empty and contain no ':'"
            ));
        }
    }
    if let Some(f) = &m.fallback_mount {
        check_mount_path(&format!("{what}.fallback_mount"), f)?;
    }
    match m.auth {
        Some(ListenerAuthKind::Url) => {
            let add = m
                .listener_add_url
                .as_deref()
                .ok_or_else(|| format!("{what}.auth = \"url\" needs listener_add_url"))?;
            check_auth_url(&format!("{what}.listener_add_url"), add)?;
        }
        Some(ListenerAuthKind::Htpasswd) if m.htpasswd_file.is_none() => {
            return Err(format!("{what}.auth = \"htpasswd\" needs htpasswd_file"));
        }
        _ => {}
    }
    if let Some(remove) = &m.listener_remove_url {
        check_auth_url(&format!("{what}.listener_remove_url"), remove)?;
    }
    if !(100..=60_000).contains(&m.auth_timeout_ms) {
        return Err(format!(
            "{what}.auth_timeout_ms = {}: 100 to 60000",
            m.auth_timeout_ms
        ));
    }
    if let Some(file) = &m.intro_file {
        if file_format(file).is_none() {
            return Err(format!(
                "{what}.intro_file = {}: not an MP3 (.mp3) or Ogg (.ogg, .oga, .opus) file",
                file.display()
            ));
        }
    }
    if let Some(file) = &m.fallback_file {
        if file_format(file).is_none() {
            return Err(format!(
                "{what}.fallback_file = {}: not an MP3 (.mp3) or Ogg (.ogg, .oga, .opus) file",
                file.display()
            ));
        }
    }
    Ok(())
}

/// An auth URL must be one the server can call: plain `http://`, with a host.
fn check_auth_url(what: &str, url: &str) -> Result<(), String> {
    match HttpUrl::parse(url) {
        Some(_) => Ok(()),
        None => Err(format!(
            "{what} = {url:?}: not an http:// URL with a host (https is not supported: call a local endpoint)"
        )),
    }
}

/// An `http://` URL, as the listener auth calls need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port`, to connect to (port 80 when not given).
    pub authority: String,
    /// As sent in `Host`.
    pub host: String,
    /// Path and query, at least `/`.
    pub target: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Option<HttpUrl> {
        let rest = url.strip_prefix("http://")?;
        let (host, target) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let bad = |c: char| c.is_whitespace() || c.is_control() || c == '@';
        if host.is_empty() || host.contains(bad) || target.contains(bad) {
            return None;
        }
        let authority = match host.rsplit_once(':') {
            Some((_, port)) if !host.ends_with(']') => {
                port.parse::<u16>().ok()?;
                host.to_string()
            }
            _ => format!("{host}:80"),
        };
        Some(HttpUrl {
            authority,
            host: host.to_string(),
            target: target.to_string(),
        })
    }
}

/// Refuses a fallback chain that comes back to a mount it passed: listeners would be sent round
/// it for ever. A link to the mount itself ends the chain (see `fallback_mount`); a mount not
/// declared has the defaults' fallback.
fn check_fallback_loops(cfg: &Config) -> Result<(), String> {
    for start in cfg.mounts.keys() {
        let mut chain = vec![start.as_str()];
        let mut at = start.as_str();
        while let Some(next) = cfg
            .mounts
            .get(at)
            .unwrap_or(&cfg.defaults)
            .fallback_mount
            .as_deref()
            .filter(|next| *next != at)
        {
            if chain.contains(&next) {
                chain.push(next);
                return Err(format!(
                    "mounts.\"{start}\".fallback_mount: the fallback chain loops: {}",
                    chain.join(" -> ")
                ));
            }
            chain.push(next);
            at = next;
        }
    }
    Ok(())
}

/// Where the fallback file `file` plays: a hidden mount named after the file, the same for
/// every mount that names it.
pub fn file_mount_path(file: &Path) -> String {
    // FNV-1a of the whole path: two files of one name in different directories differ.
    let hash = file
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let stem: String = file
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{FILE_MOUNT_PREFIX}{stem}-{hash:016x}")
}

/// Where fallback files play (see [`file_mount_path`]).
pub const FILE_MOUNT_PREFIX: &str = "/fallback-file/";

/// The formats a fallback file may have, by its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    Mp3,
    Ogg,
}

impl FileFormat {
    /// The format a stream of this `Content-Type` has, if it is one of these.
    pub fn of_content_type(content_type: &str) -> Option<FileFormat> {
        let essence = content_type.split(';').next()?.trim().to_ascii_lowercase();
        match essence.as_str() {
            "audio/mpeg" | "audio/mp3" | "audio/mpeg3" => Some(FileFormat::Mp3),
            "audio/ogg" | "application/ogg" | "audio/opus" | "audio/x-ogg" => Some(FileFormat::Ogg),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            FileFormat::Mp3 => "audio/mpeg",
            FileFormat::Ogg => "audio/ogg",
        }
    }
}

/// A fallback file's format, from its extension.
pub fn file_format(file: &Path) -> Option<FileFormat> {
    let ext = file.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "mp3" => Some(FileFormat::Mp3),
        "ogg" | "oga" | "opus" => Some(FileFormat::Ogg),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_furthest_behind_needs_is_bounded_by_the_window() {
        let s = MountSettings::default();
        let window = s.window_bytes();
        let end = 10 * window;
        assert_eq!(s.behind_bytes(end, None), 0);
        assert_eq!(s.behind_bytes(end, Some(end)), 0);
        assert_eq!(s.behind_bytes(end, Some(end - 1000)), 1000);
        assert_eq!(s.behind_bytes(end, Some(0)), window);
        // A position past the end (a stale read) needs nothing.
        assert_eq!(s.behind_bytes(end, Some(end + 5)), 0);
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.startup.listen.port(), 8000);
        assert_eq!(c.defaults.burst_bytes, 65536);
        assert_eq!(c.defaults.max_lag_bytes, 524288);
        assert_eq!(c.defaults.lag_policy, LagPolicy::Disconnect);
        assert_eq!(c.defaults.source_grace_secs, 10);
    }

    #[test]
    fn file_overrides_defaults_and_mounts_inherit() {
        let c = Config::from_toml(
            r#"
            listen = "127.0.0.1:9000"
            source_password = "global"
            [defaults]
            burst_bytes = 1000
            max_lag_bytes = 100000
            [mounts."/live"]
            source_password = "livepw"
            max_listeners = 5
            lag_policy = "skip"
            fallback_mount = "/demo"
            [mounts."/other"]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.startup.listen.port(), 9000);
        let live = c.mount("/live");
        assert_eq!(live.burst_bytes, 1000);
        assert_eq!(live.max_listeners, 5);
        assert_eq!(live.lag_policy, LagPolicy::Skip);
        assert_eq!(c.source_password_for("/live"), Some("livepw"));
        assert_eq!(c.source_password_for("/other"), Some("global"));
        assert_eq!(c.source_password_for("/undeclared"), Some("global"));
        assert_eq!(c.mount("/undeclared").max_lag_bytes, 100000);
    }

    /// The demo gets a burst a browser can start a WAV stream from, within the lag limit, unless
    /// the config gives the mount settings of its own.
    #[test]
    fn the_demo_mount_has_a_browsers_burst_unless_declared() {
        let c = Config::default();
        assert!(c.startup.demo);
        assert_eq!(c.mount("/demo").burst_bytes, DEMO_BURST_BYTES);
        assert_eq!(c.mount("/other").burst_bytes, 65536);
        let c =
            Config::from_toml("[defaults]\nmax_lag_bytes = 200000\nburst_bytes = 1000").unwrap();
        assert_eq!(c.mount("/demo").burst_bytes, 200000);
        let c = Config::from_toml("[mounts.\"/demo\"]\nburst_bytes = 1000").unwrap();
        assert_eq!(c.mount("/demo").burst_bytes, 1000);
        let c = Config::from_toml("demo = false").unwrap();
        assert_eq!(c.mount("/demo").burst_bytes, 65536);
    }

    #[test]
    fn the_readme_example_is_valid_and_states_every_default() {
        let readme = include_str!("../README.md");
        let example = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("README has a toml example");
        let mut c = Config::from_toml(example).unwrap();
        c.validate().unwrap();
        assert_eq!(c.mounts.len(), 2);
        assert_eq!(c.mount("/live").max_listeners, 500);
        assert_eq!(c.mount("/lowlatency").max_write_delay_ms, 0);
        c.mounts.clear();
        assert_eq!(
            c,
            Config::default(),
            "the README's defaults differ from the code's"
        );
    }

    #[test]
    fn the_packaged_config_is_the_readme_example_with_its_mounts_commented_out() {
        let readme = include_str!("../README.md");
        let example = readme.split("```toml\n").nth(1).unwrap();
        let example = example.split("```").next().unwrap();
        let mut expected = Config::from_toml(example).unwrap();
        // A declared mount without a source sets off FanstreamSourceDown: a fresh install
        // declares none.
        assert!(expected.mounts.contains_key("/live"));
        expected.mounts.clear();
        let text = include_str!("../packaging/fanstream.toml");
        let packaged = Config::from_toml(text).unwrap();
        packaged.validate().unwrap();
        assert_eq!(
            packaged, expected,
            "packaging/fanstream.toml and the README differ"
        );
        assert!(packaged.startup.demo);
        assert!(packaged.startup.admin_listen.unwrap().ip().is_loopback());
        // Every setting the example names, set or commented out, is named in the installed file
        // too, where an operator looks for it.
        let keys = |text: &str| -> std::collections::BTreeSet<String> {
            text.lines()
                .filter_map(|line| {
                    let (key, _) = line.trim_start_matches('#').trim().split_once(" = ")?;
                    key.chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_')
                        .then(|| key.to_string())
                })
                .collect()
        };
        let missing: Vec<_> = keys(example).difference(&keys(text)).cloned().collect();
        assert!(missing.is_empty(), "not in the packaged file: {missing:?}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = Config::from_toml("lissten = \"x\"").unwrap_err();
        assert!(e.contains("lissten"), "{e}");
        // With the line, and the key a typo was likely meant to be.
        assert_eq!(e, "line 1: unknown field `lissten`: did you mean `listen`?");
        let e = Config::from_toml("demo = true\n[defaults]\nburts_bytes = 5\n").unwrap_err();
        assert_eq!(
            e,
            "line 3: unknown field `burts_bytes` in `defaults`: did you mean `burst_bytes`?"
        );
        let e = Config::from_toml("[mounts.\"/live\"]\n\nmax_listeners = \"x\"\n").unwrap_err();
        assert!(e.starts_with("line 3: invalid type"), "{e}");
        assert!(e.contains("mounts./live.max_listeners"), "{e}");
        // Nothing close: the whole list, to choose from.
        let e = Config::from_toml("zzzzzz = 1").unwrap_err();
        assert!(e.contains("expected one of `listen`"), "{e}");
        assert_eq!(edit_distance("listne", "listen"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        let e = Config::from_toml("[defaults]\nlag_policy = \"drop\"").unwrap_err();
        assert!(e.contains("drop"), "{e}");
        let c = Config::from_toml("[defaults]\nburst_bytes = 900000").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("defaults.burst_bytes"), "{e}");
        let c = Config::from_toml("[mounts.\"live\"]").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("mounts.\"live\""), "{e}");
        let c = Config::from_toml("[mounts.\"/a\"]\nfallback_file = \"/x/brb.wav\"").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("mounts.\"/a\".fallback_file"), "{e}");
    }

    #[test]
    fn a_fallback_need_not_be_declared_but_a_loop_is_refused() {
        let c = Config::from_toml("[mounts.\"/a\"]\nfallback_mount = \"/nowhere\"").unwrap();
        c.validate().unwrap();
        let c = Config::from_toml(
            r#"
            [defaults]
            fallback_mount = "/backup"
            [mounts."/backup"]
            [mounts."/a"]
            fallback_mount = "/b"
            "#,
        )
        .unwrap();
        c.validate()
            .expect("a chain into the defaults' fallback, which names itself there, ends");
        let c = Config::from_toml(
            r#"
            [mounts."/a"]
            fallback_mount = "/b"
            [mounts."/b"]
            fallback_mount = "/c"
            [mounts."/c"]
            fallback_mount = "/a"
            "#,
        )
        .unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("loops: /a -> /b -> /c -> /a"), "{e}");
        let c = Config::from_toml("[mounts.\"/fallback-file/x\"]").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("where fallback files play"), "{e}");
    }

    #[test]
    fn fallback_files_play_on_hidden_mounts_of_their_own() {
        let c = Config::from_toml(
            r#"
            [defaults]
            fallback_file = "/srv/brb.mp3"
            [mounts."/a"]
            [mounts."/b"]
            fallback_file = "/other/brb.ogg"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let files: Vec<_> = c.fallback_files().into_iter().collect();
        assert_eq!(
            files,
            [Path::new("/other/brb.ogg"), Path::new("/srv/brb.mp3")]
        );
        let (one, two) = (file_mount_path(files[0]), file_mount_path(files[1]));
        assert!(one.starts_with("/fallback-file/brb-"), "{one}");
        assert_ne!(one, two, "two files of one name");
        assert!(crate::http::valid_mount_path(&one), "{one}");
        let settings = c.mount(&one);
        assert!(settings.hidden);
        assert_eq!(
            (settings.fallback_file, settings.fallback_mount),
            (None, None)
        );
    }

    #[test]
    fn unknown_keys_are_refused_at_the_top_and_in_every_table() {
        for (text, key) in [
            ("[mounts.\"/a\"]\nburts_bytes = 1", "burts_bytes"),
            ("[defaults]\nburts_bytes = 1", "burts_bytes"),
            ("[defualts]\nburst_bytes = 1", "defualts"),
            ("workerz = 2", "workerz"),
            ("startup = 1", "startup"),
            ("panic_injection_mount = \"/a\"", "panic_injection_mount"),
        ] {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.contains(key), "{text:?}: {e}");
        }
        let c = Config::from_toml("workers = 2\nmax_sources = 3").unwrap();
        assert_eq!((c.startup.workers, c.max_sources), (2, 3));
    }

    #[test]
    fn bad_values_name_their_setting_in_either_group() {
        for (text, key) in [
            ("listen = 5", "listen"),
            ("workers = \"x\"", "workers"),
            ("max_sources = -1", "max_sources"),
            ("admin_listen = \"nowhere\"", "admin_listen = \"nowhere\""),
            ("[mounts.\"/a\"]\nburst_bytes = \"x\"", "burst_bytes"),
        ] {
            let e = Config::from_toml(text).unwrap_err();
            assert!(e.contains(key), "{text:?}: {e}");
        }
        for off in ["none", "off", ""] {
            let c = Config::from_toml(&format!("admin_listen = {off:?}")).unwrap();
            assert_eq!(c.startup.admin_listen, None, "{off:?}");
        }
    }

    #[test]
    fn the_two_groups_share_no_setting_name() {
        let startup = field_names::<Startup>();
        assert!(startup.contains(&"listen"), "{startup:?}");
        for name in field_names::<Config>() {
            assert!(!startup.contains(name), "{name} is in both groups");
        }
    }

    #[test]
    fn a_mount_setting_comes_from_the_mount_then_defaults_then_the_embedded_defaults() {
        let c = Config::from_toml(
            r#"
            [defaults]
            burst_bytes = 1000
            max_lag_bytes = 100000
            source_password = "shared"
            [mounts."/a"]
            burst_bytes = 2000
            lag_policy = "skip"
            [mounts."/b"]
            "#,
        )
        .unwrap();
        let embedded = MountSettings::default();
        let a = c.mount("/a");
        assert_eq!(a.burst_bytes, 2000, "the mount's own");
        assert_eq!(a.lag_policy, LagPolicy::Skip, "the mount's own");
        assert_eq!(a.max_lag_bytes, 100000, "from [defaults]");
        assert_eq!(
            a.source_password.as_deref(),
            Some("shared"),
            "from [defaults]"
        );
        assert_eq!(a.min_write_bytes, embedded.min_write_bytes, "embedded");
        assert_eq!(
            c.mount("/b"),
            c.defaults,
            "a mount that sets nothing is [defaults]"
        );
        assert_eq!(
            c.defaults.burst_bytes, 1000,
            "a mount's key stays in its mount"
        );
        assert_eq!(c.defaults.lag_policy, embedded.lag_policy);
    }

    #[test]
    fn ipv6_clients_count_by_their_prefix_when_asked() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut c = Config::default();
        let a = ip("2001:db8:1:2:aaaa::1");
        assert_eq!(c.client_key(a), a, "each address by default");
        c.ipv6_prefix_bits = 64;
        assert_eq!(c.client_key(a), ip("2001:db8:1:2::"));
        assert_eq!(
            c.client_key(ip("2001:db8:1:2:ffff::9")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(c.client_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(c.client_key(ip("192.0.2.7")), ip("192.0.2.7"), "IPv4 whole");
        c.ipv6_prefix_bits = 1;
        assert_eq!(c.client_key(ip("ffff::1")), ip("8000::"));
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges() {
        let c = Config::from_toml(
            r#"trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32"]"#,
        )
        .unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for yes in [
            "127.0.0.1",
            "10.1.2.3",
            "::1",
            "2001:db8:ffff::1",
            "::ffff:10.9.9.9",
        ] {
            assert!(c.trusts(ip(yes)), "{yes}");
        }
        for no in ["127.0.0.2", "11.0.0.1", "::2", "2001:db9::1", "192.0.2.1"] {
            assert!(!c.trusts(ip(no)), "{no}");
        }
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nowhere", "::/129", "1.2.3.4/x"] {
            let e = Config::from_toml(&format!("trusted_proxies = [{bad:?}]")).unwrap_err();
            assert!(e.contains("trusted_proxies"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_reload_keeps_the_startup_group_and_names_what_it_changes() {
        let mut running = Config::from_toml("source_password = \"generated\"").unwrap();
        running.panic_injection_mount = Some("/boom".into());
        let new = Config::from_toml(
            "listen = \"127.0.0.1:9\"\nadmin_listen = \"none\"\ndemo = true\nmax_sources = 7",
        )
        .unwrap();
        let (installed, mut changed) = running.reloaded(new);
        changed.sort();
        assert_eq!(changed, ["admin_listen", "listen"]);
        assert_eq!(installed.startup, running.startup);
        assert_eq!(installed.max_sources, 7, "other settings apply");
        assert_eq!(installed.source_password.as_deref(), Some("generated"));
        assert_eq!(installed.panic_injection_mount.as_deref(), Some("/boom"));

        let new = Config::from_toml("source_password = \"new\"").unwrap();
        let (installed, changed) = running.reloaded(new);
        assert!(changed.is_empty(), "{changed:?}");
        assert_eq!(installed.source_password.as_deref(), Some("new"));

        // Relays are applied by the reload, not kept for the next restart.
        let new = Config::from_toml(
            "relay_ca_file = \"/etc/ca.pem\"\n[[relays]]\nmount = \"/r\"\nupstreams = [\"https://o/r\"]\n[master]\nurl = \"http://o:8000\"\n",
        )
        .unwrap();
        let (installed, changed) = running.reloaded(new);
        assert!(changed.is_empty(), "{changed:?}");
        assert_eq!(installed.startup.relays[0].mount, "/r");
        assert!(installed.startup.master.is_some());
        assert_eq!(
            installed.startup.relay_ca_file.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
    }

    #[test]
    fn relays_are_read_from_the_file_and_bad_ones_are_named() {
        let c = Config::from_toml(
            "[[relays]]\nmount = \"/live\"\nupstreams = [\"http://a:8000/live\", \"http://b/live\"]\npassword = \"pw\"\nprefer_first = true\n",
        )
        .unwrap();
        c.validate().unwrap();
        let r = &c.startup.relays[0];
        assert_eq!(r.upstreams.len(), 2);
        let https = "[[relays]]\nmount = \"/s\"\nupstreams = [\"https://origin/live\"]\n";
        Config::from_toml(https).unwrap().validate().unwrap();
        assert!(r.prefer_first && !r.on_demand);
        assert_eq!((r.user.as_deref(), r.retry_secs), (None, 30));
        for (toml, why) in [
            (
                "mount = \"live\"\nupstreams = [\"http://a/x\"]",
                "relays[0].mount",
            ),
            ("mount = \"/l\"\nupstreams = []", "at least one URL"),
            (
                "mount = \"/l\"\nupstreams = [\"ftp://a/x\"]",
                "http:// or https://",
            ),
            (
                "mount = \"/l\"\nupstreams = [\"http://a:x/x\"]",
                "upstreams[0]",
            ),
            (
                "mount = \"/l\"\nupstreams = [\"http://a/x\"]\nuser = \"u\"",
                "without a password",
            ),
            (
                "mount = \"/l\"\nupstreams = [\"http://a/x\"]\nretry_secs = 0",
                "retry_secs",
            ),
        ] {
            let e = Config::from_toml(&format!("[[relays]]\n{toml}"))
                .and_then(|c| c.validate())
                .unwrap_err();
            assert!(e.contains(why), "{toml}: {e}");
        }
        let e = Config::from_toml(
            "[[relays]]\nmount = \"/l\"\nupstreams = [\"http://a/x\"]\nmirror = 1",
        )
        .unwrap_err();
        assert!(e.contains("mirror"), "{e}");
        let twice = "[[relays]]\nmount = \"/l\"\nupstreams = [\"http://a/x\"]\n";
        let e = Config::from_toml(&twice.repeat(2))
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.contains("another relay"), "{e}");
    }

    #[test]
    fn a_master_is_read_from_the_file_and_bad_ones_are_named() {
        let c = Config::from_toml("[master]\nurl = \"http://origin:8000\"\npassword = \"pw\"\n")
            .unwrap();
        c.validate().unwrap();
        let m = c.startup.master.as_ref().unwrap();
        assert_eq!((m.interval_secs, m.on_demand), (120, true));
        let c = Config::from_toml("[master]\nurl = \"https://origin\"\n").unwrap();
        c.validate().unwrap();
        for (toml, why) in [
            ("url = \"ftp://o\"", "http:// or https://"),
            ("url = \"http://o/live\"", "base URL"),
            ("url = \"http://u:p@o\"", "base URL"),
            ("url = \"http://o\"\ninterval_secs = 0", "interval_secs"),
            ("url = \"http://o\"\nuser = \"u\"", "without a password"),
        ] {
            let e = Config::from_toml(&format!("[master]\n{toml}"))
                .and_then(|c| c.validate())
                .unwrap_err();
            assert!(e.contains(why), "{toml}: {e}");
        }
    }

    #[test]
    fn master_on_demand_is_the_same_setting_as_on_demand() {
        for key in ["on_demand", "master_on_demand"] {
            let c = Config::from_toml(&format!(
                "[master]\nurl = \"http://o:8000\"\n{key} = false\n"
            ))
            .unwrap();
            assert!(!c.startup.master.unwrap().on_demand, "{key}");
        }
    }

    #[test]
    fn registration_needs_a_public_url_and_the_relay_password() {
        let ok = "[master]\nurl = \"http://o:8000\"\npassword = \"pw\"\nregister = true\npublic_url = \"https://edge-1.example:8443\"\n";
        Config::from_toml(ok).unwrap().validate().unwrap();
        for (toml, why) in [
            (
                "register = true\npassword = \"pw\"",
                "needs master.public_url",
            ),
            (
                "register = true\npublic_url = \"http://e:8000\"",
                "needs master.password",
            ),
            (
                "register = true\npassword = \"pw\"\npublic_url = \"http://e:8000/live\"",
                "no path",
            ),
            (
                "register = true\npassword = \"pw\"\npublic_url = \"e:8000\"",
                "http://",
            ),
        ] {
            let e = Config::from_toml(&format!("[master]\nurl = \"http://o\"\n{toml}"))
                .and_then(|c| c.validate())
                .unwrap_err();
            assert!(e.contains(why), "{toml}: {e}");
        }
        // An https origin: registration checks its certificate as the relays do.
        Config::from_toml(
            "[master]\nurl = \"https://o\"\npassword = \"pw\"\nregister = true\npublic_url = \"http://e:8000\"\n",
        )
        .and_then(|c| c.validate())
        .unwrap();
        let e = Config::from_toml("relay_password = \"\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.contains("relay_password"), "{e}");
        let e = Config::from_toml("relay_user = \"a:b\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.contains("relay_user"), "{e}");
    }
}
