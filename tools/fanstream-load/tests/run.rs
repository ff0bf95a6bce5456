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

#[test]
fn a_short_load_run_serves_every_listener_in_full() {
    let fanstream = fanstream_bin();
    let out = scratch_dir("load_tool_run");
    let status = Command::new(env!("CARGO_BIN_EXE_fanstream-load"))
        .args([
            "run",
            "--clients",
            "40",
            "--seconds",
            "3",
            "--ramp-per-sec",
            "400",
        ])
        .args(["--per-process", "20", "--name", "smoke"])
        .arg("--fanstream-bin")
        .arg(fanstream)
        .arg("--out-dir")
        .arg(&out)
        .status()
        .expect("fanstream-load runs");
    assert!(status.success(), "fanstream-load run failed: {status}");
    let text = std::fs::read_to_string(out.join("smoke.json")).expect("summary written");
    let s: serde_json::Value = serde_json::from_str(&text).expect("summary is JSON");
    assert_eq!(s["load_processes"], 2, "{text}");
    assert_eq!(s["streaming_at_end"], 40, "{text}");
    assert_eq!(s["integrity"]["gaps"], 0, "{text}");
    assert_eq!(s["integrity"]["duplicates"], 0, "{text}");
    assert_eq!(s["integrity"]["corrupt"], 0, "{text}");
    assert!(s["delivered_ratio"].as_f64().unwrap() >= 0.999, "{text}");
    assert!(s["server_cpu_pct_metrics"].is_number(), "{text}");
    assert_eq!(s["ok"], true, "{text}");
}
