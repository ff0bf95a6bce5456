//! The write coalescing trade-off measured: the same load at several (`min_write_bytes`,
//! `max_write_delay_ms`) pairs, with the syscalls, CPU and latency each costs. The server's
//! defaults are chosen from this table.

use crate::run::{self, write_json, RunArgs, RunOpts, Summary};

#[derive(clap::Args, Clone, Debug)]
pub struct CoalesceOpts {
    /// `min_write_bytes:max_write_delay_ms` pairs (a delay of 0 writes every chunk at once).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4096:0,4096:200,16384:200,65536:500,65536:1000"
    )]
    pub pairs: Vec<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn coalesce(o: &CoalesceOpts) -> Result<(), String> {
    let base = o.run.opts();
    let mut all: Vec<Summary> = Vec::new();
    for pair in &o.pairs {
        let (bytes, ms) = pair
            .split_once(':')
            .and_then(|(b, m)| Some((b.parse::<usize>().ok()?, m.parse::<u64>().ok()?)))
            .ok_or_else(|| format!("bad pair {pair:?}: want BYTES:MS"))?;
        let opts = RunOpts {
            min_write_bytes: Some(bytes),
            max_write_delay_ms: Some(ms),
            name: Some(format!(
                "coalesce-{}c-{}k-{bytes}b-{ms}ms",
                base.clients, base.bitrate_kbps
            )),
            ..base.clone()
        };
        let s = run::run(&opts)?;
        run::print_summary(&s);
        all.push(s);
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    let stem = format!("coalescing-{}c-{}k", base.clients, base.bitrate_kbps);
    let md = table(&all);
    println!("\n{md}");
    std::fs::write(base.out_dir.join(format!("{stem}.md")), &md).map_err(|e| e.to_string())?;
    write_json(&base.out_dir.join(format!("{stem}.json")), &all)
}

fn table(all: &[Summary]) -> String {
    let mut t = String::new();
    if let Some(s) = all.first() {
        t += &format!(
            "{} listeners at {} kbit/s ({} B every {} ms), {:.0} s window; machine: {}\n\n",
            s.clients, s.bitrate_kbps, s.piece_bytes, s.interval_ms, s.window_secs, s.machine
        );
    }
    t += "| min_write_bytes | max_write_delay_ms | writes per listener-s | bytes per write | server CPU % of a core | CPU µs per listener-s | latency p50 / p99 ms | delivered | integrity errors | load avg before |\n";
    t += "|---|---|---|---|---|---|---|---|---|---|\n";
    for s in all {
        t += &format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} / {:.0} | {:.3}% | {} | {} |\n",
            s.min_write_bytes.unwrap_or_default(),
            s.max_write_delay_ms.unwrap_or_default(),
            s.write_syscalls_per_listener_sec
                .map_or("n/a".into(), |w| format!("{w:.2}")),
            s.bytes_per_write
                .map_or("n/a".into(), |b| format!("{b:.0}")),
            s.server_cpu_pct,
            s.cpu_us_per_listener_sec,
            s.latency_p50_ms,
            s.latency_p99_ms,
            s.delivered_ratio * 100.0,
            s.integrity.total(),
            s.loadavg_before,
        );
    }
    t
}
