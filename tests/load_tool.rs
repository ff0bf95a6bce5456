//! The load tool against the real server binary: a short run with a few dozen verifying
//! listeners, checked through its JSON summary. Figures are not asserted (they belong to
//! `make load`), only that every listener was served every byte, intact.

mod common;

use std::process::Command;

use common::process::scratch_dir;

#[test]
fn a_short_load_run_serves_every_listener_in_full() {
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
        .arg(env!("CARGO_BIN_EXE_fanstream"))
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
