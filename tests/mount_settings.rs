//! Per-mount settings Icecast operators carry over: `max_listener_duration_secs` (a listener
//! closed after it, counted by its reason), and `stream_name`/`genre`/`description`/`url`/
//! `public` in place of what the source sends, in listeners' `icy-*` headers, the status pages
//! and the admin API's stats, applied to a live mount by a reload.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clients::curl_get;
use common::*;
use fanstream::MountSettings;

#[test]
fn a_listener_is_closed_after_max_listener_duration_secs() {
    let srv = TestServer::start(|c| {
        c.mounts.insert(
            "/short".into(),
            MountSettings {
                max_listener_duration_secs: 2,
                max_write_delay_ms: 100,
                ..c.defaults.clone()
            },
        );
    });
    let sources = [
        Source::connect(srv.addr, "/short"),
        Source::connect(srv.addr, "/long"),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let feeding = std::thread::spawn(move || {
        let mut sources = sources;
        let mut at = 0;
        while !stopped.load(Ordering::Relaxed) {
            for s in &mut sources {
                s.send(&pattern(at, 1000));
            }
            at += 1000;
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let connected = Instant::now();
    let mut short = Listener::connect(srv.addr, "/short");
    let mut long = Listener::connect(srv.addr, "/long");
    short.read_to_end();
    let lasted = connected.elapsed();
    assert!(
        lasted >= Duration::from_secs(2) && lasted < Duration::from_secs(6),
        "closed after {lasted:?}"
    );
    assert!(short.body.len() > 10_000, "it was served until then");
    srv.wait_metric(
        "fanstream_listener_disconnects_total",
        &["mount=\"/short\"", "reason=\"max_duration\""],
        |v| v == 1.0,
    );
    // A mount without the limit keeps its listener.
    let had = long.body.len();
    long.read_at_least(had + 10_000);
    assert_eq!(srv.metric("fanstream_listeners", &["mount=\"/long\""]), 1.0);
    stop.store(true, Ordering::Relaxed);
    feeding.join().unwrap();
}

/// The value of `name` in a response head, case-insensitively.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn the_mounts_description_replaces_the_sources_everywhere_and_a_reload_changes_it() {
    let srv = TestServer::start(|c| {
        c.admin_password = Some("admin-secret".into());
        c.mounts.insert(
            "/a".into(),
            MountSettings {
                stream_name: Some("Station A".into()),
                description: Some("Our own words".into()),
                url: Some("https://a.example/".into()),
                public: Some(true),
                ..c.defaults.clone()
            },
        );
    });
    // The source says `Ice-Name: Test Radio`, `Ice-Genre: Test` and nothing of `public`.
    let mut source = Source::connect(srv.addr, "/a");
    source.send_pattern(0, 20_000, 1000, Duration::ZERO);
    let l = Listener::connect(srv.addr, "/a");
    assert_eq!(header(&l.head, "icy-name"), Some("Station A"), "{}", l.head);
    assert_eq!(
        header(&l.head, "icy-genre"),
        Some("Test"),
        "the source's, not overridden"
    );
    assert_eq!(header(&l.head, "icy-description"), Some("Our own words"));
    assert_eq!(header(&l.head, "icy-url"), Some("https://a.example/"));
    assert_eq!(header(&l.head, "icy-pub"), Some("1"));
    drop(l);

    // The status page, parsed.
    let (status, _, body) = curl_get(srv.addr, "/status-json.xsl", None, &[]);
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let src = &json["icestats"]["source"];
    let src = if src.is_array() { &src[0] } else { src };
    assert_eq!(src["server_name"], "Station A", "{json}");
    assert_eq!(src["server_description"], "Our own words");
    assert_eq!(src["genre"], "Test");
    assert_eq!(src["server_url"], "https://a.example/");

    // The admin API's stats, parsed.
    let auth = Some(("admin", "admin-secret"));
    let (status, _, body) = curl_get(srv.admin, "/admin/stats", auth, &[]);
    assert_eq!(status, 200, "{body}");
    let doc = roxmltree::Document::parse(&body).unwrap();
    let field = |name: &str| {
        doc.descendants()
            .find(|n| n.has_tag_name("source"))
            .and_then(|s| s.children().find(|c| c.has_tag_name(name)))
            .and_then(|n| n.text())
            .map(String::from)
    };
    assert_eq!(field("server_name").as_deref(), Some("Station A"), "{body}");
    assert_eq!(field("public").as_deref(), Some("1"), "{body}");

    // A reload changes the live mount's description at once; what it no longer overrides is
    // the source's again.
    let server = srv.server.as_ref().unwrap();
    let mut config = fanstream::Config {
        startup: fanstream::config::Startup {
            workers: 2,
            pin_workers: false,
            demo: false,
            ..Default::default()
        },
        source_password: Some(PASSWORD.into()),
        admin_password: Some("admin-secret".into()),
        ..Default::default()
    };
    config.mounts.insert(
        "/a".into(),
        MountSettings {
            genre: Some("Jazz".into()),
            public: Some(false),
            ..Default::default()
        },
    );
    server.reload(config).unwrap();
    wait_until("the reload applied", || {
        let l = Listener::connect(srv.addr, "/a");
        header(&l.head, "icy-genre") == Some("Jazz")
    });
    let l = Listener::connect(srv.addr, "/a");
    assert_eq!(
        header(&l.head, "icy-name"),
        Some("Test Radio"),
        "{}",
        l.head
    );
    assert_eq!(header(&l.head, "icy-pub"), Some("0"));
    assert_eq!(header(&l.head, "icy-description"), None);
    drop((l, source));
}
