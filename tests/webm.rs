//! WebM with real clients: ffmpeg pushes WebM (Opus; VP8 with Opus) to a mount, and listeners who
//! join seconds after the stream's start, when its header is long out of the burst, get the EBML
//! header first and then the stream from a Cluster (with video, one that starts with a keyframe).
//! Their captures decode without an error in ffprobe/ffmpeg, and mpv, VLC, GStreamer and
//! Chromium's `<audio>` play the mount. Drivers in tests/common/clients.rs.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::clients::*;
use common::process::scratch_dir;
use common::*;

const EBML: u32 = 0x1A45_DFA3;
const SEGMENT: u32 = 0x1853_8067;
const CLUSTER: u32 = 0x1F43_B675;
const TIMESTAMP: u32 = 0xE7;
const SIMPLE_BLOCK: u32 = 0xA3;

/// How far into the stream the late listeners join.
const JOIN_AFTER: Duration = Duration::from_secs(6);

/// An EBML element head at the start of `b`: (ID with its marker, size if known, head length).
fn head(b: &[u8]) -> Option<(u32, Option<u64>, usize)> {
    let id_len = b.first()?.leading_zeros() as usize + 1;
    let size_len = b.get(id_len)?.leading_zeros() as usize + 1;
    if id_len > 4 || size_len > 8 || b.len() < id_len + size_len {
        return None;
    }
    let id = b[..id_len].iter().fold(0u32, |v, &x| v << 8 | u32::from(x));
    let size = b[id_len + 1..id_len + size_len]
        .iter()
        .fold(u64::from(b[id_len]) & (0xFF >> size_len), |v, &x| {
            v << 8 | u64::from(x)
        });
    let unknown = (1u64 << (7 * size_len)) - 1;
    Some((id, (size != unknown).then_some(size), id_len + size_len))
}

fn uint(b: &[u8]) -> u64 {
    b.iter().fold(0, |v, &x| v << 8 | u64::from(x))
}

/// Where a late listener's capture stands: the length of the header it starts with, the first
/// Cluster's timestamp (ms), and the flags of that Cluster's first block of `track`.
#[derive(Debug)]
struct Joined {
    header_len: usize,
    timestamp_ms: u64,
    first_flags: Option<u8>,
}

/// Checks that `capture` starts with an EBML header, a Segment and its level-1 elements up to a
/// Cluster (the header a player needs), and reads that Cluster.
fn header_then_cluster(capture: &[u8], track: u8, who: &str) -> Joined {
    let start: Vec<u8> = capture.iter().take(16).copied().collect();
    let Some((EBML, Some(size), len)) = head(capture) else {
        panic!("{who}: the capture does not start with an EBML header: {start:02x?}");
    };
    let mut at = len + size as usize;
    let Some((SEGMENT, _, len)) = head(&capture[at..]) else {
        panic!("{who}: no Segment after the EBML header, at {at}");
    };
    at += len;
    loop {
        let Some((id, size, len)) = head(&capture[at..]) else {
            panic!("{who}: the header breaks off at {at}");
        };
        if id == CLUSTER {
            break;
        }
        at += len + size.expect("a header element of known size") as usize;
    }
    let header_len = at;
    let (_, size, len) = head(&capture[at..]).unwrap();
    let end = size.map_or(capture.len(), |s| {
        (at + len + s as usize).min(capture.len())
    });
    at += len;
    let (mut timestamp_ms, mut first_flags) = (None, None);
    while let Some((id, Some(size), len)) = head(&capture[at..end]) {
        let body = &capture[at + len..(at + len + size as usize).min(end)];
        match id {
            TIMESTAMP => timestamp_ms = Some(uint(body)),
            SIMPLE_BLOCK if body.first() == Some(&(0x80 | track)) => {
                first_flags = body.get(3).copied();
                break;
            }
            _ => {}
        }
        at += len + size as usize;
    }
    Joined {
        header_len,
        timestamp_ms: timestamp_ms
            .unwrap_or_else(|| panic!("{who}: the first Cluster has no Timestamp first")),
        first_flags,
    }
}

/// Waits until the source has streamed for [`JOIN_AFTER`] and sent `bytes`, so that the join
/// is well past the header and past the burst.
fn wait_late(srv: &TestServer, mount: &str, bytes: f64, source: &mut Program) {
    let label = format!("mount=\"{mount}\"");
    let started = Instant::now();
    let deadline = started + JOIN_AFTER + DEADLINE;
    loop {
        let got = srv.metric("fanstream_source_received_bytes_total", &[&label]);
        if got >= bytes && started.elapsed() >= JOIN_AFTER {
            return;
        }
        assert!(
            source.running(),
            "the source stopped after {got} bytes: {}",
            source.text()
        );
        assert!(
            Instant::now() < deadline,
            "the source sent only {got} bytes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ffmpeg -v error -i FILE -f null -`: every stream decoded; its error lines.
fn decode_all(file: &Path) -> (bool, String) {
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i"])
        .arg(file)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// `ffprobe -v error -show_entries stream=codec_name -of csv=p=0 FILE`: one codec a line.
fn codecs(file: &Path) -> String {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "stream=codec_name"])
        .args(["-of", "csv=p=0"])
        .arg(file)
        .output()
        .expect("ffprobe runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn webm_opus_listeners_joining_late_get_the_header_first_and_play() {
    static STOP: AtomicBool = AtomicBool::new(false);
    let dir = scratch_dir("webm_opus");
    let burst = 16 * 1024;
    let srv = TestServer::start(|c| {
        c.defaults.burst_bytes = burst;
        c.defaults.max_write_delay_ms = 100;
    });
    let mount = "/webm";
    let mut tone = Tone::new(Codec::Opus, 60.0).tagged("Tester", "WebM");
    tone.kbps = 64;
    let mut source = ffmpeg_webm_source(srv.addr, mount, &tone, false);
    srv.wait_metric("fanstream_source_up", &["mount=\"/webm\""], |v| v == 1.0);
    let early = background_capture(srv.addr, mount, &STOP);
    // At 64 kbit/s a burst is 2 s of the stream: the header is several bursts behind the join.
    wait_late(&srv, mount, 3.0 * burst as f64, &mut source);

    let url = format!("http://{}{mount}", srv.addr);
    let (capture, (gst_decoded, gst_log), (mpv_status, mpv_log), (vlc_status, vlc_log), browser) =
        std::thread::scope(|s| {
            let gst = s.spawn(|| gst_decode_url_until(&url, 100, 20));
            let mpv = s.spawn(|| mpv(&url, 2, 20).outcome(Duration::from_secs(30)));
            let vlc = s.spawn(|| cvlc(&url, 3, 25).outcome(Duration::from_secs(30)));
            let browser = s.spawn(|| {
                let mut b = chromium(&dir, &player_page(&url), 30);
                wait_playing(&mut b, 1.0, Duration::from_secs(25))
            });
            let capture = capture_for(srv.addr, mount, 5.0);
            (
                capture,
                gst.join().unwrap(),
                mpv.join().unwrap(),
                vlc.join().unwrap(),
                browser.join(),
            )
        });
    STOP.store(true, Ordering::Relaxed);
    let early = early.join().unwrap();
    drop(source);

    let who = format!("a WebM Opus listener joining after {JOIN_AFTER:?}");
    let joined = header_then_cluster(&capture, 1, &who);
    let from_start = header_then_cluster(&early, 1, "the listener from the start");
    assert_eq!(
        capture[..joined.header_len],
        early[..from_start.header_len],
        "{who}: the header differs from the stream's own"
    );
    assert!(
        joined.timestamp_ms >= 2000,
        "{who}: the join is not mid-stream: {joined:?}"
    );
    let file = dir.join("late.webm");
    std::fs::write(&file, &capture).unwrap();
    assert_eq!(codecs(&file), "opus", "{who}");
    let decoded = ffmpeg_decode(&file);
    assert!(
        decoded.success && decoded.errors.is_empty() && decoded.seconds >= 3.0,
        "{who}: the capture does not decode cleanly: {decoded:?}"
    );
    assert!(
        gst_decoded >= 100 && !gst_log.contains("ERROR:"),
        "{who}: GStreamer (souphttpsrc ! decodebin) decoded {gst_decoded} buffers, not 100 \
         (20 ms each):\n{gst_log}"
    );
    assert!(
        mpv_status.success() && mpv_log.contains("AO: [null]"),
        "{who}: mpv did not play: {mpv_status}\n{mpv_log}"
    );
    // VLC's own Matroska demuxer finds no Cluster in any stream it cannot seek (ffmpeg's live
    // WebM piped to it from the first byte included), and VLC then opens its libavformat one;
    // either must have opened the Opus decoder, which takes the header. As with Ogg, its dummy
    // output may report "buffer deadlock prevented" as a burst fills its queue; any other
    // decoder error is a failure.
    let vlc_errors: Vec<&str> = vlc_log
        .lines()
        .filter(|l| l.contains("decoder error") && !l.contains("buffer deadlock prevented"))
        .collect();
    assert!(
        vlc_status.success()
            && (vlc_log.contains("using demux module \"mkv\"")
                || vlc_log.contains("using demux module \"avformat\""))
            && vlc_log.contains("using audio decoder module \"opus\"")
            && vlc_errors.is_empty(),
        "{who}: VLC did not play: {vlc_status}\n{vlc_log}"
    );
    if let Err(panic) = browser {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn webm_vp8_listener_joining_late_starts_at_a_keyframe_and_decodes() {
    let dir = scratch_dir("webm_vp8");
    let burst = 64 * 1024;
    let srv = TestServer::start(|c| {
        c.defaults.burst_bytes = burst;
        c.defaults.max_write_delay_ms = 100;
    });
    let mount = "/video";
    let mut source = ffmpeg_webm_source(srv.addr, mount, &Tone::new(Codec::Opus, 40.0), true);
    srv.wait_metric("fanstream_source_up", &["mount=\"/video\""], |v| v == 1.0);
    wait_late(&srv, mount, 3.0 * burst as f64, &mut source);

    let url = format!("http://{}{mount}", srv.addr);
    let (capture, (mpv_status, mpv_log)) = std::thread::scope(|s| {
        let mpv = s.spawn(|| mpv(&url, 2, 20).outcome(Duration::from_secs(30)));
        (capture_for(srv.addr, mount, 4.0), mpv.join().unwrap())
    });
    drop(source);

    let who = format!("a WebM VP8 listener joining after {JOIN_AFTER:?}");
    // ffmpeg numbers the video track 1, the audio 2.
    let joined = header_then_cluster(&capture, 1, &who);
    assert!(
        joined.timestamp_ms >= 2000,
        "{who}: the join is not mid-stream: {joined:?}"
    );
    assert!(
        joined.first_flags.is_some_and(|f| f & 0x80 != 0),
        "{who}: the first Cluster does not start with a keyframe: {joined:?}"
    );
    let file = dir.join("late.webm");
    std::fs::write(&file, &capture).unwrap();
    assert_eq!(codecs(&file), "vp8\nopus", "{who}");
    let (ok, errors) = decode_all(&file);
    assert!(
        ok && errors.is_empty(),
        "{who}: the capture does not decode cleanly: {errors}"
    );
    assert!(
        mpv_status.success() && mpv_log.contains("AO: [null]"),
        "{who}: mpv did not play: {mpv_status}\n{mpv_log}"
    );
}
