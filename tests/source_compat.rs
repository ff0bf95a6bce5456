//! Older sources: the `SOURCE /m ICE/1.0` request line (old libshout, Icecast 1), and SHOUTcast
//! v1 sources on their own port, each driven by a small client here speaking the protocol byte
//! for byte, streaming to a listener that gets exactly what was sent.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use common::clients::curl_get;
use common::*;

/// Streams the test pattern from `from` over `stream` at 64 KB/s until `stop` or a failed write.
fn stream_pattern(
    mut stream: TcpStream,
    from: u64,
    stop: &Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    let stop = stop.clone();
    thread::spawn(move || {
        let mut at = from;
        let start = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if stream.write_all(&pattern(at, 1000)).is_err() {
                return;
            }
            at += 1000;
            let due = std::time::Duration::from_secs_f64((at - from) as f64 / 64_000.0);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                thread::sleep(wait);
            }
        }
    })
}

/// A listener's capture is the stream, in one piece from its join point.
fn assert_plays(addr: SocketAddr, mount: &str) -> String {
    let mut listener = Listener::connect(addr, mount);
    listener.read_at_least(100_000);
    let runs = exact_runs(&listener.body);
    assert_eq!(runs.len(), 1, "{mount}: one run of the stream: {runs:?}");
    listener.head
}

#[test]
fn a_source_with_the_old_ice_request_line_is_answered_as_icecast_answers_it() {
    let srv = TestServer::start(|_| {});
    // libshout's first probe carries no credentials: 401 with a challenge, as for HTTP/1.0.
    let (status, head, _) = request(srv.addr, b"SOURCE /old ICE/1.0\r\n\r\n");
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("WWW-Authenticate: Basic"), "{head}");

    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = format!(
        "SOURCE /old ICE/1.0\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\nice-name: Old Radio\r\nice-genre: Oldies\r\n\r\n",
        basic("source", PASSWORD)
    );
    s.write_all(head.as_bytes()).unwrap();
    let answer = read_head(&mut s);
    assert_eq!(answer, "HTTP/1.0 200 OK\r\nServer: fanstream\r\n\r\n");
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = stream_pattern(s, 0, &stop);
    let head = assert_plays(srv.addr, "/old");
    assert!(head.contains("icy-name: Old Radio\r\n"), "{head}");
    assert!(head.contains("icy-genre: Oldies\r\n"), "{head}");
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
}

/// Connects to the SHOUTcast port and sends the password line.
fn shoutcast_login(addr: SocketAddr, password: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(format!("{password}\r\n").as_bytes()).unwrap();
    s
}

#[test]
fn a_shoutcast_v1_source_streams_to_shoutcast_mount() {
    let srv = TestServer::start(|c| {
        c.startup.shoutcast_listen = Some("127.0.0.1:0".parse().unwrap());
        c.auth_max_failures = 3;
        c.mounts.insert(
            "/stream".into(),
            fanstream::MountSettings {
                source_password: Some("sc-pass".into()),
                ..c.defaults.clone()
            },
        );
    });
    let port = srv.server.as_ref().unwrap().shoutcast_addr().unwrap();

    // A wrong password: SHOUTcast's answer, then the connection closes.
    let mut s = shoutcast_login(port, "wrong");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"invalid password\r\n");

    // The right one: OK2, then the encoder's icy-* headers and its stream (the first bytes in
    // the same write as the headers, as encoders do).
    let mut s = shoutcast_login(port, "sc-pass");
    let mut ok = [0u8; 20];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK2\r\nicy-caps:11\r\n\r\n");
    let mut first = b"icy-name:Shout Radio\r\nicy-genre:Rock\r\nicy-url:http://shout.example\r\nicy-pub:1\r\nicy-br:128\r\ncontent-type:audio/mpeg\r\n\r\n".to_vec();
    first.extend_from_slice(&pattern(0, 1000));
    s.write_all(&first).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = stream_pattern(s, 1000, &stop);
    // `OK2` comes before the headers that name the stream, so the mount is claimed only after
    // them: wait until ingest has its bytes.
    srv.wait_metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/stream\""],
        |v| v > 0.0,
    );

    let head = assert_plays(srv.addr, "/stream");
    assert!(head.contains("Content-Type: audio/mpeg\r\n"), "{head}");
    for h in [
        "icy-name: Shout Radio",
        "icy-genre: Rock",
        "icy-url: http://shout.example",
        "icy-pub: 1",
        "icy-br: 128",
    ] {
        assert!(head.contains(&format!("{h}\r\n")), "{h}: {head}");
    }
    let (_, _, body) = curl_get(srv.addr, "/status-json.xsl", None, &[]);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["icestats"]["source"]["server_name"], "Shout Radio");
    // SHOUTcast's title update, for the same mount and password.
    let (status, _, _) = curl_get(
        srv.addr,
        "/admin.cgi",
        None,
        &[("mode", "updinfo"), ("pass", "sc-pass"), ("song", "Now")],
    );
    assert_eq!(status, 200);
    wait_until("the title on /stream", || {
        let (_, _, body) = curl_get(srv.addr, "/status-json.xsl", None, &[]);
        body.contains("\"title\":\"Now\"")
    });

    // A second source for the mount, while the first is live, is closed after its OK2.
    let mut second = shoutcast_login(port, "sc-pass");
    second.write_all(b"icy-name:Second\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = second.read_to_end(&mut answer);
    assert_eq!(
        answer, b"OK2\r\nicy-caps:11\r\n\r\n",
        "no HTTP answer for it"
    );
    assert_eq!(
        srv.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"mount_in_use\""]
        ),
        1.0
    );

    // Wrong passwords count towards the address's limit, which then holds even for the right
    // one.
    for _ in 0..3 {
        let mut s = shoutcast_login(port, "guess");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"invalid password\r\n");
    }
    let mut s = shoutcast_login(port, "sc-pass");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    assert_eq!(
        answer, b"invalid password\r\n",
        "blocked after the failures"
    );
    assert!(
        srv.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"auth_rate_limited\""]
        ) >= 1.0
    );

    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
}
