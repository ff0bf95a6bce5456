//! Runs at growing listener counts and at several bitrates, then a markdown table and charts of
//! CPU and memory per listener. At each bitrate the counts stop growing after the first run that
//! is not served in full: the one before it is the capacity.

use std::path::PathBuf;
use std::time::Duration;

use crate::plot::{self, Series};
use crate::run::{self, write_json, RunOpts, Summary};

#[derive(clap::Args, Clone, Debug)]
pub struct SweepOpts {
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,1000,5000,10000,19000"
    )]
    pub counts: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "128,2000")]
    pub bitrates: Vec<u64>,
    /// Every other setting of a run; its --clients and --bitrate-kbps are ignored.
    #[command(flatten)]
    pub run: RunOpts,
}

pub fn sweep(o: &SweepOpts) -> Result<(), String> {
    let mut all: Vec<Summary> = Vec::new();
    for &kbps in &o.bitrates {
        for &clients in &o.counts {
            let opts = RunOpts {
                clients,
                bitrate_kbps: kbps,
                name: Some(format!(
                    "sweep-{}-{clients}c-{kbps}k",
                    run::target_name(o.run.target)
                )),
                ..o.run.clone()
            };
            let s = run::run(&opts)?;
            run::print_summary(&s);
            let ok = s.ok;
            all.push(s);
            write_json(&o.run.out_dir.join("sweep.json"), &all)?;
            if !ok {
                break;
            }
            // Let the previous run's sockets and processes go before the next.
            std::thread::sleep(Duration::from_secs(3));
        }
    }
    let md = table(&all, &o.bitrates);
    let md_path = o.run.out_dir.join("sweep.md");
    std::fs::write(&md_path, &md).map_err(|e| e.to_string())?;
    println!("\n{md}");
    charts(&all, &o.bitrates, &o.run.out_dir)?;
    eprintln!(
        "table, JSON and charts written under {}",
        o.run.out_dir.display()
    );
    Ok(())
}

fn table(all: &[Summary], bitrates: &[u64]) -> String {
    let mut t = String::new();
    if let Some(first) = all.first() {
        t += &format!(
            "Machine: {}. Source: pieces every {} ms; {} worker(s) (0 = one per core); coalescing: min_write_bytes {}, max_write_delay_ms {}.\n\n",
            first.machine,
            first.interval_ms,
            first.workers,
            first.min_write_bytes.map_or("default".into(), |v| v.to_string()),
            first.max_write_delay_ms.map_or("default".into(), |v| v.to_string()),
        );
    }
    t += "| kbit/s | listeners | streaming | delivered | integrity errors | server CPU % of a core | CPU µs per listener-s | RSS MiB | RSS B per listener | writes per listener-s | TTFB p99 ms | latency p50/p99 ms | load tool CPU % | machine busy % | load avg before | result |\n";
    t += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for s in all {
        t += &format!(
            "| {} | {} | {} | {:.3}% | {} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {:.1} | {:.0} / {:.0} | {:.0} | {:.0} | {} | {} |\n",
            s.bitrate_kbps,
            s.clients,
            s.streaming_at_end,
            s.delivered_ratio * 100.0,
            s.integrity.total(),
            s.server_cpu_pct,
            s.cpu_us_per_listener_sec,
            s.server_rss_bytes as f64 / 1048576.0,
            s.rss_per_listener_bytes,
            s.write_syscalls_per_listener_sec.map_or("n/a".into(), |w| format!("{w:.2}")),
            s.ttfb_p99_ms,
            s.latency_p50_ms,
            s.latency_p99_ms,
            s.load_cpu_pct.iter().sum::<f64>(),
            s.machine_busy_pct,
            s.loadavg_before,
            if s.ok { "OK".to_string() } else { format!("SHORT ({})", s.limit) },
        );
    }
    t += "\n";
    for &kbps in bitrates {
        let capacity = all
            .iter()
            .filter(|s| s.bitrate_kbps == kbps && s.ok)
            .map(|s| s.clients)
            .max();
        t += &format!(
            "Capacity at {kbps} kbit/s (highest count delivered >= 99.9% with no integrity error): {}\n",
            capacity.map_or("none of the counts tried".into(), |c| c.to_string())
        );
    }
    t
}

fn charts(all: &[Summary], bitrates: &[u64], dir: &std::path::Path) -> Result<(), String> {
    let series = |f: fn(&Summary) -> f64| -> Vec<Series> {
        bitrates
            .iter()
            .map(|&k| {
                let runs = || all.iter().filter(move |s| s.bitrate_kbps == k);
                Series {
                    name: format!("{k} kbit/s"),
                    points: runs().map(|s| (s.clients as f64, f(s))).collect(),
                    ok: runs().map(|s| s.ok).collect(),
                }
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let stem = |n: &str| -> PathBuf { dir.join(n) };
    plot::chart(
        &stem("sweep-cpu"),
        "fanstream: server CPU per listener",
        "CPU µs per listener-second",
        &series(|s| s.cpu_us_per_listener_sec),
    )?;
    plot::chart(
        &stem("sweep-memory"),
        "fanstream: server memory per listener",
        "RSS bytes per listener",
        &series(|s| s.rss_per_listener_bytes),
    )
}
