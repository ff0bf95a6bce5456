//! The soak run: the real binary under a mix of churning, stalled and garbage clients, floods, a
//! restarting source and short-lived sources on ever new mounts, while healthy listeners verify
//! every byte. `SOAK_SECONDS` sets its length (60 by default, as in CI; `make soak` runs 600). It
//! reports, and asserts: bytes lost by healthy listeners (0), server RSS after warm-up against the
//! end, `/metrics` back to its size with only the long-lived mount, descriptors and listener gauges
//! back to their baseline, and panics (0).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::process::{wait_line, ChildGuard};
use common::*;

const PASS: &str = "soak-secret";

/// A tiny deterministic generator, so a run's mix is repeatable.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below.max(1)
    }
}

struct Soak {
    addr: SocketAddr,
    stop: AtomicBool,
    /// Stream bytes the source has sent.
    sent: AtomicU64,
    until: Instant,
}

impl Soak {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.until
    }
}

fn start_server(dir: &std::path::Path) -> (ChildGuard, SocketAddr, SocketAddr) {
    let config = dir.join("soak.toml");
    std::fs::write(
        &config,
        format!(
            "demo = false\nsource_password = \"{PASS}\"\nheader_timeout_secs = 2\nsource_timeout_secs = 5\n\
             send_timeout_secs = 5\nauth_max_failures = 5\nauth_failure_window_secs = 2\n\
             [defaults]\nsource_grace_secs = 2\nmax_lag_bytes = 262144\nburst_bytes = 16384\n\
             [mounts.\"/live\"]\nsource_grace_secs = 30\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanstream"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--config",
    ])
    .arg(&config)
    .env("FANSTREAM_LOG", "warn,fanstream::server=info")
    .env_remove("FANSTREAM_SOURCE_PASSWORD")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn("fanstream", &mut cmd);
    let lines = ChildGuard::lines(child.child.as_mut().unwrap().stderr.take().unwrap());
    let started = wait_line(&lines, "the start-up line", |l| {
        l.contains("fanstream started")
    });
    let field = |name: &str| -> SocketAddr {
        let at = started.find(name).unwrap() + name.len();
        let rest = &started[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
            .unwrap_or(rest.len());
        rest[..end].parse().unwrap()
    };
    (child, field("listen_addr="), field("admin=Some("))
}

fn scrape(admin: SocketAddr) -> String {
    String::from_utf8(request(admin, b"GET /metrics HTTP/1.0\r\n\r\n").2).unwrap()
}

/// Sample lines of a scrape, and how many of them are labelled with a churned mount.
fn metric_lines(text: &str) -> (usize, usize) {
    let samples = text.lines().filter(|l| !l.starts_with('#'));
    let churned = samples
        .clone()
        .filter(|l| l.contains("mount=\"/churn-"))
        .count();
    (samples.count(), churned)
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits up to the deadline for `cond`; false if it never held.
fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > DEADLINE {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    true
}

/// What a process holds open, for a failure message: its descriptors and its TCP sockets.
fn fd_report(pid: i32) -> String {
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    let ss = Command::new("ss")
        .args(["-tanp"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mine: Vec<&str> = ss
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .collect();
    format!("fds: {fds:?}\nsockets:\n{}", mine.join("\n"))
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The encoder: streams the pattern at 64 KB/s and restarts every 5-15 s, within the grace period.
/// Once the run is over it keeps streaming without restarts until told to stop, so that listeners
/// that leave are noticed by the writes that fail.
fn source(soak: Arc<Soak>) {
    let mut rng = Lcg(1);
    let put = format!(
        "PUT /live HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
        basic("source", PASS)
    );
    while !soak.stop.load(Ordering::Relaxed) {
        let mut s = Source::connect_raw(soak.addr, put.as_bytes());
        let session = Instant::now() + Duration::from_secs(5 + rng.next(10));
        while !soak.stop.load(Ordering::Relaxed) && (!soak.running() || Instant::now() < session) {
            let at = soak.sent.load(Ordering::Relaxed);
            s.send(&pattern(at, 640));
            soak.sent.store(at + 640, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(10));
        }
        drop(s); // the encoder restarts, or stops for good
        if soak.running() {
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Listeners that come and go: read a little, leave (half of them with a reset).
fn churn(soak: Arc<Soak>, seed: u64) -> u64 {
    let mut rng = Lcg(seed);
    let mut mismatches = 0;
    while soak.running() {
        let Ok(mut s) = TcpStream::connect(soak.addr) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if s.write_all(b"GET /live HTTP/1.0\r\n\r\n").is_err() {
            continue;
        }
        let mut all = Vec::new();
        let want = 1000 + rng.next(50_000) as usize;
        let mut buf = [0u8; 16 * 1024];
        while all.len() < want {
            match common::read_some(&mut s, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
        // Refusals (404 while the encoder restarts, 503) carry a text body, not the stream.
        if !all.starts_with(b"HTTP/1.0 200") {
            continue;
        }
        if let Some(end) = find(&all, b"\r\n\r\n") {
            let mut check = StreamCheck::default();
            check.feed(&all[end + 4..]);
            mismatches += check.mismatches;
        }
        if rng.next(2) == 0 {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
    }
    mismatches
}

/// Listeners that stop reading: the lag limit or the send timeout must drop them.
fn stalled(soak: Arc<Soak>) {
    let mut held = Vec::new();
    while soak.running() {
        // Each is held about 15 s: long enough to fill its socket and be dropped by the server.
        if held.len() < 20 {
            if let Ok(sock) =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            {
                let _ = sock.set_recv_buffer_size(4096);
                if sock.connect(&soak.addr.into()).is_ok() {
                    let mut s: TcpStream = sock.into();
                    let _ = s.write_all(b"GET /live HTTP/1.0\r\n\r\n");
                    held.push(s);
                }
            }
        } else {
            held.remove(0);
        }
        thread::sleep(Duration::from_millis(750));
    }
}

/// Sources that stream for a moment on a new mount each, a few a second, half of them with a
/// listener, and leave; their mounts expire after the 2 s grace period. Returns how many there were.
fn mount_churn(soak: Arc<Soak>) -> u64 {
    let mut n = 0;
    while soak.running() {
        let mount = format!("/churn-{n}");
        n += 1;
        let Ok(mut source) = TcpStream::connect(soak.addr) else {
            continue;
        };
        source
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let head = format!(
            "PUT {mount} HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
            basic("source", PASS)
        );
        let mut answer = [0u8; 12];
        let live = source.write_all(head.as_bytes()).is_ok()
            && source.read_exact(&mut answer).is_ok()
            && answer.starts_with(b"HTTP/1.0 200");
        if !live {
            continue;
        }
        for piece in 0..5 {
            let _ = source.write_all(&pattern(piece * 640, 640));
            thread::sleep(Duration::from_millis(20));
        }
        if n % 2 == 0 {
            if let Ok(mut l) = TcpStream::connect(soak.addr) {
                l.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = write!(l, "GET {mount} HTTP/1.0\r\n\r\n");
                let _ = l.read(&mut [0u8; 4096]);
            }
        }
        drop(source);
        thread::sleep(Duration::from_millis(150));
    }
    n
}

/// Scanners, slowloris, oversized heads, bad methods and password guessing.
fn garbage(soak: Arc<Soak>, seed: u64) {
    let mut rng = Lcg(seed);
    let mut slow = Vec::new();
    while soak.running() {
        let Some(mut s) = connect_from_elsewhere(soak.addr) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let payload: Vec<u8> = match rng.next(6) {
            0 => (0..rng.next(3000)).map(|_| rng.next(256) as u8).collect(),
            1 => {
                let _ = s.write_all(b"GET /live HTTP/1.1\r\nX-Slow: ");
                slow.push(s);
                if slow.len() > 20 {
                    slow.remove(0);
                }
                thread::sleep(Duration::from_millis(20));
                continue;
            }
            2 => {
                let mut v = b"GET /".to_vec();
                v.extend(std::iter::repeat_n(b'a', 10_000));
                v
            }
            3 => b"BREW /live HTTP/1.1\r\n\r\n".to_vec(),
            4 => b"GET /../../etc/passwd HTTP/1.0\r\n\r\n".to_vec(),
            _ => format!(
                "PUT /live HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
                basic("source", "guess")
            )
            .into_bytes(),
        };
        let _ = s.write_all(&payload);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        thread::sleep(Duration::from_millis(20));
    }
}

/// Connects from 127.0.0.2: hostile clients have their own address, so that the password
/// guessing they do is slowed down without locking out the real encoder on 127.0.0.1.
fn connect_from_elsewhere(to: SocketAddr) -> Option<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    let from: SocketAddr = "127.0.0.2:0".parse().unwrap();
    sock.bind(&from.into()).ok()?;
    sock.connect(&to.into()).ok()?;
    Some(sock.into())
}

/// Bursts of 200 connections opened and closed at once.
fn flood(soak: Arc<Soak>) {
    while soak.running() {
        let burst: Vec<TcpStream> = (0..200)
            .filter_map(|_| TcpStream::connect(soak.addr).ok())
            .map(|mut s| {
                let _ = s.write_all(b"GET /live HTTP/1.0\r\n\r\n");
                s
            })
            .collect();
        drop(burst);
        thread::sleep(Duration::from_secs(3));
    }
}

#[test]
fn soak() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = common::process::scratch_dir("soak");
    let (mut server, addr, admin) = start_server(&dir);
    let pid = server.pid();
    let baseline_fds = fd_count(pid);
    let soak = Arc::new(Soak {
        addr,
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        until: Instant::now() + Duration::from_secs(seconds),
    });
    let mut load = Vec::new();
    let s = soak.clone();
    let source_thread = thread::spawn(move || source(s));
    wait_until("the source", || {
        metric_value(&scrape(admin), "fanstream_source_up", &[]) == 1.0
    });
    let last = Arc::new(AtomicU64::new(u64::MAX));
    // Healthy listeners keep up for the whole run and check every byte, until they have the
    // stream up to `last` (set once the source has sent its last byte) or the deadline passes.
    // They are in before the load starts: the flood's 200 connections from the same address
    // would otherwise have the server close a newcomer still sending its head
    // (`max_pending_heads_per_ip`), which is the limit doing its job, not a lost listener.
    let healthy_threads: Vec<_> = (0..20)
        .map(|_| {
            let (listener, l) = (Listener::connect(addr, "/live"), last.clone());
            thread::spawn(move || listener.check_until(&l, "healthy listener"))
        })
        .collect();
    let churners: Vec<_> = (0..4)
        .map(|i| {
            let s = soak.clone();
            thread::spawn(move || churn(s, 100 + i))
        })
        .collect();
    for i in 0..2 {
        let s = soak.clone();
        load.push(thread::spawn(move || garbage(s, 200 + i)));
    }
    let s = soak.clone();
    load.push(thread::spawn(move || stalled(s)));
    let s = soak.clone();
    load.push(thread::spawn(move || flood(s)));
    let s = soak.clone();
    let mount_churner = thread::spawn(move || mount_churn(s));

    // Warm-up: a fifth of the run, then the memory and /metrics references (the latter without
    // the churned mounts live at that moment).
    thread::sleep(Duration::from_secs(seconds / 5));
    let rss_warm = rss_kib(pid);
    let (lines_warm, churned_warm) = metric_lines(&scrape(admin));
    let lines_warm = lines_warm - churned_warm;
    let mut rss_peak = rss_warm;
    while Instant::now() < soak.until {
        thread::sleep(Duration::from_millis(500));
        rss_peak = rss_peak.max(rss_kib(pid));
    }
    let rss_end = rss_kib(pid);
    for t in load {
        t.join().unwrap();
    }
    let churn_mismatches: u64 = churners.into_iter().map(|t| t.join().unwrap()).sum();
    let mounts_churned = mount_churner.join().unwrap();

    // Every healthy listener must receive the whole stream up to what the source has sent by now
    // (it goes on sending, so the server notices the listeners that leave next).
    let sent = soak.sent.load(Ordering::Relaxed);
    last.store(sent, Ordering::Relaxed);
    let checks: Vec<StreamCheck> = healthy_threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();

    let lost: u64 = checks
        .iter()
        .map(|c| sent.saturating_sub(c.next.unwrap_or(0)))
        .sum();
    let mismatches: u64 = checks.iter().map(|c| c.mismatches).sum();
    let received: u64 = checks.iter().map(|c| c.bytes).sum();

    // Back to baseline: no listener, no leaked descriptor.
    wait_until("listener gauges back to 0", || {
        metric_value(&scrape(admin), "fanstream_listeners", &[]) == 0.0
    });
    // The churned mounts' series go once their grace periods are over.
    let mut lines_end = (0, 0);
    let churn_gone = wait_for(|| {
        lines_end = metric_lines(&scrape(admin));
        lines_end.1 == 0
    });
    assert!(
        churn_gone,
        "{} series of churned mounts remain after their grace periods",
        lines_end.1
    );
    let lines_end = lines_end.0;
    soak.stop.store(true, Ordering::Relaxed);
    source_thread.join().unwrap();
    let fds_ok = wait_for(|| fd_count(pid) <= baseline_fds);
    assert!(
        fds_ok,
        "descriptors not back to baseline {baseline_fds}:\n{}",
        fd_report(pid)
    );
    let metrics = scrape(admin);
    let count = |name: &str, labels: &[&str]| metric_value(&metrics, name, labels) as u64;
    let panics = count("fanstream_panics_total", &[]);
    let restarts = count("fanstream_source_connects_total", &["mount=\"/live\""]);
    let rejected = count("fanstream_rejected_requests_total", &[]);
    let dropped_slow = count("fanstream_listener_disconnects_total", &["reason=\"slow\""])
        + count(
            "fanstream_listener_disconnects_total",
            &["reason=\"send_timeout\""],
        );
    eprintln!(
        "soak {seconds}s: source sent {sent} bytes over {restarts} sessions; healthy listeners received {received} \
         bytes, lost {lost}, mismatched {mismatches}; churn mismatches {churn_mismatches}; rejected {rejected}; \
         stalled dropped {dropped_slow}; RSS warm {rss_warm} KiB, peak {rss_peak} KiB, end {rss_end} KiB; \
         {mounts_churned} mounts churned, /metrics {lines_warm} samples after warm-up, {lines_end} at the end; \
         fds baseline {baseline_fds}, end {}; panics {panics}",
        fd_count(pid)
    );
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("fanstream_listener_disconnects_total"))
    {
        eprintln!("  {line}");
    }
    assert_eq!(lost, 0, "healthy listeners lost bytes");
    assert_eq!(
        mismatches + churn_mismatches,
        0,
        "listeners received wrong bytes"
    );
    assert_eq!(panics, 0, "panics were caught");
    assert!(restarts >= 2, "the source should have restarted");
    assert!(
        dropped_slow >= 1,
        "stalled listeners should have been dropped"
    );
    assert!(rejected >= 10, "garbage should have been refused");
    assert!(
        mounts_churned >= seconds,
        "only {mounts_churned} short-lived mounts in {seconds} s"
    );
    // Series that appear late (a refusal reason first met after warm-up, a source's end reason)
    // are a few; a mount's are 15 or more each.
    assert!(
        lines_end <= lines_warm + 30,
        "/metrics grew from {lines_warm} to {lines_end} samples with {mounts_churned} mounts churned"
    );
    // Allocators keep some freed memory; growth beyond a quarter plus 4 MiB is a leak.
    assert!(
        rss_end <= rss_warm + rss_warm / 4 + 4096,
        "RSS grew from {rss_warm} to {rss_end} KiB"
    );

    server.signal(libc::SIGTERM);
    assert!(server.wait_for(Duration::from_secs(20)).success());
}
