//! Real encoders and players against fanstream: ffmpeg pushing MP3 over `icecast://` (PUT and the
//! legacy SOURCE), curl listening, and the capture decoded by ffmpeg without errors.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{require, scratch_dir, ChildGuard};
use common::*;

/// A 4-second 128 kbit/s MP3 tone, made by ffmpeg.
fn make_mp3(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("tone.mp3");
    let status = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=4",
        ])
        .args(["-c:a", "libmp3lame", "-b:a", "128k", "-y"])
        .arg(&out)
        .status()
        .expect("ffmpeg runs");
    assert!(status.success(), "ffmpeg could not make the test MP3");
    out
}

fn push_and_capture(legacy: bool) {
    require("ffmpeg");
    require("ffprobe");
    require("curl");
    let dir = scratch_dir(if legacy {
        "ffmpeg_legacy"
    } else {
        "ffmpeg_put"
    });
    let mp3 = make_mp3(&dir);
    let srv = TestServer::start(|c| {
        c.defaults.source_grace_secs = 1;
        declare(c, "/live");
    });

    let url = format!("icecast://source:{PASSWORD}@{}/live", srv.addr);
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-re", "-i"])
        .arg(&mp3)
        .args(["-c", "copy", "-f", "mp3", "-content_type", "audio/mpeg"]);
    if legacy {
        cmd.args(["-legacy_icecast", "1"]);
    }
    cmd.arg(&url).stdin(Stdio::null());
    let mut encoder = ChildGuard::spawn("ffmpeg encoder", &mut cmd);
    srv.wait_metric("fanstream_source_up", &["mount=\"/live\""], |v| v == 1.0);

    let capture = dir.join("capture.mp3");
    let mut player = ChildGuard::spawn(
        "curl listener",
        Command::new("curl")
            .args(["-sS", "--fail", "-o"])
            .arg(&capture)
            .arg(format!("http://{}/live", srv.addr)),
    );
    let status = encoder.wait_for(Duration::from_secs(60));
    assert!(status.success(), "ffmpeg failed to stream: {status}");
    // The mount closes after the grace period; curl sees the end of the response and exits 0.
    let status = player.wait_for(Duration::from_secs(60));
    assert!(status.success(), "curl failed: {status}");

    let decoded = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i"])
        .arg(&capture)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    let errors = String::from_utf8_lossy(&decoded.stderr);
    assert!(
        decoded.status.success() && errors.trim().is_empty(),
        "capture does not decode cleanly: {errors}"
    );
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(&capture)
        .output()
        .unwrap();
    let duration: f64 = String::from_utf8_lossy(&probe.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0);
    assert!(
        duration > 3.0,
        "capture holds only {duration} s of the 4 s stream"
    );
    let received = std::fs::metadata(&capture).unwrap().len() as f64;
    assert_eq!(
        srv.metric("fanstream_sent_bytes_total", &["mount=\"/live\""]),
        received,
        "what the server says it sent differs from what curl saved"
    );
}

#[test]
fn ffmpeg_pushes_mp3_with_put_and_curl_captures_a_decodable_stream() {
    push_and_capture(false);
}

#[test]
fn ffmpeg_pushes_mp3_with_legacy_source_and_curl_captures_a_decodable_stream() {
    push_and_capture(true);
}
