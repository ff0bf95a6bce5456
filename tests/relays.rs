//! Relays: mounts pulled from other servers. Several fanstream servers in this process on
//! loopback form a tree (origin → 2 edges → 2 edges each) whose leaves serve the encoder's
//! bytes exactly; an edge fails over to its second upstream when the first dies and returns
//! with `prefer_first`, dropping no listener; bad upstreams (non-2xx, garbage, a stall, a
//! redirect loop) are counted and retried with backoff; an edge pulls over https from a TLS
//! origin (trusting the test's CA) and counts an untrusted certificate as a `tls` failover;
//! and Debian's `icecast2` is relayed, its ICY titles reaching fanstream's own ICY listeners.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::certs::Ca;
use common::clients::*;
use common::media::*;
use common::process::{require, scratch_dir, ChildGuard};
use common::upstream::BadUpstream;
use common::*;
use fanstream::config::{MasterSettings, RelaySettings};
use fanstream::{Config, Stop};

/// The test streams' rate: 32 kB/s, 256 kbit/s.
const RATE: u64 = 32_000;
const PIECE: usize = 1000;

fn url(addr: SocketAddr, mount: &str) -> String {
    format!("http://{addr}{mount}")
}

fn relay(mount: &str, upstreams: &[String]) -> RelaySettings {
    RelaySettings {
        mount: mount.into(),
        upstreams: upstreams.to_vec(),
        user: None,
        password: None,
        on_demand: false,
        prefer_first: false,
        retry_secs: 30,
    }
}

fn relay_up(server: &TestServer, mount: &str, upstream: &str) -> f64 {
    server.metric(
        "fanstream_relay_up",
        &[
            &format!("mount=\"{mount}\""),
            &format!("upstream=\"{upstream}\""),
        ],
    )
}

/// The upstream `/status.json` says the relay of `mount` pulls from.
fn relay_upstream(server: &TestServer, mount: &str) -> String {
    let (_, _, body) = request(server.addr, b"GET /status.json HTTP/1.0\r\n\r\n");
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    status["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mount"] == mount)
        .and_then(|m| m["relay_upstream"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The test pattern, paced at [`RATE`], written to every source it holds in lockstep: each
/// server gets the same bytes at the same pattern offsets, so a listener's bytes tell which
/// moment of the stream they are whichever server they came through.
struct Feeder {
    sources: Arc<Mutex<Vec<TcpStream>>>,
    sent: Arc<AtomicU64>,
    /// When each piece went out: (time, stream offset one past it).
    log: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Feeder {
    fn start(sources: Vec<Source>) -> Feeder {
        Feeder::start_with(sources, None)
    }

    /// Feeds `data` (a media file's bytes) instead of the pattern, until its end.
    fn start_with(sources: Vec<Source>, data: Option<Arc<Vec<u8>>>) -> Feeder {
        let sources = Arc::new(Mutex::new(
            sources.into_iter().map(|s| s.stream).collect::<Vec<_>>(),
        ));
        let sent = Arc::new(AtomicU64::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, n, lg, st) = (sources.clone(), sent.clone(), log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            while !st.load(Ordering::SeqCst) {
                let at = n.load(Ordering::SeqCst);
                let due = Duration::from_secs_f64(at as f64 / RATE as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                let piece = match &data {
                    None => pattern(at, PIECE),
                    Some(d) if (at as usize) < d.len() => {
                        d[at as usize..d.len().min(at as usize + PIECE)].to_vec()
                    }
                    Some(_) => return,
                };
                // A server that went away loses its source; the others go on.
                s.lock()
                    .unwrap()
                    .retain_mut(|stream| stream.write_all(&piece).is_ok());
                let end = n.fetch_add(piece.len() as u64, Ordering::SeqCst) + piece.len() as u64;
                lg.lock().unwrap().push((Instant::now(), end));
            }
        });
        Feeder {
            sources,
            sent,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// Feeds one more server, from the next piece on.
    fn add(&self, source: Source) {
        self.sources.lock().unwrap().push(source.stream);
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn three_tiers_deliver_the_encoders_bytes_exactly_to_every_leaf() {
    let origin = TestServer::start(|_| {});
    let feeder = Feeder::start(vec![Source::connect(origin.addr, "/live")]);
    let edges = |upstream: SocketAddr| {
        (0..2)
            .map(|_| {
                TestServer::start(|c| {
                    c.startup.relays = vec![relay("/live", &[url(upstream, "/live")])];
                })
            })
            .collect::<Vec<_>>()
    };
    let middle = edges(origin.addr);
    let leaves: Vec<TestServer> = middle.iter().flat_map(|m| edges(m.addr)).collect();
    for (i, server) in middle.iter().chain(&leaves).enumerate() {
        server.wait_metric("fanstream_relay_up", &["mount=\"/live\""], |v| v == 1.0);
        assert_eq!(
            server.metric("fanstream_source_up", &["mount=\"/live\""]),
            1.0,
            "edge {i}: the relay is the mount's source"
        );
    }
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let checks: Vec<_> = middle
        .iter()
        .chain(&leaves)
        .chain([&origin])
        .enumerate()
        .map(|(i, server)| {
            let listener = Listener::connect(server.addr, "/live");
            assert!(
                listener.head.contains("icy-name: Test Radio\r\n"),
                "listener {i}: the encoder's description passes each hop: {}",
                listener.head
            );
            let last = last.clone();
            std::thread::spawn(move || listener.check_until(&last, &format!("listener {i}")))
        })
        .collect();
    // Several of the relays' coalesced writes (a second each by default), through two hops.
    let until = feeder.sent() + 4 * RATE;
    wait_until("the encoder to send 4 s more", || feeder.sent() >= until);
    last.store(feeder.sent(), Ordering::SeqCst);
    for (i, check) in checks.into_iter().enumerate() {
        let check = check.join().unwrap();
        assert_eq!(
            check.mismatches, 0,
            "listener {i}: bytes differ from the stream"
        );
        assert!(
            check.next >= Some(last.load(Ordering::SeqCst)),
            "listener {i} got the stream up to {:?}, the encoder sent {}",
            check.next,
            last.load(Ordering::SeqCst)
        );
        assert!(
            check.bytes > 2 * RATE,
            "listener {i}: {} bytes",
            check.bytes
        );
    }
    for leaf in &leaves {
        assert_eq!(
            leaf.metric("fanstream_relay_failovers_total", &[]),
            0.0,
            "no relay had to leave its upstream"
        );
    }
}

/// A listener read on its own thread, keeping every byte and when each read came.
struct Capture {
    bytes: Arc<Mutex<Vec<u8>>>,
    /// (arrival, pattern offset one past the last byte so far), per read.
    ends: Arc<Mutex<Vec<(Instant, u64)>>>,
    ended: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    fn start(mut listener: Listener) -> Capture {
        let bytes = Arc::new(Mutex::new(std::mem::take(&mut listener.body)));
        let ends = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, e, d, st) = (bytes.clone(), ends.clone(), ended.clone(), stop.clone());
        let mut stream = listener.stream;
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while !st.load(Ordering::SeqCst) {
                match common::read_some(&mut stream, &mut buf) {
                    Ok(0) => return d.store(true, Ordering::SeqCst),
                    Ok(n) => {
                        let mut all = b.lock().unwrap();
                        all.extend_from_slice(&buf[..n]);
                        if all.len() >= 24 {
                            // The stream's offset at the end of what came, when the last 24
                            // bytes are the stream (not across a switch).
                            if let Some(at) = locate(&all[all.len() - 24..]) {
                                e.lock().unwrap().push((Instant::now(), at + 24));
                            }
                        }
                    }
                    Err(err)
                        if matches!(
                            err.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return d.store(true, Ordering::SeqCst),
                }
            }
        });
        Capture {
            bytes,
            ends,
            ended,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until the listener has the stream past offset `beyond`; returns when that came.
    fn wait_past(&self, beyond: u64, what: &str) -> Instant {
        let start = Instant::now();
        loop {
            assert!(
                !self.ended.load(Ordering::SeqCst),
                "{what}: the listener was dropped"
            );
            if let Some((at, _)) = self
                .ends
                .lock()
                .unwrap()
                .iter()
                .find(|(_, end)| *end > beyond)
            {
                return *at;
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `n` bytes in all have arrived.
    fn wait_bytes(&self, n: usize, what: &str) {
        wait_until(what, || {
            assert!(
                !self.ended.load(Ordering::SeqCst),
                "{what}: the listener was dropped"
            );
            self.bytes.lock().unwrap().len() >= n
        });
    }

    /// Stops reading; returns what was received.
    fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        assert!(
            !self.ended.load(Ordering::SeqCst),
            "the listener was dropped"
        );
        std::mem::take(&mut self.bytes.lock().unwrap())
    }
}

/// Splits a capture into runs that are each the stream exactly, allowing jumps (back, to a new
/// upstream's burst, or forward) between them: returns the runs as (offset, len), and how many
/// bytes belonged to no run (a word cut at a switch: a few per switch at most).
fn runs_across_switches(received: &[u8]) -> (Vec<(u64, usize)>, usize) {
    let (mut runs, mut stray, mut at) = (Vec::new(), 0, 0);
    while received.len() - at >= 24 {
        let rest = &received[at..];
        let Some(start) = locate(rest) else {
            stray += 1;
            at += 1;
            continue;
        };
        let expected = pattern(start, rest.len());
        let len = rest
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(rest.len());
        runs.push((start, len));
        at += len;
    }
    (runs, stray + received.len() - at)
}

#[test]
fn an_edge_fails_over_to_its_second_upstream_and_returns_to_the_first_dropping_no_listener() {
    const TIMEOUT_SECS: u64 = 2;
    let quick = |c: &mut Config| {
        c.defaults.max_write_delay_ms = 0;
        c.source_timeout_secs = TIMEOUT_SECS;
    };
    let mut a = TestServer::start(quick);
    let b = TestServer::start(quick);
    let feeder = Feeder::start(vec![
        Source::connect(a.addr, "/live"),
        Source::connect(b.addr, "/live"),
    ]);
    let (url_a, url_b) = (url(a.addr, "/live"), url(b.addr, "/live"));
    let edge = TestServer::start(|c| {
        quick(c);
        c.defaults.source_grace_secs = 10;
        declare(c, "/live");
        c.startup.relays = vec![RelaySettings {
            prefer_first: true,
            retry_secs: 1,
            ..relay("/live", &[url_a.clone(), url_b.clone()])
        }];
    });
    wait_until("the edge to pull from A", || {
        relay_up(&edge, "/live", &url_a) == 1.0
    });
    let capture = Capture::start(Listener::connect(edge.addr, "/live"));
    capture.wait_past(feeder.sent() + RATE / 2, "the stream through A");

    let (a_addr, killed, at_kill) = (a.addr, Instant::now(), feeder.sent());
    a.stop(Stop::Now);
    let resumed = capture.wait_past(at_kill + PIECE as u64, "the stream through B");
    assert!(
        resumed - killed <= Duration::from_secs(TIMEOUT_SECS + 1),
        "the listener went on from B {:?} after A died",
        resumed - killed
    );
    assert_eq!(relay_up(&edge, "/live", &url_b), 1.0);
    assert_eq!(relay_up(&edge, "/live", &url_a), 0.0);
    assert_eq!(
        relay_upstream(&edge, "/live"),
        url_b,
        "the status page names the upstream"
    );
    assert!(
        edge.metric("fanstream_relay_failovers_total", &["reason=\"closed\""]) >= 1.0,
        "{}",
        edge.metrics()
    );

    let a = TestServer::start_at(a_addr, quick);
    feeder.add(Source::connect(a.addr, "/live"));
    wait_until("the edge to return to A", || {
        relay_up(&edge, "/live", &url_a) == 1.0
    });
    assert_eq!(relay_up(&edge, "/live", &url_b), 0.0);
    assert_eq!(relay_upstream(&edge, "/live"), url_a);
    assert_eq!(
        edge.metric("fanstream_relay_failovers_total", &["reason=\"preferred\""]),
        1.0
    );
    capture.wait_past(feeder.sent() + RATE / 2, "the stream through A again");

    let received = capture.finish();
    let (runs, stray) = runs_across_switches(&received);
    assert!(
        runs.len() <= 8 && stray <= 64,
        "each upstream switch costs a jump, no garbage: runs {runs:?}, {stray} stray bytes"
    );
    assert_eq!(
        edge.metric("fanstream_listener_disconnects_total", &[]),
        0.0,
        "no listener dropped"
    );
    assert_eq!(
        edge.metric("fanstream_listeners", &["mount=\"/live\""]),
        1.0
    );
}

#[test]
fn bad_upstreams_are_counted_and_retried_with_backoff() {
    let bad = BadUpstream::start();
    let cases = [
        ("/missing", "not_found"),
        ("/error", "status"),
        ("/garbage", "bad_response"),
        ("/loop", "redirect_loop"),
        ("/badicy", "bad_metadata"),
        ("/stall", "stalled"),
    ];
    let mut edge = TestServer::start(|c| {
        c.source_timeout_secs = 1;
        c.startup.relays = cases
            .iter()
            .map(|(path, _)| RelaySettings {
                user: Some("relayer".into()),
                password: Some("pw".into()),
                ..relay(path, &[url(bad.addr, path)])
            })
            .collect();
    });
    for (path, reason) in cases {
        let labels = [format!("mount=\"{path}\""), format!("reason=\"{reason}\"")];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        edge.wait_metric("fanstream_relay_failovers_total", &labels, |v| v >= 2.0);
        assert_eq!(
            edge.metric("fanstream_relay_failovers_total", &[labels[0]]),
            edge.metric("fanstream_relay_failovers_total", &labels),
            "{path}: counted as {reason} only: {}",
            edge.metrics()
        );
    }
    let (attempts, last) = bad.requests("/missing");
    assert!(attempts.len() >= 2);
    let gap = attempts[1] - attempts[0];
    assert!(
        gap >= Duration::from_millis(450),
        "a failing upstream is retried after a backoff, not at once: {gap:?}"
    );
    wait_until("a third attempt on /missing", || {
        bad.requests("/missing").0.len() >= 3
    });
    let attempts = bad.requests("/missing").0;
    assert!(
        attempts[2] - attempts[1] >= Duration::from_millis(950),
        "the backoff grows: {:?} then {:?}",
        attempts[1] - attempts[0],
        attempts[2] - attempts[1]
    );
    // What Icecast's relay sends.
    for line in [
        "GET /missing HTTP/1.0\r\n",
        "Icy-MetaData: 1\r\n",
        "User-Agent: fanstream/",
        &format!("Authorization: Basic {}\r\n", basic("relayer", "pw")),
    ] {
        assert!(
            last.contains(line),
            "the relay's request lacks {line:?}: {last}"
        );
    }
    assert_eq!(edge.metric("fanstream_panics_total", &[]), 0.0);
    assert_eq!(edge.metric("fanstream_relay_up", &[]), 0.0);
    let (status, _, _) = request(edge.addr, b"GET /status.json HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200, "the edge still serves");
    let open = bad.open.load(Ordering::SeqCst);
    assert!(
        open <= cases.len() as u64,
        "each relay holds one upstream connection at most, {open} are open"
    );
    edge.stop(Stop::Now);
    wait_until("the stopped edge to close its upstream connections", || {
        bad.open.load(Ordering::SeqCst) == 0
    });
}

/// An upstream that answers and then sends nothing is failing however long the relay waits
/// for it: with a `source_timeout_secs` longer than the relay's five seconds of "it streamed,
/// so retry at once", it is still backed off (it once reconnected at once, forever, with a
/// warning each time).
#[test]
fn an_upstream_silent_after_its_answer_is_backed_off() {
    let bad = BadUpstream::start();
    let _edge = TestServer::start(|c| {
        c.source_timeout_secs = 6;
        c.startup.relays = vec![relay("/stall", &[url(bad.addr, "/stall")])];
    });
    // Waits of 0.5-1 s, 1-2 s, then 2-4 s after each six-second stall; without the backoff
    // growing, every wait would be the first's.
    let start = Instant::now();
    while bad.requests("/stall").0.len() < 4 {
        assert!(start.elapsed() < 2 * DEADLINE, "four attempts on /stall");
        std::thread::sleep(Duration::from_millis(50));
    }
    let attempts = bad.requests("/stall").0;
    let gap = attempts[3] - attempts[2];
    assert!(
        gap >= Duration::from_millis(7_900),
        "the third retry came {gap:?} after the attempt before: the backoff did not grow"
    );
}

/// Debian's icecast2 on a free loopback port with a generated config, run as its own user (it
/// refuses root): `runuser -u icecast2 -- icecast2 -c DIR/icecast.xml`.
fn icecast(dir: &std::path::Path) -> (ChildGuard, SocketAddr) {
    icecast_with(dir, "")
}

/// [`icecast`] with more of its config (`<relay>` blocks).
fn icecast_with(dir: &std::path::Path, extra: &str) -> (ChildGuard, SocketAddr) {
    require("icecast2");
    require("runuser");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::process::Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(dir)
        .status()
        .unwrap();
    let config = format!(
        r#"<icecast>
  <limits><clients>100</clients><sources>4</sources><burst-size>65536</burst-size></limits>
  <authentication>
    <source-password>{PASSWORD}</source-password>
    <relay-password>relaypw</relay-password>
    <admin-user>admin</admin-user><admin-password>adminpw</admin-password>
  </authentication>
  <hostname>127.0.0.1</hostname>
  <listen-socket><port>{port}</port><bind-address>127.0.0.1</bind-address></listen-socket>
  <paths>
    <basedir>/usr/share/icecast2</basedir>
    <logdir>{dir}</logdir>
    <pidfile>{dir}/icecast.pid</pidfile>
    <webroot>/usr/share/icecast2/web</webroot>
    <adminroot>/usr/share/icecast2/admin</adminroot>
  </paths>
  <logging><accesslog>access.log</accesslog><errorlog>error.log</errorlog><loglevel>3</loglevel></logging>
  {extra}
</icecast>
"#,
        dir = dir.display()
    );
    let file = dir.join("icecast.xml");
    std::fs::write(&file, config).unwrap();
    // A group: runuser forks icecast2, which must not outlive the test either.
    let child = ChildGuard::spawn_group(
        "icecast2",
        std::process::Command::new("runuser")
            .args(["-u", "icecast2", "--", "icecast2", "-c"])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("icecast2.stderr")).unwrap()),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // icecast2 2.4.4 was once seen to crash (segmentation fault, on a machine with a load
    // average of 100) when probed right after it started: wait for its log to say it runs.
    let log = dir.join("error.log");
    wait_until("icecast2 to say it started", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("server started"))
    });
    wait_until("icecast2 to listen", || TcpStream::connect(addr).is_ok());
    (child, addr)
}

#[test]
fn an_mp3_mount_relayed_from_icecast_brings_its_titles_to_icy_listeners() {
    let dir = scratch_dir("relay_icecast");
    let (_icecast, ice) = icecast(&dir);
    let mut encoder = ffmpeg_source(ice, "/live", &Tone::new(Codec::Mp3, 120.0));
    let edge = TestServer::start(|c| {
        c.defaults.max_write_delay_ms = 0;
        c.startup.relays = vec![relay("/relayed", &[url(ice, "/live")])];
    });
    let started = Instant::now();
    while edge.metric("fanstream_relay_up", &["mount=\"/relayed\""]) != 1.0 {
        assert!(
            encoder.running(),
            "ffmpeg stopped streaming to icecast2: {}",
            encoder.text()
        );
        assert!(
            started.elapsed() < DEADLINE,
            "the relay never pulled from icecast2: {}",
            edge.metrics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut s, head, mut capture) = {
        let (s, head) = icy_listener(edge.addr, "/relayed");
        let metaint = icy_metaint(&head).expect("fanstream's ICY listener gets icy-metaint");
        (s, head, IcyCapture::new(metaint))
    };
    assert!(head.contains("Content-Type: audio/mpeg\r\n"), "{head}");
    // A title beyond ASCII reaches fanstream's listeners as the text it was too.
    for title in ["Relayed Artist - Relayed Title", "Björk - Jóga"] {
        let (status, _, body) = curl_get(
            ice,
            "/admin/metadata",
            Some(("admin", "adminpw")),
            &[("mode", "updinfo"), ("mount", "/live"), ("song", title)],
        );
        assert_eq!(status, 200, "icecast2 took the title: {body}");
        read_until(
            &mut s,
            &mut capture,
            &format!("icecast2's title {title:?} at fanstream's ICY listener"),
            DEADLINE,
            |c| c.titles().iter().any(|t| t == title),
        );
    }
    // The audio between fanstream's blocks is MP3 frames, none of icecast2's blocks left in it.
    let skip = capture
        .audio
        .windows(2)
        .position(|w| w[0] == 0xFF && w[1] & 0xE0 == 0xE0)
        .unwrap();
    assert_frame_chain(&capture.audio[skip..], mpeg_frame_len, "relayed audio");
    let status: serde_json::Value =
        serde_json::from_slice(&request(edge.addr, b"GET /status.json HTTP/1.0\r\n\r\n").2)
            .unwrap();
    assert!(
        status.to_string().contains("Björk - Jóga"),
        "the title shows in the status page: {status}"
    );
    // Counted as Icecast counts a relay, apart from encoders' connections.
    let (_, _, stats) = curl_get(edge.admin, "/admin/stats", None, &[]);
    for counter in [
        "<source_relay_connections>1</source_relay_connections>",
        "<source_client_connections>0</source_client_connections>",
        "<source_total_connections>1</source_total_connections>",
    ] {
        assert!(stats.contains(counter), "{counter} in {stats}");
    }
}

/// The mounts a server's `/status.json` lists.
fn status_mounts(server: &TestServer) -> Vec<String> {
    let (_, _, body) = request(server.addr, b"GET /status.json HTTP/1.0\r\n\r\n");
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    status["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mount"].as_str().unwrap().to_string())
        .collect()
}

/// icecast2's own mount list, as its relay user reads it.
fn icecast_streamlist(ice: SocketAddr) -> String {
    let (status, _, body) = curl_get(
        ice,
        "/admin/streamlist.txt",
        Some(("relay", "relaypw")),
        &[],
    );
    assert_eq!(status, 200, "icecast2's streamlist: {body}");
    body
}

#[test]
fn an_edge_mirrors_the_mounts_an_icecast_origin_lists() {
    const INTERVAL_SECS: u64 = 2;
    let dir = scratch_dir("relay_mirror");
    let (_icecast, ice) = icecast(&dir);
    let first = ffmpeg_source(ice, "/first", &Tone::new(Codec::Mp3, 120.0));
    wait_until("icecast2 to list /first", || {
        icecast_streamlist(ice).lines().any(|l| l == "/first")
    });
    let edge = TestServer::start(|c| {
        c.startup.master = Some(MasterSettings {
            url: format!("http://{ice}"),
            user: None,
            password: Some("relaypw".into()),
            interval_secs: INTERVAL_SECS,
            on_demand: false,
            register: false,
            public_url: None,
        });
    });
    edge.wait_metric("fanstream_relay_up", &["mount=\"/first\""], |v| v == 1.0);
    let mut listener = Listener::connect(edge.addr, "/first");
    listener.read_at_least(16 * 1024);

    let _second = ffmpeg_source(ice, "/second", &Tone::new(Codec::Mp3, 120.0));
    wait_until("icecast2 to list /second", || {
        icecast_streamlist(ice).lines().any(|l| l == "/second")
    });
    let listed = Instant::now();
    edge.wait_metric("fanstream_relay_up", &["mount=\"/second\""], |v| v == 1.0);
    assert!(
        listed.elapsed() <= Duration::from_secs(INTERVAL_SECS + 1),
        "a mount created on the origin is relayed within one interval: {:?}",
        listed.elapsed()
    );
    assert!(status_mounts(&edge).contains(&"/second".to_string()));

    drop(first);
    wait_until("icecast2 to drop /first", || {
        !icecast_streamlist(ice).lines().any(|l| l == "/first")
    });
    edge.wait_metric("fanstream_relay_mirrored_mounts", &[], |v| v == 1.0);
    wait_until("the edge to drop /first", || {
        !status_mounts(&edge).contains(&"/first".to_string())
    });
    assert_eq!(
        edge.metric("fanstream_relay_up", &["mount=\"/second\""]),
        1.0,
        "the other mount is still relayed"
    );

    // By default mirrored mounts are pulled on demand: nothing until a listener asks.
    let lazy = TestServer::start(|c| {
        c.startup.master = Some(MasterSettings {
            url: format!("http://{ice}"),
            user: None,
            password: Some("relaypw".into()),
            interval_secs: INTERVAL_SECS,
            on_demand: true,
            register: false,
            public_url: None,
        });
    });
    assert_eq!(lazy.metric("fanstream_relay_connects_total", &[]), 0.0);
    let mut listener = None;
    wait_until("the lazy edge to serve /second", || {
        let mut s = TcpStream::connect(lazy.addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(b"GET /second HTTP/1.0\r\n\r\n").unwrap();
        let head = read_head(&mut s);
        let ok = head.starts_with("HTTP/1.0 200");
        listener = ok.then_some(s);
        ok
    });
    let mut s = listener.unwrap();
    let mut some = [0u8; 4096];
    s.read_exact(&mut some).unwrap();
    assert_eq!(
        lazy.metric("fanstream_relay_up", &["mount=\"/second\""]),
        1.0
    );
    assert_eq!(
        lazy.metric("fanstream_relay_connects_total", &[]),
        1.0,
        "only the mount listened to is pulled"
    );
}

#[test]
fn an_on_demand_relay_pulls_only_while_it_has_listeners() {
    const TIMEOUT_SECS: u64 = 2;
    let origin = TestServer::start(|c| declare(c, "/live"));
    let _feeder = Feeder::start(vec![Source::connect(origin.addr, "/live")]);
    let edge = TestServer::start(|c| {
        c.source_timeout_secs = TIMEOUT_SECS;
        c.startup.relays = vec![RelaySettings {
            on_demand: true,
            ..relay("/live", &[url(origin.addr, "/live")])
        }];
    });
    let pulling = || origin.metric("fanstream_listeners", &["mount=\"/live\""]);
    // An always-on relay connects within milliseconds of start-up; this one waits.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(1) {
        assert_eq!(
            pulling(),
            0.0,
            "an on-demand relay pulled without a listener"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(edge.metric("fanstream_relay_connects_total", &[]), 0.0);

    // The first listener wakes it, waits for the mount, and gets the stream exactly.
    let listener = Listener::connect(edge.addr, "/live");
    assert_eq!(pulling(), 1.0);
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let reader = {
        let last = last.clone();
        std::thread::spawn(move || listener.check_until(&last, "on-demand listener"))
    };
    // Two of the origin's coalesced writes to the relay (a second each).
    edge.wait_metric("fanstream_relay_received_bytes_total", &[], |v| {
        v >= 2.0 * RATE as f64
    });
    let upto = origin.metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/live\""],
    );
    last.store(upto as u64, Ordering::SeqCst);
    let check = reader.join().unwrap();
    assert_eq!(check.mismatches, 0);
    assert!(check.bytes > 0);

    // Without listeners it lets the upstream go: within a second of the edge noticing the
    // listener left (at its next write, a second at most with the default coalescing), and
    // some slack for a loaded machine.
    let left = Instant::now();
    wait_until("the on-demand relay to stop", || {
        edge.metric("fanstream_relay_up", &[]) == 0.0
    });
    assert!(
        left.elapsed() <= Duration::from_secs(5),
        "the relay held its upstream {:?} without listeners",
        left.elapsed()
    );
    wait_until("the origin to lose the relay", || pulling() == 0.0);

    // And the next listener wakes it again.
    let mut again = Listener::connect(edge.addr, "/live");
    again.read_at_least(1000);
    assert!(locate(&again.body).is_some(), "the stream again");
    assert_eq!(edge.metric("fanstream_relay_connects_total", &[]), 2.0);
}

/// HLS on an edge whose relay pulls on demand (as `[master]` relays do by default): the first
/// playlist request wakes the relay and waits for its first segment, ffmpeg plays the edge's
/// playlist through, the players' polls keep the relay pulling, and it lets go once they stop.
#[test]
fn an_on_demand_relay_serves_hls_while_players_poll() {
    const TIMEOUT_SECS: u64 = 2;
    let origin = TestServer::start(|_| {});
    let mut encoder = ffmpeg_source(origin.addr, "/live", &Tone::new(Codec::Mp3, 600.0));
    let started = Instant::now();
    while origin.metric("fanstream_source_up", &["mount=\"/live\""]) != 1.0 {
        assert!(started.elapsed() < DEADLINE, "ffmpeg: {}", encoder.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let edge = TestServer::start(|c| {
        c.source_timeout_secs = TIMEOUT_SECS;
        c.defaults.hls = true;
        c.defaults.hls_segment_secs = 1;
        c.startup.relays = vec![RelaySettings {
            on_demand: true,
            ..relay("/live", &[url(origin.addr, "/live")])
        }];
    });
    assert_eq!(edge.metric("fanstream_relay_connects_total", &[]), 0.0);
    // Twelve seconds of audio, well past the relay's idle check, with no listener but ffmpeg
    // polling the playlist.
    require("ffmpeg");
    let playlist = format!("http://{}/live/index.m3u8", edge.addr);
    let out = std::process::Command::new("timeout")
        .args([
            "60",
            "ffmpeg",
            "-hide_banner",
            "-v",
            "error",
            "-i",
            &playlist,
        ])
        .args(["-t", "12", "-f", "s16le", "-ac", "1", "-ar", "8000", "-"])
        .output()
        .expect("ffmpeg runs");
    let seconds = out.stdout.len() as f64 / 16000.0;
    assert!(
        out.status.success() && seconds >= 11.9,
        "ffmpeg played {seconds} s of the edge's HLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        edge.metric("fanstream_relay_connects_total", &[]),
        1.0,
        "one pull for the whole play"
    );
    // Nobody polls any more: the relay lets the origin go.
    wait_until("the on-demand relay to stop", || {
        edge.metric("fanstream_relay_up", &[]) == 0.0
    });
}

#[test]
fn an_icecast_relay_pulls_a_mount_from_fanstream_and_serves_it_exactly() {
    let origin = TestServer::start(|_| {});
    let feeder = Feeder::start(vec![Source::connect(origin.addr, "/live")]);
    let dir = scratch_dir("icecast_relays_fanstream");
    let relay = format!(
        "<relay><server>127.0.0.1</server><port>{}</port><mount>/live</mount>\
         <local-mount>/copy</local-mount><on-demand>0</on-demand>\
         <relay-shoutcast-metadata>1</relay-shoutcast-metadata></relay>",
        origin.addr.port()
    );
    let (_icecast, ice) = icecast_with(&dir, &relay);
    wait_until("icecast2's relay to pull from fanstream", || {
        origin.metric("fanstream_listeners", &["mount=\"/live\""]) == 1.0
    });
    wait_until("icecast2 to list /copy", || {
        icecast_streamlist(ice).lines().any(|l| l == "/copy")
    });
    let listener = Listener::connect(ice, "/copy");
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let reader = {
        let last = last.clone();
        std::thread::spawn(move || listener.check_until(&last, "icecast2's listener"))
    };
    let until = feeder.sent() + 3 * RATE;
    wait_until("3 s more of the stream", || feeder.sent() >= until);
    last.store(feeder.sent(), Ordering::SeqCst);
    let check = reader.join().unwrap();
    assert_eq!(
        check.mismatches, 0,
        "icecast2 served fanstream's stream with bytes changed (ICY blocks left in?)"
    );
    assert!(
        check.next >= Some(last.load(Ordering::SeqCst)),
        "icecast2's listener got up to {:?} of {}",
        check.next,
        last.load(Ordering::SeqCst)
    );
}

#[test]
fn an_ogg_opus_listener_across_a_failover_still_decodes() {
    let dir = scratch_dir("relay_ogg_failover");
    let file = make_file(&dir, "feed.opus", &Tone::new(Codec::Opus, 60.0));
    let bytes = Arc::new(std::fs::read(file).unwrap());
    let quick = |c: &mut Config| {
        c.defaults.max_write_delay_ms = 0;
        c.source_timeout_secs = 2;
    };
    let mut a = TestServer::start(quick);
    let b = TestServer::start(quick);
    let feeder = Feeder::start_with(
        vec![
            Source::connect_typed(a.addr, "/live", "audio/ogg"),
            Source::connect_typed(b.addr, "/live", "audio/ogg"),
        ],
        Some(bytes.clone()),
    );
    let (url_a, url_b) = (url(a.addr, "/live"), url(b.addr, "/live"));
    let edge = TestServer::start(|c| {
        quick(c);
        c.defaults.source_grace_secs = 10;
        c.startup.relays = vec![relay("/live", &[url_a.clone(), url_b.clone()])];
    });
    wait_until("the edge to pull from A", || {
        relay_up(&edge, "/live", &url_a) == 1.0
    });
    let capture = Capture::start(Listener::connect(edge.addr, "/live"));
    capture.wait_bytes(2 * RATE as usize, "2 s of Opus through A");
    a.stop(Stop::Now);
    wait_until("the edge to pull from B", || {
        relay_up(&edge, "/live", &url_b) == 1.0
    });
    let had = capture.bytes.lock().unwrap().len();
    capture.wait_bytes(had + 2 * RATE as usize, "2 s more of Opus through B");
    assert!(
        feeder.sent() < bytes.len() as u64,
        "the file lasted the test"
    );
    let received = capture.finish();
    let path = dir.join("across-failover.opus");
    std::fs::write(&path, &received).unwrap();
    let decoded = ffmpeg_decode(&path);
    // The listener gets B's header pages again at the switch (its sync point), with the same
    // serial as A's stream, as two origins fed by one encoder have: the edge ends A's stream
    // there (an EOS page) and gives B's another serial, a clean chain boundary, so ffmpeg
    // decodes across without an error.
    assert!(
        decoded.success && decoded.errors.trim().is_empty(),
        "ffmpeg could not decode the capture across the switch cleanly: {}",
        decoded.errors
    );
    assert!(
        decoded.seconds >= 3.0,
        "decoded {} s of {} bytes",
        decoded.seconds,
        received.len()
    );
}

/// The median time from the encoder sending a byte to `capture` receiving it, over the pieces
/// sent in the capture's window.
fn median_latency(feeder: &Feeder, capture: &Capture) -> Duration {
    let ends = capture.ends.lock().unwrap();
    let log = feeder.log.lock().unwrap();
    let first = ends.first().map_or(0, |e| e.1);
    let last = ends.last().map_or(0, |e| e.1);
    let mut delays: Vec<Duration> = log
        .iter()
        .filter(|(_, end)| *end > first && *end <= last)
        .filter_map(|(sent, end)| {
            let got = ends.iter().find(|(_, e)| e >= end)?;
            Some(got.0.saturating_duration_since(*sent))
        })
        .collect();
    delays.sort();
    delays.get(delays.len() / 2).copied().unwrap_or_default()
}

/// Origin → edge → leaf, with a listener on each, for `secs` seconds of stream: the median
/// latency from the encoder at each tier.
fn latency_by_tier(write_delay_ms: u64, secs: u64) -> Vec<Duration> {
    let tune = |c: &mut Config| c.defaults.max_write_delay_ms = write_delay_ms;
    let origin = TestServer::start(tune);
    let feeder = Feeder::start(vec![Source::connect(origin.addr, "/live")]);
    let edge = TestServer::start(|c| {
        tune(c);
        c.startup.relays = vec![relay("/live", &[url(origin.addr, "/live")])];
    });
    edge.wait_metric("fanstream_relay_up", &[], |v| v == 1.0);
    let leaf = TestServer::start(|c| {
        tune(c);
        c.startup.relays = vec![relay("/live", &[url(edge.addr, "/live")])];
    });
    leaf.wait_metric("fanstream_relay_up", &[], |v| v == 1.0);
    let captures: Vec<Capture> = [&origin, &edge, &leaf]
        .iter()
        .map(|s| Capture::start(Listener::connect(s.addr, "/live")))
        .collect();
    let until = feeder.sent() + secs * RATE;
    wait_until("the stream to run", || feeder.sent() >= until);
    let latencies = captures
        .iter()
        .map(|c| median_latency(&feeder, c))
        .collect();
    for c in captures {
        c.finish();
    }
    latencies
}

#[test]
fn the_latency_each_hop_adds_is_measured() {
    for (write_delay_ms, per_hop_bound) in [
        (0, Duration::from_millis(100)),
        (1000, Duration::from_millis(2500)),
    ] {
        let tiers = latency_by_tier(write_delay_ms, 6);
        eprintln!(
            "max_write_delay_ms = {write_delay_ms}: median latency from the encoder at the origin {:?}, edge {:?}, leaf {:?}",
            tiers[0], tiers[1], tiers[2]
        );
        for hop in 1..tiers.len() {
            let added = tiers[hop].saturating_sub(tiers[hop - 1]);
            assert!(
                added <= per_hop_bound,
                "max_write_delay_ms = {write_delay_ms}: hop {hop} adds {added:?}"
            );
        }
    }
}

#[test]
fn an_edge_mirrors_the_mounts_a_fanstream_origin_lists() {
    // The origin serves its list to its relay user, as Icecast does (and to its admin).
    let origin = TestServer::start(|c| c.relay_password = Some("relay-secret".into()));
    let one = Source::connect(origin.addr, "/one");
    let two = Source::connect(origin.addr, "/two");
    let feeder = Feeder::start(vec![one]);
    let mut two = Feeder::start(vec![two]);
    let edge = TestServer::start(|c| {
        c.startup.master = Some(MasterSettings {
            url: format!("http://{}", origin.addr),
            user: None,
            password: Some("relay-secret".into()),
            interval_secs: 1,
            on_demand: false,
            register: false,
            public_url: None,
        });
    });
    for mount in ["/one", "/two"] {
        edge.wait_metric(
            "fanstream_relay_up",
            &[&format!("mount=\"{mount}\"")],
            |v| v == 1.0,
        );
    }
    assert_eq!(edge.metric("fanstream_relay_mirrored_mounts", &[]), 2.0);
    // On the origin, the edge's connections are relays, not audience.
    origin.wait_metric("fanstream_relays", &["mount=\"/one\""], |v| v == 1.0);
    assert_eq!(
        origin.metric("fanstream_listeners", &["mount=\"/one\""]),
        0.0
    );
    let mut listener = Listener::connect(edge.addr, "/one");
    listener.read_at_least(4 * PIECE);
    assert!(locate(&listener.body).is_some(), "the origin's stream");

    // /two's encoder leaves: after the origin's grace period it is no longer listed, and the
    // edge stops relaying it (its own listeners would wait the edge's grace period).
    two.stop.store(true, Ordering::SeqCst);
    if let Some(t) = two.thread.take() {
        t.join().unwrap();
    }
    two.sources.lock().unwrap().clear();
    edge.wait_metric("fanstream_relay_mirrored_mounts", &[], |v| v == 1.0);
    wait_until("the edge to drop /two", || {
        !status_mounts(&edge).contains(&"/two".to_string())
    });
    assert_eq!(
        edge.metric("fanstream_relay_up", &["mount=\"/one\""]),
        1.0,
        "the other mount is still relayed"
    );
    assert!(feeder.sent() > 0);
}

/// `fanstream_relay_failovers_total` of `mount` for `reason`.
fn failovers(server: &TestServer, mount: &str, reason: &str) -> f64 {
    server.metric(
        "fanstream_relay_failovers_total",
        &[
            &format!("mount=\"{mount}\""),
            &format!("reason=\"{reason}\""),
        ],
    )
}

#[test]
fn an_edge_relays_over_https_byte_exact_and_an_untrusted_certificate_is_a_tls_failover() {
    let dir = scratch_dir("relay_https");
    let ca = Ca::new(&dir);
    ca.issue(1);
    let origin = TestServer::start_tls(|c| {
        ca.serve_with(c);
        c.defaults.max_write_delay_ms = 0;
    });
    let feeder = Feeder::start(vec![Source::connect(origin.addr, "/live")]);
    let https = format!("https://localhost:{}/live", origin.tls.unwrap().port());
    let bad = BadUpstream::start();
    let quick = |c: &mut Config| {
        c.source_timeout_secs = 2;
        c.defaults.max_write_delay_ms = 0;
    };
    // Trusting the test's CA: straight to the TLS port, and through an http redirect to it.
    let trusting = TestServer::start(|c| {
        quick(c);
        c.startup.relay_ca_file = Some(ca.path());
        c.startup.relays = vec![
            relay("/live", std::slice::from_ref(&https)),
            relay(
                "/redirected",
                &[url(bad.addr, &format!("/redirect?{https}"))],
            ),
        ];
    });
    // Trusting the system's roots only: the test CA's certificate is refused, counted as `tls`,
    // and the relay goes on to its plain http upstream.
    let plain = url(origin.addr, "/live");
    let untrusting = TestServer::start(|c| {
        quick(c);
        c.startup.relays = vec![relay("/live", &[https.clone(), plain.clone()])];
    });
    trusting.wait_metric("fanstream_relay_up", &["mount=\"/live\""], |v| v == 1.0);
    assert_eq!(relay_upstream(&trusting, "/live"), https);
    trusting.wait_metric("fanstream_relay_up", &["mount=\"/redirected\""], |v| {
        v == 1.0
    });
    untrusting.wait_metric("fanstream_relay_up", &["mount=\"/live\""], |v| v == 1.0);
    assert_eq!(relay_upstream(&untrusting, "/live"), plain);
    assert!(
        failovers(&untrusting, "/live", "tls") >= 1.0,
        "{}",
        untrusting.metrics()
    );
    assert_eq!(
        untrusting.metric("fanstream_relay_failovers_total", &["mount=\"/live\""]),
        failovers(&untrusting, "/live", "tls"),
        "the refused certificate is counted as tls only"
    );
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let checks: Vec<_> = [
        (&trusting, "/live"),
        (&trusting, "/redirected"),
        (&untrusting, "/live"),
    ]
    .into_iter()
    .map(|(server, mount)| {
        let listener = Listener::connect(server.addr, mount);
        let (last, who) = (last.clone(), format!("listener of {mount}"));
        std::thread::spawn(move || listener.check_until(&last, &who))
    })
    .collect();
    let until = feeder.sent() + 2 * RATE;
    wait_until("the encoder to send 2 s more", || feeder.sent() >= until);
    last.store(feeder.sent(), Ordering::SeqCst);
    for (i, check) in checks.into_iter().enumerate() {
        let check = check.join().unwrap();
        assert_eq!(
            check.mismatches, 0,
            "listener {i}: bytes differ from the stream"
        );
        assert!(
            check.next >= Some(last.load(Ordering::SeqCst)) && check.bytes > RATE,
            "listener {i} got {} bytes, up to {:?}",
            check.bytes,
            check.next
        );
    }
    assert_eq!(failovers(&trusting, "/live", "tls"), 0.0);
    let (_, request) = bad.requests(&format!("/redirect?{https}"));
    assert!(request.starts_with("GET /redirect?https://"), "{request}");
}

#[test]
fn a_reload_adds_removes_and_restarts_relays_and_leaves_the_others_streaming() {
    let origin = TestServer::start(|_| {});
    let feeder = Feeder::start(
        ["/a", "/b", "/c"]
            .iter()
            .map(|m| Source::connect(origin.addr, m))
            .collect(),
    );
    let (a, b, c) = (
        url(origin.addr, "/a"),
        url(origin.addr, "/b"),
        url(origin.addr, "/c"),
    );
    let before = vec![
        relay("/a", std::slice::from_ref(&a)),
        relay("/b", std::slice::from_ref(&b)),
        relay("/d", std::slice::from_ref(&a)),
    ];
    let after = vec![
        relay("/a", std::slice::from_ref(&a)),
        relay("/c", std::slice::from_ref(&c)),
        relay("/d", std::slice::from_ref(&c)),
    ];
    let edge_config = |relays: &Vec<RelaySettings>| {
        let mut config = test_config();
        config.defaults.max_write_delay_ms = 0;
        config.startup.relays = relays.clone();
        config
    };
    let edge = TestServer::start(|c| *c = edge_config(&before));
    for mount in ["/a", "/b", "/d"] {
        edge.wait_metric(
            "fanstream_relay_up",
            &[&format!("mount=\"{mount}\"")],
            |v| v == 1.0,
        );
    }
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let kept = {
        let (listener, last) = (Listener::connect(edge.addr, "/a"), last.clone());
        std::thread::spawn(move || listener.check_until(&last, "listener of /a"))
    };
    let mut removed = Listener::connect(edge.addr, "/b");
    removed.read_at_least(1000);

    // A CA file that does not load refuses the whole reload: nothing changes.
    let mut bad = edge_config(&after);
    bad.startup.relay_ca_file = Some("/nonexistent/ca.pem".into());
    let e = edge.server.as_ref().unwrap().reload(bad).unwrap_err();
    assert!(e.contains("relay_ca_file /nonexistent/ca.pem"), "{e}");
    assert_eq!(
        relay_up(&edge, "/b", &b),
        1.0,
        "the refused reload stopped nothing"
    );
    edge.server
        .as_ref()
        .unwrap()
        .reload(edge_config(&after))
        .unwrap();
    edge.wait_metric("fanstream_relay_up", &["mount=\"/c\""], |v| v == 1.0);
    wait_until("/d to pull from its new upstream", || {
        relay_up(&edge, "/d", &c) == 1.0
    });
    wait_until("/b's relay to stop", || relay_up(&edge, "/b", &b) == 0.0);
    // /b's listener waits the grace period (1 s here), then the mount closes.
    removed.read_to_end();
    let until = feeder.sent() + 2 * RATE;
    wait_until("the encoder to send 2 s more", || feeder.sent() >= until);
    last.store(feeder.sent(), Ordering::SeqCst);
    let check = kept.join().unwrap();
    assert_eq!(check.mismatches, 0, "/a's listener got every byte in order");
    assert!(check.next >= Some(last.load(Ordering::SeqCst)));
    let connects = |mount: &str| {
        edge.metric(
            "fanstream_relay_connects_total",
            &[&format!("mount=\"{mount}\"")],
        )
    };
    assert_eq!(connects("/a"), 1.0, "the unchanged relay was not restarted");
    assert_eq!(connects("/d"), 2.0, "the changed relay connected again");
    assert_eq!(relay_up(&edge, "/d", &a), 0.0);
    assert_eq!(
        edge.metric("fanstream_relay_failovers_total", &[]),
        0.0,
        "no relay failed on the way: {}",
        edge.metrics()
    );
    assert!(
        !status_mounts(&edge).contains(&"/b".to_string()),
        "/b closed"
    );
}

/// An operator reading the edge's log sees where a relayed source comes from, as an encoder's
/// address is named: `source connected` with `source=relay URL`, the upstream's URL without
/// credentials.
#[test]
fn the_edges_log_names_the_upstream_of_a_relayed_source() {
    let origin = TestServer::start(|c| declare(c, "/live"));
    let _feeder = Feeder::start(vec![Source::connect(origin.addr, "/live")]);
    let dir = scratch_dir("relay_log");
    let toml = format!(
        "[[relays]]\nmount = \"/relayed\"\nupstreams = [\"http://relay:{PASSWORD}@{}/live\"]\n",
        origin.addr
    );
    let mut edge = fanstream(&dir, &toml);
    let upstream = format!("source=relay http://{}/live", origin.addr);
    let line = edge
        .program
        .wait_line("the relayed source's line", DEADLINE, |l| {
            l.contains("source connected") && l.contains("mount=/relayed")
        });
    assert!(line.contains(&upstream), "{line}");
    assert!(!line.contains(PASSWORD), "credentials logged: {line}");
}
