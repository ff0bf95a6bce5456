//! Runs at growing listener counts, at several bitrates and on several counts of mounts, then a
//! markdown table and charts of CPU and memory per listener, against listeners and against
//! mounts. At each bitrate and mount count the listener counts stop growing after the first run
//! that is not served in full: the one before it is the capacity.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::plot::{self, Series};
use crate::run::{self, mount_count, mounts_suffix, write_json, RunOpts, Summary};

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
    /// Counts of mounts (one source each): every listener count is run on each, its listeners
    /// spread evenly over the mounts.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = mount_count())]
    pub mounts: Vec<usize>,
    /// Every other setting of a run; its --clients and --bitrate-kbps are ignored.
    #[command(flatten)]
    pub run: RunOpts,
}

pub fn sweep(o: &SweepOpts) -> Result<(), String> {
    // `--name` names the table, the JSON, the charts and the runs (`NAME.md`, `NAME-cpu.png`,
    // ...), so that a second sweep does not overwrite the first's; by default, `sweep`.
    let stem = o.run.name.clone().unwrap_or_else(|| "sweep".into());
    let mut all: Vec<Summary> = Vec::new();
    for &kbps in &o.bitrates {
        for &mounts in &o.mounts {
            for &clients in &o.counts {
                let opts = RunOpts {
                    clients,
                    bitrate_kbps: kbps,
                    mounts,
                    name: Some(format!(
                        "{stem}-{}-{clients}c-{kbps}k{}",
                        run::target_name(o.run.target),
                        mounts_suffix(mounts)
                    )),
                    ..o.run.clone()
                };
                let s = run::run(&opts)?;
                run::print_summary(&s);
                let ok = s.ok;
                all.push(s);
                write_json(&o.run.out_dir.join(format!("{stem}.json")), &all)?;
                if !ok {
                    break;
                }
                // Let the previous run's sockets and processes go before the next.
                std::thread::sleep(Duration::from_secs(3));
            }
        }
    }
    let md = table(&all, &o.bitrates, &o.mounts);
    let md_path = o.run.out_dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, &md).map_err(|e| e.to_string())?;
    println!("\n{md}");
    charts(&all, &o.bitrates, &o.mounts, &o.run.out_dir, &stem)?;
    eprintln!(
        "table, JSON and charts written under {}",
        o.run.out_dir.display()
    );
    Ok(())
}

fn table(all: &[Summary], bitrates: &[u64], mount_counts: &[usize]) -> String {
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
    t += "| kbit/s | mounts | listeners | streaming | delivered | integrity errors | server CPU % of a core | CPU µs per listener-s | RSS MiB | RSS B per listener | writes per listener-s | TTFB p99 ms | latency p50/p99 ms | load tool CPU % | machine busy % | load avg before | result |\n";
    t += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for s in all {
        t += &format!(
            "| {} | {} | {} | {} | {:.3}% | {} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {:.1} | {:.0} / {:.0} | {:.0} | {:.0} | {} | {} |\n",
            s.bitrate_kbps,
            s.mounts,
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
        for &mounts in mount_counts {
            let capacity = all
                .iter()
                .filter(|s| s.bitrate_kbps == kbps && s.mounts == mounts && s.ok)
                .map(|s| s.clients)
                .max();
            t += &format!(
                "Capacity at {kbps} kbit/s on {mounts} mount(s) (highest count delivered >= 99.9% with no integrity error): {}\n",
                capacity.map_or("none of the counts tried".into(), |c| c.to_string())
            );
        }
    }
    t
}

/// One line of a chart: its name and its runs, in the order of the x axis.
struct Line<'a> {
    name: String,
    runs: Vec<&'a Summary>,
}

fn series(lines: &[Line], x: fn(&Summary) -> f64, y: fn(&Summary) -> f64) -> Vec<Series> {
    lines
        .iter()
        .filter(|l| !l.runs.is_empty())
        .map(|l| Series {
            name: l.name.clone(),
            points: l.runs.iter().map(|s| (x(s), y(s))).collect(),
            ok: l.runs.iter().map(|s| s.ok).collect(),
        })
        .collect()
}

/// Against listeners, one line per bitrate (and per mount count when there are several); against
/// mounts, one line per bitrate and listener count.
fn charts(
    all: &[Summary],
    bitrates: &[u64],
    mount_counts: &[usize],
    dir: &std::path::Path,
    name: &str,
) -> Result<(), String> {
    let mut by_listeners = Vec::new();
    for &k in bitrates {
        for &m in mount_counts {
            by_listeners.push(Line {
                name: if mount_counts.len() > 1 {
                    format!("{k} kbit/s, {m} mount(s)")
                } else {
                    format!("{k} kbit/s")
                },
                runs: all
                    .iter()
                    .filter(|s| s.bitrate_kbps == k && s.mounts == m)
                    .collect(),
            });
        }
    }
    let counts: BTreeSet<usize> = all.iter().map(|s| s.clients).collect();
    let mut by_mounts = Vec::new();
    for &k in bitrates {
        for &c in &counts {
            let mut runs: Vec<&Summary> = all
                .iter()
                .filter(|s| s.bitrate_kbps == k && s.clients == c)
                .collect();
            runs.sort_by_key(|s| s.mounts);
            by_mounts.push(Line {
                name: format!("{c} listeners, {k} kbit/s"),
                runs,
            });
        }
    }
    let stem = |n: &str| -> PathBuf { dir.join(format!("{name}-{n}")) };
    let (listeners, mounts) = (
        |s: &Summary| s.clients as f64,
        |s: &Summary| s.mounts as f64,
    );
    let (cpu, rss) = (
        |s: &Summary| s.cpu_us_per_listener_sec,
        |s: &Summary| s.rss_per_listener_bytes,
    );
    let by_listeners_desc = "listeners (log scale); hollow: not served in full";
    let by_mounts_desc = "mounts (log scale); hollow: not served in full";
    plot::chart(
        &stem("cpu"),
        "fanstream: server CPU per listener",
        by_listeners_desc,
        "CPU µs per listener-second",
        &series(&by_listeners, listeners, cpu),
    )?;
    plot::chart(
        &stem("memory"),
        "fanstream: server memory per listener",
        by_listeners_desc,
        "RSS bytes per listener",
        &series(&by_listeners, listeners, rss),
    )?;
    plot::chart(
        &stem("mounts-cpu"),
        "fanstream: server CPU per listener, by mounts",
        by_mounts_desc,
        "CPU µs per listener-second",
        &series(&by_mounts, mounts, cpu),
    )?;
    plot::chart(
        &stem("mounts-memory"),
        "fanstream: server memory per listener, by mounts",
        by_mounts_desc,
        "RSS bytes per listener",
        &series(&by_mounts, mounts, rss),
    )
}
