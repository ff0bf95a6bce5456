//! One load run: start the server, push the sources, ramp the listeners over several listen
//! processes, watch, and sum it all up.
//!
//! Timeline (all processes share it in unix time): the sources start at `t0`; listeners ramp
//! from `start`; the measured window opens once the ramp and every listener's burst are done
//! (`measure_from`) and lasts `--seconds`; at its end (`end`) every listener closes, then the
//! sources and the server are stopped. Server and load CPU are taken over the window only.
//!
//! With `--icy-share`, that share of the listeners ask for ICY metadata and verify the audio
//! between the blocks; with `--title-every-secs`, the title of every mount is updated that often
//! from the sources' start on, so that the blocks carry titles.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::Duration;

use crate::flood::{self, FloodReport};
use crate::listen::{IcyReport, Line, ListenReport, Progress};
use crate::procstat;
use crate::record::Errors;
use crate::schedule::{unix_us, Schedule};
use crate::servers::{self, metric_by_label, metric_sum, ServerOpts, ServerProc, Target, PASSWORD};
use crate::source::{self, SourceOpts, SourceReport};
use crate::titles::{self, TitleReport};

/// A process holds at most this many connections: its open-file hard limit is 20,000 here.
const MAX_PER_PROCESS: usize = 9_000;
/// After the ramp, listeners have this long to take their burst before the window opens.
const SETTLE_SECS: f64 = 3.0;
/// A load process above this share of a core may have delayed what it measured.
const SATURATED_CORE_PCT: f64 = 90.0;
/// A source piece this late means the machine could not keep the pace.
const SOURCE_LATE_MS: f64 = 100.0;

#[derive(clap::Args, Clone, Debug)]
pub struct RunOpts {
    /// The server under test.
    #[arg(long, value_enum, default_value = "fanstream")]
    pub target: Target,
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    #[arg(long, default_value_t = 128)]
    pub bitrate_kbps: u64,
    /// Length of the measured window, after the ramp.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// fanstream worker threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Mounts, one source each, with the listeners spread evenly over them. Each command sets
    /// it from its own `--mounts`: one count for `run` ([`RunArgs`]), a list for `sweep` and
    /// `compare`, which run at each count.
    #[arg(skip = 1_usize)]
    pub mounts: usize,
    /// The source sends one piece this often (its size follows from the bitrate).
    #[arg(long, default_value_t = 20)]
    pub interval_ms: u64,
    /// Bytes per write of the source, each its own syscall, paced over each interval (1: a
    /// source writing a byte at a time at the same bitrate); default: one write per interval.
    #[arg(long)]
    pub piece_bytes: Option<usize>,
    /// New connections per second, over all listen processes.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp_per_sec: f64,
    /// Connections per listen process (at most 9,000: the fd limit is 20,000 per process).
    #[arg(long, default_value_t = 5000)]
    pub per_process: usize,
    /// fanstream's write coalescing; unset = the server's defaults.
    #[arg(long)]
    pub min_write_bytes: Option<usize>,
    #[arg(long)]
    pub max_write_delay_ms: Option<u64>,
    /// More settings for fanstream's generated config, as `KEY=TOML_VALUE` (top-level, e.g.
    /// `listener_send_buffer_bytes=262144`) or `defaults.KEY=TOML_VALUE` (every mount's, e.g.
    /// `defaults.burst_bytes=32768`, in place of the tool's own); repeatable.
    #[arg(long = "server-setting")]
    pub server_settings: Vec<String>,
    /// Bytes sent in the last this-many ms of the window are not counted as owed yet: they may
    /// be in flight, or held by write coalescing (up to `max_write_delay_ms`).
    #[arg(long, default_value_t = 2000)]
    pub allowance_ms: u64,
    /// The share of listeners that ask for ICY metadata (`Icy-MetaData: 1`), 0 to 1, spread
    /// evenly over each mount; they strip the blocks and verify the audio between them.
    #[arg(long, default_value_t = 0.0)]
    pub icy_share: f64,
    /// Audio bytes between ICY blocks, set as the mounts' `icy_metaint` (fanstream only);
    /// unset = the server's default (16000).
    #[arg(long)]
    pub icy_metaint: Option<usize>,
    /// Update every mount's title this often (`/admin/metadata`), so that ICY blocks carry
    /// titles; unset = never.
    #[arg(long)]
    pub title_every_secs: Option<f64>,
    /// Listeners connect over TLS, to a TLS port fanstream gets for the run with a certificate
    /// made for it (sources and title updates stay plain).
    #[arg(long)]
    pub tls: bool,
    /// With `--tls`: this many connections to the TLS port that never finish their handshake
    /// (half send a partial ClientHello, half nothing), held from the listeners' ramp to the
    /// end and opened again as the server closes them ([`crate::flood`]).
    #[arg(long, default_value_t = 0)]
    pub tls_flood: usize,
    /// A two-tier tree (fanstream only): this many more fanstream servers, the edges, each
    /// relay every mount from the server the sources push to, the origin, and the listeners
    /// are split evenly over the edges; CPU and memory are reported per tier. 0: no tree.
    #[arg(long, default_value_t = 0)]
    pub edges: usize,
    #[arg(long, default_value = "target/release/fanstream")]
    pub fanstream_bin: PathBuf,
    #[arg(long, default_value = "icecast2")]
    pub icecast_bin: String,
    #[arg(long, default_value = "target/load")]
    pub out_dir: PathBuf,
    /// Name of this run's files under out_dir (default: target-clients-bitrate).
    #[arg(long)]
    pub name: Option<String>,
}

/// The command line of `run`, `coalesce` and `icy-compare`: a run's settings at one mount count.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Mounts, one source each; the listeners are spread evenly over them.
    #[arg(long, default_value_t = 1, value_parser = mount_count())]
    pub mounts: usize,
    #[command(flatten)]
    pub run: RunOpts,
}

impl RunArgs {
    pub fn opts(&self) -> RunOpts {
        RunOpts {
            mounts: self.mounts,
            ..self.run.clone()
        }
    }
}

/// Parses a count of mounts: a run needs at least one source to listen to.
pub fn mount_count() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// What a run at `mounts` mounts adds to the name of its files: nothing at one mount, so that
/// runs on one mount keep the names they had before mount counts were swept.
pub fn mounts_suffix(mounts: usize) -> String {
    if mounts == 1 {
        String::new()
    } else {
        format!("-{mounts}m")
    }
}

impl RunOpts {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            format!(
                "{}-{}c-{}k",
                target_name(self.target),
                self.clients,
                self.bitrate_kbps
            )
        })
    }
}

pub fn target_name(t: Target) -> &'static str {
    match t {
        Target::Fanstream => "fanstream",
        Target::Icecast => "icecast",
    }
}

/// Everything a run measured; also written as JSON.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub name: String,
    pub target: String,
    pub clients: usize,
    pub bitrate_kbps: u64,
    pub piece_bytes: u64,
    pub interval_ms: u64,
    /// Bytes per write syscall of the source (`piece_bytes` unless `--piece-bytes` said less).
    pub source_write_bytes: u64,
    pub window_secs: f64,
    pub workers: usize,
    pub mounts: usize,
    pub min_write_bytes: Option<usize>,
    pub max_write_delay_ms: Option<u64>,
    pub server_settings: Vec<String>,
    pub load_processes: usize,
    pub machine: String,
    /// When the run started (UTC).
    pub started_utc: String,
    pub loadavg_before: String,
    pub streaming_at_end: usize,
    pub failed: BTreeMap<String, usize>,
    pub disconnects: usize,
    /// Why the server let listeners go before the end, by its own count (fanstream only).
    pub server_disconnect_reasons: BTreeMap<String, f64>,
    /// Connections the server closed or left unanswered, by its reason
    /// (`fanstream_rejected_requests_total`; `workers_full` counts each time it reached its
    /// connection limit and stopped accepting).
    pub server_unanswered: BTreeMap<String, f64>,
    pub delivered_ratio: f64,
    pub delivered_bytes: u64,
    pub owed_bytes: u64,
    pub listeners_short: usize,
    pub integrity: Errors,
    pub listeners_with_errors: usize,
    pub ttfb_p50_ms: f64,
    pub ttfb_p99_ms: f64,
    pub ttfb_max_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub server_cpu_pct: f64,
    /// From fanstream's own `fanstream_thread_cpu_seconds_total`.
    pub server_cpu_pct_metrics: Option<f64>,
    pub cpu_us_per_listener_sec: f64,
    /// fanstream's worker threads alone (`fanstream_thread_cpu_seconds_total{thread=~"fs-worker-.*"}`),
    /// in % of a core and per listener-second: what serves the listeners, without ingest.
    pub workers_cpu_pct: Option<f64>,
    pub workers_cpu_us_per_listener_sec: Option<f64>,
    /// fanstream's ingest thread alone, in % of a core: what the sources cost.
    pub ingest_cpu_pct: Option<f64>,
    pub server_rss_bytes: u64,
    pub server_rss_before_listeners_bytes: u64,
    pub rss_per_listener_bytes: f64,
    pub write_syscalls_per_listener_sec: Option<f64>,
    pub bytes_per_write: Option<f64>,
    /// Times fanstream's fan-out loops were woken by a publication, per second over all
    /// workers (`fanstream_worker_wakeups_total`): a wake-up's cost is shared by the writes it
    /// makes, so writes per wake-up says how well they are batched.
    pub wakeups_per_sec: Option<f64>,
    pub load_cpu_pct: Vec<f64>,
    /// All cores busy, by anyone, in % of one core.
    pub machine_busy_pct: f64,
    pub cores: usize,
    pub source_max_late_ms: f64,
    pub sources: Vec<SourceReport>,
    /// The share of listeners asked to take ICY metadata.
    pub icy_share: f64,
    /// The `icy_metaint` set on the server (None: its default).
    pub icy_metaint: Option<usize>,
    pub title_every_secs: Option<f64>,
    /// Title updates answered 200, and refused or unanswered.
    pub title_updates: TitleReport,
    /// The stalled handshakes held beside the listeners (`--tls-flood`).
    pub tls_flood: Option<FloodReport>,
    /// The ICY listeners alone (also counted in every figure above).
    pub icy: IcyReport,
    /// Blocks per streaming ICY listener, and titles per streaming ICY listener.
    pub icy_blocks_per_listener: f64,
    pub icy_titles_per_listener: f64,
    /// ICY listeners by the server's count (`fanstream_icy_listeners`) at the window's end.
    pub server_icy_listeners: Option<f64>,
    /// Source bytes fanstream's format layer found no frame in
    /// (`fanstream_source_unsynced_bytes_total`), by the run's end: what each source sent
    /// before its framer locked on the stream (its first pieces), and nothing more after.
    pub server_unsynced_bytes: Option<f64>,
    /// Delivered >= 99.9% to every listener asked for, with no integrity error.
    pub ok: bool,
    /// What limited the run, as far as can be told.
    pub limit: String,
    /// A tree run (`--edges`): the origin, then each edge.
    pub tiers: Vec<Tier>,
}

/// One server of a tree run, over the window.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Tier {
    pub name: String,
    /// Who it serves: the edges' relays for the origin, listeners for an edge.
    pub listeners: usize,
    pub cpu_pct: f64,
    pub cpu_us_per_listener_sec: f64,
    pub rss_bytes: u64,
}

/// CPU counters at one instant.
#[derive(Clone, Default)]
struct Sample {
    at_us: u64,
    server: f64,
    /// `fanstream_thread_cpu_seconds_total` by thread (empty without a scrape).
    threads: BTreeMap<String, f64>,
    writes: Option<f64>,
    sent: Option<f64>,
    wakeups: Option<f64>,
    load: Vec<f64>,
    machine_busy: f64,
    server_rss: Option<u64>,
    /// fanstream's listener disconnects by reason, since it started.
    disconnects: BTreeMap<String, f64>,
    /// fanstream's connections closed or left unanswered by reason, since it started.
    unanswered: BTreeMap<String, f64>,
    icy_listeners: Option<f64>,
    unsynced: Option<f64>,
    /// Each edge's CPU seconds and RSS (a tree run).
    edges: Vec<(f64, Option<u64>)>,
}

fn sample(server: &ServerProc, edges: &[ServerProc], loads: &[Child]) -> Sample {
    let metrics = server.metrics();
    let m = |name| metrics.as_deref().map(|t| metric_sum(t, name));
    Sample {
        at_us: unix_us(),
        server: procstat::cpu_secs(server.pid()).unwrap_or(0.0),
        threads: metrics.as_deref().map_or_else(BTreeMap::new, |t| {
            metric_by_label(t, "fanstream_thread_cpu_seconds_total", "thread")
        }),
        writes: m("fanstream_write_syscalls_total"),
        sent: m("fanstream_sent_bytes_total"),
        wakeups: m("fanstream_worker_wakeups_total"),
        load: loads
            .iter()
            .map(|c| procstat::cpu_secs(c.id()).unwrap_or(0.0))
            .collect(),
        machine_busy: procstat::machine_cpu().map_or(0.0, |(b, _)| b),
        server_rss: procstat::rss_bytes(server.pid()),
        disconnects: metrics.as_deref().map_or_else(BTreeMap::new, |t| {
            metric_by_label(t, "fanstream_listener_disconnects_total", "reason")
        }),
        unanswered: metrics.as_deref().map_or_else(BTreeMap::new, |t| {
            metric_by_label(t, "fanstream_rejected_requests_total", "reason")
        }),
        icy_listeners: m("fanstream_icy_listeners"),
        unsynced: m("fanstream_source_unsynced_bytes_total"),
        edges: edges
            .iter()
            .map(|e| {
                (
                    procstat::cpu_secs(e.pid()).unwrap_or(0.0),
                    procstat::rss_bytes(e.pid()),
                )
            })
            .collect(),
    }
}

/// Listen processes, killed on drop whatever happens.
struct Loads(Vec<Child>);

impl Drop for Loads {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("{} cores, {model}, {mem_gib:.0} GiB", cores())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Now, in UTC, as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = unix_us() / 1_000_000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `o` with the mounts' settings the tool itself acts on (`min_write_bytes`,
/// `max_write_delay_ms`, `icy_metaint`) taken from `--server-setting defaults.KEY=VALUE` when
/// given there: the listeners strip ICY blocks at the server's interval, and the report states
/// the coalescing the server ran with. A flag and a setting for the same key are refused.
fn with_settings_folded(o: &RunOpts) -> Result<RunOpts, String> {
    fn fold<T: std::str::FromStr>(
        field: &mut Option<T>,
        flag: &str,
        key: &str,
        settings: &[String],
    ) -> Result<(), String> {
        let Some(value) = servers::defaults_setting(settings, key) else {
            return Ok(());
        };
        if field.is_some() {
            return Err(format!(
                "{flag} and --server-setting defaults.{key}: give one of them"
            ));
        }
        *field =
            Some(value.parse().map_err(|_| {
                format!("--server-setting defaults.{key}={value}: not a whole number")
            })?);
        Ok(())
    }
    let settings = &o.server_settings;
    let mut folded = o.clone();
    fold(
        &mut folded.min_write_bytes,
        "--min-write-bytes",
        "min_write_bytes",
        settings,
    )?;
    fold(
        &mut folded.max_write_delay_ms,
        "--max-write-delay-ms",
        "max_write_delay_ms",
        settings,
    )?;
    fold(
        &mut folded.icy_metaint,
        "--icy-metaint",
        "icy_metaint",
        settings,
    )?;
    Ok(folded)
}

pub fn run(o: &RunOpts) -> Result<Summary, String> {
    let o = &with_settings_folded(o)?;
    if !(0.0..=1.0).contains(&o.icy_share) {
        return Err(format!("--icy-share {}: 0 to 1", o.icy_share));
    }
    if o.title_every_secs
        .is_some_and(|s| !s.is_finite() || s <= 0.0)
    {
        return Err("--title-every-secs: more than 0".into());
    }
    if o.edges > 0 && (o.target != Target::Fanstream || o.tls || o.icy_share > 0.0) {
        return Err("--edges: fanstream only, plain listeners without ICY".into());
    }
    let name = o.name();
    let started_utc = utc_now();
    let dir = o.out_dir.join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut server_settings = o.server_settings.clone();
    let tls = if o.tls {
        if o.target != Target::Fanstream {
            return Err("--tls: fanstream only".into());
        }
        let tls = servers::tls_setup(&dir)?;
        server_settings.extend(tls.settings.iter().cloned());
        Some(tls)
    } else {
        None
    };
    if o.tls_flood > 0 && tls.is_none() {
        return Err("--tls-flood: with --tls only".into());
    }
    let loadavg_before = loadavg();
    eprintln!(
        "== {name}: {} listeners at {} kbit/s on {} mount(s), {} s window (load average {loadavg_before})",
        o.clients, o.bitrate_kbps, o.mounts, o.seconds
    );
    let server = servers::start(
        &ServerOpts {
            target: o.target,
            workers: o.workers,
            max_clients: o.clients,
            mounts: o.mounts,
            min_write_bytes: o.min_write_bytes,
            max_write_delay_ms: o.max_write_delay_ms,
            icy_metaint: o.icy_metaint,
            settings: server_settings.clone(),
            relay_from: None,
            fanstream_bin: o.fanstream_bin.clone(),
            icecast_bin: o.icecast_bin.clone(),
        },
        &dir,
    )?;
    let mounts: Vec<String> = (0..o.mounts).map(|m| format!("/load{m}")).collect();
    let mut streams = Vec::new();
    for mount in &mounts {
        let so = SourceOpts {
            addr: server.addr,
            mount: mount.clone(),
            user: "source".into(),
            password: PASSWORD.into(),
            piece_bytes: o.piece_bytes,
        };
        // Which source of how many: the count a server stops taking sources at is a result.
        let stream = source::connect(&so)
            .map_err(|e| format!("source {} of {}: {e}", streams.len() + 1, mounts.len()))?;
        streams.push((so, stream));
    }
    let schedule = Schedule::new(unix_us() + 200_000, o.bitrate_kbps, o.interval_ms);
    let sources = source::start(streams, schedule);
    let titles = o.title_every_secs.map(|every| {
        // Icecast takes title updates with the admin credentials.
        let user = match o.target {
            Target::Fanstream => "source",
            Target::Icecast => "admin",
        };
        titles::start(
            server.addr,
            mounts.clone(),
            user,
            PASSWORD,
            Duration::from_secs_f64(every),
        )
    });
    let mut edges = Vec::new();
    for i in 0..o.edges {
        let edge_dir = dir.join(format!("edge{i}"));
        std::fs::create_dir_all(&edge_dir).map_err(|e| format!("{}: {e}", edge_dir.display()))?;
        let edge = servers::start(
            &ServerOpts {
                target: Target::Fanstream,
                workers: o.workers,
                max_clients: o.clients.div_ceil(o.edges),
                mounts: o.mounts,
                min_write_bytes: o.min_write_bytes,
                max_write_delay_ms: o.max_write_delay_ms,
                icy_metaint: None,
                settings: server_settings.clone(),
                relay_from: Some(server.addr),
                fanstream_bin: o.fanstream_bin.clone(),
                icecast_bin: o.icecast_bin.clone(),
            },
            &edge_dir,
        )?;
        wait_relays(&edge, o.mounts, &edge_dir)?;
        edges.push(edge);
    }
    let rss_before = wait_rss(&server);

    let per_process = o.per_process.clamp(1, MAX_PER_PROCESS);
    // In a tree, each edge gets its share of the listen processes.
    let nproc = o
        .clients
        .div_ceil(per_process)
        .max(1)
        .next_multiple_of(o.edges.max(1));
    // The edges took a while to connect their relays.
    let start_us = (schedule.t0_us + 1_000_000).max(unix_us() + 500_000);
    let ramp_secs = o.clients as f64 / o.ramp_per_sec;
    let measure_from_us = start_us + ((ramp_secs + SETTLE_SECS) * 1e6) as u64;
    let end_us = measure_from_us + o.seconds * 1_000_000;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<(usize, Line)>();
    let mut loads = Loads(Vec::new());
    let mut first = 0;
    for p in 0..nproc {
        let n = (o.clients - first).min(o.clients.div_ceil(nproc));
        let mut cmd = Command::new(&me);
        let listen_addr = match (&tls, edges.is_empty()) {
            (Some(t), _) => t.addr,
            (None, true) => server.addr,
            (None, false) => edges[p % edges.len()].addr,
        };
        cmd.arg("listen")
            .args(["--addr", &listen_addr.to_string()])
            .args(["--mounts", &mounts.join(",")])
            .args(["--clients", &n.to_string()])
            .args(["--first-index", &first.to_string()])
            .args([
                "--ramp-per-sec",
                &(o.ramp_per_sec / nproc as f64).to_string(),
            ])
            .args(["--start-us", &start_us.to_string()])
            .args(["--end-us", &end_us.to_string()])
            .args(["--measure-from-us", &measure_from_us.to_string()])
            .args(["--t0-us", &schedule.t0_us.to_string()])
            .args(["--bitrate-kbps", &o.bitrate_kbps.to_string()])
            .args(["--interval-ms", &o.interval_ms.to_string()])
            .args(["--allowance-ms", &o.allowance_ms.to_string()])
            .args(["--icy-share", &o.icy_share.to_string()]);
        if let Some(m) = o.icy_metaint {
            cmd.args(["--icy-metaint", &m.to_string()]);
        }
        if let Some(t) = &tls {
            cmd.arg("--tls-ca").arg(&t.ca);
        }
        let mut child = servers::spawn_piped(&mut cmd)?;
        let out = child.stdout.take().expect("piped stdout");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(l) = serde_json::from_str::<Line>(&line) {
                    if tx.send((p, l)).is_err() {
                        break;
                    }
                }
            }
        });
        loads.0.push(child);
        first += n;
    }
    drop(tx);
    let flood = tls
        .as_ref()
        .filter(|_| o.tls_flood > 0)
        // From the ramp on: the listeners' own handshakes come during the flood.
        .map(|t| flood::start(t.addr, o.tls_flood, start_us, end_us));

    // Watch: progress each second, CPU samples at the window's edges.
    let mut progress = vec![Progress::default(); nproc];
    let mut reports: Vec<Option<ListenReport>> = vec![None; nproc];
    let mut begin: Option<Sample> = None;
    let mut finish: Option<Sample> = None;
    let mut next_print = unix_us() + 1_000_000;
    let give_up_us = end_us + 30_000_000;
    let mut server = server;
    while reports.iter().any(Option::is_none) && unix_us() < give_up_us {
        while let Ok((p, line)) = rx.try_recv() {
            match line {
                Line::Progress(pr) => progress[p] = pr,
                Line::Report(r) => reports[p] = Some(*r),
            }
        }
        let now = unix_us();
        if begin.is_none() && now >= measure_from_us {
            begin = Some(sample(&server, &edges, &loads.0));
        }
        // Just before the listeners close.
        if finish.is_none() && now + 300_000 >= end_us {
            finish = Some(sample(&server, &edges, &loads.0));
        }
        if now >= next_print && now < end_us {
            next_print += 1_000_000;
            print_progress(
                o,
                &progress,
                &server,
                now,
                start_us,
                measure_from_us,
                end_us,
            );
        }
        if !server.alive() || !edges.iter_mut().all(|e| e.alive()) {
            return Err(format!("a server died; see {}", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let sources: Vec<SourceReport> = sources.stop();
    let title_updates = titles.map(|t| t.stop()).unwrap_or_default();
    let tls_flood = flood.map(|f| f.stop());
    drop(loads);
    drop(edges);
    drop(server);
    let (Some(begin), Some(finish)) = (begin, finish) else {
        return Err("the run ended before its window".into());
    };
    let reports: Vec<ListenReport> = reports.into_iter().flatten().collect();
    if reports.len() < nproc {
        return Err(format!(
            "only {} of {nproc} listen processes reported",
            reports.len()
        ));
    }
    let s = summarize(
        o,
        name,
        &schedule,
        &reports,
        &begin,
        &finish,
        rss_before,
        sources,
        loadavg_before,
    );
    let s = Summary {
        started_utc,
        title_updates,
        tls_flood,
        ..s
    };
    write_json(&o.out_dir.join(format!("{}.json", s.name)), &s)?;
    if !s.tiers.is_empty() {
        let path = o.out_dir.join(format!("{}.md", s.name));
        std::fs::write(&path, tree_table(&s)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(s)
}

/// Waits until an edge's relays stream every mount (`fanstream_relay_up`).
fn wait_relays(edge: &ServerProc, mounts: usize, dir: &std::path::Path) -> Result<(), String> {
    let deadline = unix_us() + 15_000_000;
    while unix_us() < deadline {
        let up = edge
            .metrics()
            .map_or(0.0, |t| metric_sum(&t, "fanstream_relay_up"));
        if up >= mounts as f64 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the edge's relays did not come up within 15 s; see {}",
        dir.display()
    ))
}

/// A tree run's result as a Markdown table, with its conditions.
fn tree_table(s: &Summary) -> String {
    let mut out = format!(
        "# {}: a two-tier tree, origin and {} edges\n\n\
         `fanstream-load run --edges {}`: {} listeners at {} kbit/s on {} mount(s), split evenly over \
         the edges, each edge relaying every mount from the origin; {:.1} s window, started {}.\n\
         Machine: {} (shared; load average before: {}); the load tool and the three servers on it.\n\n\
         | server | serves | CPU (% of a core) | CPU µs per listener-second | RSS (MiB) |\n\
         |---|---|---|---|---|\n",
        s.name,
        s.tiers.len() - 1,
        s.tiers.len() - 1,
        s.clients,
        s.bitrate_kbps,
        s.mounts,
        s.window_secs,
        s.started_utc,
        s.machine,
        s.loadavg_before,
    );
    for t in &s.tiers {
        out += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |\n",
            t.name,
            t.listeners,
            t.cpu_pct,
            t.cpu_us_per_listener_sec,
            t.rss_bytes as f64 / 1048576.0
        );
    }
    out += &format!(
        "\nThe origin serves the edges' relays (one listener per edge and mount) and takes the sources; \
         its figure per listener-second is per relay. Delivered {:.5} of the bytes owed, {} integrity \
         errors, {} of {} listeners streaming at the end; source-to-listener latency p50 {:.0} ms, \
         p99 {:.0} ms (two coalescing delays). Result: {}; limited by: {}.\n",
        s.delivered_ratio,
        s.integrity.total(),
        s.streaming_at_end,
        s.clients,
        s.latency_p50_ms,
        s.latency_p99_ms,
        if s.ok { "OK" } else { "SHORT" },
        s.limit
    );
    out
}

/// RSS once the sources are up and before any listener: the base the per-listener figure
/// is taken from.
fn wait_rss(server: &ServerProc) -> u64 {
    std::thread::sleep(Duration::from_millis(500));
    procstat::rss_bytes(server.pid()).unwrap_or(0)
}

pub fn write_json<T: serde::Serialize>(path: &std::path::Path, v: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

fn print_progress(
    o: &RunOpts,
    progress: &[Progress],
    server: &ServerProc,
    now: u64,
    start_us: u64,
    measure_from_us: u64,
    end_us: u64,
) {
    let sum = |f: fn(&Progress) -> u64| progress.iter().map(f).sum::<u64>();
    let phase = if now < measure_from_us {
        "ramp"
    } else {
        "run "
    };
    let left = end_us.saturating_sub(now) / 1_000_000;
    eprintln!(
        "  [{phase} {:>4.0}s, {left:>3}s left] streaming {:>6}/{} failed {} closed {} errors {} | received {:.1} MiB | server rss {:.1} MiB",
        now.saturating_sub(start_us) as f64 / 1e6,
        sum(|p| p.streaming as u64),
        o.clients,
        sum(|p| p.failed as u64),
        sum(|p| p.closed as u64),
        sum(|p| p.errors),
        sum(|p| p.bytes) as f64 / 1048576.0,
        procstat::rss_bytes(server.pid()).unwrap_or(0) as f64 / 1048576.0,
    );
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn histogram_percentile(h: &BTreeMap<u64, u64>, p: f64) -> u64 {
    let total: u64 = h.values().sum();
    let want = (total as f64 * p).ceil() as u64;
    let mut seen = 0;
    for (v, n) in h {
        seen += n;
        if seen >= want {
            return *v;
        }
    }
    0
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    o: &RunOpts,
    name: String,
    schedule: &Schedule,
    reports: &[ListenReport],
    begin: &Sample,
    finish: &Sample,
    rss_before: u64,
    sources: Vec<SourceReport>,
    loadavg_before: String,
) -> Summary {
    let mut s = Summary {
        name,
        target: target_name(o.target).into(),
        clients: o.clients,
        bitrate_kbps: o.bitrate_kbps,
        piece_bytes: schedule.piece_bytes,
        interval_ms: o.interval_ms,
        source_write_bytes: o.piece_bytes.map_or(schedule.piece_bytes, |b| {
            (b.max(1) as u64).min(schedule.piece_bytes)
        }),
        workers: o.workers,
        mounts: o.mounts,
        min_write_bytes: o.min_write_bytes,
        max_write_delay_ms: o.max_write_delay_ms,
        server_settings: o.server_settings.clone(),
        load_processes: reports.len(),
        machine: machine(),
        loadavg_before,
        cores: cores(),
        ..Summary::default()
    };
    let mut ttfb = Vec::new();
    let mut latency = BTreeMap::new();
    for r in reports {
        s.streaming_at_end += r.streaming_at_end;
        for (k, v) in &r.failed {
            *s.failed.entry(k.clone()).or_default() += v;
        }
        s.disconnects += r.closed_early;
        s.delivered_bytes += r.delivered_bytes;
        s.owed_bytes += r.owed_bytes;
        s.listeners_short += r.listeners_short;
        s.integrity.add(&r.errors);
        s.listeners_with_errors += r.listeners_with_errors;
        ttfb.extend_from_slice(&r.ttfb_us);
        s.icy.add(&r.icy);
        for (k, v) in &r.latency_ms {
            *latency.entry(*k).or_insert(0) += v;
        }
    }
    ttfb.sort_unstable();
    s.ttfb_p50_ms = percentile(&ttfb, 0.5) as f64 / 1e3;
    s.ttfb_p99_ms = percentile(&ttfb, 0.99) as f64 / 1e3;
    s.ttfb_max_ms = ttfb.last().copied().unwrap_or(0) as f64 / 1e3;
    s.latency_p50_ms = histogram_percentile(&latency, 0.5) as f64;
    s.latency_p99_ms = histogram_percentile(&latency, 0.99) as f64;
    s.delivered_ratio = if s.owed_bytes > 0 {
        s.delivered_bytes as f64 / s.owed_bytes as f64
    } else {
        0.0
    };
    let secs = (finish.at_us - begin.at_us) as f64 / 1e6;
    s.window_secs = secs;
    let pct = |a: f64, b: f64| (b - a) / secs * 100.0;
    s.server_cpu_pct = pct(begin.server, finish.server);
    let listener_secs = s.streaming_at_end.max(1) as f64 * secs;
    s.cpu_us_per_listener_sec = (finish.server - begin.server) * 1e6 / listener_secs;
    // The CPU seconds of fanstream's threads that `role` takes, over the window; None where
    // the server has no such thread (Icecast) or a scrape of `/metrics` failed.
    let threads = |role: fn(&str) -> bool| {
        let sum = |m: &BTreeMap<String, f64>| {
            let mut ours = m.iter().filter(|(t, _)| role(t)).peekable();
            ours.peek()?;
            Some(ours.map(|(_, v)| v).sum::<f64>())
        };
        Some(sum(&finish.threads)? - sum(&begin.threads)?)
    };
    s.server_cpu_pct_metrics = threads(|_| true).map(|c| c / secs * 100.0);
    let workers = threads(|t| t.starts_with("fs-worker-"));
    s.workers_cpu_pct = workers.map(|c| c / secs * 100.0);
    s.workers_cpu_us_per_listener_sec = workers.map(|c| c * 1e6 / listener_secs);
    s.ingest_cpu_pct = threads(|t| t == "fs-ingest").map(|c| c / secs * 100.0);
    if !begin.edges.is_empty() {
        let n = begin.edges.len();
        let tier = |name: String, listeners: usize, cpu: f64, rss: Option<u64>| Tier {
            name,
            listeners,
            cpu_pct: cpu / secs * 100.0,
            cpu_us_per_listener_sec: cpu * 1e6 / (listeners.max(1) as f64 * secs),
            rss_bytes: rss.unwrap_or(0),
        };
        s.tiers.push(tier(
            "origin".into(),
            n * o.mounts,
            finish.server - begin.server,
            finish.server_rss,
        ));
        for (i, (b, f)) in begin.edges.iter().zip(&finish.edges).enumerate() {
            // Listen process p listened on edge p % n.
            let listeners = reports
                .iter()
                .enumerate()
                .filter(|(p, _)| p % n == i)
                .map(|(_, r)| r.streaming_at_end)
                .sum();
            s.tiers
                .push(tier(format!("edge {}", i + 1), listeners, f.0 - b.0, f.1));
        }
    }
    s.server_disconnect_reasons = finish.disconnects.clone();
    s.server_unanswered = finish.unanswered.clone();
    s.server_unanswered.retain(|_, n| *n > 0.0);
    s.icy_share = o.icy_share;
    s.icy_metaint = o.icy_metaint;
    s.title_every_secs = o.title_every_secs;
    let icy_streaming = s.icy.streaming_at_end.max(1) as f64;
    s.icy_blocks_per_listener = s.icy.counts.blocks as f64 / icy_streaming;
    s.icy_titles_per_listener = s.icy.counts.titles as f64 / icy_streaming;
    s.server_icy_listeners = finish.icy_listeners;
    s.server_unsynced_bytes = finish.unsynced;
    s.server_rss_bytes = finish.server_rss.unwrap_or(0);
    s.server_rss_before_listeners_bytes = rss_before;
    s.rss_per_listener_bytes =
        s.server_rss_bytes.saturating_sub(rss_before) as f64 / s.streaming_at_end.max(1) as f64;
    if let (Some(w0), Some(w1)) = (begin.writes, finish.writes) {
        s.write_syscalls_per_listener_sec = Some((w1 - w0) / listener_secs);
        if let (Some(b0), Some(b1)) = (begin.sent, finish.sent) {
            s.bytes_per_write = Some((b1 - b0) / (w1 - w0).max(1.0));
        }
    }
    if let (Some(w0), Some(w1)) = (begin.wakeups, finish.wakeups) {
        s.wakeups_per_sec = Some((w1 - w0) / secs);
    }
    s.load_cpu_pct = begin
        .load
        .iter()
        .zip(&finish.load)
        .map(|(a, b)| pct(*a, *b))
        .collect();
    s.machine_busy_pct = pct(begin.machine_busy, finish.machine_busy);
    s.source_max_late_ms = sources.iter().map(|r| r.max_late_ms).fold(0.0, f64::max);
    s.sources = sources;
    let asked = o.clients;
    s.ok = s.delivered_ratio >= 0.999
        && s.integrity.total() == 0
        && s.streaming_at_end == asked
        && s.sources.iter().all(|r| r.error.is_none());
    s.limit = verdict(&s);
    s
}

/// Says what limited the run: the machine (the load tool, or other work on the machine) or the
/// server.
fn verdict(s: &Summary) -> String {
    let busiest_load = s.load_cpu_pct.iter().cloned().fold(0.0, f64::max);
    let machine_pct = s.cores as f64 * 100.0;
    let others = s.machine_busy_pct - s.server_cpu_pct - s.load_cpu_pct.iter().sum::<f64>();
    let mut notes = Vec::new();
    // A server that lets sources go (one at its limits) is what limited the run, before any load.
    let stopped: Vec<&SourceReport> = s.sources.iter().filter(|r| r.error.is_some()).collect();
    if let Some(first) = stopped.first() {
        notes.push(format!(
            "server: {} of {} sources stopped (first: {})",
            stopped.len(),
            s.sources.len(),
            first.error.as_deref().unwrap_or_default()
        ));
    }
    // Listeners that never got an answer: the server says why, where the tool saw only a
    // timeout (at its connection limit, newcomers wait in the kernel's backlog).
    if s.server_unanswered.contains_key("workers_full") {
        notes.push(
            "server: it reached its connection limit and stopped accepting (its log gives the limit)"
                .into(),
        );
    }
    let closed: Vec<String> = s
        .server_unanswered
        .iter()
        .filter(|(why, _)| *why != "workers_full")
        .map(|(why, n)| format!("{why} {n:.0}"))
        .collect();
    if !closed.is_empty() {
        notes.push(format!(
            "server: connections closed unanswered ({})",
            closed.join(", ")
        ));
    }
    if busiest_load >= SATURATED_CORE_PCT {
        notes.push(format!(
            "machine: a load process used {busiest_load:.0}% of a core"
        ));
    }
    // Averaged over the window, which includes quieter moments: 90% busy on average leaves no
    // headroom at the peaks (a ramp, a burst of writes).
    if s.machine_busy_pct >= machine_pct * 0.9 {
        notes.push(format!(
            "machine: {:.0}% busy of {machine_pct:.0}% ({:.0}% server, {:.0}% load tool, {:.0}% other processes)",
            s.machine_busy_pct,
            s.server_cpu_pct,
            s.load_cpu_pct.iter().sum::<f64>(),
            others.max(0.0)
        ));
    }
    if s.source_max_late_ms >= SOURCE_LATE_MS {
        notes.push(format!(
            "machine: the source ran up to {:.0} ms late",
            s.source_max_late_ms
        ));
    }
    match (s.ok, notes.is_empty()) {
        (true, true) => "none: every listener was served in full".into(),
        (true, false) => format!("served in full, but near the limit: {}", notes.join("; ")),
        (false, true) => "server: the machine had spare CPU".into(),
        (false, false) => notes.join("; "),
    }
}

pub fn print_summary(s: &Summary) {
    let mib = |b: u64| b as f64 / 1048576.0;
    let opt = |v: Option<f64>, unit: &str| v.map_or("n/a".into(), |v| format!("{v:.1}{unit}"));
    println!("---- {} ----", s.name);
    println!(
        "machine            {} (load average before: {})",
        s.machine, s.loadavg_before
    );
    println!(
        "load               {} listeners, {} kbit/s ({} B every {} ms, in writes of {} B), {} mount(s), {} worker(s) (0: one per core), {:.1} s window, {} load process(es)",
        s.clients, s.bitrate_kbps, s.piece_bytes, s.interval_ms, s.source_write_bytes, s.mounts, s.workers, s.window_secs, s.load_processes
    );
    println!(
        "listeners          {} streaming at the end, {} disconnected early (server's reasons: {:?}), failed: {:?}",
        s.streaming_at_end, s.disconnects, s.server_disconnect_reasons, s.failed
    );
    println!(
        "delivered          {:.5} of the bytes owed ({} listeners under 99.9%)",
        s.delivered_ratio, s.listeners_short
    );
    println!(
        "integrity errors   {} (gaps {}, duplicates {}, corrupt {}) on {} listeners",
        s.integrity.total(),
        s.integrity.gaps,
        s.integrity.duplicates,
        s.integrity.corrupt,
        s.listeners_with_errors
    );
    println!(
        "time to first byte p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms; source-to-listener latency p50 {:.0} ms, p99 {:.0} ms",
        s.ttfb_p50_ms, s.ttfb_p99_ms, s.ttfb_max_ms, s.latency_p50_ms, s.latency_p99_ms
    );
    println!(
        "server CPU         {:.1}% of a core (/proc), {} (/metrics threads); {:.1} µs per listener-second",
        s.server_cpu_pct,
        opt(s.server_cpu_pct_metrics, "%"),
        s.cpu_us_per_listener_sec
    );
    if let (Some(w), Some(us), Some(i)) = (
        s.workers_cpu_pct,
        s.workers_cpu_us_per_listener_sec,
        s.ingest_cpu_pct,
    ) {
        println!(
            "server threads     workers {w:.1}% of a core ({us:.1} µs per listener-second), ingest {i:.1}%"
        );
    }
    println!(
        "server writes      {} per listener-second, {} bytes per write; {} fan-out wake-ups a second",
        opt(s.write_syscalls_per_listener_sec, ""),
        opt(s.bytes_per_write, ""),
        opt(s.wakeups_per_sec, "")
    );
    println!(
        "server RSS         {:.1} MiB ({:.1} MiB before listeners): {:.0} bytes per listener",
        mib(s.server_rss_bytes),
        mib(s.server_rss_before_listeners_bytes),
        s.rss_per_listener_bytes
    );
    if let Some(f) = &s.tls_flood {
        println!(
            "TLS flood          {} stalled handshakes held: {} opened, {} closed by the server after {:.1} s (p50; {:.1} to {:.1} s), {} answered, {} could not connect",
            f.connections,
            f.opened,
            f.closed_by_server,
            f.closed_after_p50_secs,
            f.closed_after_min_secs,
            f.closed_after_max_secs,
            f.answered,
            f.connect_failed
        );
    }
    let loads: Vec<String> = s.load_cpu_pct.iter().map(|p| format!("{p:.0}%")).collect();
    println!(
        "load tool CPU      {} of a core each; machine busy {:.0}% of {}00%; source at most {:.1} ms late",
        loads.join(" "),
        s.machine_busy_pct,
        s.cores,
        s.source_max_late_ms
    );
    if s.icy.clients > 0 || s.title_every_secs.is_some() {
        println!(
            "ICY                {} of {} listeners (share {}), icy_metaint {}: {} streaming at the end; {} blocks ({:.1} each), {} with a title ({:.1} each), {} framing errors, {} integrity errors, {} streaming without a block; title updates every {}: {} sent, {} failed",
            s.icy.clients,
            s.clients,
            s.icy_share,
            s.icy_metaint.map_or("default".into(), |m| m.to_string()),
            s.icy.streaming_at_end,
            s.icy.counts.blocks,
            s.icy_blocks_per_listener,
            s.icy.counts.titles,
            s.icy_titles_per_listener,
            s.icy.counts.framing_errors,
            s.icy.errors.total(),
            s.icy.listeners_without_blocks,
            s.title_every_secs.map_or("(never)".into(), |t| format!("{t} s")),
            s.title_updates.sent,
            s.title_updates.failed,
        );
    }
    for t in &s.tiers {
        println!(
            "tier {:<13} serves {:>6}: CPU {:.1}% of a core, {:.1} µs per listener-second, RSS {:.1} MiB",
            t.name,
            t.listeners,
            t.cpu_pct,
            t.cpu_us_per_listener_sec,
            mib(t.rss_bytes)
        );
    }
    println!("result             {}", if s.ok { "OK" } else { "SHORT" });
    println!("limited by         {}", s.limit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: RunOpts,
    }

    fn opts(args: &[&str]) -> RunOpts {
        Cli::parse_from(std::iter::once("run").chain(args.iter().copied())).o
    }

    // The listeners strip ICY blocks at the interval the server was given, whichever way it was
    // given, and the report says the delay the server ran with.
    #[test]
    fn a_mount_setting_the_tool_acts_on_is_taken_from_the_server_settings() {
        let o = with_settings_folded(&opts(&[
            "--server-setting",
            "defaults.icy_metaint = 8192",
            "--server-setting",
            "defaults.max_write_delay_ms=200",
            "--min-write-bytes",
            "4096",
        ]))
        .unwrap();
        assert_eq!(o.icy_metaint, Some(8192));
        assert_eq!(o.max_write_delay_ms, Some(200));
        assert_eq!(o.min_write_bytes, Some(4096));

        let plain = with_settings_folded(&opts(&[])).unwrap();
        assert_eq!(
            (
                plain.icy_metaint,
                plain.max_write_delay_ms,
                plain.min_write_bytes
            ),
            (None, None, None)
        );
    }

    // At 1,000 sources and 19,000 listeners the server's connection limit (its descriptors less
    // the sources') left 265 listeners in the backlog; the tool saw only their timeouts.
    #[test]
    fn the_verdict_names_what_the_server_left_unanswered() {
        let mut s = Summary {
            cores: 2,
            ..Summary::default()
        };
        assert_eq!(verdict(&s), "server: the machine had spare CPU");
        s.server_unanswered.insert("workers_full".into(), 1.0);
        s.server_unanswered.insert("header_timeout".into(), 12.0);
        assert_eq!(
            verdict(&s),
            "server: it reached its connection limit and stopped accepting (its log gives the \
             limit); server: connections closed unanswered (header_timeout 12)"
        );
    }

    #[test]
    fn a_flag_and_a_setting_for_one_key_are_refused() {
        let both = with_settings_folded(&opts(&[
            "--max-write-delay-ms",
            "100",
            "--server-setting",
            "defaults.max_write_delay_ms=200",
        ]));
        assert_eq!(
            both.err().as_deref(),
            Some("--max-write-delay-ms and --server-setting defaults.max_write_delay_ms: give one of them")
        );
        let bad = with_settings_folded(&opts(&["--server-setting", "defaults.icy_metaint=lots"]));
        assert_eq!(
            bad.err().as_deref(),
            Some("--server-setting defaults.icy_metaint=lots: not a whole number")
        );
    }
}
