//! What TLS costs the server: the same run twice, back to back on the same machine, every
//! listener plain, then every listener over TLS (fanstream's TLS port, a certificate made for
//! the run), so that the only difference is the encryption. Server CPU cannot be split by
//! listener kind within one run, so the two runs are compared: both rows and their ratio.

use crate::compare::{ratio, side_by_side};
use crate::run::{RunOpts, Summary};

/// The target: TLS at most this many times plain, in CPU per listener-second.
const TARGET_RATIO: f64 = 1.5;

pub fn tls_compare(o: &RunOpts) -> Result<(), String> {
    let variant = |kind, tls| RunOpts {
        tls,
        name: Some(format!(
            "tls-compare-{kind}-{}c-{}k",
            o.clients, o.bitrate_kbps
        )),
        ..o.clone()
    };
    let stem = format!("tls-{}c-{}k", o.clients, o.bitrate_kbps);
    side_by_side(
        [variant("plain", false), variant("tls", true)],
        &o.out_dir.join(stem),
        table,
    )
}

fn table(plain: &Summary, tls: &Summary) -> String {
    let mut t = format!(
        "{} listeners at {} kbit/s ({} B every {} ms), {:.0} s window; machine: {}\n\n",
        tls.clients,
        tls.bitrate_kbps,
        tls.piece_bytes,
        tls.interval_ms,
        tls.window_secs,
        tls.machine
    );
    t += "| | plain | TLS | TLS / plain |\n|---|---|---|---|\n";
    let numeric: [(&str, f64, f64, usize); 8] = [
        (
            "listeners streaming at the end",
            plain.streaming_at_end as f64,
            tls.streaming_at_end as f64,
            0,
        ),
        (
            "delivered (% of bytes owed)",
            plain.delivered_ratio * 100.0,
            tls.delivered_ratio * 100.0,
            3,
        ),
        (
            "server CPU, % of a core",
            plain.server_cpu_pct,
            tls.server_cpu_pct,
            1,
        ),
        (
            "**CPU µs per listener-second** (/proc)",
            plain.cpu_us_per_listener_sec,
            tls.cpu_us_per_listener_sec,
            1,
        ),
        (
            "RSS per listener, bytes",
            plain.rss_per_listener_bytes,
            tls.rss_per_listener_bytes,
            0,
        ),
        (
            "server RSS, MiB",
            plain.server_rss_bytes as f64 / 1048576.0,
            tls.server_rss_bytes as f64 / 1048576.0,
            1,
        ),
        (
            "write syscalls per listener-second",
            plain.write_syscalls_per_listener_sec.unwrap_or(0.0),
            tls.write_syscalls_per_listener_sec.unwrap_or(0.0),
            3,
        ),
        (
            "bytes per write (audio)",
            plain.bytes_per_write.unwrap_or(0.0),
            tls.bytes_per_write.unwrap_or(0.0),
            0,
        ),
    ];
    for (name, p, q, prec) in numeric {
        t += &format!("| {name} | {p:.prec$} | {q:.prec$} | {} |\n", ratio(q, p));
    }
    let integrity = |s: &Summary| {
        format!(
            "{} (gaps {}, duplicates {}, corrupt {})",
            s.integrity.total(),
            s.integrity.gaps,
            s.integrity.duplicates,
            s.integrity.corrupt
        )
    };
    let text: [(&str, String, String); 7] = [
        ("integrity errors", integrity(plain), integrity(tls)),
        (
            "latency p50 / p99, ms",
            format!("{:.0} / {:.0}", plain.latency_p50_ms, plain.latency_p99_ms),
            format!("{:.0} / {:.0}", tls.latency_p50_ms, tls.latency_p99_ms),
        ),
        (
            "load tool CPU, % of a core",
            format!("{:.0}", plain.load_cpu_pct.iter().sum::<f64>()),
            format!("{:.0}", tls.load_cpu_pct.iter().sum::<f64>()),
        ),
        (
            "machine busy, % (of 200%)",
            format!("{:.0}", plain.machine_busy_pct),
            format!("{:.0}", tls.machine_busy_pct),
        ),
        (
            "started",
            plain.started_utc.clone(),
            tls.started_utc.clone(),
        ),
        (
            "load average before",
            plain.loadavg_before.clone(),
            tls.loadavg_before.clone(),
        ),
        ("limited by", plain.limit.clone(), tls.limit.clone()),
    ];
    for (name, p, q) in text {
        t += &format!("| {name} | {p} | {q} | |\n");
    }
    let r = tls.cpu_us_per_listener_sec / plain.cpu_us_per_listener_sec.max(f64::MIN_POSITIVE);
    t += &format!(
        "\nTLS / plain CPU per listener-second: {r:.2} (target: at most {TARGET_RATIO:.1}): {}; TLS listeners {}.\n",
        if r <= TARGET_RATIO { "within" } else { "over" },
        if tls.integrity.total() == 0 && tls.streaming_at_end == tls.clients {
            "all streaming, byte-exact"
        } else {
            "NOT all clean: see the rows above"
        }
    );
    t
}
