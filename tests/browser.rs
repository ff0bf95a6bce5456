//! A browser as a listener: headless Chromium opens tests/web/player.html (a file:// page given
//! the stream's URL in its query string), whose `<audio>` element must reach readyState >= 3 with
//! `currentTime` advancing, for a late-joined Ogg/Opus mount (header pages first) and for an MP3
//! mount fed by a libshout source (ezstream, whose writes are not frame-sized). The page logs its
//! state to the console every second; Chromium writes that to its stderr, which the test reads.
//! Over HTTPS, with a test CA's certificate: the page at `/` lists the demo mount and a second
//! one, and the play button of its own `<audio>` plays the demo (driven over the DevTools
//! protocol, as the page is the server's own; its screenshot is the README's); a page on
//! another origin (tests/web/cors_player.html, on file://) reads
//! `/status.json` and plays a stream, both fetched in CORS mode.

mod common;

use std::time::{Duration, Instant};

use common::certs::Ca;
use common::clients::*;
use common::devtools::DevTools;
use common::process::scratch_dir;
use common::*;

/// How long Chromium may take to play, from its start (it needs a second or two to start itself).
const PLAY_DEADLINE: Duration = Duration::from_secs(25);
/// For the demo, which a browser starts at once (far less than the 10-15 s it took).
const DEMO_PLAY_DEADLINE: Duration = Duration::from_secs(8);

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

#[test]
fn over_https_the_page_lists_the_mounts_and_another_origin_reads_status_and_plays() {
    let dir = scratch_dir("browser_https");
    let ca = Ca::new(&dir);
    ca.issue(31);
    let srv = TestServer::start_tls(|c| {
        ca.serve_with(c);
        c.startup.demo = true;
        c.defaults.burst_bytes = 16 * 1024;
        c.defaults.max_write_delay_ms = 100;
    });
    let port = srv.tls.unwrap().port();
    let _source = ffmpeg_source(srv.addr, "/second", &Tone::new(Codec::Mp3, 60.0));
    srv.wait_metric("fanstream_source_up", &["mount=\"/second\""], |v| v == 1.0);
    let origin = format!("https://localhost:{port}");

    // The page at `/`, as a user sees it: it lists both mounts, its script has refreshed it
    // from /status.json, and the play button of the demo's own <audio> plays it.
    let mut page = DevTools::start(
        &dir,
        PLAY_DEADLINE.as_secs() as u32 + 30,
        &["--ignore-certificate-errors"],
    );
    page.open(&format!("{origin}/"), 900, 640);
    let listed = "document.querySelector('li[data-mount=\"/demo\"] audio') !== null \
        && document.querySelector('li[data-mount=\"/second\"] audio') !== null \
        && document.getElementById('updated').textContent.includes('refreshed at')";
    let mut last = Err(String::new());
    wait_until("the page at / listing /demo and /second, refreshed", || {
        last = page.eval(listed);
        last == Ok(serde_json::Value::Bool(true))
    });
    let pressed = page
        .eval(
            "(() => { const a = document.querySelector('li[data-mount=\"/demo\"] audio'); \
             a.play().catch(e => { window.playFailed = e.name; }); return a.currentSrc; })()",
        )
        .unwrap();
    assert_eq!(pressed, format!("{origin}/demo").as_str(), "{last:?}");
    // Chromium reads 272 KiB of a WAV stream before it plays: with a 64 KiB burst, 10-15 s of
    // silence at the demo's 16 KB/s. The demo's own burst, and its running that far ahead from
    // its start, make it play at once.
    let end = Instant::now() + DEMO_PLAY_DEADLINE;
    let mut seen = Vec::new();
    let mut first_playing: Option<f64> = None;
    loop {
        let state = page
            .eval(
                "(() => { const p = document.querySelector('li[data-mount=\"/demo\"] audio'); \
                 return {ready: p.readyState, time: p.currentTime, \
                   error: p.error && p.error.code, failed: window.playFailed || null}; })()",
            )
            .unwrap();
        let ready = state["ready"].as_u64().unwrap();
        let time = state["time"].as_f64().unwrap();
        seen.push(state.to_string());
        if ready >= 3 && time >= *first_playing.get_or_insert(time) + 1.0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the page's own <audio> for /demo did not play 1 s within {DEMO_PLAY_DEADLINE:?} over \
             HTTPS (readyState >= 3 and currentTime advancing); its states:\n{}",
            seen.join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The README's screenshot: the page over HTTPS, its demo player playing.
    let shot = page.screenshot();
    assert!(shot.len() > 10_000, "a screenshot of {} bytes", shot.len());
    std::fs::write(dir.join("page.png"), shot).unwrap();
    drop(page);

    // Another origin: reads /status.json, then plays /second, both in CORS mode.
    let page = test_page("cors_player.html", "server", &origin) + "&mount=%2Fsecond";
    let mut browser = chromium_with(
        &dir,
        &page,
        PLAY_DEADLINE.as_secs() as u32 + 5,
        &["--ignore-certificate-errors"],
    );
    browser.wait_line("the status read across origins", PLAY_DEADLINE, |l| {
        l.contains("fanstream-status: mounts=/demo,/second")
    });
    let states = wait_playing(&mut browser, 1.0, PLAY_DEADLINE);
    assert!(states.last().unwrap().ready_state >= 3);
}
