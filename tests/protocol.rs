//! The Icecast source protocol and the listener responses, as real encoders and players use them,
//! with every status code fanstream answers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn put_head(mount: &str, auth: &str, extra: &str) -> String {
    format!("PUT {mount} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Type: audio/mpeg\r\n{extra}\r\n")
}

#[test]
fn listener_response_carries_the_source_headers_and_no_length() {
    let srv = TestServer::start(|_| {});
    let mut source = Source::connect(srv.addr, "/live");
    source.send_pattern(0, 5000, 1000, Duration::ZERO);
    let mut l = Listener::connect(srv.addr, "/live");
    l.read_at_least(5000);
    let head = l.head.to_ascii_lowercase();
    for line in [
        "content-type: audio/mpeg\r\n",
        "cache-control: no-cache",
        "icy-name: test radio\r\n",
        "icy-genre: test\r\n",
        "icy-br: 128\r\n",
    ] {
        assert!(head.contains(line), "missing {line:?} in {head}");
    }
    assert!(!head.contains("content-length"), "{head}");
    assert_exact_suffix(&l.body[..5000], 5000, "listener");
}

#[test]
fn head_answers_the_headers_only() {
    let srv = TestServer::start(|_| {});
    let _source = Source::connect(srv.addr, "/live");
    let (status, head, body) = request(srv.addr, b"HEAD /live HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("Content-Type: audio/mpeg"), "{head}");
    assert!(body.is_empty(), "HEAD returned {} body bytes", body.len());
}

/// A target in absolute form (what a client set up for a proxy sends; RFC 9112 has servers take
/// it) or with escapes (`/%6Cive`, which Icecast decodes) names the mount it spells; an escaped
/// `..` is still a bad path.
#[test]
fn absolute_and_escaped_targets_name_their_mount() {
    let srv = TestServer::start(|_| {});
    let _source = Source::connect(srv.addr, "/live");
    for raw in [
        "HEAD http://radio.test:8000/live HTTP/1.1\r\nHost: radio.test:8000\r\n\r\n",
        "HEAD /%6Cive HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let (status, head, _) = request(srv.addr, raw.as_bytes());
        assert_eq!(status, 200, "{raw}: {head}");
        assert!(head.contains("Content-Type: audio/mpeg"), "{head}");
    }
    let (status, _, body) = request(srv.addr, b"GET /%2e%2e/live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("bad path"));
}

#[test]
fn unknown_and_idle_mounts_are_404() {
    let srv = TestServer::start(|c| c.defaults.source_grace_secs = 30);
    let (status, _, body) = request(srv.addr, b"GET /nothing HTTP/1.0\r\n\r\n");
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("unknown mount"));
    drop(Source::connect(srv.addr, "/live"));
    srv.wait_metric("fanstream_source_up", &["mount=\"/live\""], |v| v == 0.0);
    let (status, _, body) = request(srv.addr, b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("mount idle"));
}

#[test]
fn put_without_content_type_is_400() {
    let srv = TestServer::start(|_| {});
    let raw = format!(
        "PUT /live HTTP/1.1\r\nAuthorization: Basic {}\r\n\r\n",
        basic("source", PASSWORD)
    );
    let (status, _, body) = request(srv.addr, raw.as_bytes());
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("missing content type"));
}

#[test]
fn a_mount_path_not_starting_with_a_slash_is_400() {
    let srv = TestServer::start(|_| {});
    let raw = put_head("live", &basic("source", PASSWORD), "");
    let (status, _, _) = request(srv.addr, raw.as_bytes());
    assert_eq!(status, 400);
}

#[test]
fn bad_or_missing_credentials_are_401_with_a_challenge() {
    let srv = TestServer::start(|_| {});
    for auth in [
        basic("source", "wrong"),
        basic("admin", PASSWORD),
        "!!notbase64".into(),
    ] {
        let (status, head, _) = request(srv.addr, put_head("/live", &auth, "").as_bytes());
        assert_eq!(status, 401, "auth {auth}");
        assert!(head.contains("WWW-Authenticate: Basic realm="), "{head}");
    }
    assert_eq!(srv.metric("fanstream_source_up", &[]), 0.0);
}

#[test]
fn libshout_probe_then_authenticated_source() {
    // libshout first probes without credentials and expects a 401 challenge...
    let srv = TestServer::start(|_| {});
    let (status, head, _) = request(
        srv.addr,
        b"SOURCE /live HTTP/1.0\r\nContent-Type: audio/mpeg\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, 401);
    assert!(head.contains("WWW-Authenticate: Basic"));
    // ...then repeats with them, HTTP/1.0, and waits for 2xx before streaming.
    let head = format!(
        "SOURCE /live HTTP/1.0\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\nice-name: shout\r\n\r\n",
        basic("source", PASSWORD)
    );
    let mut source = Source::connect_raw(srv.addr, head.as_bytes());
    source.send_pattern(0, 3000, 1000, Duration::ZERO);
    let mut l = Listener::connect(srv.addr, "/live");
    l.read_at_least(3000);
    assert_exact_suffix(&l.body, 3000, "listener");
}

#[test]
fn expect_100_continue_gets_exactly_100_then_200_after_authentication() {
    let srv = TestServer::start(|_| {});
    // Wrong password: the refusal comes instead of 100 Continue, so no media is sent in vain.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(
        put_head(
            "/live",
            &basic("source", "nope"),
            "Expect: 100-continue\r\n",
        )
        .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.0 401"), "{head}");

    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(
        put_head(
            "/live",
            &basic("source", PASSWORD),
            "Expect: 100-continue\r\n",
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(read_head(&mut s), "HTTP/1.1 100 Continue\r\n\r\n");
    assert!(read_head(&mut s).starts_with("HTTP/1.0 200 OK\r\n"));
    s.write_all(&pattern(0, 4000)).unwrap();
    let mut l = Listener::connect(srv.addr, "/live");
    l.read_at_least(4000);
    assert_exact_suffix(&l.body, 4000, "listener");
}

#[test]
fn legacy_source_media_in_the_header_packet_is_kept() {
    let srv = TestServer::start(|_| {});
    let mut raw = format!(
        "SOURCE /live HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
        basic("source", PASSWORD)
    )
    .into_bytes();
    raw.extend(pattern(0, 2000));
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(&raw).unwrap(); // one write: headers and media together
    assert!(read_head(&mut s).starts_with("HTTP/1.0 200 OK"));
    srv.wait_metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/live\""],
        |v| v == 2000.0,
    );
    let mut l = Listener::connect(srv.addr, "/live");
    l.read_at_least(2000);
    assert_exact_suffix(&l.body, 2000, "listener");
}

#[test]
fn chunked_source_bodies_are_decoded() {
    let srv = TestServer::start(|c| declare(c, "/live"));
    let head = put_head(
        "/live",
        &basic("source", PASSWORD),
        "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n",
    );
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    assert_eq!(read_head(&mut s), "HTTP/1.1 100 Continue\r\n\r\n");
    read_head(&mut s);
    let data = pattern(0, 10_000);
    let mut body = Vec::new();
    for piece in data.chunks(777) {
        body.extend(format!("{:x}\r\n", piece.len()).as_bytes());
        body.extend(piece);
        body.extend(b"\r\n");
    }
    // Framing split at awkward places, as TCP may deliver it.
    for part in body.chunks(100) {
        s.write_all(part).unwrap();
    }
    srv.wait_metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/live\""],
        |v| v == 10_000.0,
    );
    let mut l = Listener::connect(srv.addr, "/live");
    s.write_all(b"0\r\n\r\n").unwrap();
    l.read_to_end();
    assert_exact_suffix(&l.body, 10_000, "listener");
    srv.wait_metric(
        "fanstream_source_disconnects_total",
        &["reason=\"end_of_stream\""],
        |v| v == 1.0,
    );
}

#[test]
fn bad_chunk_framing_ends_the_source_but_listeners_wait_for_the_grace_period() {
    let srv = TestServer::start(|c| c.defaults.source_grace_secs = 30);
    let head = put_head(
        "/live",
        &basic("source", PASSWORD),
        "Transfer-Encoding: chunked\r\n",
    );
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    read_head(&mut s);
    s.write_all(b"10\r\n0123456789abcdef\r\n").unwrap();
    let l = Listener::connect(srv.addr, "/live");
    s.write_all(b"zz\r\n").unwrap();
    srv.wait_metric(
        "fanstream_source_disconnects_total",
        &["reason=\"bad_chunk_framing\""],
        |v| v == 1.0,
    );
    assert_eq!(srv.server.as_ref().unwrap().listeners(), 1);
    drop(l);
}

#[test]
fn a_second_source_on_a_live_mount_is_403() {
    let srv = TestServer::start(|_| {});
    let _first = Source::connect(srv.addr, "/live");
    let (status, _, body) = request(
        srv.addr,
        put_head("/live", &basic("source", PASSWORD), "").as_bytes(),
    );
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("mount in use"));
}

#[test]
fn sources_racing_for_one_mount_exactly_one_wins() {
    let srv = TestServer::start(|_| {});
    let addr = srv.addr;
    let racers: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                s.write_all(put_head("/race", &basic("source", PASSWORD), "").as_bytes())
                    .unwrap();
                let head = read_head(&mut s);
                (head, s)
            })
        })
        .collect();
    let results: Vec<_> = racers.into_iter().map(|r| r.join().unwrap()).collect();
    let winners = results
        .iter()
        .filter(|(h, _)| h.starts_with("HTTP/1.0 200"))
        .count();
    let losers = results
        .iter()
        .filter(|(h, _)| h.starts_with("HTTP/1.0 403"))
        .count();
    assert_eq!((winners, losers), (1, 7));
}

#[test]
fn per_mount_passwords_and_undeclared_mounts() {
    let srv = TestServer::start(|c| {
        c.mounts.insert(
            "/private".into(),
            fanstream::MountSettings {
                source_password: Some("mount-secret".into()),
                ..Default::default()
            },
        );
    });
    // The global password does not open a mount with its own.
    let (status, _, _) = request(
        srv.addr,
        put_head("/private", &basic("source", PASSWORD), "").as_bytes(),
    );
    assert_eq!(status, 401);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(put_head("/private", &basic("source", "mount-secret"), "").as_bytes())
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.0 200"));
    // A mount not in the config is accepted with the global password, as Icecast does.
    let _undeclared = Source::connect(srv.addr, "/anything-else");
}

/// Icecast's `<mount><username>`: a mount's own source user. ffmpeg pushes with it, and it
/// updates titles and runs the mount's admin commands; the global user is refused there, and
/// other mounts keep the global one.
#[test]
fn a_mount_with_its_own_source_user() {
    use common::clients::{curl_get, ffmpeg_source_as, Codec, Tone};
    let srv = TestServer::start(|c| {
        c.admin_password = Some("admin-secret".into());
        c.mounts.insert(
            "/dj".into(),
            fanstream::MountSettings {
                source_user: Some("dj".into()),
                source_password: Some("dj-secret".into()),
                ..Default::default()
            },
        );
    });
    for auth in [basic("source", "dj-secret"), basic("dj", PASSWORD)] {
        let (status, _, _) = request(srv.addr, put_head("/dj", &auth, "").as_bytes());
        assert_eq!(status, 401);
    }
    let mut ffmpeg = ffmpeg_source_as(
        srv.addr,
        "/dj",
        &Tone::new(Codec::Mp3, 600.0),
        ("dj", "dj-secret"),
    );
    let start = std::time::Instant::now();
    while request(srv.addr, b"HEAD /dj HTTP/1.0\r\n\r\n").0 != 200 {
        assert!(
            start.elapsed() < DEADLINE,
            "ffmpeg as dj: {}",
            ffmpeg.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut l = Listener::connect(srv.addr, "/dj");
    l.read_at_least(8000);
    let dj = Some(("dj", "dj-secret"));
    let update = [
        ("mount", "/dj"),
        ("mode", "updinfo"),
        ("song", "Set by the DJ"),
    ];
    let (status, _, body) = curl_get(srv.addr, "/admin/metadata", dj, &update);
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = curl_get(srv.admin, "/admin/listclients", dj, &[("mount", "/dj")]);
    assert_eq!(status, 200, "{body}");
    let as_source = Some(("source", "dj-secret"));
    let (status, _, _) = curl_get(srv.addr, "/admin/metadata", as_source, &update);
    assert_eq!(status, 401);
    let (status, _, _) = curl_get(
        srv.admin,
        "/admin/listclients",
        as_source,
        &[("mount", "/dj")],
    );
    assert_eq!(status, 401);
    let _other = Source::connect(srv.addr, "/other");
}

#[test]
fn mount_listener_limit_is_503_with_retry_after() {
    let srv = TestServer::start(|c| c.defaults.max_listeners = 2);
    let mut source = Source::connect(srv.addr, "/live");
    source.send_pattern(0, 1000, 1000, Duration::ZERO);
    let _a = Listener::connect(srv.addr, "/live");
    let _b = Listener::connect(srv.addr, "/live");
    let (status, head, _) = request(srv.addr, b"GET /live HTTP/1.0\r\n\r\n");
    assert_eq!(status, 503);
    assert!(head.contains("Retry-After:"), "{head}");
}

#[test]
fn malformed_requests_and_unknown_methods_get_clear_statuses() {
    let srv = TestServer::start(|_| {});
    let (status, _, _) = request(
        srv.addr,
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n",
    );
    assert_eq!(status, 400);
    let (status, head, _) = request(srv.addr, b"DELETE /live HTTP/1.1\r\n\r\n");
    assert_eq!(status, 405);
    assert!(
        head.contains("Allow: GET, HEAD, OPTIONS, SOURCE, PUT"),
        "{head}"
    );
    let mut long = b"GET /".to_vec();
    long.extend(vec![b'a'; 9000]);
    let (status, _, _) = request(srv.addr, &long);
    assert_eq!(status, 414);
    let (status, _, _) = request(srv.addr, b"GET /../../etc/passwd HTTP/1.0\r\n\r\n");
    assert_eq!(status, 400);
    // Each refusal is counted by reason.
    assert_eq!(
        srv.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"malformed_request\""]
        ),
        1.0
    );
    assert_eq!(
        srv.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"method_not_allowed\""]
        ),
        1.0
    );
}

#[test]
fn a_client_that_never_finishes_its_head_is_closed_after_the_header_timeout() {
    let srv = TestServer::start(|c| c.header_timeout_secs = 1);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /live HTTP/1.1\r\nHost: slow").unwrap();
    let mut buf = [0u8; 16];
    // The server closes without answering; read returns 0 (or a reset).
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        srv.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"header_timeout\""]
        ),
        1.0
    );
}
