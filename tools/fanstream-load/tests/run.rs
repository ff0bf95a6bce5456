//! The load tool against the real server binary: a short run with a few dozen verifying
//! listeners, checked through its JSON summary. Figures are not asserted (they belong to
//! `make load`), only that every listener was served every byte, intact.

use std::path::PathBuf;
use std::process::Command;

/// A fresh scratch directory for one test, under target/.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The server binary, built into the same directory as this package's binary: Cargo gives a
/// test the paths of its own package's binaries only, and the server is another package.
fn fanstream_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_fanstream-load")).with_file_name("fanstream");
    assert!(
        bin.is_file(),
        "the server binary {} is missing: run the tests with `cargo test --workspace`, which \
         builds every package's binaries first, or build it with `cargo build -p fanstream --bin \
         fanstream` (add `--release` for a release test run)",
        bin.display()
    );
    bin
}

/// Runs `fanstream-load run ARGS --name NAME` against the server binary, in a scratch directory
/// of its own; returns its JSON summary, and the summary's text for assertion messages.
fn load_run(name: &str, args: &[&str]) -> (serde_json::Value, String) {
    let out = scratch_dir(&format!("load_tool_run_{name}"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanstream-load"));
    cmd.arg("run").args(args);
    // A quick ramp, in few processes: what every short run here wants unless it says otherwise.
    for (flag, value) in [("--ramp-per-sec", "400"), ("--per-process", "20")] {
        if !args.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    let status = cmd
        .args(["--name", name])
        .arg("--fanstream-bin")
        .arg(fanstream_bin())
        .arg("--out-dir")
        .arg(&out)
        .status()
        .expect("fanstream-load runs");
    assert!(status.success(), "fanstream-load run failed: {status}");
    let text = std::fs::read_to_string(out.join(format!("{name}.json"))).expect("summary written");
    (serde_json::from_str(&text).expect("summary is JSON"), text)
}

#[test]
fn a_short_load_run_serves_every_listener_in_full() {
    let (s, text) = load_run("smoke", &["--clients", "40", "--seconds", "3"]);
    assert_eq!(s["load_processes"], 2, "{text}");
    assert_eq!(s["streaming_at_end"], 40, "{text}");
    assert_eq!(s["integrity"]["gaps"], 0, "{text}");
    assert_eq!(s["integrity"]["duplicates"], 0, "{text}");
    assert_eq!(s["integrity"]["corrupt"], 0, "{text}");
    assert!(s["delivered_ratio"].as_f64().unwrap() >= 0.999, "{text}");
    assert!(s["server_cpu_pct_metrics"].is_number(), "{text}");
    // Read from the server's own counter: a renamed metric would leave it null.
    assert!(s["wakeups_per_sec"].is_number(), "{text}");
    // The load stream is MPEG to the server's framer: it locks on the source within its first
    // pieces (ingest merges them, up to 16 KiB, and the pieces read before the lock count as
    // out of frame) and finds no byte out of frame after that, where a stream that is not MPEG
    // is out of frame from end to end (some 48 KB in this run).
    let unsynced = s["server_unsynced_bytes"].as_f64().unwrap();
    assert!(unsynced <= 16384.0, "{unsynced} bytes out of frame: {text}");
    assert_eq!(s["ok"], true, "{text}");
}

/// Listeners past the server's connection limit wait in its backlog, where the tool sees only
/// their silence: the verdict reads why from the server.
#[test]
fn a_load_run_past_the_connection_limit_says_so() {
    let (s, text) = load_run(
        "limit",
        &[
            "--clients",
            "30",
            "--seconds",
            "2",
            "--ramp-per-sec",
            "300",
            "--per-process",
            "30",
            "--server-setting",
            "max_connections=20",
        ],
    );
    assert_eq!(s["streaming_at_end"], 20, "{text}");
    assert_eq!(s["ok"], false, "{text}");
    assert!(
        s["server_unanswered"]["workers_full"].as_f64() >= Some(1.0),
        "{text}"
    );
    let limit = s["limit"].as_str().unwrap();
    assert!(
        limit.starts_with("server: it reached its connection limit"),
        "{limit}"
    );
}

/// The interval and the coalescing given as the server's own settings: the ICY listeners strip
/// blocks at the interval the server was given, and the summary states the delay it ran with.
#[test]
fn mount_settings_given_to_the_server_are_the_ones_the_tool_acts_on() {
    let (s, text) = load_run(
        "settings",
        &[
            "--clients",
            "20",
            "--seconds",
            "2",
            "--icy-share",
            "0.5",
            "--server-setting",
            "defaults.icy_metaint=2048",
            "--server-setting",
            "defaults.max_write_delay_ms=200",
        ],
    );
    assert_eq!(s["icy_metaint"], 2048, "{text}");
    assert_eq!(s["max_write_delay_ms"], 200, "{text}");
    assert_eq!(s["icy"]["streaming_at_end"], 10, "{text}");
    assert!(
        s["icy_blocks_per_listener"].as_f64().unwrap() > 0.0,
        "{text}"
    );
    assert_eq!(s["ok"], true, "{text}");
}

#[test]
fn a_short_load_run_with_icy_listeners_verifies_the_audio_between_blocks() {
    // Half of them ICY, side by side with plain ones; a short interval and titles each second,
    // so that a 3 s window holds many blocks and several titles.
    let (s, text) = load_run(
        "icy",
        &[
            "--clients",
            "40",
            "--seconds",
            "3",
            "--icy-share",
            "0.5",
            "--icy-metaint",
            "1024",
            "--title-every-secs",
            "1",
        ],
    );
    assert_eq!(s["streaming_at_end"], 40, "{text}");
    assert_eq!(s["icy"]["clients"], 20, "{text}");
    assert_eq!(s["icy"]["streaming_at_end"], 20, "{text}");
    assert_eq!(s["server_icy_listeners"], 20.0, "{text}");
    for kind in ["gaps", "duplicates", "corrupt"] {
        assert_eq!(s["integrity"][kind], 0, "{kind}: {text}");
    }
    assert_eq!(s["icy"]["counts"]["framing_errors"], 0, "{text}");
    assert_eq!(s["icy"]["listeners_without_blocks"], 0, "{text}");
    // At 16,000 audio bytes a second, a block every 1,024: well over 40 per listener.
    assert!(
        s["icy_blocks_per_listener"].as_f64().unwrap() >= 40.0,
        "{text}"
    );
    assert!(
        s["icy"]["counts"]["titles"].as_u64().unwrap() >= 20,
        "{text}"
    );
    assert!(s["title_updates"]["sent"].as_u64().unwrap() >= 3, "{text}");
    assert_eq!(s["title_updates"]["failed"], 0, "{text}");
    assert!(s["icy"]["delivered_bytes"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(s["ok"], true, "{text}");
}

#[test]
fn a_tiny_sweep_over_two_mount_counts_reports_both() {
    let fanstream = fanstream_bin();
    let out = scratch_dir("load_tool_sweep_mounts");
    let status = Command::new(env!("CARGO_BIN_EXE_fanstream-load"))
        .args(["sweep", "--counts", "20", "--bitrates", "128"])
        .args(["--mounts", "1,4", "--seconds", "2", "--ramp-per-sec", "400"])
        .args(["--name", "tiny"])
        .arg("--fanstream-bin")
        .arg(fanstream)
        .arg("--out-dir")
        .arg(&out)
        .status()
        .expect("fanstream-load runs");
    assert!(status.success(), "fanstream-load sweep failed: {status}");
    // `--name` names the table, the JSON, the charts and the runs: no `sweep.*` is written.
    assert!(!out.join("sweep.json").exists() && !out.join("sweep.md").exists());
    assert!(out.join("tiny-fanstream-20c-128k-4m.json").is_file());
    let text = std::fs::read_to_string(out.join("tiny.json")).expect("tiny.json written");
    let runs: Vec<serde_json::Value> = serde_json::from_str(&text).expect("tiny.json is JSON");
    let mounts: Vec<u64> = runs.iter().map(|s| s["mounts"].as_u64().unwrap()).collect();
    assert_eq!(mounts, [1, 4], "{text}");
    for s in &runs {
        assert_eq!(s["clients"], 20, "{text}");
        assert_eq!(
            s["sources"].as_array().unwrap().len() as u64,
            s["mounts"],
            "{text}"
        );
    }
    let md = std::fs::read_to_string(out.join("tiny.md")).expect("tiny.md written");
    assert!(md.contains("| kbit/s | mounts | listeners |"), "{md}");
    for row in ["| 128 | 1 | 20 |", "| 128 | 4 | 20 |"] {
        assert!(md.contains(row), "no row {row:?} in:\n{md}");
    }
    for chart in [
        "tiny-cpu",
        "tiny-memory",
        "tiny-mounts-cpu",
        "tiny-mounts-memory",
    ] {
        for ext in ["png", "svg"] {
            let f = out.join(format!("{chart}.{ext}"));
            assert!(f.is_file(), "{} missing", f.display());
        }
    }
}

/// The HLS mode through a real nginx cache: 100 clients for 8 s, 1 s segments, every segment
/// verified (no gap, no corruption, timestamps continuous), and fanstream answering about one
/// request per segment however many clients fetched it (the tool fails the run otherwise; the
/// summary is checked here too).
#[test]
fn a_short_hls_run_through_nginx_costs_fanstream_one_request_per_segment() {
    let fanstream = fanstream_bin();
    assert!(
        Command::new("nginx").arg("-v").output().is_ok(),
        "nginx is missing: install Debian's nginx-light (make deps)"
    );
    let out = scratch_dir("load_tool_hls");
    let status = Command::new(env!("CARGO_BIN_EXE_fanstream-load"))
        .args(["hls", "--clients", "100", "--seconds", "8"])
        .args(["--segment-secs", "1", "--via", "nginx"])
        .arg("--fanstream-bin")
        .arg(fanstream)
        .arg("--out-dir")
        .arg(&out)
        .status()
        .expect("fanstream-load runs");
    assert!(status.success(), "fanstream-load hls failed: {status}");
    let text =
        std::fs::read_to_string(out.join("hls-100c-nginx/summary.json")).expect("summary written");
    let s: serde_json::Value = serde_json::from_str(&text).expect("summary is JSON");
    let published = s["segments_published"].as_f64().unwrap();
    assert!(published >= 5.0, "{text}");
    // Each client fetched about every segment published; fanstream answered one request each.
    assert!(
        s["totals"]["segments"].as_f64().unwrap() >= 100.0 * (published - 2.0),
        "{text}"
    );
    assert!(
        s["origin_requests"]["segment"].as_f64().unwrap() <= published + 2.0,
        "{text}"
    );
    for e in ["gaps", "corrupt", "timestamp_breaks", "http_errors"] {
        assert_eq!(s["totals"][e], 0, "{e}: {text}");
    }
}
