//! `/status-json.xsl` in Icecast 2.4's shape (field names and JSON types, `source` absent, an
//! object, then an array) and `/status.json` in fanstream's own, on both ports.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::*;
use serde_json::Value;

/// GETs a status page with a `Host` header; checks the headers every status page carries.
fn get_json(addr: SocketAddr, path: &str) -> Value {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: radio.example:8000\r\n\r\n");
    let (status, head, body) = request(addr, raw.as_bytes());
    assert_eq!(status, 200, "{path}: {head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("\r\ncontent-type: application/json"),
        "{path}: {head}"
    );
    assert!(
        lower.contains("\r\naccess-control-allow-origin: *\r\n"),
        "web players read status pages cross-origin: {head}"
    );
    assert!(lower.contains(&format!("\r\ncontent-length: {}\r\n", body.len())));
    serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{path} is not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Asserts that `obj` has exactly these fields, with these JSON types.
fn assert_shape(obj: &Value, expected: &[(&str, &str)], what: &str) {
    let obj = obj
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {obj}"));
    let got: BTreeMap<&str, &str> = obj.iter().map(|(k, v)| (k.as_str(), kind(v))).collect();
    let want: BTreeMap<&str, &str> = expected.iter().copied().collect();
    assert_eq!(got, want, "{what}: fields and types differ; got {obj:?}");
}

/// Icecast's date formats: `Tue, 14 Nov 2023 22:13:20 +0000` and `2023-11-14T22:13:20+0000`,
/// naming the same instant.
fn assert_icecast_dates(rfc: &Value, iso: &Value) {
    let (rfc, iso) = (rfc.as_str().unwrap(), iso.as_str().unwrap());
    assert_eq!(iso.len(), 24, "{iso}");
    assert_eq!(&iso[4..5], "-");
    assert_eq!(&iso[10..11], "T");
    assert!(iso.ends_with("+0000"), "{iso}");
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month: usize = iso[5..7].parse().unwrap();
    let expected_rfc_tail = format!(
        "{} {} {} {} +0000",
        &iso[8..10],
        months[month - 1],
        &iso[0..4],
        &iso[11..19]
    );
    assert_eq!(rfc.len(), 31, "{rfc}");
    assert!(
        rfc.ends_with(&expected_rfc_tail) && rfc.as_bytes()[3] == b',',
        "{rfc} and {iso} differ"
    );
}

const ICESTATS_SERVER_FIELDS: [(&str, &str); 6] = [
    ("admin", "string"),
    ("host", "string"),
    ("location", "string"),
    ("server_id", "string"),
    ("server_start", "string"),
    ("server_start_iso8601", "string"),
];

const SOURCE_FIELDS: [(&str, &str); 15] = [
    ("bitrate", "number"),
    ("genre", "string"),
    ("listener_peak", "number"),
    ("listeners", "number"),
    ("listenurl", "string"),
    // Edges' relays, apart from listeners: fanstream's addition.
    ("relays", "number"),
    ("server_description", "string"),
    ("server_name", "string"),
    ("server_type", "string"),
    ("stream_start", "string"),
    ("stream_start_iso8601", "string"),
    ("total_bytes_read", "number"),
    ("total_bytes_sent", "number"),
    ("dummy", "null"),
    ("audio_info", "string"),
];

#[test]
fn icecast_status_has_icecasts_shape_with_no_one_and_several_sources() {
    let srv = TestServer::start(|_| {});

    // No source: no `source` key at all, as Icecast.
    let doc = get_json(srv.addr, "/status-json.xsl");
    assert_shape(&doc, &[("icestats", "object")], "document");
    let mut fields = ICESTATS_SERVER_FIELDS.to_vec();
    fields.push(("dummy", "null"));
    assert_shape(&doc["icestats"], &fields, "icestats without sources");
    assert_eq!(doc["icestats"]["host"], "radio.example");
    assert!(doc["icestats"]["server_id"]
        .as_str()
        .unwrap()
        .starts_with("fanstream "));
    assert_icecast_dates(
        &doc["icestats"]["server_start"],
        &doc["icestats"]["server_start_iso8601"],
    );

    // One source: `source` is an object.
    let mut live = Source::connect(srv.addr, "/live");
    live.send(&pattern(0, 5000));
    srv.wait_metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/live\""],
        |v| v >= 5000.0,
    );
    let mut listeners: Vec<_> = (0..2)
        .map(|_| Listener::connect(srv.addr, "/live"))
        .collect();
    for l in &mut listeners {
        l.read_at_least(5000);
    }
    // One leaves (the peak stays at 2); the server notices on a write, so keep the stream going.
    drop(listeners.pop());
    let mut sent = 5000;
    while srv.metric("fanstream_listeners", &["mount=\"/live\""]) != 1.0 {
        assert!(sent < 10_000_000, "the closed listener was never noticed");
        live.send(&pattern(sent, 5000));
        sent += 5000;
        listeners[0].read_at_least(sent as usize);
    }
    // What a worker sent is counted once its pass has written to every listener due.
    wait_until("the status to count what both listeners got", || {
        get_json(srv.addr, "/status-json.xsl")["icestats"]["source"]["total_bytes_sent"].as_u64()
            >= Some(sent + 5000)
    });
    let doc = get_json(srv.addr, "/status-json.xsl");
    let stats = &doc["icestats"];
    let mut fields = ICESTATS_SERVER_FIELDS.to_vec();
    fields.push(("source", "object"));
    assert_shape(stats, &fields, "icestats with one source");
    let source = &stats["source"];
    // The test source sends Ice-Name, Ice-Genre and Ice-Bitrate only: no URL, no audio info,
    // so those are absent as in Icecast, and the description is Icecast's placeholder.
    let without_optional: Vec<_> = SOURCE_FIELDS
        .iter()
        .copied()
        .filter(|(k, _)| *k != "audio_info")
        .collect();
    assert_shape(source, &without_optional, "the source");
    assert_eq!(
        source["listenurl"],
        format!("http://radio.example:{}/live", srv.addr.port())
    );
    assert_eq!(source["listeners"], 1);
    assert_eq!(source["listener_peak"], 2);
    assert_eq!(source["bitrate"], 128);
    assert_eq!(source["server_name"], "Test Radio");
    assert_eq!(source["genre"], "Test");
    assert_eq!(source["server_description"], "Unspecified description");
    assert_eq!(source["server_type"], "audio/mpeg");
    assert_eq!(source["total_bytes_read"], sent);
    let total_sent = source["total_bytes_sent"].as_u64().unwrap();
    assert!(
        total_sent >= sent + 5000,
        "two listeners read {sent} and 5000 bytes or more: {total_sent}"
    );
    assert_icecast_dates(&source["stream_start"], &source["stream_start_iso8601"]);

    // Two sources: `source` is an array, in mount order, each with the same shape.
    let head = format!(
        "PUT /another HTTP/1.1\r\nHost: test\r\nAuthorization: Basic {}\r\nContent-Type: audio/ogg\r\nIce-Name: Second\r\nIce-URL: http://radio.example/\r\nIce-Audio-Info: channels=2;samplerate=44100;bitrate=96\r\n\r\n",
        basic("source", PASSWORD)
    );
    let mut another = Source::connect_raw(srv.addr, head.as_bytes());
    another.send(&pattern(0, 100));
    srv.wait_metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/another\""],
        |v| v >= 100.0,
    );
    let doc = get_json(srv.addr, "/status-json.xsl");
    let sources = doc["icestats"]["source"]
        .as_array()
        .unwrap_or_else(|| panic!("two sources must be an array: {doc}"));
    assert_eq!(sources.len(), 2);
    let mut with_url = SOURCE_FIELDS.to_vec();
    with_url.push(("server_url", "string"));
    assert_shape(&sources[0], &with_url, "the first source");
    assert_eq!(
        sources[0]["listenurl"].as_str().unwrap(),
        format!("http://radio.example:{}/another", srv.addr.port())
    );
    assert_eq!(sources[0]["bitrate"], 96, "bitrate from ice-audio-info");
    assert_eq!(
        sources[0]["audio_info"],
        "channels=2;samplerate=44100;bitrate=96"
    );
    assert_eq!(sources[0]["server_url"], "http://radio.example/");
    assert_eq!(sources[0]["genre"], "various", "Icecast's default genre");
    assert_shape(&sources[1], &without_optional, "the second source");
    assert_eq!(sources[1]["server_name"], "Test Radio");

    // The admin port serves the same document.
    let admin = get_json(srv.admin, "/status-json.xsl");
    assert_eq!(
        admin["icestats"]["source"].as_array().map(Vec::len),
        Some(2)
    );

    // A source that leaves is no longer listed (Icecast lists sources, not mounts).
    drop(another);
    wait_until("/another to leave the Icecast status", || {
        get_json(srv.addr, "/status-json.xsl")["icestats"]["source"].is_object()
    });
}

#[test]
fn own_status_lists_mounts_with_their_state_and_counters() {
    let srv = TestServer::start(|c| c.defaults.source_grace_secs = 30);
    let doc = get_json(srv.admin, "/status.json");
    assert_eq!(doc["listeners"], 0);
    assert_eq!(doc["mounts"], Value::Array(vec![]));

    let mut live = Source::connect(srv.addr, "/live");
    live.send(&pattern(0, 3000));
    srv.wait_metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/live\""],
        |v| v >= 3000.0,
    );
    let mut l = Listener::connect(srv.addr, "/live");
    l.read_at_least(3000);
    // A worker adds what it sent to the counters once its pass has written to every listener
    // due, so a look right after the listener got its bytes may come before that.
    let sent = l.body.len();
    wait_until("the status to count what the listener got", || {
        get_json(srv.addr, "/status.json")["mounts"][0]["sent_bytes"] == sent
    });
    let doc = get_json(srv.addr, "/status.json");
    assert_shape(
        &doc,
        &[
            ("server_id", "string"),
            ("server_start_iso8601", "string"),
            ("uptime_seconds", "number"),
            ("listeners", "number"),
            ("mounts", "array"),
        ],
        "/status.json",
    );
    assert_eq!(doc["listeners"], 1);
    let m = &doc["mounts"][0];
    assert_shape(
        m,
        &[
            ("mount", "string"),
            ("listenurl", "string"),
            ("state", "string"),
            ("listeners", "number"),
            ("relays", "number"),
            ("listener_peak", "number"),
            ("content_type", "string"),
            ("name", "string"),
            ("description", "null"),
            ("genre", "string"),
            ("url", "null"),
            ("bitrate_kbps", "number"),
            ("audio_info", "null"),
            // What the format layer made of the stream: test patterns are no known format.
            ("subtype", "null"),
            ("title", "null"),
            ("artist", "null"),
            ("metadata_updated", "null"),
            ("stream_start_iso8601", "string"),
            ("received_bytes", "number"),
            ("relay_upstream", "null"),
            ("sent_bytes", "number"),
            ("retained_bytes", "number"),
        ],
        "a mount",
    );
    assert_eq!(m["mount"], "/live");
    assert_eq!(m["state"], "live");
    assert_eq!(m["listeners"], 1);
    assert_eq!(m["received_bytes"], 3000);
    assert_eq!(m["sent_bytes"], sent);
    assert_eq!(m["retained_bytes"], 3000);

    // While the source is away, the mount waits for it with its listeners: Icecast's page no
    // longer lists it, fanstream's says it is waiting.
    drop(live);
    wait_until("the mount to wait for its source", || {
        get_json(srv.addr, "/status.json")["mounts"][0]["state"] == "waiting"
    });
    assert!(get_json(srv.addr, "/status-json.xsl")["icestats"]
        .get("source")
        .is_none());
}

#[test]
fn status_paths_answer_head_and_are_never_mounts() {
    let srv = TestServer::start(|_| {});
    let (status, head, body) = request(srv.addr, b"HEAD /status.json HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200, "{head}");
    assert!(body.is_empty(), "HEAD has no body");
    assert!(head.contains("Content-Length: "));

    let raw = format!(
        "PUT /status-json.xsl HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
        basic("source", PASSWORD)
    );
    let (status, _, _) = request(srv.addr, raw.as_bytes());
    assert_eq!(status, 400, "a source may not take a status path");
    assert_eq!(
        srv.metric("fanstream_listeners", &[]),
        0.0,
        "status requests are not listeners"
    );
}
