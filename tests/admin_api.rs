//! Icecast 2.4's admin API, driven with curl on both ports: the XML (parsed) and JSON answers,
//! killclient, moveclients (the moved listener keeps decoding), killsource with the grace and
//! fallback rules, the credentials each command takes, and the element names held against what
//! Debian's Icecast 2.4 answers for the same stream.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::clients::*;
use common::process::{require, scratch_dir};
use common::*;

const ADMIN_PASSWORD: &str = "admin-secret";
const ADMIN: Option<(&str, &str)> = Some(("admin", ADMIN_PASSWORD));

fn with_admin_password(c: &mut fanstream::Config) {
    c.admin_password = Some(ADMIN_PASSWORD.into());
}

/// Waits until a metric (read from `/metrics` with the admin credentials) satisfies `ok`.
fn wait_metric(srv: &TestServer, name: &str, labels: &[&str], ok: impl Fn(f64) -> bool) {
    wait_until(&format!("{name}{labels:?}"), || {
        let (status, _, body) = curl_get(srv.admin, "/metrics", ADMIN, &[]);
        assert_eq!(status, 200, "{body}");
        ok(metric_value(&body, name, labels))
    });
}

/// `curl -sS -i -G -u admin:PASS --data-urlencode K=V ... http://ADDR/admin/COMMAND`; fails
/// the test unless it answers 200 with a body.
fn admin_ok(addr: SocketAddr, command: &str, params: &[(&str, &str)]) -> String {
    let (status, head, body) = curl_get(addr, &format!("/admin/{command}"), ADMIN, params);
    assert_eq!(status, 200, "/admin/{command} {params:?}: {head}{body}");
    body
}

/// Parses an answer as XML, failing the test with the text when it is not.
fn parse(body: &str) -> roxmltree::Document<'_> {
    roxmltree::Document::parse(body).unwrap_or_else(|e| panic!("not XML ({e}): {body}"))
}

fn child<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> roxmltree::Node<'a, 'a> {
    node.children()
        .find(|c| c.has_tag_name(name))
        .unwrap_or_else(|| panic!("no <{name}> in <{}>", node.tag_name().name()))
}

/// The fallback `listmounts` lists for `mount` (empty when it has none).
fn listed_fallback(admin: SocketAddr, mount: &str) -> String {
    let body = admin_ok(admin, "listmounts", &[]);
    let doc = parse(&body);
    let source = children(doc.root_element(), "source")
        .find(|s| s.attribute("mount") == Some(mount))
        .unwrap_or_else(|| panic!("{mount} not in listmounts: {body}"));
    text(source, "fallback").to_string()
}

fn text<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> &'a str {
    child(node, name).text().unwrap_or("")
}

fn children<'a>(
    node: roxmltree::Node<'a, 'a>,
    name: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'a>> {
    node.children().filter(move |c| c.has_tag_name(name))
}

/// The names of an element's child elements.
fn names(node: roxmltree::Node) -> BTreeSet<String> {
    node.children()
        .filter(|c| c.is_element())
        .map(|c| c.tag_name().name().to_string())
        .collect()
}

/// The ids `listclients` gives for `mount`, in its order.
fn client_ids(addr: SocketAddr, mount: &str) -> Vec<u64> {
    let body = admin_ok(addr, "listclients", &[("mount", mount)]);
    let doc = parse(&body);
    let source = child(doc.root_element(), "source");
    children(source, "listener")
        .map(|l| text(l, "ID").parse().unwrap())
        .collect()
}

/// A source on `mount` sending the test pattern until dropped.
struct Feeding {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Source>>,
}

impl Feeding {
    fn start(addr: SocketAddr, mount: &str) -> Feeding {
        Feeding::start_typed(addr, mount, "audio/mpeg")
    }

    fn start_typed(addr: SocketAddr, mount: &str, content_type: &str) -> Feeding {
        let mut source = Source::connect_typed(addr, mount, content_type);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let data = pattern(0, 64 << 20);
            source.send_paced(&data, 1000, 64_000, &flag);
            source
        });
        Feeding {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Feeding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn every_command_answers_in_icecast_xml_and_in_json_on_both_ports() {
    let srv = TestServer::start(|c| {
        with_admin_password(c);
        c.mounts.insert(
            "/live".into(),
            fanstream::MountSettings {
                max_listeners: 7,
                fallback_mount: Some("/other".into()),
                ..c.defaults.clone()
            },
        );
        declare(c, "/other");
    });
    let _feeding = Feeding::start(srv.addr, "/live");
    let _other = Feeding::start(srv.addr, "/other");
    let mut a = Listener::connect(srv.addr, "/live");
    let mut b = Listener::connect(srv.addr, "/live");
    a.read_at_least(1000);
    b.read_at_least(1000);

    for port in [srv.admin, srv.addr] {
        // stats: the server's fields, then one <source mount=...> per live source.
        let body = admin_ok(port, "stats", &[]);
        let doc = parse(&body);
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "icestats");
        assert_eq!(text(root, "listeners"), "2", "{body}");
        assert_eq!(text(root, "sources"), "2", "{body}");
        let sources: Vec<_> = children(root, "source").collect();
        assert_eq!(sources.len(), 2, "{body}");
        let live = sources
            .iter()
            .find(|s| s.attribute("mount") == Some("/live"))
            .unwrap();
        assert_eq!(text(*live, "listeners"), "2");
        assert_eq!(text(*live, "max_listeners"), "7");
        assert_eq!(text(*live, "server_name"), "Test Radio");
        assert_eq!(text(*live, "server_type"), "audio/mpeg");
        assert_eq!(text(*live, "source_ip"), "127.0.0.1");
        assert!(text(*live, "listenurl").ends_with("/live"));
        assert!(text(*live, "total_bytes_read").parse::<u64>().unwrap() > 0);

        // listmounts: each source's fallback, listeners, Connected seconds and content type.
        let body = admin_ok(port, "listmounts", &[]);
        let doc = parse(&body);
        let live = children(doc.root_element(), "source")
            .find(|s| s.attribute("mount") == Some("/live"))
            .unwrap_or_else(|| panic!("{body}"));
        assert_eq!(text(live, "fallback"), "/other");
        assert_eq!(text(live, "listeners"), "2");
        assert_eq!(text(live, "content-type"), "audio/mpeg");
        text(live, "Connected").parse::<u64>().unwrap();
        // streamlist: Icecast's XML form of streamlist.txt, the same document.
        let streamlist = admin_ok(port, "streamlist", &[]);
        let doc = parse(&streamlist);
        let mounts: Vec<_> = children(doc.root_element(), "source")
            .filter_map(|s| s.attribute("mount"))
            .collect();
        assert_eq!(mounts, ["/live", "/other"], "{streamlist}");

        // listclients: each listener with its IP, UserAgent, Connected, ID and lag.
        let body = admin_ok(port, "listclients", &[("mount", "/live")]);
        let doc = parse(&body);
        let source = child(doc.root_element(), "source");
        assert_eq!(source.attribute("mount"), Some("/live"));
        assert_eq!(text(source, "Listeners"), "2");
        let listeners: Vec<_> = children(source, "listener").collect();
        assert_eq!(listeners.len(), 2, "{body}");
        let mut ids = BTreeSet::new();
        for l in &listeners {
            assert_eq!(text(*l, "IP"), "127.0.0.1");
            assert_eq!(text(*l, "UserAgent"), "fanstream-test");
            text(*l, "Connected").parse::<u64>().unwrap();
            text(*l, "lag").parse::<u64>().unwrap();
            ids.insert(text(*l, "ID").parse::<u64>().unwrap());
        }
        assert_eq!(ids.len(), 2, "ids are unique: {body}");

        // streamlist.txt: one live mount a line.
        let (status, head, body) = curl_get(port, "/admin/streamlist.txt", ADMIN, &[]);
        assert_eq!(status, 200, "{head}");
        assert!(head
            .to_ascii_lowercase()
            .contains("content-type: text/plain"));
        assert_eq!(body, "/live\n/other\n");

        // The same, as JSON: by `format=json` or by `Accept`.
        let (_, head, body) = curl_get(
            port,
            "/admin/listclients",
            ADMIN,
            &[("mount", "/live"), ("format", "json")],
        );
        assert!(head.contains("application/json"), "{head}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let listeners = json["icestats"]["source"][0]["listener"]
            .as_array()
            .unwrap();
        assert_eq!(listeners.len(), 2, "{json}");
        assert_eq!(listeners[0]["UserAgent"], "fanstream-test");
        assert!(listeners[0]["ID"].is_u64() && listeners[0]["lag"].is_u64());
        let out = Command::new("curl")
            .args(["-sS", "-u", &format!("admin:{ADMIN_PASSWORD}")])
            .args(["-H", "Accept: application/json"])
            .arg(format!("http://{port}/admin/stats"))
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["icestats"]["listeners"], 2, "{json}");
        assert_eq!(json["icestats"]["source"].as_array().unwrap().len(), 2);
        let (_, _, body) = curl_get(port, "/admin/streamlist.txt", ADMIN, &[("format", "json")]);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            serde_json::json!(["/live", "/other"])
        );
    }

    // fallbacks: sets the mount's fallback, which listmounts then shows.
    let body = admin_ok(
        srv.addr,
        "fallbacks",
        &[("mount", "/other"), ("fallback", "/live")],
    );
    assert_eq!(text(parse(&body).root_element(), "return"), "1", "{body}");
    assert_eq!(listed_fallback(srv.admin, "/other"), "/live");
    // Given empty, it clears the fallback, as Icecast's does.
    admin_ok(
        srv.addr,
        "fallbacks",
        &[("mount", "/other"), ("fallback", "")],
    );
    assert_eq!(listed_fallback(srv.admin, "/other"), "");

    // Mistakes get a specific 400.
    for (path, params, reason) in [
        ("/admin/nonsense", vec![], "unknown command"),
        ("/admin/listclients", vec![], "bad query"),
        (
            "/admin/listclients",
            vec![("mount", "/nowhere")],
            "no such source",
        ),
        (
            "/admin/killclient",
            vec![("mount", "/live"), ("id", "x")],
            "bad query",
        ),
        (
            "/admin/killsource",
            vec![("mount", "/nowhere")],
            "no such source",
        ),
        (
            "/admin/killsource",
            vec![("mount", "/live\nforged")],
            "bad query",
        ),
        (
            "/admin/moveclients",
            vec![("mount", "/live"), ("destination", "/nowhere")],
            "bad destination",
        ),
        (
            "/admin/moveclients",
            vec![("mount", "/live"), ("destination", "/live")],
            "bad destination",
        ),
        (
            "/admin/fallbacks",
            vec![("mount", "/live"), ("fallback", "x")],
            "bad query",
        ),
        ("/admin/fallbacks", vec![("mount", "/live")], "bad query"),
    ] {
        let (status, head, body) = curl_get(srv.admin, path, ADMIN, &params);
        assert_eq!(status, 400, "{path} {params:?}: {head}{body}");
        assert!(body.contains(reason), "{path} {params:?}: {body}");
    }

    // A panel that asks for JSON gets its refusals in JSON too, on both ports, with the same
    // status and headers (a 401 its challenge).
    let wrong = Some(("admin", "not-the-password"));
    for (addr, credentials, path, params, status, reason) in [
        (
            srv.admin,
            ADMIN,
            "/admin/listclients",
            vec![("mount", "/nowhere"), ("format", "json")],
            400,
            "no_such_source",
        ),
        (
            srv.addr,
            ADMIN,
            "/admin/moveclients",
            vec![
                ("mount", "/live"),
                ("destination", "/nowhere"),
                ("format", "json"),
            ],
            400,
            "bad_destination",
        ),
        (
            srv.addr,
            wrong,
            "/admin/stats",
            vec![("format", "json")],
            401,
            "bad_credentials",
        ),
    ] {
        let (got, head, body) = curl_get(addr, path, credentials, &params);
        assert_eq!(got, status, "{path} {params:?}: {head}{body}");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("content-type: application/json"),
            "{path}: {head}"
        );
        assert_eq!(
            status == 401,
            head.contains("www-authenticate: basic"),
            "{head}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(json["error"]["status"], status, "{body}");
        assert_eq!(json["error"]["reason"], reason, "{body}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&reason.replace('_', " "))),
            "{body}"
        );
    }
}

#[test]
fn killclient_removes_exactly_that_listener() {
    let srv = TestServer::start(with_admin_password);
    let _feeding = Feeding::start(srv.addr, "/live");
    let mut keep = Listener::connect(srv.addr, "/live");
    let mut gone = Listener::connect(srv.addr, "/live");
    keep.read_at_least(1000);
    gone.read_at_least(1000);
    let ids = client_ids(srv.admin, "/live");
    assert_eq!(ids.len(), 2);
    // Listeners list in the order they came.
    let (keep_id, gone_id) = (ids[0], ids[1]);

    let id = gone_id.to_string();
    let body = admin_ok(srv.addr, "killclient", &[("mount", "/live"), ("id", &id)]);
    let doc = parse(&body);
    assert_eq!(text(doc.root_element(), "return"), "1", "{body}");
    assert_eq!(
        text(doc.root_element(), "message"),
        format!("Client {gone_id} removed")
    );
    // The killed listener's stream ends; the other one's goes on.
    gone.read_to_end();
    let had = keep.body.len();
    keep.read_at_least(had + 20_000);
    assert_eq!(client_ids(srv.admin, "/live"), [keep_id]);
    wait_metric(
        &srv,
        "fanstream_listener_disconnects_total",
        &["reason=\"killed\""],
        |v| v == 1.0,
    );

    // Again: it is gone, and Icecast's answer for that is `return` 0.
    let body = admin_ok(srv.addr, "killclient", &[("mount", "/live"), ("id", &id)]);
    let doc = parse(&body);
    assert_eq!(text(doc.root_element(), "return"), "0", "{body}");
    assert_eq!(
        text(doc.root_element(), "message"),
        format!("Client {gone_id} not found")
    );
}

/// Reads a live stream until `stop`, on its own thread, counting the bytes in `got`; returns
/// them.
fn capture(
    mut stream: TcpStream,
    stop: Arc<AtomicBool>,
    got: Arc<AtomicUsize>,
) -> thread::JoinHandle<Vec<u8>> {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while !stop.load(Ordering::Relaxed) {
            match common::read_some(&mut stream, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    got.store(out.len(), Ordering::Relaxed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        out
    })
}

#[test]
fn moveclients_moves_a_listener_that_keeps_decoding() {
    let dir = scratch_dir("admin_moveclients");
    let srv = TestServer::start(with_admin_password);
    // Two Ogg Vorbis streams: the moved listener must get the destination's header pages.
    let _a = ffmpeg_source(srv.addr, "/a", &Tone::new(Codec::Vorbis, 600.0));
    let mut tone_b = Tone::new(Codec::Vorbis, 600.0);
    tone_b.frequency = 880;
    let _b = ffmpeg_source(srv.addr, "/b", &tone_b);
    wait_until("both sources live", || {
        curl_get(srv.admin, "/admin/streamlist.txt", ADMIN, &[]).2 == "/a\n/b\n"
    });
    let listener = Listener::connect(srv.addr, "/a");
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicUsize::new(0));
    let reader = capture(listener.stream, stop.clone(), got.clone());
    let ids = client_ids(srv.admin, "/a");
    assert_eq!(ids.len(), 1);
    // Two seconds of /a's audio (16 KB/s) in the capture, past its header pages.
    wait_until("audio from /a", || got.load(Ordering::Relaxed) > 40_000);

    let body = admin_ok(
        srv.admin,
        "moveclients",
        &[("mount", "/a"), ("destination", "/b")],
    );
    let doc = parse(&body);
    assert_eq!(text(doc.root_element(), "return"), "1", "{body}");
    assert_eq!(
        text(doc.root_element(), "message"),
        "Clients moved from /a to /b"
    );
    wait_until("the listener listed on /b, with its id", || {
        client_ids(srv.admin, "/b") == ids
    });
    assert!(client_ids(srv.admin, "/a").is_empty());
    let moved_at = got.load(Ordering::Relaxed);
    // Two seconds and more of /b.
    wait_until("audio from /b", || {
        got.load(Ordering::Relaxed) > moved_at + 40_000
    });
    stop.store(true, Ordering::Relaxed);
    let captured = reader.join().unwrap();

    // The capture is /a's stream, then /b's from its header pages: a chained Ogg stream, which
    // decodes from end to end.
    let pages = common::media::ogg_pages(&captured, "moved listener");
    let bos: Vec<_> = pages.iter().filter(|p| p.bos()).collect();
    assert_eq!(bos.len(), 2, "one BOS per stream: {bos:?}");
    assert_ne!(bos[0].serial, bos[1].serial);
    let file = dir.join("moved.ogg");
    std::fs::write(&file, &captured).unwrap();
    let decoded = ffmpeg_decode(&file);
    assert!(decoded.success, "{decoded:?}");
    assert!(decoded.seconds > 3.0, "{decoded:?}");
    // What it got from /b on is a stream of its own, from its header pages on.
    let after = dir.join("after-move.ogg");
    std::fs::write(&after, &captured[bos[1].offset..]).unwrap();
    let probe = ffprobe(&after);
    assert_eq!(probe.codec, "vorbis", "{probe:?}");
    assert!(probe.duration > 1.0, "{probe:?}");
}

/// A move never puts listeners into a stream they cannot decode (Icecast ignores such a move;
/// here it is refused with a reason), and never past the destination's `max_listeners`: as many
/// move as it takes, across workers, and the others stay where they were, listening.
#[test]
fn moveclients_keeps_listeners_in_their_format_and_within_the_destinations_max_listeners() {
    let srv = TestServer::start(|c| {
        with_admin_password(c);
        c.mounts.insert(
            "/c".into(),
            fanstream::MountSettings {
                max_listeners: 1,
                ..c.defaults.clone()
            },
        );
    });
    let _a = Feeding::start(srv.addr, "/a");
    let _aac = Feeding::start_typed(srv.addr, "/aac", "audio/aac");
    let _c = Feeding::start(srv.addr, "/c");
    wait_until("three sources live", || {
        curl_get(srv.admin, "/admin/streamlist.txt", ADMIN, &[]).2 == "/a\n/aac\n/c\n"
    });
    let mut listeners: Vec<Listener> = (0..3).map(|_| Listener::connect(srv.addr, "/a")).collect();
    for l in &mut listeners {
        l.read_at_least(1000);
    }
    let ids: BTreeSet<u64> = client_ids(srv.admin, "/a").into_iter().collect();
    assert_eq!(ids.len(), 3);

    // Without a destination: where they could go (Icecast's list for its page), which is
    // neither the mount itself nor one of another format.
    let body = admin_ok(srv.admin, "moveclients", &[("mount", "/a")]);
    let doc = parse(&body);
    assert_eq!(text(doc.root_element(), "current_source"), "/a", "{body}");
    let choices: Vec<_> = children(doc.root_element(), "source")
        .filter_map(|s| s.attribute("mount"))
        .collect();
    assert_eq!(choices, ["/c"], "{body}");

    let to_aac = [("mount", "/a"), ("destination", "/aac")];
    let (status, head, body) = curl_get(srv.admin, "/admin/moveclients", ADMIN, &to_aac);
    assert_eq!(status, 409, "{head}{body}");
    assert!(body.contains("another format"), "{body}");
    let on_a: BTreeSet<u64> = client_ids(srv.admin, "/a").into_iter().collect();
    assert_eq!(on_a, ids, "nobody moved to the other format");

    let body = admin_ok(
        srv.admin,
        "moveclients",
        &[("mount", "/a"), ("destination", "/c")],
    );
    let doc = parse(&body);
    assert_eq!(text(doc.root_element(), "return"), "1", "{body}");
    assert_eq!(
        text(doc.root_element(), "message"),
        "Moved 1 of 3 clients from /a to /c: /c holds its max_listeners (1)"
    );
    wait_until("one listener on /c", || {
        client_ids(srv.admin, "/c").len() == 1
    });
    let on_a: BTreeSet<u64> = client_ids(srv.admin, "/a").into_iter().collect();
    let on_c: BTreeSet<u64> = client_ids(srv.admin, "/c").into_iter().collect();
    assert_eq!(on_a.len(), 2, "two stayed on /a");
    assert_eq!(&on_a | &on_c, ids);
    // Every one of them, moved or not, goes on receiving.
    for l in &mut listeners {
        let had = l.body.len();
        l.read_at_least(had + 20_000);
    }
}

#[test]
fn killsource_closes_the_source_and_its_listeners_go_to_the_fallback_after_the_grace_period() {
    let srv = TestServer::start(|c| {
        with_admin_password(c);
        c.defaults.source_grace_secs = 2;
        c.mounts.insert(
            "/a".into(),
            fanstream::MountSettings {
                fallback_mount: Some("/b".into()),
                ..c.defaults.clone()
            },
        );
        declare(c, "/b");
    });
    // A source that writes until its connection fails.
    let mut source = Source::connect(srv.addr, "/a");
    let writer = thread::spawn(move || {
        let mut at = 0;
        while source.stream.write_all(&pattern(at, 1000)).is_ok() {
            at += 1000;
            thread::sleep(Duration::from_millis(15));
        }
    });
    let _b = Feeding::start(srv.addr, "/b");
    let mut listener = Listener::connect(srv.addr, "/a");
    listener.read_at_least(30_000);
    let ids = client_ids(srv.admin, "/a");

    // Taken before the request: the kill happens within it, so the grace period runs from no
    // earlier than this (taken after, it could run from a few milliseconds before).
    let killed = Instant::now();
    // Mount-scoped: the mount's source credentials will do.
    let (status, head, body) = curl_get(
        srv.addr,
        "/admin/killsource",
        Some(("source", PASSWORD)),
        &[("mount", "/a")],
    );
    assert_eq!(status, 200, "{head}{body}");
    let doc = parse(&body);
    assert_eq!(text(doc.root_element(), "message"), "Source Removed");
    // The encoder's connection is closed: its writes fail.
    wait_until("the source's connection closed", || writer.is_finished());
    wait_metric(
        &srv,
        "fanstream_source_disconnects_total",
        &["mount=\"/a\"", "reason=\"killed\""],
        |v| v == 1.0,
    );
    // Its listener waits out the grace period on /a, then moves to the fallback.
    assert_eq!(client_ids(srv.admin, "/a"), ids, "still waiting on /a");
    wait_until("the listener moved to /b", || {
        client_ids(srv.admin, "/b") == ids
    });
    assert!(killed.elapsed() >= Duration::from_secs(2));
    let had = listener.body.len();
    listener.read_at_least(had + 20_000);
    // No source on /a any more: nothing left to kill.
    let (status, _, body) = curl_get(srv.admin, "/admin/killsource", ADMIN, &[("mount", "/a")]);
    assert_eq!(status, 400, "{body}");
}

#[test]
fn credentials_as_icecast_takes_them_and_a_public_port_closed_without_an_admin_password() {
    let srv = TestServer::start(|c| {
        with_admin_password(c);
        c.auth_max_failures = 3;
    });
    let _feeding = Feeding::start(srv.addr, "/live");
    let _other = Feeding::start(srv.addr, "/other");
    for port in [srv.admin, srv.addr] {
        let (status, head, _) = curl_get(port, "/admin/stats", None, &[]);
        assert_eq!(status, 401, "{head}");
        assert!(
            head.contains("WWW-Authenticate: Basic realm=\"fanstream admin\""),
            "{head}"
        );
        let (status, _, body) = curl_get(port, "/admin/stats", ADMIN, &[]);
        assert_eq!(status, 200, "{body}");
        // A mount's source credentials run commands on that mount, not the server's.
        let source = Some(("source", PASSWORD));
        let (status, _, body) = curl_get(port, "/admin/listclients", source, &[("mount", "/live")]);
        assert_eq!(status, 200, "{body}");
        let (status, _, _) = curl_get(port, "/admin/stats", source, &[]);
        assert_eq!(status, 401);
        // Commands act on GET alone: a HEAD is told so, not taken for a mount.
        let (status, head, _) = request(port, b"HEAD /admin/stats HTTP/1.0\r\n\r\n");
        assert_eq!(status, 405, "{head}");
        assert!(head.contains("Allow: GET\r\n"), "{head}");
        // Its own mount's stats, as Icecast gives them: that source alone.
        let (status, _, body) = curl_get(port, "/admin/stats", source, &[("mount", "/live")]);
        assert_eq!(status, 200, "{body}");
        let doc = parse(&body);
        let sources: Vec<_> = children(doc.root_element(), "source").collect();
        assert_eq!(sources.len(), 1, "{body}");
        assert_eq!(sources[0].attribute("mount"), Some("/live"));
        let (status, _, _) = curl_get(port, "/admin/listmounts", source, &[]);
        assert_eq!(status, 401);
    }
    // Wrong passwords count towards the address's 429, which then holds even for the right one.
    for _ in 0..3 {
        let (status, _, _) = curl_get(srv.addr, "/admin/stats", Some(("admin", "guess")), &[]);
        assert!(status == 401 || status == 429, "{status}");
    }
    let (status, head, _) = curl_get(srv.addr, "/admin/stats", ADMIN, &[]);
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("Retry-After: "), "{head}");
    // Source logins are counted apart: a panel guessing (or left with a stale password) on
    // the encoder's host does not lock the encoder out.
    let _encoder = Feeding::start(srv.addr, "/second");

    // Without an admin password the listener port refuses the admin API, naming the setting;
    // the loopback admin port stays open, as it was.
    let open = TestServer::start(|_| {});
    let _feeding = Feeding::start(open.addr, "/live");
    for (path, params) in [
        ("/admin/stats", vec![]),
        ("/admin/listclients", vec![("mount", "/live")]),
    ] {
        let (status, head, body) = curl_get(open.addr, path, Some(("source", PASSWORD)), &params);
        assert_eq!(status, 403, "{path}: {head}{body}");
        assert!(body.contains("admin password not set"), "{body}");
        let (status, _, body) = curl_get(open.admin, path, None, &params);
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert_eq!(
        open.metric(
            "fanstream_rejected_requests_total",
            &["reason=\"admin_password_not_set\""]
        ),
        2.0
    );
}

/// A free loopback port, for a program that binds its own.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's Icecast 2.4 on a loopback port, with the test's passwords:
/// `icecast2 -c DIR/icecast.xml`, as `nobody` when the test runs as root (Icecast refuses root).
fn icecast(dir: &Path) -> (Program, SocketAddr) {
    require("icecast2");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let logdir = dir.join("icecast-log");
    std::fs::create_dir_all(&logdir).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        std::os::unix::fs::chown(&logdir, Some(65534), Some(65534)).unwrap();
    }
    let config = format!(
        r#"<icecast>
  <limits><clients>100</clients><sources>4</sources></limits>
  <authentication>
    <source-password>{PASSWORD}</source-password>
    <relay-password>{PASSWORD}</relay-password>
    <admin-user>admin</admin-user>
    <admin-password>{ADMIN_PASSWORD}</admin-password>
  </authentication>
  <hostname>127.0.0.1</hostname>
  <listen-socket><port>{port}</port><bind-address>127.0.0.1</bind-address></listen-socket>
  <fileserve>0</fileserve>
  <paths>
    <basedir>/usr/share/icecast2</basedir>
    <logdir>{logdir}</logdir>
    <webroot>/usr/share/icecast2/web</webroot>
    <adminroot>/usr/share/icecast2/admin</adminroot>
  </paths>
  <logging><accesslog>access.log</accesslog><errorlog>error.log</errorlog><loglevel>2</loglevel></logging>
  <security><chroot>0</chroot></security>
</icecast>
"#,
        port = addr.port(),
        logdir = logdir.display()
    );
    let path = dir.join("icecast.xml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new("icecast2");
    cmd.arg("-c").arg(&path);
    if root {
        std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
        std::os::unix::process::CommandExt::gid(&mut cmd, 65534);
    }
    let mut program = Program::spawn("icecast2", &mut cmd);
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            program.running() && start.elapsed() < DEADLINE,
            "icecast2 did not start: {}",
            program.text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    (program, addr)
}

/// What fanstream may show beyond Icecast 2.4: the Ogg/MP3 `subtype` (Icecast 2.4 gives it
/// for Ogg only), the source's description when it sends one, and each listener's `lag` (as
/// Icecast 2.5 does).
const EXTRAS: [&str; 6] = ["subtype", "bitrate", "audio_info", "title", "artist", "lag"];

fn assert_same_names(icecast: &BTreeSet<String>, ours: &BTreeSet<String>, what: &str) {
    let missing: Vec<_> = icecast.difference(ours).collect();
    let extra: Vec<_> = ours
        .difference(icecast)
        .filter(|n| !EXTRAS.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: fanstream lacks {missing:?} and adds {extra:?} (Icecast: {icecast:?})"
    );
}

#[test]
fn element_names_are_the_ones_icecast_2_4_answers_for_the_same_stream() {
    let dir = scratch_dir("admin_icecast_names");
    let (_icecast, ice) = icecast(&dir);
    let srv = TestServer::start(with_admin_password);
    let tone = Tone::new(Codec::Mp3, 600.0);
    let _to_icecast = ffmpeg_source(ice, "/live", &tone);
    let _to_fanstream = ffmpeg_source(srv.addr, "/live", &tone);
    let mut listeners = Vec::new();
    for addr in [ice, srv.addr] {
        wait_until("the source is live", || {
            curl_get(addr, "/admin/listmounts", ADMIN, &[])
                .2
                .contains("/live")
        });
        let mut l = Listener::connect(addr, "/live");
        l.read_at_least(1000);
        listeners.push(l);
    }
    let answers = |addr| {
        [
            admin_ok(addr, "stats", &[]),
            admin_ok(addr, "listmounts", &[]),
            admin_ok(addr, "listclients", &[("mount", "/live")]),
        ]
    };
    let (theirs, ours) = (answers(ice), answers(srv.addr));
    for (i, what) in ["stats", "listmounts", "listclients"].iter().enumerate() {
        let (theirs, ours) = (parse(&theirs[i]), parse(&ours[i]));
        let (t, o) = (theirs.root_element(), ours.root_element());
        assert_eq!(t.tag_name().name(), o.tag_name().name(), "{what}");
        assert_same_names(&names(t), &names(o), what);
        let (ts, os) = (child(t, "source"), child(o, "source"));
        assert_eq!(ts.attribute("mount"), os.attribute("mount"), "{what}");
        assert_same_names(&names(ts), &names(os), &format!("{what} <source>"));
        if *what == "listclients" {
            let (tl, ol) = (child(ts, "listener"), child(os, "listener"));
            assert_same_names(&names(tl), &names(ol), "listclients <listener>");
        }
    }
}

#[test]
fn the_binary_warns_at_start_up_when_the_admin_api_is_closed_on_the_listener_port() {
    let dir = scratch_dir("admin_warning");
    let mut server = fanstream(&dir, "");
    let line = server
        .program
        .wait_line("the admin_password warning", DEADLINE, |l| {
            l.contains("admin_password is not set")
        });
    assert!(line.contains("WARN"), "{line}");
    let (status, _, body) = curl_get(server.addr, "/admin/stats", Some(("admin", "x")), &[]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin password not set"), "{body}");
    let (status, _, _) = curl_get(server.admin, "/admin/stats", None, &[]);
    assert_eq!(status, 200);

    let dir = scratch_dir("admin_no_warning");
    let mut server = fanstream(&dir, &format!("admin_password = {ADMIN_PASSWORD:?}\n"));
    server.program.collect();
    assert!(
        !server.program.text().contains("admin_password is not set"),
        "{}",
        server.program.text()
    );
}
