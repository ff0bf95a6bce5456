//! Hostile and broken clients, limits and faults: each is refused or dropped with its own status
//! or reason and counter, and healthy listeners on the same mount stay byte-exact throughout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use common::*;

const LIVE: &str = "mount=\"/live\"";

/// A healthy listener reading in the background; its capture is checked at the end.
struct Healthy(thread::JoinHandle<Vec<u8>>);

impl Healthy {
    fn join(srv: &TestServer, mount: &'static str) -> Healthy {
        let addr = srv.addr;
        Healthy(thread::spawn(move || {
            let mut l = Listener::connect(addr, mount);
            l.read_to_end();
            l.body
        }))
    }

    /// Ends with the stream: the server must be stopped (or the mount closed) first.
    fn assert_exact(self, end: u64) {
        assert_exact_suffix(&self.0.join().unwrap(), end, "healthy listener");
    }
}

fn live_source(srv: &TestServer, bytes: u64) -> Source {
    let mut s = Source::connect(srv.addr, "/live");
    s.send_pattern(0, bytes, 1000, Duration::ZERO);
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == bytes as f64
    });
    s
}

fn put(mount: &str, pw: &str, extra: &str) -> String {
    format!(
        "PUT {mount} HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n{extra}\r\n",
        basic("source", pw)
    )
}

#[test]
fn a_source_that_stops_sending_is_dropped_and_listeners_wait_for_it() {
    let srv = TestServer::start(|c| {
        c.source_timeout_secs = 1;
        c.defaults.source_grace_secs = 30;
    });
    let mut source = live_source(&srv, 5000);
    let healthy = Healthy::join(&srv, "/live");
    srv.wait_metric(
        "fanstream_source_disconnects_total",
        &["reason=\"source_timeout\""],
        |v| v == 1.0,
    );
    assert_eq!(
        srv.server.as_ref().unwrap().listeners(),
        1,
        "listeners stay for the grace period"
    );
    // The stalled encoder's connection was closed.
    let mut buf = [0u8; 64];
    let n = source.stream.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    let mut srv = srv;
    srv.stop(fanstream::Stop::Drain);
    healthy.assert_exact(5000);
}

#[test]
fn conflicting_or_unsupported_body_framing_is_refused() {
    let srv = TestServer::start(|_| {});
    let raw = put(
        "/live",
        PASSWORD,
        "Transfer-Encoding: chunked\r\nContent-Length: 10\r\n",
    );
    assert_eq!(request(srv.addr, raw.as_bytes()).0, 400);
    let raw = put("/live", PASSWORD, "Transfer-Encoding: gzip\r\n");
    assert_eq!(request(srv.addr, raw.as_bytes()).0, 501);
    // RFC 9112 §6.3: a proxy in front could have framed the body by the other length.
    let raw = put(
        "/live",
        PASSWORD,
        "Content-Length: 5\r\nContent-Length: 7\r\n",
    );
    let (status, _, body) = request(srv.addr, raw.as_bytes());
    assert_eq!(status, 400);
    assert_eq!(body, b"400 Bad Request: conflicting length\n");
    let raw = "GET /live HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n";
    assert_eq!(request(srv.addr, raw.as_bytes()).0, 400);
    assert_eq!(
        srv.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"conflicting_length\""]
        ),
        3.0
    );
}

#[test]
fn an_absurd_chunk_size_ends_the_source_and_keeps_its_listeners() {
    let srv = TestServer::start(|c| c.defaults.source_grace_secs = 30);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(put("/live", PASSWORD, "Transfer-Encoding: chunked\r\n").as_bytes())
        .unwrap();
    read_head(&mut s);
    let data = pattern(0, 3000);
    s.write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .unwrap();
    s.write_all(&data).unwrap();
    s.write_all(b"\r\n").unwrap();
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == 3000.0
    });
    let healthy = Healthy::join(&srv, "/live");
    wait_until("the listener", || {
        srv.server.as_ref().unwrap().listeners() == 1
    });
    s.write_all(b"FFFFFFFFFFFF\r\n").unwrap();
    srv.wait_metric(
        "fanstream_source_disconnects_total",
        &["reason=\"chunk_too_large\""],
        |v| v == 1.0,
    );
    assert_eq!(srv.server.as_ref().unwrap().listeners(), 1);
    let mut srv = srv;
    srv.stop(fanstream::Stop::Drain);
    healthy.assert_exact(3000);
}

#[test]
fn sources_over_max_sources_get_503() {
    let srv = TestServer::start(|c| c.max_sources = 2);
    let _a = Source::connect(srv.addr, "/a");
    let _b = Source::connect(srv.addr, "/b");
    let (status, _, body) = request(srv.addr, put("/c", PASSWORD, "").as_bytes());
    assert_eq!(status, 503);
    // It names the setting to raise.
    assert!(
        String::from_utf8_lossy(&body).contains("too many sources (raise max_sources)"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}

#[test]
fn max_sources_defaults_to_a_share_of_the_open_file_limit() {
    let config = fanstream::Config::default();
    assert_eq!(config.max_sources, 0, "derived unless set");
    let open_files = fanstream::open_files::soft_limit().expect("the process's limit") as usize;
    assert_eq!(config.source_limit(), (open_files / 100).max(100));
    assert!(config.source_limit() >= 100);
}

#[test]
fn repeated_password_failures_are_slowed_down_with_429_and_no_password_leaks() {
    let srv = TestServer::start(|c| c.auth_max_failures = 3);
    for _ in 0..3 {
        assert_eq!(
            request(srv.addr, put("/live", "guess-123", "").as_bytes()).0,
            401
        );
    }
    // Now even the right password waits for the window to end.
    let (status, head, _) = request(srv.addr, put("/live", PASSWORD, "").as_bytes());
    assert_eq!(status, 429);
    assert!(head.contains("Retry-After: "), "{head}");
    assert_eq!(
        srv.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"auth_rate_limited\""]
        ),
        1.0
    );
    assert_eq!(
        srv.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"bad_credentials\""]
        ),
        3.0
    );
    let metrics = srv.metrics();
    assert!(!metrics.contains(PASSWORD) && !metrics.contains("guess-123"));
}

#[test]
fn the_global_listener_limit_is_503_with_retry_after() {
    let srv = TestServer::start(|c| c.max_listeners = 2);
    let mut source = live_source(&srv, 1000);
    let healthy = Healthy::join(&srv, "/live");
    let _second = Listener::connect(srv.addr, "/live");
    wait_until("two listeners", || {
        srv.server.as_ref().unwrap().listeners() == 2
    });
    let (status, head, _) = request(srv.addr, b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 503);
    assert!(head.contains("Retry-After: 10"), "{head}");
    assert_eq!(
        srv.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"server_full\""]
        ),
        1.0
    );
    source.send_pattern(1000, 2000, 500, Duration::ZERO);
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == 2000.0
    });
    let mut srv = srv;
    srv.stop(fanstream::Stop::Drain);
    healthy.assert_exact(2000);
}

#[test]
fn connections_over_the_per_address_limit_get_429() {
    let srv = TestServer::start(|c| c.max_connections_per_ip = 3);
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(srv.addr).unwrap())
        .collect();
    let (status, _, _) = request(srv.addr, b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 429);
    drop(idle);
    // Room again once they close.
    wait_until("the per-address count to fall", || {
        request(srv.addr, b"GET /live HTTP/1.0\r\n\r\n").0 == 404
    });
}

#[test]
fn when_every_worker_is_full_the_acceptor_waits_for_room() {
    let srv = TestServer::start(|c| c.startup.max_connections = 4);
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(srv.addr).unwrap())
        .collect();
    // Connects (the kernel backlog holds it) but is not served while the workers are full.
    let mut waiting = TcpStream::connect(srv.addr).unwrap();
    waiting.set_read_timeout(Some(DEADLINE)).unwrap();
    waiting.write_all(b"GET /nothing HTTP/1.0\r\n\r\n").unwrap();
    srv.wait_metric(
        "fanstream_rejected_requests_total",
        &["reason=\"workers_full\""],
        |v| v >= 1.0,
    );
    idle.pop();
    let mut answer = Vec::new();
    waiting.read_to_end(&mut answer).unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.0 404"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn a_listener_that_resets_is_removed_promptly_and_counted() {
    let srv = TestServer::start(|c| c.defaults.max_write_delay_ms = 0);
    let mut source = live_source(&srv, 1000);
    let healthy = Healthy::join(&srv, "/live");
    let gone = Listener::connect(srv.addr, "/live");
    wait_until("two listeners", || {
        srv.server.as_ref().unwrap().listeners() == 2
    });
    socket2::SockRef::from(&gone.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(gone); // RST
    let mut sent = 1000;
    while srv.metric(
        "fanstream_listener_disconnects_total",
        &["reason=\"client_closed\""],
    ) < 1.0
    {
        source.send_pattern(sent, sent + 100, 100, Duration::from_millis(5));
        sent += 100;
        assert!(sent < 10_000_000);
    }
    assert_eq!(srv.server.as_ref().unwrap().listeners(), 1);
    let mut srv = srv;
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == sent as f64
    });
    srv.stop(fanstream::Stop::Drain);
    healthy.assert_exact(sent);
}

#[test]
fn a_listener_that_accepts_nothing_for_send_timeout_is_dropped() {
    let srv = TestServer::start(|c| {
        c.send_timeout_secs = 1;
        c.defaults.max_lag_bytes = 1 << 30;
    });
    let mut source = live_source(&srv, 1000);
    let healthy = Healthy::join(&srv, "/live");
    let stalled = Listener::connect_small_buffer(srv.addr, "/live");
    wait_until("two listeners", || {
        srv.server.as_ref().unwrap().listeners() == 2
    });
    let mut sent = 1000;
    while srv.metric(
        "fanstream_listener_disconnects_total",
        &["reason=\"send_timeout\""],
    ) < 1.0
    {
        source.send_pattern(sent, sent + 32 * 1024, 4096, Duration::from_millis(2));
        sent += 32 * 1024;
        assert!(sent < 500_000_000, "stalled listener never timed out");
    }
    drop(stalled);
    let mut srv = srv;
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == sent as f64
    });
    srv.stop(fanstream::Stop::Drain);
    healthy.assert_exact(sent);
}

#[test]
fn a_panic_costs_one_connection_not_the_worker() {
    let srv = TestServer::start(|c| {
        c.startup.workers = 1; // everything on the worker that panics
        c.panic_injection_mount = Some("/boom".into());
    });
    let mut source = live_source(&srv, 1000);
    let healthy = Healthy::join(&srv, "/live");
    wait_until("the healthy listener", || {
        srv.server.as_ref().unwrap().listeners() == 1
    });

    // A request whose handling panics: the connection closes without an answer.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /boom/panic HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(answer.is_empty());
    srv.wait_metric("fanstream_panics_total", &["where=\"request\""], |v| {
        v == 1.0
    });

    // A listener whose serving panics is dropped alone.
    let mut boom = Source::connect(srv.addr, "/boom");
    boom.send(&[0u8; 100]);
    let mut victim = TcpStream::connect(srv.addr).unwrap();
    victim.set_read_timeout(Some(DEADLINE)).unwrap();
    victim.write_all(b"GET /boom HTTP/1.0\r\n\r\n").unwrap();
    srv.wait_metric(
        "fanstream_listener_disconnects_total",
        &["reason=\"panic\""],
        |v| v == 1.0,
    );
    assert!(srv.metric("fanstream_panics_total", &["where=\"listener\""]) >= 1.0);

    // The worker goes on serving everyone else.
    source.send_pattern(1000, 50_000, 1000, Duration::ZERO);
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == 50_000.0
    });
    assert_eq!(request(srv.addr, b"GET /nothing HTTP/1.0\r\n\r\n").0, 404);
    let mut srv = srv;
    srv.stop(fanstream::Stop::Drain);
    healthy.assert_exact(50_000);
}

#[test]
fn graceful_stop_under_load_delivers_everything_received_to_listeners_that_kept_up() {
    let srv = TestServer::start(|c| c.defaults.burst_bytes = 0);
    let mut source = live_source(&srv, 0);
    let listeners: Vec<Healthy> = (0..20).map(|_| Healthy::join(&srv, "/live")).collect();
    wait_until("20 listeners", || {
        srv.server.as_ref().unwrap().listeners() == 20
    });
    source.send_pattern(0, 400_000, 4000, Duration::from_millis(1));
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == 400_000.0
    });
    let mut srv = srv;
    srv.stop(fanstream::Stop::Drain);
    for l in listeners {
        let body = l.0.join().unwrap();
        // Joined with no burst before any byte was sent: every byte, from the first.
        assert_eq!(body.len(), 400_000);
        assert_exact_suffix(&body, 400_000, "listener");
    }
}

#[test]
fn odd_paths_and_oversized_heads_are_refused_while_listeners_stay_byte_exact() {
    let srv = TestServer::start(|_| {});
    let mut source = live_source(&srv, 1000);
    let healthy = Healthy::join(&srv, "/live");
    wait_until("the healthy listener", || {
        srv.server.as_ref().unwrap().listeners() == 1
    });
    let long_name = format!("GET /{} HTTP/1.0\r\n\r\n", "a".repeat(300));
    let many_headers = format!(
        "GET /live HTTP/1.0\r\n{}\r\n",
        (0..65).map(|i| format!("X-{i}: y\r\n")).collect::<String>()
    );
    let huge_header = format!("GET /live HTTP/1.0\r\nCookie: {}\r\n\r\n", "c".repeat(9000));
    let cases: [(&[u8], u16, &str); 10] = [
        // Escapes are decoded (`/li%76e` is `/live`, as on Icecast), then checked as any path.
        (b"GET /live/%2e%2e HTTP/1.0\r\n\r\n", 400, "bad_path"),
        (b"GET /live%00 HTTP/1.0\r\n\r\n", 400, "bad_path"),
        (b"GET /./live HTTP/1.0\r\n\r\n", 400, "bad_path"),
        (b"GET //live HTTP/1.0\r\n\r\n", 400, "bad_path"),
        (b"GET /live/.. HTTP/1.0\r\n\r\n", 400, "bad_path"),
        (long_name.as_bytes(), 400, "bad_path"),
        (b"GET /live\0 HTTP/1.0\r\n\r\n", 400, "malformed_request"),
        (
            b"GET /other?x=/etc/passwd HTTP/1.0\r\n\r\n",
            404,
            "unknown_mount",
        ),
        (many_headers.as_bytes(), 431, "headers_too_large"),
        (huge_header.as_bytes(), 431, "headers_too_large"),
    ];
    for (raw, status, reason) in cases {
        let before = srv.metric(
            "fanstream_rejected_requests_total",
            &[&format!("reason=\"{reason}\"")],
        );
        let (got, _, body) = request(srv.addr, raw);
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned();
        assert_eq!(got, status, "{shown:?}");
        // The body says why, in words.
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(
            body.contains(&reason.replace('_', " ")),
            "{shown:?}: {body}"
        );
        let after = srv.metric(
            "fanstream_rejected_requests_total",
            &[&format!("reason=\"{reason}\"")],
        );
        assert_eq!(after, before + 1.0, "{shown:?} counted as {reason}");
    }
    // A query string is ignored: it neither changes the mount nor reaches anything else.
    let mut with_query = Listener::connect(srv.addr, "/live?type=.mp3&nocache=1");
    source.send_pattern(1000, 40_000, 1000, Duration::ZERO);
    let mut srv = srv;
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == 40_000.0
    });
    srv.stop(fanstream::Stop::Drain);
    with_query.read_to_end();
    assert_exact_suffix(&with_query.body, 40_000, "listener with a query string");
    healthy.assert_exact(40_000);
}

#[test]
fn a_listener_that_half_closes_after_its_request_keeps_receiving_the_stream() {
    let srv = TestServer::start(|c| c.defaults.max_write_delay_ms = 0);
    let mut source = live_source(&srv, 1000);
    // Some HTTP/1.0 clients shut down their sending side once the request is out; they are
    // still listening, and must get the whole stream.
    let mut half = Listener::connect(srv.addr, "/live");
    half.stream.shutdown(std::net::Shutdown::Write).unwrap();
    wait_until("the listener", || {
        srv.server.as_ref().unwrap().listeners() == 1
    });
    // It reads as it goes, like a player: what a listener that reads nothing can hold is up to
    // the kernel's buffers, not the server.
    let reader = std::thread::spawn(move || {
        half.read_to_end();
        half
    });
    source.send_pattern(1000, 100_000, 1000, Duration::ZERO);
    let mut srv = srv;
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == 100_000.0
    });
    assert_eq!(srv.server.as_ref().unwrap().listeners(), 1);
    srv.stop(fanstream::Stop::Drain);
    let half = reader.join().expect("the reading thread");
    assert_exact_suffix(&half.body, 100_000, "half-closed listener");
}

#[test]
fn with_an_admin_password_the_admin_listener_asks_for_it_and_slows_down_guessing() {
    let srv = TestServer::start(|c| {
        c.admin_password = Some("admin-secret".into());
        c.auth_max_failures = 3;
    });
    let scrape = |auth: Option<(&str, &str)>| {
        let header = auth.map_or(String::new(), |(u, p)| {
            format!("Authorization: Basic {}\r\n", basic(u, p))
        });
        request(
            srv.admin,
            format!("GET /metrics HTTP/1.0\r\n{header}\r\n").as_bytes(),
        )
    };
    let (status, head, _) = scrape(None);
    assert_eq!(status, 401);
    assert!(
        head.contains("WWW-Authenticate: Basic realm=\"fanstream admin\""),
        "{head}"
    );
    let (status, _, body) = scrape(Some(("admin", "admin-secret")));
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("fanstream_thread_cpu_seconds_total"),
        "{text}"
    );
    assert!(
        !text.contains("admin-secret"),
        "the password leaked into /metrics"
    );
    // The status pages on the admin port are behind the same password.
    assert_eq!(
        request(srv.admin, b"GET /status-json.xsl HTTP/1.0\r\n\r\n").0,
        401
    );
    for _ in 0..3 {
        assert_eq!(scrape(Some(("admin", "guess"))).0, 401);
    }
    // Past auth_max_failures, even the right password waits for the window to end.
    let (status, head, _) = scrape(Some(("admin", "admin-secret")));
    assert_eq!(status, 429);
    assert!(head.contains("Retry-After: "), "{head}");
    // The public status page stays open, as Icecast's is.
    assert_eq!(
        request(srv.addr, b"GET /status-json.xsl HTTP/1.0\r\n\r\n").0,
        200
    );
}

#[test]
fn a_worker_busy_round_after_round_still_answers_newcomers_and_unparks_listeners() {
    // Every round the worker serves takes 30 ms, and its source publishes every 2 ms: the next
    // round is always due before the last ends, as on a saturated core. Its loop must still let
    // the worker's request tasks answer newcomers, and hear that parked listeners' sockets drained.
    let srv = TestServer::start(|c| {
        c.startup.workers = 1;
        c.defaults.min_write_bytes = 1;
        c.defaults.max_write_delay_ms = 0;
        c.pass_delay_injection_ms = 30;
        // A listener that stalls parks soon, and one left parked goes in 5 s.
        c.listener_send_buffer_bytes = 4096;
        c.send_timeout_secs = 5;
    });
    let source = live_source(&srv, 1000);
    // A listener of the mount, so that each publication wakes the worker.
    let first = Healthy::join(&srv, "/live");
    wait_until("the first listener", || {
        srv.server.as_ref().unwrap().listeners() == 1
    });
    let writing = source.keep_writing(1000, 100, Duration::from_millis(2));

    // Newcomers get their response head and their stream.
    for _ in 0..3 {
        let mut newcomer = Listener::connect(srv.addr, "/live");
        newcomer.read_at_least(1000);
        assert_eq!(exact_runs(&newcomer.body).len(), 1, "a newcomer lost bytes");
    }
    // A listener that stalls fills its socket and is parked; reading again, it drains it, and
    // the worker writes it the rest, though it never waits for anything.
    let mut stalled = Listener::connect_small_buffer(srv.addr, "/live");
    // Both sockets' buffers together hold far less than this.
    let sent = srv.metric("fanstream_source_received_bytes_total", &[LIVE]);
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v >= sent + 60_000.0
    });
    stalled.read_at_least(60_000);
    assert_eq!(
        exact_runs(&stalled.body).len(),
        1,
        "the stalled listener lost bytes"
    );

    let end = writing.stop();
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == end as f64
    });
    let mut srv = srv;
    srv.stop(fanstream::Stop::Drain);
    first.assert_exact(end);
}

#[test]
fn a_listener_on_its_way_to_the_fan_out_when_a_graceful_stop_comes_gets_its_stream() {
    // Its hand-off to the fan-out is held back 1 s, as on a busy worker; the stop comes in
    // that gap, after its response head.
    let srv = TestServer::start(|c| c.join_delay_injection_ms = 1000);
    let mut source = Source::connect_typed(srv.addr, "/live", "application/octet-stream");
    source.send_pattern(0, 10_000, 1000, Duration::ZERO);
    srv.wait_metric("fanstream_source_received_bytes_total", &[LIVE], |v| {
        v == 10_000.0
    });
    let mut newcomer = Listener::connect(srv.addr, "/live");
    let mut srv = srv;
    srv.stop(fanstream::Stop::Drain);
    newcomer.read_to_end();
    // The burst (all of the stream so far), then the end.
    assert_exact_suffix(&newcomer.body, 10_000, "the newcomer");
}
