//! Fallbacks as Icecast operators expect them: a newcomer during an outage gets the fallback at
//! once, chains are followed, `fallback_override` brings listeners back when the source returns,
//! a `fallback_file` plays in a loop (and decodes), and a loop of fallbacks is refused at load.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::clients::{ffmpeg_decode, ffmpeg_source, make_file, Codec, Tone};
use common::*;
use fanstream::MountSettings;

/// Where the second mount's pattern starts: a listener's bytes say which mount they came from
/// (`locate` finds offsets below 2^40).
const HIGH: u64 = 1 << 36;

/// A source writing the verifiable pattern from `base`, 1000 bytes every 10 ms, until dropped.
struct Feeding {
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
}

impl Feeding {
    fn start(addr: std::net::SocketAddr, mount: &str, base: u64) -> Feeding {
        Feeding::start_typed(addr, mount, base, "audio/mpeg")
    }

    fn start_typed(
        addr: std::net::SocketAddr,
        mount: &str,
        base: u64,
        content_type: &str,
    ) -> Feeding {
        let mut source = Source::connect_typed(addr, mount, content_type);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let writer = thread::spawn(move || {
            let mut at = base;
            while !stopped.load(Ordering::Relaxed)
                && source.stream.write_all(&pattern(at, 1000)).is_ok()
            {
                at += 1000;
                thread::sleep(Duration::from_millis(10));
            }
        });
        Feeding {
            stop,
            writer: Some(writer),
        }
    }
}

impl Drop for Feeding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Which pattern the listener's newest bytes are: reads until 64 fresh bytes locate, then
/// returns their offset.
fn newest_offset(l: &mut Listener) -> u64 {
    let start = Instant::now();
    loop {
        let had = l.body.len();
        l.read_at_least(had + 4096);
        let tail = &l.body[l.body.len() - 64..];
        if let Some(at) = locate(tail) {
            return at;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no pattern in the listener's newest bytes"
        );
    }
}

/// Reads until the listener's newest bytes are from the pattern that `from` says.
fn wait_on(l: &mut Listener, what: &str, from: impl Fn(u64) -> bool) {
    let start = Instant::now();
    while !from(newest_offset(l)) {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
    }
}

fn listeners(srv: &TestServer, mount: &str) -> f64 {
    srv.metric("fanstream_listeners", &[&format!("mount=\"{mount}\"")])
}

fn status_of(srv: &TestServer, mount: &str) -> u16 {
    let raw = format!("GET {mount} HTTP/1.0\r\n\r\n");
    request(srv.addr, raw.as_bytes()).0
}

#[test]
fn a_listener_arriving_during_an_outage_gets_the_fallback_at_once() {
    let srv = TestServer::start(|c| {
        let with_fallback = |to: &str| MountSettings {
            source_grace_secs: 60,
            fallback_mount: Some(to.into()),
            ..c.defaults.clone()
        };
        // A chain: /a → /b → /c; /b is declared for its own fallback, /c is not declared.
        c.mounts.insert("/a".into(), with_fallback("/b"));
        c.mounts.insert("/b".into(), with_fallback("/c"));
        c.mounts.insert("/never".into(), with_fallback("/c"));
        c.mounts.insert(
            "/alone".into(),
            MountSettings {
                source_grace_secs: 60,
                ..c.defaults.clone()
            },
        );
    });
    let _c = Feeding::start(srv.addr, "/c", 0);
    let a = Feeding::start(srv.addr, "/a", HIGH);
    let mut first = Listener::connect(srv.addr, "/a");
    assert!(
        newest_offset(&mut first) >= HIGH,
        "/a's own stream while it is live"
    );

    // The source leaves; its listener waits out the grace period on /a...
    drop(a);
    srv.wait_metric("fanstream_source_up", &["mount=\"/a\""], |v| v == 0.0);
    // ...but a newcomer gets the first live mount of the chain at once: /b has no source, /c.
    let asked = Instant::now();
    let mut late = Listener::connect(srv.addr, "/a");
    assert!(
        newest_offset(&mut late) < HIGH,
        "the newcomer gets /c's stream"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "at once, not after the grace"
    );
    assert!(
        late.head.contains("Content-Type: audio/mpeg"),
        "{}",
        late.head
    );
    assert_eq!(
        listeners(&srv, "/a"),
        1.0,
        "the first listener still waits on /a"
    );
    assert_eq!(listeners(&srv, "/c"), 1.0);

    // A declared mount that never had a source sends its listeners to its fallback too.
    let mut never = Listener::connect(srv.addr, "/never");
    assert!(newest_offset(&mut never) < HIGH);
    // Without a fallback, as before: 404 for an idle mount and an unknown one.
    let alone = Feeding::start(srv.addr, "/alone", HIGH);
    drop(alone);
    srv.wait_metric("fanstream_source_up", &["mount=\"/alone\""], |v| v == 0.0);
    assert_eq!(status_of(&srv, "/alone"), 404);
    assert_eq!(status_of(&srv, "/nowhere"), 404);
}

#[test]
fn fallback_override_moves_the_listeners_back_when_the_source_returns() {
    let srv = TestServer::start(|c| {
        c.mounts.insert(
            "/a".into(),
            MountSettings {
                source_grace_secs: 1,
                fallback_mount: Some("/b".into()),
                fallback_override: true,
                ..c.defaults.clone()
            },
        );
        c.mounts.insert(
            "/plain".into(),
            MountSettings {
                source_grace_secs: 1,
                fallback_mount: Some("/b".into()),
                ..c.defaults.clone()
            },
        );
    });
    let _b = Feeding::start(srv.addr, "/b", 0);
    let a = Feeding::start(srv.addr, "/a", HIGH);
    let mut before = Listener::connect(srv.addr, "/a");
    assert!(newest_offset(&mut before) >= HIGH);
    drop(a);
    // After the grace period it is on /b, and so is a newcomer.
    srv.wait_metric("fanstream_listeners", &["mount=\"/b\""], |v| v == 1.0);
    wait_on(&mut before, "the first listener on /b", |at| at < HIGH);
    let mut during = Listener::connect(srv.addr, "/a");
    assert!(newest_offset(&mut during) < HIGH);
    assert_eq!(listeners(&srv, "/b"), 2.0);

    // The source returns: both move back to /a, and keep receiving its stream.
    let _a = Feeding::start(srv.addr, "/a", HIGH + (1 << 30));
    srv.wait_metric("fanstream_listeners", &["mount=\"/a\""], |v| v == 2.0);
    assert_eq!(listeners(&srv, "/b"), 0.0);
    for l in [&mut before, &mut during] {
        wait_on(l, "the listener back on /a", |at| at >= HIGH + (1 << 30));
    }

    // Without fallback_override, listeners stay on the fallback when the source returns.
    let plain = Feeding::start(srv.addr, "/plain", HIGH);
    let mut stays = Listener::connect(srv.addr, "/plain");
    assert!(newest_offset(&mut stays) >= HIGH);
    drop(plain);
    srv.wait_metric("fanstream_listeners", &["mount=\"/b\""], |v| v == 1.0);
    let _plain = Feeding::start(srv.addr, "/plain", HIGH);
    srv.wait_metric("fanstream_source_up", &["mount=\"/plain\""], |v| v == 1.0);
    let at = newest_offset(&mut stays);
    let later = newest_offset(&mut stays);
    assert!(at < HIGH && later < HIGH, "still on /b");
    assert_eq!(listeners(&srv, "/plain"), 0.0);
}

/// Every place the first `probe` bytes of `file`'s audio (past its start) occur in `capture`.
fn occurrences(capture: &[u8], file: &[u8]) -> usize {
    let probe = &file[4000..6000];
    capture.windows(probe.len()).filter(|w| *w == probe).count()
}

fn capture_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// How a listener left its mount: moved (on to the pattern from `HIGH * 2`), or closed.
#[derive(Debug, PartialEq)]
enum Fate {
    Moved,
    Closed,
}

/// Reads until the listener is on the pattern from `HIGH * 2` or is closed; fails the test if it
/// gets any byte of the pattern from `HIGH` (another format's mount).
fn fate(l: &mut Listener) -> Fate {
    let mut buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < DEADLINE, "neither moved nor closed");
        let n = read_some(&mut l.stream, &mut buf).expect("a read");
        if n == 0 {
            return Fate::Closed;
        }
        l.body.extend_from_slice(&buf[..n]);
        let newest = l.body.len().saturating_sub(64);
        for at in (0..l.body.len().saturating_sub(64))
            .step_by(256)
            .chain([newest])
        {
            let offset = locate(&l.body[at..at + 64]);
            assert!(
                !offset.is_some_and(|o| (HIGH..2 * HIGH).contains(&o)),
                "a listener got bytes of another format's stream"
            );
        }
        if locate(&l.body[newest..]).is_some_and(|o| o >= 2 * HIGH) {
            return Fate::Moved;
        }
    }
}

/// At the end of the grace period listeners go down the fallback chain past a live mount whose
/// stream is another format (MP3 frames followed by AAC ones stop a player), to the first in
/// theirs; as many as its `max_listeners` takes, the others are closed.
#[test]
fn listeners_fall_back_only_to_their_format_and_within_the_fallbacks_max_listeners() {
    let srv = TestServer::start(|c| {
        c.defaults.source_grace_secs = 1;
        let with = |fallback: Option<&str>, max_listeners| MountSettings {
            fallback_mount: fallback.map(str::to_string),
            max_listeners,
            ..c.defaults.clone()
        };
        let mounts = [
            ("/a", with(Some("/aac"), 0)),
            ("/aac", with(Some("/b"), 0)),
            ("/b", with(None, 1)),
        ];
        for (path, settings) in mounts {
            c.mounts.insert(path.into(), settings);
        }
    });
    let _aac = Feeding::start_typed(srv.addr, "/aac", HIGH, "audio/aac");
    let _b = Feeding::start(srv.addr, "/b", 2 * HIGH);
    let a = Feeding::start(srv.addr, "/a", 0);
    let mut first = Listener::connect(srv.addr, "/a");
    let mut second = Listener::connect(srv.addr, "/a");
    wait_on(&mut first, "/a's stream", |at| at < HIGH);
    wait_on(&mut second, "/a's stream", |at| at < HIGH);
    drop(a);
    let mut fates = [fate(&mut first), fate(&mut second)];
    fates.sort_by_key(|f| *f == Fate::Closed);
    assert_eq!(fates, [Fate::Moved, Fate::Closed]);
    assert_eq!(listeners(&srv, "/b"), 1.0);
    assert_eq!(listeners(&srv, "/aac"), 0.0);
}

/// A source that comes back within the grace period in another format ends it for the
/// listeners waiting (they could not decode what it sends), and starts the mount anew.
#[test]
fn a_source_back_in_another_format_closes_the_listeners_waiting_for_it() {
    let srv = TestServer::start(|c| c.defaults.source_grace_secs = 60);
    let a = Feeding::start(srv.addr, "/a", 0);
    let mut waiting = Listener::connect(srv.addr, "/a");
    wait_on(&mut waiting, "/a's stream", |at| at < HIGH);
    drop(a);
    srv.wait_metric("fanstream_source_up", &["mount=\"/a\""], |v| v == 0.0);
    let _aac = Feeding::start_typed(srv.addr, "/a", HIGH, "audio/aac");
    // Closed at once, not at the end of the 60 s grace period (the read would time out).
    assert_eq!(fate(&mut waiting), Fate::Closed);
    let mut newcomer = Listener::connect(srv.addr, "/a");
    assert!(
        newcomer.head.contains("Content-Type: audio/aac\r\n"),
        "{}",
        newcomer.head
    );
    wait_on(&mut newcomer, "the new stream", |at| at >= HIGH);
}

#[test]
fn a_fallback_file_plays_in_a_loop_and_decodes() {
    let dir = common::process::scratch_dir("fallback_file");
    for (codec, name) in [(Codec::Mp3, "brb.mp3"), (Codec::Vorbis, "brb.ogg")] {
        let file = make_file(&dir, name, &Tone::new(codec, 2.0));
        let audio = std::fs::read(&file).unwrap();
        let srv = TestServer::start(|c| {
            c.mounts.insert(
                "/a".into(),
                MountSettings {
                    source_grace_secs: 1,
                    fallback_file: Some(file.clone()),
                    fallback_override: true,
                    ..c.defaults.clone()
                },
            );
        });
        // A source in the file's format (listeners are moved only between streams of one
        // format): the test pattern as MP3, or an Ogg Vorbis encoder.
        let source = |base| -> Box<dyn std::any::Any> {
            let source: Box<dyn std::any::Any> = match codec {
                Codec::Mp3 => Box::new(Feeding::start(srv.addr, "/a", base)),
                _ => Box::new(ffmpeg_source(srv.addr, "/a", &Tone::new(codec, 600.0))),
            };
            srv.wait_metric("fanstream_source_up", &["mount=\"/a\""], |v| v == 1.0);
            source
        };
        // A listener there when the source leaves moves to the file after the grace period.
        let a = source(0);
        let mut moved = Listener::connect(srv.addr, "/a");
        moved.read_at_least(20_000);
        drop(a);
        let start = Instant::now();
        while occurrences(&moved.body, &audio) == 0 {
            let had = moved.body.len();
            moved.read_at_least(had + 4096);
            assert!(
                start.elapsed() < DEADLINE,
                "{name}: the moved listener never got the file"
            );
        }

        // A newcomer gets it from the start: three rounds of it, which decode as one stream.
        let mut l = Listener::connect(srv.addr, "/a");
        let ct = codec.content_type();
        assert!(
            l.head.contains(&format!("Content-Type: {ct}")),
            "{}",
            l.head
        );
        let start = Instant::now();
        while occurrences(&l.body, &audio) < 3 {
            let had = l.body.len();
            l.read_at_least(had + 4096);
            assert!(start.elapsed() < DEADLINE, "{name}: the file did not loop");
        }
        let capture = capture_file(&dir, &format!("capture-{name}"), &l.body);
        let decoded = ffmpeg_decode(&capture);
        // Each Ogg round is a new link of a chained stream; ffmpeg times a link from where the
        // one before ended by its last granule position, which Vorbis's end trimming puts a
        // few milliseconds past the audio it decodes, and its PCM muxer says so at each round.
        // Any other message is a failure.
        let unexpected: Vec<&str> = decoded
            .errors
            .lines()
            .filter(|e| !(codec == Codec::Vorbis && e.contains("non monotonically increasing dts")))
            .collect();
        assert!(
            decoded.success && unexpected.is_empty(),
            "{name}: {decoded:?}"
        );
        assert!(decoded.seconds > 4.0, "{name}: {decoded:?}");
        // Not in the status pages: it is a hidden mount of the server's own.
        let (_, _, body) = request(srv.addr, b"GET /status.json HTTP/1.0\r\n\r\n");
        let body = String::from_utf8_lossy(&body);
        assert!(!body.contains("fallback-file"), "{body}");
        // The source returns: fallback_override takes both listeners back from the file.
        let _back = source(HIGH);
        srv.wait_metric("fanstream_listeners", &["mount=\"/a\""], |v| v == 2.0);
        if codec == Codec::Mp3 {
            wait_on(&mut l, "the newcomer back on /a", |at| at >= HIGH);
        } else {
            let had = l.body.len();
            l.read_at_least(had + 20_000);
        }
    }
}

#[test]
fn a_fallback_loop_is_refused_at_config_load() {
    let dir = common::process::scratch_dir("fallback_loop");
    let path = dir.join("fanstream.toml");
    std::fs::write(
        &path,
        "[mounts.\"/a\"]\nfallback_mount = \"/b\"\n[mounts.\"/b\"]\nfallback_mount = \"/a\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fanstream"))
        .env_remove("FANSTREAM_SOURCE_PASSWORD")
        .args([
            "--source-password",
            "x",
            "--listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mounts.\"/a\".fallback_mount: the fallback chain loops: /a -> /b -> /a"),
        "{err}"
    );
}

#[test]
fn check_config_reads_the_fallback_and_intro_files() {
    let dir = common::process::scratch_dir("fallback_check_config");
    let bad = dir.join("empty.mp3");
    std::fs::write(&bad, b"").unwrap();
    for key in ["fallback_file", "intro_file"] {
        let path = dir.join("fanstream.toml");
        let toml = format!("[mounts.\"/a\"]\n{key} = {:?}\n", bad.display().to_string());
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_fanstream"))
            .env_remove("FANSTREAM_SOURCE_PASSWORD")
            .arg("--check-config")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{key}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{key} = {}", bad.display())), "{err}");
    }
}

#[test]
fn a_fallback_file_that_cannot_play_stops_the_start_naming_it() {
    let dir = common::process::scratch_dir("fallback_file_bad");
    let file = dir.join("silence.mp3");
    std::fs::write(&file, b"not audio at all").unwrap();
    let config = fanstream::Config {
        source_password: Some(PASSWORD.into()),
        mounts: [(
            "/a".to_string(),
            MountSettings {
                fallback_file: Some(file.clone()),
                ..MountSettings::default()
            },
        )]
        .into(),
        ..fanstream::Config::default()
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = fanstream::Server::start(config, listener, None)
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("fallback_file") && msg.contains("silence.mp3"),
        "{msg}"
    );
    assert!(msg.contains("no MPEG audio frames"), "{msg}");
}
