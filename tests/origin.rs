//! The origin's side of a tree: edges' relays (the relay credentials) pass the listener limits,
//! count as relays rather than audience and are skipped, never dropped, by the lag policy;
//! edges register for spill-over, and a full mount sends new listeners to them (`302`), which
//! `curl -L` follows to a stream; registrations need the relay credentials, and a silent edge
//! is forgotten.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::certs::Ca;
use common::process::{require, scratch_dir, ChildGuard};
use common::*;
use fanstream::config::{Config, MasterSettings};
use fanstream::Stop;

const RELAY_PW: &str = "relay-secret";

/// The test pattern written to a source in pieces, at about 100 kB/s (or as fast as it is
/// taken with `fast`), until dropped.
struct Feed {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Feed {
    fn start(mut source: Source, fast: bool) -> Feed {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (st, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let piece = 1000;
            while !st.load(Ordering::SeqCst) {
                let at = n.load(Ordering::SeqCst);
                // The server went away: so does the feed.
                if source.stream.write_all(&pattern(at, piece)).is_err() {
                    return;
                }
                n.fetch_add(piece as u64, Ordering::SeqCst);
                if !fast {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Feed {
            stop,
            sent,
            thread: Some(thread),
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `curl` streaming `url` to a pipe (with `args` before it), bounded in time; the guard kills it.
fn curl_stream(args: &[&str], url: &str) -> (ChildGuard, ChildStdout) {
    require("curl");
    let mut guard = ChildGuard::spawn(
        "curl",
        Command::new("curl")
            .args(["-sS", "-N", "--max-time", "30"])
            .args(args)
            .arg(url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let out = guard.child.as_mut().unwrap().stdout.take().unwrap();
    (guard, out)
}

/// Reads `n` bytes of what curl streams; panics if it ends first.
fn read_n(out: &mut ChildStdout, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    out.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("curl's stream ended before {n} bytes: {e}"));
    buf
}

/// The HTTP status curl got for `url` (a short answer: no stream), with `args`.
fn curl_status(args: &[&str], url: &str) -> u16 {
    require("curl");
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `/status.json`, from the admin port: the listener port may be at its per-address limit.
fn status_json(server: &TestServer) -> serde_json::Value {
    let (_, _, body) = request(server.admin, b"GET /status.json HTTP/1.0\r\n\r\n");
    serde_json::from_slice(&body).unwrap()
}

fn mount_field(server: &TestServer, mount: &str, field: &str) -> u64 {
    status_json(server)["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mount"] == mount)
        .unwrap_or_else(|| panic!("{mount} is not in /status.json"))[field]
        .as_u64()
        .unwrap()
}

fn edge_urls(server: &TestServer) -> Vec<String> {
    status_json(server)["edges"]
        .as_array()
        .map(|edges| {
            edges
                .iter()
                .map(|e| e["url"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn relay_credentials_pass_the_limits_and_count_as_relays_not_listeners() {
    let origin = TestServer::start(|c| {
        c.relay_password = Some(RELAY_PW.into());
        c.max_connections_per_ip = 1;
        c.defaults.max_listeners = 1;
    });
    let _feed = Feed::start(Source::connect(origin.addr, "/live"), false);
    let url = format!("http://{}/live", origin.addr);
    let relay_user = format!("relay:{RELAY_PW}");
    // The mount list is the relay's to read, not anyone's.
    let list = format!("http://{}/admin/streamlist.txt", origin.addr);
    wait_until("the list to name /live", || {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "-u", &relay_user, &list])
            .output()
            .unwrap();
        out.status.success() && String::from_utf8_lossy(&out.stdout) == "/live\n"
    });
    assert_eq!(curl_status(&[], &list), 401);
    assert_eq!(curl_status(&["-u", "relay:wrong"], &list), 401);

    // The audience's one place, on the address's one connection: once the server has seen the
    // curl requests above close (a closed curl can still count for a moment), it is admitted.
    let mut audience = None;
    wait_until(
        "the address's one connection admitted as a listener",
        || {
            let mut s = TcpStream::connect(origin.addr).unwrap();
            s.write_all(b"GET /live HTTP/1.0\r\n\r\n").unwrap();
            let admitted = read_head(&mut s).starts_with("HTTP/1.0 200");
            if admitted {
                audience = Some(s);
            }
            admitted
        },
    );
    assert_eq!(
        curl_status(&[], &url),
        429,
        "the address holds its one connection"
    );

    // Three relays from the same address, past both limits.
    let mut relays: Vec<_> = (0..3)
        .map(|_| curl_stream(&["-u", &relay_user], &url))
        .collect();
    for (_, out) in &mut relays {
        let bytes = read_n(out, 4000);
        assert!(locate(&bytes).is_some(), "a relay gets the stream");
    }
    origin.wait_metric("fanstream_relays", &["mount=\"/live\""], |v| v == 3.0);
    assert_eq!(
        origin.metric("fanstream_listeners", &["mount=\"/live\""]),
        1.0
    );
    assert_eq!(mount_field(&origin, "/live", "relays"), 3);
    assert_eq!(mount_field(&origin, "/live", "listeners"), 1);
    let (_, _, body) = request(origin.admin, b"GET /status-json.xsl HTTP/1.0\r\n\r\n");
    let ice: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ice["icestats"]["source"]["relays"], 3);
    assert_eq!(ice["icestats"]["source"]["listeners"], 1);
    // The admin API lists them among the mount's clients, marked (on the admin port, open
    // without an admin password).
    let raw = b"GET /admin/listclients?mount=/live&format=json HTTP/1.0\r\n\r\n";
    let (status, _, body) = request(origin.admin, raw);
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.matches("\"relay\"").count(), 3, "{text}");

    // A wrong relay password is refused as the admin's is, with the relay's challenge.
    let raw = format!(
        "GET /live HTTP/1.0\r\nAuthorization: Basic {}\r\n\r\n",
        basic("relay", "wrong")
    );
    let (status, head, _) = request(origin.addr, raw.as_bytes());
    assert_eq!(status, 401);
    assert!(head.contains("realm=\"fanstream relay\""), "{head}");

    // The relays did not take the address's place: a listener is still refused for it.
    assert_eq!(curl_status(&[], &url), 429);

    drop(relays);
    origin.wait_metric("fanstream_relays", &["mount=\"/live\""], |v| v == 0.0);
    assert_eq!(mount_field(&origin, "/live", "listeners"), 1);
}

#[test]
fn a_slow_relay_is_skipped_where_a_slow_listener_is_dropped() {
    let origin = TestServer::start(|c| {
        c.relay_password = Some(RELAY_PW.into());
        c.listener_send_buffer_bytes = 4096;
        c.defaults.burst_bytes = 4096;
        c.defaults.max_lag_bytes = 16384;
        c.defaults.min_write_bytes = 4096;
        c.defaults.max_write_delay_ms = 0;
        declare(c, "/live");
    });
    let source = Source::connect(origin.addr, "/live");
    // Two connections that read nothing, with tiny receive buffers: a listener and a relay.
    let small = || {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&origin.addr.into()).unwrap();
        let s: TcpStream = sock.into();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    };
    let _listener = Listener::connect_small_buffer(origin.addr, "/live");
    let mut relay = small();
    std::io::Write::write_all(
        &mut relay,
        format!(
            "GET /live HTTP/1.0\r\nAuthorization: Basic {}\r\n\r\n",
            basic("relay", RELAY_PW)
        )
        .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut relay);
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    let feed = Feed::start(source, true);
    origin.wait_metric(
        "fanstream_listener_disconnects_total",
        &["mount=\"/live\"", "reason=\"slow\""],
        |v| v == 1.0,
    );
    origin.wait_metric(
        "fanstream_listener_skips_total",
        &["mount=\"/live\""],
        |v| v >= 1.0,
    );
    assert_eq!(
        origin.metric("fanstream_relays", &["mount=\"/live\""]),
        1.0,
        "the relay stays"
    );
    // It goes on receiving the stream, well past what its buffers held when it stalled.
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got < 1 << 20 {
        match common::read_some(&mut relay, &mut buf) {
            Ok(0) => panic!("the relay was closed after {got} bytes"),
            Ok(n) => got += n,
            Err(e) => panic!("the relay's read failed after {got} bytes: {e}"),
        }
    }
    assert!(feed.sent.load(Ordering::SeqCst) > 1 << 20);
}

/// An edge of `origin` that registers for spill-over every second, pulling on demand.
fn registered_edge(origin: SocketAddr) -> (TestServer, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let public_url = format!("http://{}", listener.local_addr().unwrap());
    let edge = TestServer::start_on_listener(listener, |c| {
        c.startup.master = Some(edge_master(&format!("http://{origin}"), &public_url, true));
    });
    (edge, public_url)
}

/// An edge's `[master]`: the origin at `url`, registering (or not) every second as `public_url`,
/// pulling on demand.
fn edge_master(url: &str, public_url: &str, register: bool) -> MasterSettings {
    MasterSettings {
        url: url.into(),
        user: None,
        password: Some(RELAY_PW.into()),
        interval_secs: 1,
        on_demand: true,
        register,
        public_url: Some(public_url.into()),
    }
}

#[test]
fn listeners_past_a_full_mount_are_redirected_to_registered_edges_and_stream_there() {
    let origin = TestServer::start(|c| {
        c.relay_password = Some(RELAY_PW.into());
        c.defaults.max_listeners = 10;
        declare(c, "/live");
    });
    let _feed = Feed::start(Source::connect(origin.addr, "/live"), false);
    let edges: Vec<_> = (0..2).map(|_| registered_edge(origin.addr)).collect();
    wait_until("both edges to register", || edge_urls(&origin).len() == 2);
    for (edge, _) in &edges {
        assert_eq!(edge.metric("fanstream_edge_registered", &[]), 1.0);
    }
    let _ten: Vec<_> = (0..10)
        .map(|_| Listener::connect(origin.addr, "/live"))
        .collect();

    // Listeners 11 and 12: each redirected, to each edge in turn, and streaming from it.
    let dir = scratch_dir("spill_over");
    let url = format!("http://{}/live", origin.addr);
    let mut followed = Vec::new();
    for i in 0..2 {
        let headers = dir.join(format!("headers-{i}.txt"));
        let (curl, mut out) = curl_stream(&["-L", "-D", headers.to_str().unwrap()], &url);
        let bytes = read_n(&mut out, 8000);
        assert!(
            locate(&bytes).is_some(),
            "listener {} gets the stream through the edge",
            11 + i
        );
        let headers = std::fs::read_to_string(&headers).unwrap();
        assert!(headers.starts_with("HTTP/1.0 302 Found\r\n"), "{headers}");
        let location = headers
            .lines()
            .find_map(|l| l.strip_prefix("Location: "))
            .unwrap_or_else(|| panic!("no Location: {headers}"))
            .to_string();
        assert!(headers.contains("HTTP/1.0 200 OK\r\n"), "{headers}");
        followed.push((curl, out, location));
    }
    let mut locations: Vec<_> = followed.iter().map(|(_, _, l)| l.clone()).collect();
    locations.sort();
    let mut expected: Vec<_> = edges.iter().map(|(_, url)| format!("{url}/live")).collect();
    expected.sort();
    assert_eq!(locations, expected, "one listener to each edge, in turn");
    for (edge, _) in &edges {
        assert_eq!(
            edge.metric("fanstream_listeners", &["mount=\"/live\""]),
            1.0
        );
    }
    assert_eq!(
        origin.metric("fanstream_listener_redirects_total", &["mount=\"/live\""]),
        2.0
    );
    // The edges' relays joined the full mount: relays pass its limit, and are not redirected.
    assert_eq!(origin.metric("fanstream_relays", &["mount=\"/live\""]), 2.0);
    assert_eq!(mount_field(&origin, "/live", "listeners"), 10);
}

#[test]
fn registrations_need_the_relay_credentials_and_a_silent_edge_is_forgotten() {
    let origin = TestServer::start(|c| {
        c.relay_password = Some(RELAY_PW.into());
        c.defaults.max_listeners = 1;
        declare(c, "/live");
    });
    let _feed = Feed::start(Source::connect(origin.addr, "/live"), false);
    let register = |listeners: u32| {
        format!(
            "http://{}/admin/register?url=http%3A%2F%2F127.0.0.1%3A9&listeners={listeners}&max_listeners=10&interval=1",
            origin.addr
        )
    };
    let relay_user = format!("relay:{RELAY_PW}");
    assert_eq!(curl_status(&[], &register(0)), 401);
    assert_eq!(curl_status(&["-u", "relay:wrong"], &register(0)), 401);
    assert_eq!(curl_status(&["-u", "source:x"], &register(0)), 401);
    assert!(edge_urls(&origin).is_empty(), "no edge was taken");
    let bad = format!(
        "http://{}/admin/register?url=ftp%3A%2F%2Fx&listeners=0&max_listeners=1&interval=1",
        origin.addr
    );
    assert_eq!(curl_status(&["-u", &relay_user], &bad), 400);

    // An edge without room is registered but sent no one: the full mount answers 503.
    assert_eq!(curl_status(&["-u", &relay_user], &register(10)), 200);
    assert_eq!(edge_urls(&origin), ["http://127.0.0.1:9"]);
    let _one = Listener::connect(origin.addr, "/live");
    let (status, _, _) = request(origin.addr, b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 503);
    assert_eq!(
        edge_urls(&origin),
        ["http://127.0.0.1:9"],
        "it was registered when the listener came"
    );

    // An edge stopping gracefully (SIGTERM) says at once that it has no room left.
    let (mut leaving, leaving_url) = registered_edge(origin.addr);
    wait_until("the edge to register", || {
        edge_urls(&origin).contains(&leaving_url)
    });
    leaving.stop(Stop::Drain);
    let room = |url: &str| {
        status_json(&origin)["edges"]
            .as_array()
            .and_then(|edges| edges.iter().find(|e| e["url"] == url))
            .map(|e| e["room"].as_u64().unwrap())
    };
    assert_eq!(room(&leaving_url), Some(0), "it said it leaves");
    let (status, _, _) = request(origin.addr, b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 503, "no edge with room");

    // A real edge registers every second; stopped, it falls silent and is forgotten, as the
    // edges above were.
    let (mut edge, public_url) = registered_edge(origin.addr);
    wait_until("the edge to register", || {
        edge_urls(&origin).contains(&public_url)
    });
    edge.stop(Stop::Now);
    let silent = Instant::now();
    wait_until("the origin to forget the stopped edge", || {
        !edge_urls(&origin).contains(&public_url)
    });
    assert!(
        silent.elapsed() >= Duration::from_secs(2),
        "forgotten after three intervals without a word, not at once: {:?}",
        silent.elapsed()
    );
    assert!(edge_urls(&origin).is_empty());
    assert_eq!(origin.metric("fanstream_edges", &[]), 0.0);
    let (status, _, _) = request(origin.addr, b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 503, "no edge left to send it to");
}

#[test]
fn an_edge_registers_with_an_https_origin_it_trusts_and_a_reload_starts_and_stops_registering() {
    let dir = scratch_dir("register_https");
    let ca = Ca::new(&dir);
    ca.issue(1);
    let origin = TestServer::start_tls(|c| {
        ca.serve_with(c);
        c.relay_password = Some(RELAY_PW.into());
        declare(c, "/live");
    });
    let https = format!("https://localhost:{}", origin.tls.unwrap().port());
    let room = |url: &str| {
        status_json(&origin)["edges"]
            .as_array()
            .and_then(|edges| edges.iter().find(|e| e["url"] == url))
            .map(|e| e["room"].as_u64().unwrap())
    };
    let edge_config = |public_url: &str, register: bool, trust: bool| {
        let mut c = test_config();
        c.startup.master = Some(edge_master(&https, public_url, register));
        c.startup.relay_ca_file = trust.then(|| ca.path());
        c
    };
    let start_edge = |register: bool, trust: bool| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let public_url = format!("http://{}", listener.local_addr().unwrap());
        let config = edge_config(&public_url, register, trust);
        (
            TestServer::start_on_listener(listener, |c| *c = config),
            public_url,
        )
    };
    let handshakes_failed = || {
        origin.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"tls_handshake_failed\""],
        )
    };

    // Trusting the test's CA, an edge registers over TLS.
    let (trusting, trusting_url) = start_edge(true, true);
    wait_until("the edge to register over https", || {
        room(&trusting_url).is_some()
    });
    trusting.wait_metric("fanstream_edge_registered", &[], |v| v == 1.0);
    assert_eq!(handshakes_failed(), 0.0);

    // Trusting the system's roots only, its registrations end in the certificate check: the
    // origin sees the handshake fail and lists no such edge.
    let (untrusting, untrusting_url) = start_edge(true, false);
    wait_until("a registration to fail its handshake", || {
        handshakes_failed() >= 1.0
    });
    assert_eq!(room(&untrusting_url), None);
    assert_eq!(untrusting.metric("fanstream_edge_registered", &[]), 0.0);
    // A reload that trusts the CA starts its registration over, and it is taken.
    let reload = |edge: &TestServer, config: Config| edge.server.as_ref().unwrap().reload(config);
    reload(&untrusting, edge_config(&untrusting_url, true, true)).unwrap();
    wait_until("the edge to register after the reload", || {
        room(&untrusting_url).is_some()
    });

    // A reload that turns registration off tells the origin at once that the edge has no room:
    // the origin sends it no one from then on, before it forgets it.
    assert!(room(&trusting_url).unwrap() > 0);
    reload(&trusting, edge_config(&trusting_url, false, true)).unwrap();
    wait_until("the edge to say it has no room", || {
        room(&trusting_url) == Some(0)
    });
    assert_eq!(trusting.metric("fanstream_edge_registered", &[]), 0.0);
    // And one that turns it on again registers with room.
    reload(&trusting, edge_config(&trusting_url, true, true)).unwrap();
    wait_until("the edge to register again with room", || {
        room(&trusting_url).is_some_and(|r| r > 0)
    });
    trusting.wait_metric("fanstream_edge_registered", &[], |v| v == 1.0);
}
