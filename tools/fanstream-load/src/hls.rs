//! HLS load (`hls`): fanstream with one HLS mount fed by a source of this tool's own MP3
//! frames, and thousands of HLS clients on one current-thread runtime, each polling the
//! playlist as a player does (once per target duration, half that when it brought nothing
//! new) on a kept-alive connection and fetching every new segment once.
//!
//! Every segment is verified against what the source sent: each frame the source makes carries
//! its counter (and the counter scrambled with a key) and fixed bytes, so a client checks that a segment is an
//! ID3 tag with the `com.apple.streaming.transportStreamTimestamp` PRIV frame, then whole frames
//! whose counters run on without a gap from the previous segment's, and that its timestamp is
//! the previous one plus the previous segment's samples. A client that misses a segment (it
//! left the playlist before the client came back) counts a gap.
//!
//! `--via nginx` puts nginx (the config of the README's "HLS and CDNs") between the clients and
//! fanstream, and the run fails unless fanstream answered at most about one segment request per
//! segment (its `fanstream_hls_requests_total`), whatever the number of clients.
//! `--compare-direct` then runs as many direct listeners of the same mount for as long, and
//! gives fanstream's CPU in both phases and their ratio.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::procstat;
use crate::run::{machine, utc_now, write_json};
use crate::servers::{self, metric_by_label, ServerOpts, Target, PASSWORD};
use crate::source::{self, SourceOpts};

const MOUNT: &str = "/hls";
/// MPEG-1 layer III, 128 kbit/s, 44.1 kHz, joint stereo, no padding: 417 bytes, 1,152 samples.
const FRAME_HEADER: [u8; 4] = [0xFF, 0xFB, 0x90, 0x64];
const FRAME_BYTES: usize = 417;
const FRAME_SAMPLES: u64 = 1152;
const RATE: u64 = 44_100;
const KEY: u64 = 0x5DEE_CE66_D1CE_4E5B;
const TIMESTAMP_OWNER: &[u8] = b"com.apple.streaming.transportStreamTimestamp\0";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Clients poll fanstream itself.
    Direct,
    /// Clients go through nginx with `proxy_cache`.
    Nginx,
}

#[derive(clap::Args, Clone, Debug)]
pub struct HlsOpts {
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// How long the clients poll.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    #[arg(long, value_enum, default_value = "nginx")]
    pub via: Via,
    /// The mount's `hls_segment_secs` (fanstream's default).
    #[arg(long, default_value_t = 4)]
    pub segment_secs: u64,
    /// Then as many direct listeners for as long: fanstream's CPU in both phases, as a ratio.
    #[arg(long)]
    pub compare_direct: bool,
    /// fanstream worker threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    #[arg(long, default_value = "target/release/fanstream")]
    pub fanstream_bin: PathBuf,
    #[arg(long, default_value = "target/load")]
    pub out_dir: PathBuf,
}

/// What one HLS client saw.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ClientCounts {
    pub playlists: u64,
    pub segments: u64,
    pub segment_bytes: u64,
    /// Frames whose counter jumped, and segments missed between two polls.
    pub gaps: u64,
    /// Frames or tags not as the source made them.
    pub corrupt: u64,
    /// Segments whose timestamp does not follow on from the previous one's.
    pub timestamp_breaks: u64,
    pub http_errors: u64,
}

impl ClientCounts {
    fn add(&mut self, o: &ClientCounts) {
        self.playlists += o.playlists;
        self.segments += o.segments;
        self.segment_bytes += o.segment_bytes;
        self.gaps += o.gaps;
        self.corrupt += o.corrupt;
        self.timestamp_breaks += o.timestamp_breaks;
        self.http_errors += o.http_errors;
    }

    fn errors(&self) -> u64 {
        self.gaps + self.corrupt + self.timestamp_breaks + self.http_errors
    }
}

#[derive(Debug, serde::Serialize)]
pub struct HlsSummary {
    pub started_utc: String,
    pub machine: String,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub clients: usize,
    pub seconds: u64,
    pub via: Via,
    pub segment_secs: u64,
    /// Segments fanstream published during the clients' run (media sequence numbers).
    pub segments_published: u64,
    pub totals: ClientCounts,
    /// Requests fanstream answered during the run, by kind (`playlist`, `segment`).
    pub origin_requests: BTreeMap<String, f64>,
    /// Origin segment requests over segments published.
    pub origin_requests_per_segment: f64,
    /// fanstream's CPU seconds over the measured part of the HLS phase (after the clients'
    /// start, spread over one target duration, and a second more).
    pub hls_cpu_secs: f64,
    pub measured_secs: f64,
    /// With `--compare-direct`: the same over as many direct listeners, and the ratio.
    pub direct_cpu_secs: Option<f64>,
    pub direct_bytes: Option<u64>,
    /// Direct listeners still streaming at the end (all of them, or the comparison is void).
    pub direct_streaming_at_end: Option<u64>,
    pub hls_over_direct_cpu: Option<f64>,
}

/// The bytes of every frame after its header, counter and check: fixed, so that a byte changed
/// anywhere is seen. Never 0xFF: no byte of the payload looks like the start of a frame.
const FILLER: [u8; FRAME_BYTES - 20] = filler();

const fn filler() -> [u8; FRAME_BYTES - 20] {
    let mut f = [0u8; FRAME_BYTES - 20];
    let mut i = 0;
    while i < f.len() {
        f[i] = ((i + 20) % 0x7F) as u8;
        i += 1;
    }
    f
}

/// Frame `n` of the source's stream.
fn frame(n: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&FRAME_HEADER);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&(n ^ KEY).to_le_bytes());
    out.extend_from_slice(&FILLER);
}

/// Sends frames at their real-time pace until `stop`.
fn mp3_source(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let o = SourceOpts {
        addr,
        mount: MOUNT.into(),
        user: "source".into(),
        password: PASSWORD.into(),
        piece_bytes: None,
    };
    let mut stream = source::connect(&o)?;
    Ok(std::thread::spawn(move || {
        let started = Instant::now();
        let mut sent = 0u64;
        let mut piece = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let due = (started.elapsed().as_secs_f64() * RATE as f64 / FRAME_SAMPLES as f64) as u64;
            piece.clear();
            while sent <= due {
                frame(sent, &mut piece);
                sent += 1;
            }
            if !piece.is_empty() && stream.write_all(&piece).is_err() {
                eprintln!("hls source: the server closed the connection");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }))
}

/// What a client follows from segment to segment.
#[derive(Default)]
struct Follow {
    last_seq: Option<u64>,
    next_frame: Option<u64>,
    next_ts: Option<u64>,
}

/// Checks a segment against what the source sent and the previous segment (when `contiguous`).
fn check_segment(data: &[u8], follow: &mut Follow, contiguous: bool, c: &mut ClientCounts) {
    if !contiguous {
        follow.next_frame = None;
        follow.next_ts = None;
    }
    if data.len() < 10 || &data[..3] != b"ID3" {
        c.corrupt += 1;
        return;
    }
    let size = data[6..10]
        .iter()
        .fold(0usize, |n, &b| (n << 7) | usize::from(b & 0x7F));
    let tag_end = 10 + size;
    let Some(tag) = data.get(..tag_end) else {
        c.corrupt += 1;
        return;
    };
    let ts = tag
        .windows(TIMESTAMP_OWNER.len())
        .position(|w| w == TIMESTAMP_OWNER)
        .and_then(|at| tag.get(at + TIMESTAMP_OWNER.len()..at + TIMESTAMP_OWNER.len() + 8))
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
    let Some(ts) = ts else {
        c.corrupt += 1;
        return;
    };
    if follow.next_ts.is_some_and(|t| t.abs_diff(ts) > 1) {
        c.timestamp_breaks += 1;
    }
    let frames = &data[tag_end..];
    if frames.is_empty() || !frames.len().is_multiple_of(FRAME_BYTES) {
        c.corrupt += 1;
        return;
    }
    for f in frames.chunks_exact(FRAME_BYTES) {
        let word = |at: usize| u64::from_le_bytes(f[at..at + 8].try_into().expect("8 bytes"));
        let n = word(4);
        if f[..4] != FRAME_HEADER || word(12) != n ^ KEY || f[20..] != FILLER {
            c.corrupt += 1;
            follow.next_frame = None;
            continue;
        }
        if follow.next_frame.is_some_and(|want| want != n) {
            c.gaps += 1;
        }
        follow.next_frame = Some(n + 1);
    }
    let count = (frames.len() / FRAME_BYTES) as u64;
    follow.next_ts = Some(ts + count * FRAME_SAMPLES * 90_000 / RATE);
}

/// One kept-alive HTTP/1.1 connection of a client.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// `GET path` on the client's connection (made anew when there is none): the body of a `200`.
async fn get(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    path: &str,
    agent: &str,
) -> Result<Vec<u8>, String> {
    if conn.is_none() {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        *conn = Some(Conn {
            stream,
            buf: Vec::new(),
        });
    }
    let c = conn.as_mut().expect("connected");
    let request = format!("GET {path} HTTP/1.1\r\nHost: load\r\nUser-Agent: {agent}\r\n\r\n");
    c.stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = c.stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        c.buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&c.buf[..head_end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).unwrap_or_default().to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no Content-Length")?;
    let close = head
        .lines()
        .any(|l| l.starts_with("connection:") && l.contains("close"));
    while c.buf.len() < head_end + length {
        let n = c.stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed in the body".into());
        }
        c.buf.extend_from_slice(&chunk[..n]);
    }
    let body = c.buf[head_end..head_end + length].to_vec();
    c.buf.drain(..head_end + length);
    if close {
        *conn = None;
    }
    if status != "200" {
        return Err(format!("{path}: {status}"));
    }
    Ok(body)
}

/// (media sequence, target duration, segment names) of a live playlist.
fn parse_playlist(text: &str) -> Option<(u64, u64, Vec<String>)> {
    let mut sequence = None;
    let mut target = None;
    let mut names = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("#EXT-X-MEDIA-SEQUENCE:") {
            sequence = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("#EXT-X-TARGETDURATION:") {
            target = v.trim().parse().ok();
        } else if !line.starts_with('#') && !line.is_empty() {
            names.push(line.to_string());
        }
    }
    Some((sequence?, target?, names))
}

/// One HLS client: polls and fetches until `end`.
async fn hls_client(
    addr: SocketAddr,
    i: usize,
    start: Instant,
    end: Instant,
    counts: Arc<Mutex<ClientCounts>>,
) {
    tokio::time::sleep_until(start.into()).await;
    let agent = format!("fanstream-load-hls/{i}");
    let playlist_path = format!("{MOUNT}/index.m3u8");
    let mut conn = None;
    let mut follow = Follow::default();
    while Instant::now() < end {
        let mut c = ClientCounts::default();
        let mut pause = Duration::from_millis(500);
        match tokio::time::timeout(
            REQUEST_TIMEOUT,
            get(&mut conn, addr, &playlist_path, &agent),
        )
        .await
        {
            Ok(Ok(body)) => {
                c.playlists += 1;
                match parse_playlist(&String::from_utf8_lossy(&body)) {
                    Some((sequence, target, names)) if !names.is_empty() => {
                        let newest = sequence + names.len() as u64 - 1;
                        // A player starts at the live edge, then takes every segment once.
                        let mut first = follow.last_seq.map_or(newest, |s| s + 1);
                        if first < sequence {
                            c.gaps += 1;
                            first = sequence;
                        }
                        let new = first <= newest;
                        for seq in first..=newest {
                            let name = &names[(seq - sequence) as usize];
                            let path = format!("{MOUNT}/{name}");
                            match tokio::time::timeout(
                                REQUEST_TIMEOUT,
                                get(&mut conn, addr, &path, &agent),
                            )
                            .await
                            {
                                Ok(Ok(data)) => {
                                    let contiguous = follow.last_seq == Some(seq.wrapping_sub(1));
                                    check_segment(&data, &mut follow, contiguous, &mut c);
                                    c.segments += 1;
                                    c.segment_bytes += data.len() as u64;
                                    follow.last_seq = Some(seq);
                                }
                                _ => {
                                    c.http_errors += 1;
                                    conn = None;
                                    break;
                                }
                            }
                        }
                        let target = Duration::from_secs(target.max(1));
                        pause = if new { target } else { target / 2 };
                    }
                    _ => c.corrupt += 1,
                }
            }
            _ => {
                c.http_errors += 1;
                conn = None;
            }
        }
        counts.lock().expect("not poisoned").add(&c);
        let wake = (Instant::now() + pause).min(end);
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// A direct listener: reads the stream until `end`; the bytes it got, and whether it was still
/// streaming then (not refused, not closed).
async fn direct_listener(addr: SocketAddr, end: Instant) -> (u64, bool) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return (0, false);
    };
    if s.write_all(format!("GET {MOUNT} HTTP/1.0\r\nHost: load\r\n\r\n").as_bytes())
        .await
        .is_err()
    {
        return (0, false);
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut got = 0u64;
    loop {
        match tokio::time::timeout_at(end.into(), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got += n as u64,
            Ok(_) => return (got, false),
            Err(_) => return (got, true),
        }
    }
}

/// The newest media sequence number fanstream lists, from its playlist.
fn newest_seq(addr: SocketAddr) -> Option<u64> {
    let mut s = StdStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {MOUNT}/index.m3u8 HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let text = String::from_utf8_lossy(&all);
    let (_, body) = text.split_once("\r\n\r\n")?;
    let (sequence, _, names) = parse_playlist(body)?;
    (!names.is_empty()).then(|| sequence + names.len() as u64 - 1)
}

/// nginx in front of `origin` at `listen`, its files under `dir`: the README's config.
fn nginx(
    dir: &std::path::Path,
    listen: SocketAddr,
    origin: SocketAddr,
) -> Result<std::process::Child, String> {
    // nginx reads a relative `-c` under its `-p` prefix.
    let dir = &dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let d = dir.display();
    let config = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
         events {{ worker_connections 10000; }}\nhttp {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
         proxy_cache_path {d}/cache keys_zone=hls:10m;\n    upstream fanstream {{ server {origin}; keepalive 16; }}\n\
         server {{\n        listen {listen};\n        location / {{\n            proxy_pass http://fanstream;\n            proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\";\n            proxy_cache hls;\n            proxy_cache_lock on;\n            proxy_cache_use_stale updating;\n        }}\n    }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&path).arg("-p").arg(dir);
    servers::spawn_logged(&mut cmd, &dir.join("nginx.log"))
        .map_err(|e| format!("{e} (nginx: Debian's nginx-light)"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Runs `clients` tasks made by `task` on a current-thread runtime on its own thread.
fn on_runtime<F, Fut>(clients: usize, task: F) -> std::thread::JoinHandle<()>
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let tasks: Vec<_> = (0..clients)
                .map(|i| tokio::task::spawn_local(task(i)))
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        });
    })
}

/// fanstream's CPU seconds from `from` to `to`, sampled at those instants.
fn cpu_between(pid: u32, from: Instant, to: Instant) -> f64 {
    std::thread::sleep(from.saturating_duration_since(Instant::now()));
    let before = procstat::cpu_secs(pid).unwrap_or(0.0);
    std::thread::sleep(to.saturating_duration_since(Instant::now()));
    procstat::cpu_secs(pid).unwrap_or(0.0) - before
}

pub fn hls(o: &HlsOpts) -> Result<HlsSummary, String> {
    let name = format!(
        "hls-{}c-{}",
        o.clients,
        serde_json::to_string(&o.via)
            .unwrap_or_default()
            .trim_matches('"')
    );
    let dir = o.out_dir.join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let limit = procstat::raise_fd_limit();
    if o.clients as u64 + 64 > limit {
        return Err(format!(
            "{} clients need more open files than allowed ({limit})",
            o.clients
        ));
    }
    let started_utc = utc_now();
    let loadavg_before = loadavg();
    eprintln!(
        "== {name}: {} HLS clients {:?} for {} s (load average {loadavg_before})",
        o.clients, o.via, o.seconds
    );
    let server = servers::start(
        &ServerOpts {
            target: Target::Fanstream,
            workers: o.workers,
            max_clients: o.clients + 16,
            mounts: 1,
            min_write_bytes: None,
            max_write_delay_ms: None,
            icy_metaint: None,
            settings: vec![
                format!("[mounts.\"{MOUNT}\"]"),
                "hls = true".into(),
                format!("hls_segment_secs = {}", o.segment_secs),
                "hls_segments = 6".into(),
            ],
            fanstream_bin: o.fanstream_bin.clone(),
            icecast_bin: String::new(),
            relay_from: None,
        },
        &dir,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let source = mp3_source(server.addr, stop.clone())?;
    let deadline = Instant::now() + Duration::from_secs(10 + 3 * o.segment_secs);
    while newest_seq(server.addr).is_none() {
        if Instant::now() > deadline {
            return Err(format!("no HLS segment in time; see {}", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut cache = None;
    let addr = match o.via {
        Via::Direct => server.addr,
        Via::Nginx => {
            let listen: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?;
            let mut child = nginx(&dir, listen, server.addr)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while StdStream::connect(listen).is_err() {
                if Instant::now() > deadline || !matches!(child.try_wait(), Ok(None)) {
                    let _ = child.kill();
                    return Err(format!("nginx did not listen; see {}", dir.display()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            cache = Some(child);
            listen
        }
    };
    let by_kind = |text: Option<String>| {
        metric_by_label(
            &text.unwrap_or_default(),
            "fanstream_hls_requests_total",
            "kind",
        )
    };
    let origin_before = by_kind(server.metrics());
    let first_seq = newest_seq(server.addr).unwrap_or(0);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs(o.seconds);
    let spread = Duration::from_secs(o.segment_secs);
    let clients = o.clients;
    let results: Arc<Mutex<ClientCounts>> = Arc::default();
    let counts = results.clone();
    let runner = on_runtime(clients, move |i| {
        let at = start + spread.mul_f64(i as f64 / clients.max(1) as f64);
        hls_client(addr, i, at, end, counts.clone())
    });
    let measured_from = start + spread + Duration::from_secs(1);
    let hls_cpu_secs = cpu_between(server.pid(), measured_from, end);
    let measured_secs = end.saturating_duration_since(measured_from).as_secs_f64();
    runner.join().map_err(|_| "the clients' thread panicked")?;
    let totals = *results.lock().expect("not poisoned");
    let last_seq = newest_seq(server.addr).unwrap_or(first_seq);
    let origin_after = by_kind(server.metrics());
    let origin_requests: BTreeMap<String, f64> = origin_after
        .iter()
        .map(|(k, v)| (k.clone(), v - origin_before.get(k).copied().unwrap_or(0.0)))
        .collect();
    let segments_published = last_seq - first_seq;
    let origin_segments = origin_requests.get("segment").copied().unwrap_or(0.0);
    let (mut direct_cpu_secs, mut direct_bytes, mut ratio) = (None, None, None);
    let mut direct_streaming_at_end = None;
    if o.compare_direct {
        let start = Instant::now() + Duration::from_millis(200);
        let end = start + Duration::from_secs(o.seconds);
        let bytes: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let streaming: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let (total, still) = (bytes.clone(), streaming.clone());
        // Started over one target duration, as the HLS clients were: a thousand heads at once
        // from one address would pass fanstream's `max_pending_heads_per_ip`.
        let listeners = on_runtime(clients, move |i| {
            let (total, still) = (total.clone(), still.clone());
            let at = start + spread.mul_f64(i as f64 / clients.max(1) as f64);
            async move {
                tokio::time::sleep_until(at.into()).await;
                let (got, streaming) = direct_listener(addr, end).await;
                total.fetch_add(got, Ordering::Relaxed);
                still.fetch_add(u64::from(streaming), Ordering::Relaxed);
            }
        });
        let measured_from = start + spread + Duration::from_secs(1);
        let cpu = cpu_between(server.pid(), measured_from, end);
        listeners
            .join()
            .map_err(|_| "the listeners' thread panicked")?;
        direct_cpu_secs = Some(cpu);
        direct_bytes = Some(bytes.load(Ordering::Relaxed));
        let still = streaming.load(Ordering::Relaxed);
        direct_streaming_at_end = Some(still);
        ratio = Some(hls_cpu_secs / cpu.max(1e-9));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = source.join();
    if let Some(mut child) = cache {
        let _ = child.kill();
        let _ = child.wait();
    }
    let summary = HlsSummary {
        started_utc,
        machine: machine(),
        loadavg_before,
        loadavg_after: loadavg(),
        clients: o.clients,
        seconds: o.seconds,
        via: o.via,
        segment_secs: o.segment_secs,
        segments_published,
        totals,
        origin_requests,
        origin_requests_per_segment: origin_segments / segments_published.max(1) as f64,
        hls_cpu_secs,
        measured_secs,
        direct_cpu_secs,
        direct_bytes,
        direct_streaming_at_end,
        hls_over_direct_cpu: ratio,
    };
    write_json(&dir.join("summary.json"), &summary)?;
    print_summary(&summary);
    if totals.errors() > 0 {
        return Err(format!("clients saw errors: {totals:?}"));
    }
    if direct_streaming_at_end.is_some_and(|n| n < o.clients as u64) {
        return Err(format!(
            "only {direct_streaming_at_end:?} of {} direct listeners streamed to the end",
            o.clients
        ));
    }
    if totals.segments < o.clients as u64 {
        return Err(format!(
            "{} clients fetched only {} segments",
            o.clients, totals.segments
        ));
    }
    // Through one cache: a request per segment, and one more for a segment published as the
    // run began or ended.
    if o.via == Via::Nginx && origin_segments > segments_published as f64 + 2.0 {
        return Err(format!(
            "fanstream answered {origin_segments} segment requests for {segments_published} segments through one nginx"
        ));
    }
    Ok(summary)
}

pub fn print_summary(s: &HlsSummary) {
    let t = &s.totals;
    println!(
        "{} HLS clients {:?}, {} s, {} s segments ({}, load average {} before, {} after)",
        s.clients,
        s.via,
        s.seconds,
        s.segment_secs,
        s.started_utc,
        s.loadavg_before,
        s.loadavg_after
    );
    println!(
        "  clients: {} playlists, {} segments ({} MB) verified; gaps {}, corrupt {}, timestamp breaks {}, HTTP errors {}",
        t.playlists,
        t.segments,
        t.segment_bytes / 1_000_000,
        t.gaps,
        t.corrupt,
        t.timestamp_breaks,
        t.http_errors
    );
    println!(
        "  fanstream: {} segments published, answered {:?}: {:.2} segment requests per segment",
        s.segments_published, s.origin_requests, s.origin_requests_per_segment
    );
    println!(
        "  fanstream CPU over {:.1} s: {:.3} s with the HLS clients",
        s.measured_secs, s.hls_cpu_secs
    );
    if let (Some(d), Some(r)) = (s.direct_cpu_secs, s.hls_over_direct_cpu) {
        println!(
            "  fanstream CPU over {:.1} s: {d:.3} s with as many direct listeners ({} streaming at the end, {} MB read); HLS / direct = {r:.2}",
            s.measured_secs,
            s.direct_streaming_at_end.unwrap_or(0),
            s.direct_bytes.unwrap_or(0) / 1_000_000
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment as fanstream cuts one: an ID3 tag with the timestamp, then frames.
    fn segment(ts: u64, frames: std::ops::Range<u64>) -> Vec<u8> {
        let mut body = b"PRIV\0\0\0\x35\0\0".to_vec();
        body.extend_from_slice(TIMESTAMP_OWNER);
        body.extend_from_slice(&ts.to_be_bytes());
        let mut out = b"ID3\x04\0\0\0\0\0".to_vec();
        out.push(body.len() as u8);
        out.extend(body);
        for n in frames {
            frame(n, &mut out);
        }
        out
    }

    #[test]
    fn segments_are_checked_against_the_source_and_the_previous_one() {
        let mut follow = Follow::default();
        let mut c = ClientCounts::default();
        check_segment(&segment(0, 0..10), &mut follow, false, &mut c);
        let next_ts = 10 * FRAME_SAMPLES * 90_000 / RATE;
        check_segment(&segment(next_ts, 10..20), &mut follow, true, &mut c);
        assert_eq!(c.errors(), 0, "{c:?}");
        // A frame missing, then a timestamp off, then a byte changed.
        check_segment(&segment(2 * next_ts, 21..30), &mut follow, true, &mut c);
        assert_eq!((c.gaps, c.timestamp_breaks), (1, 0));
        check_segment(&segment(5, 30..40), &mut follow, true, &mut c);
        assert_eq!(c.timestamp_breaks, 1);
        let mut bad = segment(0, 40..41);
        let last = bad.len() - 1;
        bad[last - 400] ^= 1;
        check_segment(&bad, &mut follow, false, &mut c);
        assert_eq!(c.corrupt, 1);
        let mut bad = segment(0, 40..41);
        let at = bad.len() - FRAME_BYTES + 5;
        bad[at] ^= 1;
        check_segment(&bad, &mut follow, false, &mut c);
        assert_eq!(c.corrupt, 2);
    }
}
