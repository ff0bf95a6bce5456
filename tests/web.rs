//! On the open web: the page at `/` (on both ports, HEAD too, its list without JavaScript and
//! refreshed by its script in headless Chromium), CORS for web players on other origins (the
//! headers on streams and status pages, a browser's preflight), and unknown paths still 404.

mod common;

use std::process::Command;
use std::time::Duration;

use common::clients::*;
use common::process::{require, scratch_dir};
use common::*;

fn get(addr: std::net::SocketAddr, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: radio.test\r\n{extra}\r\n").as_bytes(),
    )
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A live MP3 source on `mount` with a name, a description and a title.
fn described_source(srv: &TestServer, mount: &str, name: &str, title: &str) -> Source {
    let head = format!(
        "PUT {mount} HTTP/1.1\r\nHost: test\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\nIce-Name: {name}\r\nIce-Description: About {name}\r\nIce-Bitrate: 128\r\n\r\n",
        basic("source", PASSWORD)
    );
    let mut s = Source::connect_raw(srv.addr, head.as_bytes());
    s.send_pattern(0, 4000, 1000, Duration::ZERO);
    let label = format!("mount=\"{mount}\"");
    srv.wait_metric("fanstream_source_received_bytes_total", &[&label], |v| {
        v == 4000.0
    });
    let update = format!(
        "GET /admin/metadata?mode=updinfo&mount={mount}&song={} HTTP/1.0\r\nAuthorization: Basic {}\r\n\r\n",
        title.replace(' ', "%20").replace('<', "%3C").replace('>', "%3E"),
        basic("source", PASSWORD)
    );
    assert_eq!(request(srv.addr, update.as_bytes()).0, 200);
    // Applied by ingest after the answer: wait for it, as a page read at once may precede it.
    srv.wait_metric(
        "fanstream_metadata_updates_total",
        &[&format!("mount=\"{mount}\"")],
        |v| v >= 1.0,
    );
    s
}

#[test]
fn the_page_lists_each_mount_with_a_player_and_its_playlist_on_both_ports() {
    let srv = TestServer::start(|_| {});
    let _one = described_source(&srv, "/one", "First Radio", "Alpha - Song");
    let _two = described_source(&srv, "/two", "Second <Radio>", "<script>x</script>");
    for addr in [srv.addr, srv.admin] {
        let (status, head, body) = get(addr, "/", "");
        assert_eq!(status, 200, "{head}");
        assert_eq!(
            header(&head, "content-type"),
            Some("text/html; charset=utf-8")
        );
        let page = String::from_utf8(body).unwrap();
        assert_eq!(
            header(&head, "content-length"),
            Some(page.len().to_string().as_str())
        );
        for want in [
            "<audio controls preload=\"none\" src=\"/one\"></audio>",
            "<a class=\"m3u\" href=\"/one.m3u\">",
            "<audio controls preload=\"none\" src=\"/two\"></audio>",
            "<a class=\"m3u\" href=\"/two.m3u\">",
            "<div class=\"name\">First Radio</div>",
            "<div class=\"description\">About First Radio</div>",
            // The pattern is no MP3 the framer recognises, so the Content-Type stands for its format.
            "audio/mpeg · 128 kbit/s · 0 listeners",
            "Now playing: Alpha - Song",
            // A source's words stay text.
            "Second &lt;Radio&gt;",
            "Now playing: &lt;script&gt;x&lt;/script&gt;",
            concat!("fanstream <span id=\"version\">", env!("CARGO_PKG_VERSION")),
            "up <span id=\"uptime\">0m ",
        ] {
            assert!(page.contains(want), "{want:?} not in the page:\n{page}");
        }
        assert!(!page.contains("<script>x"), "{page}");
        assert!(
            !page.contains("src=\"http") && !page.contains("href=\"http"),
            "no external assets"
        );
        // HEAD: the same head, no body.
        let (status, head_only, body) =
            request(addr, b"HEAD / HTTP/1.1\r\nHost: radio.test\r\n\r\n");
        assert_eq!(status, 200);
        assert!(body.is_empty());
        assert_eq!(
            header(&head_only, "content-length"),
            header(&head, "content-length")
        );
    }
    // Unknown paths are still 404 on the listener port, and odd ones still 400.
    assert_eq!(get(srv.addr, "/nothing-here", "").0, 404);
    assert_eq!(get(srv.addr, "/a/../b", "").0, 400);
    assert_eq!(get(srv.admin, "/nothing-here", "").0, 404);
}

#[test]
fn with_no_stream_the_page_says_so() {
    let srv = TestServer::start(|_| {});
    let page = String::from_utf8(get(srv.addr, "/", "").2).unwrap();
    assert!(
        page.contains("<p id=\"none\">No stream is on the air.</p>"),
        "{page}"
    );
    assert!(!page.contains("<audio controls"), "{page}");
}

/// Chromium runs the page's script (virtual time: its refresh comes at once, in real time), and
/// the DOM it leaves is the server's list refreshed from `/status.json`.
#[test]
fn chromium_runs_the_page_and_its_refresh_from_status_json() {
    require("chromium");
    let dir = scratch_dir("web_page_dom");
    let srv = TestServer::start(|_| {});
    let _one = described_source(&srv, "/one", "First Radio", "Alpha - Song");
    let out = Command::new("timeout")
        .arg("60")
        .args([
            "chromium",
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--virtual-time-budget=7000",
            "--dump-dom",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .arg(format!("http://{}/", srv.addr))
        .output()
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<span id=\"updated\">, refreshed at "),
        "the page's script did not refresh from /status.json; Chromium said:\n{}\nDOM:\n{dom}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "data-mount=\"/one\"",
        "<div class=\"name\">First Radio</div>",
        "Now playing: Alpha - Song",
        "href=\"/one.m3u\"",
    ] {
        assert!(dom.contains(want), "{want:?} not in the DOM:\n{dom}");
    }
}

#[test]
fn streams_and_status_pages_carry_cors_for_any_origin_by_default() {
    let srv = TestServer::start(|_| {});
    let _one = described_source(&srv, "/one", "First Radio", "Alpha - Song");
    let origin = "Origin: https://player.example\r\n";
    for path in ["/status.json", "/status-json.xsl"] {
        let (status, head, _) = get(srv.addr, path, origin);
        assert_eq!(status, 200);
        assert_eq!(
            header(&head, "access-control-allow-origin"),
            Some("*"),
            "{head}"
        );
    }
    let (_, head, _) = request(
        srv.addr,
        format!("HEAD /one HTTP/1.1\r\n{origin}Icy-MetaData: 1\r\n\r\n").as_bytes(),
    );
    assert_eq!(
        header(&head, "access-control-allow-origin"),
        Some("*"),
        "{head}"
    );
    let exposed = header(&head, "access-control-expose-headers").unwrap_or_default();
    for name in ["icy-metaint", "icy-name", "icy-br", "icy-description"] {
        assert!(exposed.contains(name), "{name} not exposed: {head}");
    }
    assert_eq!(header(&head, "icy-metaint"), Some("16000"), "{head}");
    assert!(head.ends_with("\r\n\r\n"));

    // A refusal too: a player on another site can tell a station offline (404) from a network
    // error.
    let (status, head, body) = get(srv.addr, "/offline", origin);
    assert_eq!(status, 404, "{head}");
    assert_eq!(
        header(&head, "access-control-allow-origin"),
        Some("*"),
        "{head}"
    );
    assert!(body.starts_with(b"404 Not Found: unknown mount"), "{head}");

    // A browser's preflight for a fetch with Icy-MetaData.
    let (status, head, body) = request(
        srv.addr,
        format!(
            "OPTIONS /one HTTP/1.1\r\n{origin}Access-Control-Request-Method: GET\r\nAccess-Control-Request-Headers: icy-metadata\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(status, 204, "{head}");
    assert!(body.is_empty());
    assert_eq!(header(&head, "access-control-allow-origin"), Some("*"));
    assert_eq!(
        header(&head, "access-control-allow-methods"),
        Some("GET, HEAD, OPTIONS")
    );
    let allowed = header(&head, "access-control-allow-headers").unwrap_or_default();
    assert!(
        allowed.to_ascii_lowercase().contains("icy-metadata"),
        "{head}"
    );
}

#[test]
fn a_list_of_origins_admits_those_it_names_only() {
    let srv = TestServer::start(|c| {
        c.cors_allowed_origins = vec!["https://player.example".into()];
    });
    let _one = described_source(&srv, "/one", "First Radio", "Alpha - Song");
    let (_, head, _) = get(
        srv.addr,
        "/status.json",
        "Origin: https://player.example\r\n",
    );
    assert_eq!(
        header(&head, "access-control-allow-origin"),
        Some("https://player.example"),
        "{head}"
    );
    assert_eq!(header(&head, "vary"), Some("Origin"));
    let (_, head, _) = request(
        srv.addr,
        b"HEAD /one HTTP/1.1\r\nOrigin: https://evil.example\r\n\r\n",
    );
    assert_eq!(header(&head, "access-control-allow-origin"), None, "{head}");
    assert_eq!(header(&head, "vary"), Some("Origin"));
    let (status, head, _) = request(
        srv.addr,
        b"OPTIONS /status.json HTTP/1.1\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: GET\r\n\r\n",
    );
    assert_eq!(status, 204);
    assert_eq!(header(&head, "access-control-allow-origin"), None, "{head}");
}

#[test]
fn curl_sees_cors_on_a_stream_it_decodes_as_a_web_player_would_fetch_it() {
    let dir = scratch_dir("web_cors_curl");
    let srv = TestServer::start(|_| {});
    let _src = ffmpeg_source(srv.addr, "/tone", &Tone::new(Codec::Mp3, 30.0));
    srv.wait_metric("fanstream_source_up", &["mount=\"/tone\""], |v| v == 1.0);
    require("curl");
    let file = dir.join("tone.mp3");
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-o"])
        .arg(&file)
        .args([
            "--max-time",
            "3",
            "-H",
            "Origin: https://player.example",
            "-H",
            "Icy-MetaData: 0",
        ])
        .arg(format!("http://{}/tone", srv.addr))
        .output()
        .expect("curl runs");
    let head = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        header(&head, "access-control-allow-origin"),
        Some("*"),
        "{head}"
    );
    let decoded = ffmpeg_decode(&file);
    assert!(decoded.seconds > 1.0, "{decoded:?}");
}
