//! Titles with real clients: ICY metadata blocks every `icy_metaint` bytes for listeners that ask
//! with `Icy-MetaData: 1`, title updates through `/admin/metadata` (and SHOUTcast's `admin.cgi`)
//! answered as Icecast answers them, titles that cannot forge a field, no blocks in Ogg streams,
//! and the encoders that send titles on each track change: ezstream (libshout) and liquidsoap,
//! with mpv reporting what it got. Drivers are in tests/common/clients.rs.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clients::*;
use common::media::*;
use common::process::scratch_dir;
use common::*;

/// The default `icy_metaint`.
const DEFAULT_METAINT: usize = 16000;

/// A raw source sending a real stream (an ffmpeg-made file, so that a server that frames MP3 or
/// Ogg sees a valid stream) in 1000-byte pieces every 10 ms, which a test can pause (to know
/// exactly which bytes were sent before a title update) and resume.
struct Feed {
    bytes: Arc<Vec<u8>>,
    sent: Arc<AtomicU64>,
    pause: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A minute of noisy tone as a file: MP3 (past its ID3 tag) or Ogg/Opus, 128 kbit/s.
fn stream_bytes(dir: &std::path::Path, codec: Codec) -> Arc<Vec<u8>> {
    let file = make_file(
        dir,
        &format!("feed.{}", codec.name()),
        &Tone::new(codec, 60.0),
    );
    let bytes = std::fs::read(file).unwrap();
    Arc::new(bytes[id3v2_len(&bytes)..].to_vec())
}

impl Feed {
    fn start(addr: SocketAddr, mount: &str, codec: Codec, bytes: Arc<Vec<u8>>) -> Feed {
        let mut src = Source::connect_typed(addr, mount, codec.content_type());
        let sent = Arc::new(AtomicU64::new(0));
        let pause = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s, p, i, st) = (
            bytes.clone(),
            sent.clone(),
            pause.clone(),
            idle.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            for piece in b.chunks(1000) {
                while p.load(Ordering::SeqCst) && !st.load(Ordering::SeqCst) {
                    i.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                }
                i.store(false, Ordering::SeqCst);
                if st.load(Ordering::SeqCst) {
                    return;
                }
                src.send(piece);
                s.fetch_add(piece.len() as u64, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Feed {
            bytes,
            sent,
            pause,
            idle,
            stop,
            thread: Some(thread),
        }
    }

    /// Pauses the source; returns how many bytes it sent in all.
    fn pause(&self) -> u64 {
        self.pause.store(true, Ordering::SeqCst);
        wait_until("the source to pause", || self.idle.load(Ordering::SeqCst));
        self.sent.load(Ordering::SeqCst)
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
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

/// An ICY listener: the stream, its response head, and its capture split at `icy-metaint`.
fn icy_join(addr: SocketAddr, mount: &str) -> (std::net::TcpStream, String, IcyCapture) {
    let (s, head) = icy_listener(addr, mount);
    let metaint = icy_metaint(&head).unwrap_or_else(|| {
        panic!("a listener sending `Icy-MetaData: 1` got no icy-metaint header: {head:?}")
    });
    (s, head, IcyCapture::new(metaint))
}

/// Updates the title of `mount` with curl on the listener port, with the source credentials.
fn update(addr: SocketAddr, mount: &str, params: &[(&str, &str)]) -> (u16, String) {
    let mut all = vec![("mode", "updinfo"), ("mount", mount)];
    all.extend_from_slice(params);
    let (status, _, body) = curl_get(addr, "/admin/metadata", Some(("source", PASSWORD)), &all);
    (status, body)
}

fn assert_updated(addr: SocketAddr, mount: &str, params: &[(&str, &str)]) {
    let (status, body) = update(addr, mount, params);
    assert_eq!(
        (status, body.trim_end()),
        (200, METADATA_OK),
        "/admin/metadata {params:?} on {mount}"
    );
}

/// A block that carries a title: a `StreamTitle` that is not empty (a server may open with
/// `StreamTitle='';`, as Icecast does).
fn has_title(block: &[u8]) -> bool {
    icy_fields(block)
        .iter()
        .any(|(k, v)| k == "StreamTitle" && !v.is_empty())
}

/// Reads until the next block with a title arrives; returns its position and bytes.
fn next_title_block(
    s: &mut std::net::TcpStream,
    c: &mut IcyCapture,
    what: &str,
) -> (usize, Vec<u8>) {
    let before = c.blocks.len();
    read_until(s, c, what, DEADLINE, |c| {
        c.blocks[before.min(c.blocks.len())..]
            .iter()
            .any(|(_, b)| has_title(b))
    });
    c.blocks[before..]
        .iter()
        .find(|(_, b)| has_title(b))
        .cloned()
        .unwrap()
}

#[test]
fn icy_blocks_come_every_metaint_bytes_with_exact_audio_and_a_new_title_within_one_interval() {
    let dir = scratch_dir("icy_blocks");
    let srv = TestServer::start(|_| {});
    let feed = Feed::start(srv.addr, "/icy", Codec::Mp3, stream_bytes(&dir, Codec::Mp3));
    srv.wait_metric("fanstream_source_up", &["mount=\"/icy\""], |v| v == 1.0);
    let (mut s, head, mut c) = icy_join(srv.addr, "/icy");
    assert_eq!(
        c.metaint, DEFAULT_METAINT,
        "icy-metaint is not the default: {head}"
    );
    read_until(&mut s, &mut c, "4 blocks", DEADLINE, |c| {
        c.blocks.len() >= 4
    });
    // Nothing changed after the first block: each later one is the single 0 byte.
    for (at, b) in &c.blocks[1..] {
        assert!(b.is_empty(), "block at {at} with no title change: {b:?}");
    }

    // Pause the source, read (nearly) everything it sent, update the title, resume: the title
    // must be in the first block written after the update, at most one interval past the bytes
    // the source had sent. (A server may hold back the end of an incomplete frame, hence SLACK.)
    const SLACK: usize = 4096;
    let sent = feed.pause();
    let join = assert_slice_of(&c.audio, &feed.bytes, "audio between blocks") as u64;
    let paused_at = (sent - join) as usize;
    read_until(
        &mut s,
        &mut c,
        "the bytes sent before the pause",
        DEADLINE,
        |c| c.audio.len() + SLACK >= paused_at,
    );
    assert_updated(srv.addr, "/icy", &[("song", "First Song")]);
    feed.resume();
    let (at, block) = next_title_block(&mut s, &mut c, "the new title");
    assert!(
        at <= paused_at + c.metaint,
        "the title arrived in the block after {at} audio bytes; the update came once the source \
         had sent {paused_at}, so it was due within {} more",
        c.metaint
    );
    assert_block_well_formed(&block, "title block");
    assert_eq!(
        icy_fields(&block),
        vec![("StreamTitle".to_string(), "First Song".to_string())]
    );
    let blocks = c.blocks.len();
    read_until(&mut s, &mut c, "the block after the title", DEADLINE, |c| {
        c.blocks.len() > blocks
    });
    assert!(
        c.blocks[blocks].1.is_empty(),
        "the title was sent again although it did not change"
    );

    // Every block sat exactly every metaint bytes: the audio between them is the stream, whole.
    assert_slice_of(&c.audio, &feed.bytes, "audio between blocks");
    assert!(c
        .blocks
        .iter()
        .all(|(at, _)| at % c.metaint == 0 && *at > 0));
}

fn status_source(addr: SocketAddr, mount: &str) -> serde_json::Value {
    let (status, _, body) = request(addr, b"GET /status-json.xsl HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let sources = match &json["icestats"]["source"] {
        serde_json::Value::Array(a) => a.clone(),
        one => vec![one.clone()],
    };
    sources
        .into_iter()
        .find(|s| s["listenurl"].as_str().is_some_and(|u| u.ends_with(mount)))
        .unwrap_or_else(|| panic!("{mount} is not in /status-json.xsl: {json}"))
}

fn status_mount(addr: SocketAddr, mount: &str) -> serde_json::Value {
    let (status, _, body) = request(addr, b"GET /status.json HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    json["mounts"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["mount"] == mount).cloned())
        .unwrap_or_else(|| panic!("{mount} is not in /status.json: {json}"))
}

/// `title` of /status-json.xsl as one text: `artist - title` when both are given.
fn status_title(addr: SocketAddr, mount: &str) -> String {
    let s = status_source(addr, mount);
    match (s["artist"].as_str(), s["title"].as_str()) {
        (Some(a), Some(t)) if !a.is_empty() => format!("{a} - {t}"),
        (_, Some(t)) => t.to_string(),
        _ => String::new(),
    }
}

#[test]
fn admin_metadata_answers_as_icecast_on_both_ports_and_titles_reach_listeners_and_status() {
    let dir = scratch_dir("admin_metadata");
    let mp3 = stream_bytes(&dir, Codec::Mp3);
    let srv = TestServer::start(|c| {
        c.admin_password = Some("admin-secret".into());
        c.mounts.insert(
            "/own".into(),
            fanstream::config::MountSettings {
                source_password: Some("own-secret".into()),
                ..c.defaults.clone()
            },
        );
    });
    let _feed = Feed::start(srv.addr, "/m", Codec::Mp3, mp3.clone());
    let own_head = format!(
        "PUT /own HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
        basic("source", "own-secret")
    );
    let mut own = Source::connect_raw(srv.addr, own_head.as_bytes());
    own.send(&mp3[..4000]);
    wait_until("both mounts live", || {
        let (_, _, body) = request(srv.addr, b"GET /status.json HTTP/1.0\r\n\r\n");
        String::from_utf8_lossy(&body).matches("\"live\"").count() == 2
    });
    let (mut s, _, mut c) = icy_join(srv.addr, "/m");
    let q = |song: &'static str| vec![("mode", "updinfo"), ("mount", "/m"), ("song", song)];

    // Source credentials on the listener port.
    assert_updated(srv.addr, "/m", &[("song", "Hello")]);
    let (_, block) = next_title_block(&mut s, &mut c, "Hello");
    assert_eq!(icy_fields(&block)[0].1, "Hello");
    assert_eq!(status_title(srv.addr, "/m"), "Hello");
    let st = status_mount(srv.addr, "/m");
    assert_eq!(st["title"], "Hello", "/status.json: {st}");
    assert!(
        st["metadata_updated"].is_string() || st["metadata_updated"].is_number(),
        "/status.json has no metadata_updated: {st}"
    );

    // Artist and title make `artist - title`.
    assert_updated(srv.addr, "/m", &[("artist", "Alpha"), ("title", "Beta")]);
    let (_, block) = next_title_block(&mut s, &mut c, "Alpha - Beta");
    assert_eq!(icy_fields(&block)[0].1, "Alpha - Beta");
    assert_eq!(status_title(srv.addr, "/m"), "Alpha - Beta");

    // Admin credentials, on the admin port and on the listener port.
    for (port, name) in [(srv.admin, "admin port"), (srv.addr, "listener port")] {
        let (status, _, body) = curl_get(
            port,
            "/admin/metadata",
            Some(("admin", "admin-secret")),
            &q("By Admin"),
        );
        assert_eq!((status, body.trim_end()), (200, METADATA_OK), "{name}");
    }
    let (_, block) = next_title_block(&mut s, &mut c, "By Admin");
    assert_eq!(icy_fields(&block)[0].1, "By Admin");

    // A mount with its own password takes that one (and the admin's), not the global one.
    let own_q = vec![("mode", "updinfo"), ("mount", "/own"), ("song", "Own")];
    let ok = curl_get(
        srv.addr,
        "/admin/metadata",
        Some(("source", "own-secret")),
        &own_q,
    );
    assert_eq!((ok.0, ok.2.trim_end()), (200, METADATA_OK), "own password");
    let global = curl_get(
        srv.addr,
        "/admin/metadata",
        Some(("source", PASSWORD)),
        &own_q,
    );
    assert_eq!(global.0, 401, "the global password on a mount with its own");

    // Refusals.
    let none = curl_get(srv.addr, "/admin/metadata", None, &q("x"));
    assert_eq!(none.0, 401, "no credentials: {}", none.1);
    let wrong = curl_get(
        srv.addr,
        "/admin/metadata",
        Some(("source", "wrong")),
        &q("x"),
    );
    assert_eq!(wrong.0, 401, "wrong password: {}", wrong.1);
    let unknown = curl_get(
        srv.addr,
        "/admin/metadata",
        Some(("source", PASSWORD)),
        &[("mode", "updinfo"), ("mount", "/nope"), ("song", "x")],
    );
    assert_eq!(unknown.0, 404, "unknown mount: {}", unknown.1);
    let bad_mode = curl_get(
        srv.addr,
        "/admin/metadata",
        Some(("source", PASSWORD)),
        &[("mode", "nonsense"), ("mount", "/m"), ("song", "x")],
    );
    assert_eq!(bad_mode.0, 400, "bad mode: {}", bad_mode.1);
    let no_song = curl_get(
        srv.addr,
        "/admin/metadata",
        Some(("source", PASSWORD)),
        &[("mode", "updinfo"), ("mount", "/m")],
    );
    assert_eq!(no_song.0, 400, "no song: {}", no_song.1);

    // SHOUTcast v1: the password in the query.
    let cgi = curl_get(
        srv.addr,
        "/admin.cgi",
        None,
        &[
            ("mode", "updinfo"),
            ("pass", PASSWORD),
            ("mount", "/m"),
            ("song", "Via Cgi"),
        ],
    );
    assert_eq!(cgi.0, 200, "admin.cgi with pass=: {}", cgi.1);
    let (_, block) = next_title_block(&mut s, &mut c, "Via Cgi");
    assert_eq!(icy_fields(&block)[0].1, "Via Cgi");
    let cgi_wrong = curl_get(
        srv.addr,
        "/admin.cgi",
        None,
        &[
            ("mode", "updinfo"),
            ("pass", "wrong"),
            ("mount", "/m"),
            ("song", "Forged"),
        ],
    );
    assert_ne!(cgi_wrong.0, 200, "admin.cgi with a wrong pass=");
    assert_eq!(status_title(srv.addr, "/m"), "Via Cgi");

    // A blank `song=` clears the title, as on Icecast (an encoder between tracks): listeners
    // get `StreamTitle='';`.
    assert_updated(srv.addr, "/m", &[("song", "")]);
    let before = c.blocks.len();
    read_until(&mut s, &mut c, "the cleared title", DEADLINE, |c| {
        c.blocks[before.min(c.blocks.len())..]
            .iter()
            .any(|(_, b)| !b.is_empty() && !has_title(b))
    });
    let cleared = c.blocks[before..]
        .iter()
        .find(|(_, b)| !b.is_empty() && !has_title(b))
        .unwrap();
    assert_eq!(
        icy_fields(&cleared.1)[0],
        ("StreamTitle".into(), String::new())
    );
    assert_eq!(status_title(srv.addr, "/m"), "");
}

#[test]
fn hostile_titles_cannot_forge_a_field_and_stream_url_is_its_own_field() {
    let dir = scratch_dir("hostile_titles");
    let srv = TestServer::start(|_| {});
    let _feed = Feed::start(srv.addr, "/h", Codec::Mp3, stream_bytes(&dir, Codec::Mp3));
    srv.wait_metric("fanstream_source_up", &["mount=\"/h\""], |v| v == 1.0);
    let (mut s, _, mut c) = icy_join(srv.addr, "/h");

    let long = "x".repeat(5000);
    for (song, what) in [
        ("a';StreamUrl='http://evil';x", "a quote and semicolon"),
        ("one\ntwo\r\u{1}three\u{7f}", "control bytes"),
        (long.as_str(), "5000 bytes"),
    ] {
        assert_updated(srv.addr, "/h", &[("song", song)]);
        let (_, block) = next_title_block(&mut s, &mut c, what);
        assert_block_well_formed(&block, what);
        let fields = icy_fields(&block);
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["StreamTitle"],
            "a title with {what} forged a field: {:?}",
            String::from_utf8_lossy(&block)
        );
        assert!(block.len() <= 255 * 16, "{what}: block of {}", block.len());
    }

    assert_updated(
        srv.addr,
        "/h",
        &[("song", "With Url"), ("url", "http://example.com/x")],
    );
    let (_, block) = next_title_block(&mut s, &mut c, "a title with a URL");
    assert_block_well_formed(&block, "title with url");
    assert_eq!(
        icy_fields(&block),
        vec![
            ("StreamTitle".to_string(), "With Url".to_string()),
            ("StreamUrl".to_string(), "http://example.com/x".to_string())
        ]
    );
}

#[test]
fn ogg_streams_never_carry_icy_blocks() {
    let dir = scratch_dir("ogg_no_icy");
    let srv = TestServer::start(|_| {});
    let _feed = Feed::start(
        srv.addr,
        "/ogg",
        Codec::Opus,
        stream_bytes(&dir, Codec::Opus),
    );
    srv.wait_metric("fanstream_source_up", &["mount=\"/ogg\""], |v| v == 1.0);
    let (mut s, head) = icy_listener(srv.addr, "/ogg");
    assert_eq!(
        icy_metaint(&head),
        None,
        "an Ogg stream offered ICY metadata: {head}"
    );
    // A title update, whatever its answer, must not put anything into the stream.
    let _ = update(srv.addr, "/ogg", &[("song", "Not In Ogg")]);
    let mut c = IcyCapture::new(usize::MAX);
    read_until(&mut s, &mut c, "3 intervals' worth", DEADLINE, |c| {
        c.audio.len() >= 3 * DEFAULT_METAINT
    });
    // Page after page to the end: a block inserted anywhere would break the walk.
    let pages = ogg_pages(&c.audio, "Ogg listener asking for ICY");
    let end = pages.last().map_or(0, |p| p.offset + p.len);
    let tail = &c.audio[end..];
    assert!(
        tail.len() < 65536 && b"OggS".starts_with(&tail[..tail.len().min(4)]),
        "the Ogg stream was altered after byte {end}"
    );
}

/// `icy_metaint` set in the config file, for every mount and for one: the binary as an operator
/// runs it.
#[test]
fn icy_metaint_comes_from_the_config_file() {
    let dir = scratch_dir("icy_metaint_config");
    let mp3 = stream_bytes(&dir, Codec::Mp3);
    let srv = fanstream(
        &dir,
        "[defaults]\nicy_metaint = 8192\nsource_grace_secs = 1\n\n[mounts.\"/small\"]\nicy_metaint = 4096\n",
    );
    for (mount, metaint) in [("/big", 8192), ("/small", 4096)] {
        let feed = Feed::start(srv.addr, mount, Codec::Mp3, mp3.clone());
        let (mut s, head, mut c) = icy_join(srv.addr, mount);
        assert_eq!(c.metaint, metaint, "{mount}: {head}");
        read_until(&mut s, &mut c, "3 blocks", DEADLINE, |c| {
            c.blocks.len() >= 3
        });
        assert_slice_of(&c.audio, &feed.bytes, mount);
    }
}

/// ezstream (libshout) streaming two tagged MP3 files: each title change reaches an ICY listener
/// and mpv, and ezstream reports no failed metadata update.
#[test]
fn ezstream_titles_reach_icy_listeners_and_mpv() {
    let dir = scratch_dir("ezstream_titles");
    let srv = TestServer::start(|c| c.defaults.source_grace_secs = 1);
    let mut one = Tone::new(Codec::Mp3, 4.0).tagged("Alpha", "One");
    one.frequency = 440;
    let mut two = Tone::new(Codec::Mp3, 4.0).tagged("Alpha", "Two");
    two.frequency = 660;
    let files = [
        make_file(&dir, "one.mp3", &one),
        make_file(&dir, "two.mp3", &two),
    ];
    let mut ez = ezstream(&dir, srv.addr, "/ez", "MP3", &files);
    srv.wait_metric("fanstream_source_up", &["mount=\"/ez\""], |v| v == 1.0);
    let url = format!("http://{}/ez", srv.addr);
    let mut player = mpv(&url, 12, 25);
    let (head, titles) = {
        let (mut s, head) = icy_listener(srv.addr, "/ez");
        let mut c = IcyCapture::new(icy_metaint(&head).unwrap_or(usize::MAX));
        // Until the second title, or the end of the stream (the source gone past its grace).
        read_while_open(&mut s, &mut c, Duration::from_secs(20), |c| {
            c.titles().iter().any(|t| t == "Alpha - Two")
        });
        (head, c.titles())
    };
    let status = ez.wait_exit(Duration::from_secs(30));
    let log = ez.text();
    assert!(status.success(), "ezstream failed: {log}");
    assert!(
        !log.contains("shout_set_metadata"),
        "ezstream's title updates failed:\n{log}"
    );
    assert!(
        icy_metaint(&head).is_some(),
        "no icy-metaint for a listener asking for ICY: {head}"
    );
    assert!(
        titles.iter().any(|t| t == "Alpha - One")
            && titles.last().map(String::as_str) == Some("Alpha - Two"),
        "the ICY listener got titles {titles:?}"
    );
    player.wait_exit(Duration::from_secs(30));
    let mpv_log = player.text();
    assert!(
        mpv_log.contains("icy-title: Alpha - One") || mpv_log.contains("icy-title: Alpha - Two"),
        "mpv reported no icy-title:\n{mpv_log}"
    );
}

/// liquidsoap 2.1 re-encoding a playlist of two tagged files to MP3: its title updates succeed
/// (no "Metadata update may have failed") and reach /status-json.xsl.
#[test]
fn liquidsoap_track_changes_update_titles_without_errors() {
    let dir = scratch_dir("liquidsoap_titles");
    let srv = TestServer::start(|c| c.defaults.source_grace_secs = 1);
    let files = [
        make_file(
            &dir,
            "one.mp3",
            &Tone::new(Codec::Mp3, 3.0).tagged("Alpha", "One"),
        ),
        make_file(
            &dir,
            "two.mp3",
            &Tone::new(Codec::Mp3, 3.0).tagged("Alpha", "Two"),
        ),
    ];
    let mut liq = liquidsoap(&dir, srv.addr, "/liq", "%mp3(bitrate=128)", &files);
    srv.wait_metric("fanstream_source_up", &["mount=\"/liq\""], |v| v == 1.0);
    liq.wait_line("the second track", Duration::from_secs(30), |l| {
        l.contains("Prepared") && l.contains("two.mp3")
    });
    // Until the second title shows, or liquidsoap says its update failed.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let title = status_title(srv.addr, "/liq");
        if seen.last() != Some(&title) {
            seen.push(title.clone());
        }
        let log = liq.text();
        if title.contains("Two") || log.contains("Metadata update may have failed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no title in /status-json.xsl: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = liq.text();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Metadata update may have failed"))
        .collect();
    assert!(
        failures.is_empty(),
        "liquidsoap's title updates failed: {failures:#?}"
    );
    assert!(
        seen.iter().any(|t| t.contains("Two")),
        "/status-json.xsl titles seen: {seen:?}"
    );
}

/// A listener who joins with a burst that spans a title change hears each title where it began
/// in the stream: blocks in the burst before the change carry the title before it, and the new
/// title comes in the first block at or after the offset where it was set. (The current title
/// in the first block was up to a burst early: 4 s at 128 kbit/s.)
#[test]
fn a_newcomers_burst_carries_each_title_where_it_began_in_the_stream() {
    const METAINT: usize = 1000;
    const CHANGE: u64 = 30_000;
    const END: u64 = 40_000;
    let srv = TestServer::start(|c| c.defaults.icy_metaint = METAINT);
    let mut source = Source::connect(srv.addr, "/m");
    let updates = |n: f64| {
        srv.wait_metric("fanstream_metadata_updates_total", &["mount=\"/m\""], |v| {
            v == n
        })
    };
    let received = |n: u64| {
        srv.wait_metric(
            "fanstream_source_received_bytes_total",
            &["mount=\"/m\""],
            |v| v == n as f64,
        )
    };
    assert_updated(srv.addr, "/m", &[("song", "Before")]);
    updates(1.0);
    source.send_pattern(0, CHANGE, 1000, Duration::ZERO);
    received(CHANGE);
    assert_updated(srv.addr, "/m", &[("song", "After")]);
    updates(2.0);
    source.send_pattern(CHANGE, END, 1000, Duration::ZERO);
    received(END);

    let (mut s, _, mut c) = icy_join(srv.addr, "/m");
    read_until(&mut s, &mut c, "the burst", DEADLINE, |c| {
        c.audio.len() >= 20_000 && locate(&c.audio).is_some_and(|j| j + c.audio.len() as u64 >= END)
    });
    let joined = locate(&c.audio).expect("the pattern");
    assert!(
        joined + METAINT as u64 <= CHANGE,
        "joined at {joined}: no block before the change"
    );
    let titled: Vec<(u64, String)> = c
        .blocks
        .iter()
        .filter(|(_, b)| has_title(b))
        .map(|(at, b)| (joined + *at as u64, icy_fields(b)[0].1.clone()))
        .collect();
    assert_eq!(titled[0].1, "Before", "{titled:?}");
    assert!(titled[0].0 < CHANGE, "{titled:?}");
    let after = titled
        .iter()
        .find(|(_, t)| t == "After")
        .unwrap_or_else(|| panic!("no block with the new title: {titled:?}"));
    assert!(
        (CHANGE..CHANGE + METAINT as u64).contains(&after.0),
        "the new title came at {} for a change at {CHANGE}: {titled:?}",
        after.0
    );
}
