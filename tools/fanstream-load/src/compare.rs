//! The same run against Icecast and fanstream, one after the other on the same machine, with
//! the same sources, listeners, burst and lag limit: both rows and their ratio.

use crate::run::{self, write_json, RunOpts, Summary};
use crate::servers::Target;

pub fn compare(o: &RunOpts) -> Result<(), String> {
    let variant = |target| RunOpts {
        target,
        name: Some(format!(
            "compare-{}-{}c-{}k",
            run::target_name(target),
            o.clients,
            o.bitrate_kbps
        )),
        ..o.clone()
    };
    let stem = format!("compare-{}c-{}k", o.clients, o.bitrate_kbps);
    side_by_side(
        [variant(Target::Icecast), variant(Target::Fanstream)],
        &o.out_dir.join(stem),
        table,
    )
}

/// Runs two variants back to back on the same machine, prints each summary, and writes the
/// table of both (`<stem>.md`) and their summaries (`<stem>.json`).
pub fn side_by_side(
    variants: [RunOpts; 2],
    stem: &std::path::Path,
    table: fn(&Summary, &Summary) -> String,
) -> Result<(), String> {
    let mut rows = Vec::new();
    for opts in variants {
        let s = run::run(&opts)?;
        run::print_summary(&s);
        rows.push(s);
        // Let sockets of the first run drain before the second.
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    let table = table(&rows[0], &rows[1]);
    println!("\n{table}");
    let md = stem.with_extension("md");
    std::fs::write(&md, &table).map_err(|e| e.to_string())?;
    write_json(&stem.with_extension("json"), &rows)?;
    eprintln!("written to {}", md.display());
    Ok(())
}

/// `a / b` for a table cell, or `n/a` without a `b`.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "n/a".into()
    }
}

fn table(ice: &Summary, fan: &Summary) -> String {
    let mut t = format!(
        "{} listeners at {} kbit/s ({} B every {} ms), {:.0} s window; machine: {}; load average before: Icecast run {}, fanstream run {}\n\n",
        fan.clients, fan.bitrate_kbps, fan.piece_bytes, fan.interval_ms, fan.window_secs, fan.machine, ice.loadavg_before, fan.loadavg_before
    );
    t += "| | Icecast | fanstream | Icecast / fanstream |\n|---|---|---|---|\n";
    let rows: [(&str, f64, f64, &str); 6] = [
        (
            "listeners streaming at the end",
            ice.streaming_at_end as f64,
            fan.streaming_at_end as f64,
            "0",
        ),
        (
            "delivered (of bytes owed)",
            ice.delivered_ratio * 100.0,
            fan.delivered_ratio * 100.0,
            "3",
        ),
        (
            "server CPU, % of a core",
            ice.server_cpu_pct,
            fan.server_cpu_pct,
            "1",
        ),
        (
            "CPU µs per listener-second",
            ice.cpu_us_per_listener_sec,
            fan.cpu_us_per_listener_sec,
            "1",
        ),
        (
            "RSS per listener, bytes",
            ice.rss_per_listener_bytes,
            fan.rss_per_listener_bytes,
            "0",
        ),
        (
            "server RSS, MiB",
            ice.server_rss_bytes as f64 / 1048576.0,
            fan.server_rss_bytes as f64 / 1048576.0,
            "1",
        ),
    ];
    for (name, i, f, prec) in rows {
        let p: usize = prec.parse().unwrap_or(1);
        t += &format!("| {name} | {i:.p$} | {f:.p$} | {} |\n", ratio(i, f));
    }
    t += &format!(
        "| integrity errors | {} | {} | |\n| time to first byte p50 / p99, ms | {:.1} / {:.1} | {:.1} / {:.1} | |\n| latency p50 / p99, ms | {:.0} / {:.0} | {:.0} / {:.0} | |\n| load tool CPU, % of a core | {:.0} | {:.0} | |\n| limited by | {} | {} | |\n",
        ice.integrity.total(),
        fan.integrity.total(),
        ice.ttfb_p50_ms,
        ice.ttfb_p99_ms,
        fan.ttfb_p50_ms,
        fan.ttfb_p99_ms,
        ice.latency_p50_ms,
        ice.latency_p99_ms,
        fan.latency_p50_ms,
        fan.latency_p99_ms,
        ice.load_cpu_pct.iter().sum::<f64>(),
        fan.load_cpu_pct.iter().sum::<f64>(),
        ice.limit,
        fan.limit
    );
    t
}
