//! A browser as a listener: headless Chromium opens tests/web/player.html (a file:// page given
//! the stream's URL in its query string), whose `<audio>` element must reach readyState >= 3 with
//! `currentTime` advancing, for a late-joined Ogg/Opus mount (header pages first) and for an MP3
//! mount fed by a libshout source (ezstream, whose writes are not frame-sized). The page logs its
//! state to the console every second; Chromium writes that to its stderr, which the test reads.

mod common;

use std::time::{Duration, Instant};

use common::clients::*;
use common::process::scratch_dir;
use common::*;

/// How long Chromium may take to play, from its start (it needs a second or two to start itself).
const PLAY_DEADLINE: Duration = Duration::from_secs(25);

#[test]
fn chromium_plays_a_late_joined_ogg_opus_mount() {
    let dir = scratch_dir("browser_opus");
    let burst = 16 * 1024;
    let srv = TestServer::start(|c| {
        c.defaults.burst_bytes = burst;
        c.defaults.max_write_delay_ms = 100;
    });
    let _source = ffmpeg_source(srv.addr, "/opus", &Tone::new(Codec::Opus, 60.0));
    let label = "mount=\"/opus\"";
    srv.wait_metric("fanstream_source_up", &[label], |v| v == 1.0);
    // Late: the header pages (the stream's first kilobytes) are several bursts behind the join.
    srv.wait_metric("fanstream_source_received_bytes_total", &[label], |v| {
        v >= 4.0 * burst as f64
    });
    let mut browser = chromium(
        &dir,
        &player_page(&format!("http://{}/opus", srv.addr)),
        PLAY_DEADLINE.as_secs() as u32 + 5,
    );
    let states = wait_playing(&mut browser, 1.0, PLAY_DEADLINE);
    let last = states.last().unwrap();
    assert!(last.ready_state >= 3, "{last:?}");
}

#[test]
fn chromium_plays_an_mp3_mount_fed_by_ezstream_and_starts_at_once() {
    let dir = scratch_dir("browser_mp3");
    let srv = TestServer::start(|c| {
        c.defaults.burst_bytes = 16 * 1024;
        c.defaults.max_write_delay_ms = 100;
    });
    let file = make_file(
        &dir,
        "tone.mp3",
        &Tone::new(Codec::Mp3, 40.0).tagged("Alpha", "Browser"),
    );
    let _ez = ezstream(&dir, srv.addr, "/ez", "MP3", &[file]);
    let label = "mount=\"/ez\"";
    srv.wait_metric("fanstream_source_up", &[label], |v| v == 1.0);
    srv.wait_metric("fanstream_source_received_bytes_total", &[label], |v| {
        v >= 64.0 * 1024.0
    });
    let start = Instant::now();
    let mut browser = chromium(
        &dir,
        &player_page(&format!("http://{}/ez", srv.addr)),
        PLAY_DEADLINE.as_secs() as u32 + 5,
    );
    let states = wait_playing(&mut browser, 1.0, PLAY_DEADLINE);
    // A join on a frame header plays within a fraction of a second of the request; one in the
    // middle of a frame took about 4 s in Chromium (CLIENTS.md).
    let loadstart = states.iter().find(|s| s.what == "event=loadstart");
    let playing = states.iter().find(|s| s.ready_state >= 3);
    if let (Some(a), Some(b)) = (loadstart, playing) {
        assert!(
            b.ms - a.ms < 3000,
            "Chromium needed {} ms from loadstart to readyState >= 3 ({:?} after start)",
            b.ms - a.ms,
            start.elapsed()
        );
    }
}
