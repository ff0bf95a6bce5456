//! Hidden mounts (left out of every listing, still playable) and the `.m3u`/`.xspf` playlists
//! of listed mounts, with the URL built from the host the client used; mpv plays a mount from its
//! `.m3u`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::clients::*;
use common::*;

/// A source on `mount` sending the test pattern at 64 KB/s until `stop`.
fn feed(addr: std::net::SocketAddr, mount: &str, stop: &Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let mut source = Source::connect(addr, mount);
    let stop = stop.clone();
    thread::spawn(move || source.send_paced(&pattern(0, 64 << 20), 1000, 64_000, &stop))
}

#[test]
fn a_hidden_mount_is_left_out_of_every_listing_and_still_plays() {
    let srv = TestServer::start(|c| {
        c.mounts.insert(
            "/secret".into(),
            fanstream::MountSettings {
                hidden: true,
                ..c.defaults.clone()
            },
        );
    });
    let stop = Arc::new(AtomicBool::new(false));
    let feeders = [
        feed(srv.addr, "/live", &stop),
        feed(srv.addr, "/secret", &stop),
    ];

    let (status, _, body) = curl_get(srv.addr, "/status-json.xsl", None, &[]);
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let source = &json["icestats"]["source"];
    assert!(source.is_object(), "one listed source, not two: {json}");
    assert!(source["listenurl"].as_str().unwrap().ends_with("/live"));
    let (_, _, body) = curl_get(srv.addr, "/status.json", None, &[]);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mounts: Vec<&str> = json["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mount"].as_str().unwrap())
        .collect();
    assert_eq!(mounts, ["/live"]);
    let (_, _, body) = curl_get(srv.admin, "/admin/streamlist.txt", None, &[]);
    assert_eq!(body, "/live\n");
    let (status, _, _) = curl_get(srv.addr, "/secret.m3u", None, &[]);
    assert_eq!(status, 404);
    let (status, _, _) = curl_get(srv.addr, "/secret.xspf", None, &[]);
    assert_eq!(status, 404);
    // The operator still sees it.
    let (_, _, body) = curl_get(srv.admin, "/admin/listmounts", None, &[]);
    assert!(body.contains("<source mount=\"/secret\">"), "{body}");

    // Whoever knows the path plays it.
    let mut listener = Listener::connect(srv.addr, "/secret");
    listener.read_at_least(100_000);
    assert!(!exact_runs(&listener.body).is_empty());

    stop.store(true, Ordering::Relaxed);
    for f in feeders {
        f.join().unwrap();
    }
}

#[test]
fn playlists_point_at_the_host_the_client_used_and_mpv_plays_one() {
    let srv = TestServer::start(|_| {});
    let _source = ffmpeg_source(srv.addr, "/live", &Tone::new(Codec::Mp3, 600.0));
    wait_until("the source is live", || {
        curl_get(srv.addr, "/live.m3u", None, &[]).0 == 200
    });

    let (_, head, body) = curl_get(srv.addr, "/live.m3u", None, &[]);
    assert!(head.contains("Content-Type: audio/x-mpegurl"), "{head}");
    assert_eq!(body, format!("http://{}/live\n", srv.addr));
    // Through a proxy or a public name: the URL the client used.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-H", "Host: radio.example:8443"])
        .arg(format!("http://{}/live.m3u", srv.addr))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "http://radio.example:8443/live\n"
    );

    let (_, head, body) = curl_get(srv.addr, "/live.xspf", None, &[]);
    assert!(
        head.contains("Content-Type: application/xspf+xml"),
        "{head}"
    );
    let doc = roxmltree::Document::parse(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(doc.root_element().tag_name().name(), "playlist");
    let location = doc
        .descendants()
        .find(|n| n.has_tag_name("location"))
        .and_then(|n| n.text());
    assert_eq!(location, Some(format!("http://{}/live", srv.addr).as_str()));

    // A HEAD has the headers only; a playlist for no mount is 404.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-I"])
        .arg(format!("http://{}/live.m3u", srv.addr))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout);
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    let (status, _, _) = curl_get(srv.addr, "/nowhere.m3u", None, &[]);
    assert_eq!(status, 404);

    // mpv opens the playlist and plays the stream it names.
    let mut player = mpv(&format!("http://{}/live.m3u", srv.addr), 2, 20);
    let status = player.wait_exit(Duration::from_secs(30));
    let log = player.text();
    assert!(
        status.success() && log.contains("AO: [null]"),
        "mpv did not play the .m3u: {status}\n{log}"
    );
    assert!(srv.metric("fanstream_listener_connects_total", &["mount=\"/live\""]) >= 1.0);
}
