//! What many mounts cost against one: the same listeners on each count of mounts, run in turn,
//! round after round, each run's CPU per listener-second set against the first count's in the
//! same round. Runs on a shared machine spread as widely as the differences sought, so one pair
//! proves nothing; rounds alternate their order (drift over the hour weighs on both sides alike)
//! and the table gives every round's ratio and their median.

use crate::run::{self, mount_count, mounts_suffix, write_json, RunOpts, Summary};

#[derive(clap::Args, Clone, Debug)]
pub struct MountsOpts {
    /// Counts of mounts (one source each), the listeners spread evenly over them; the first is
    /// the one the others are measured against.
    #[arg(long, value_delimiter = ',', default_value = "1,1000", value_parser = mount_count())]
    pub mounts: Vec<usize>,
    /// Rounds: each runs every count of mounts once.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    #[command(flatten)]
    pub run: RunOpts,
}

pub fn mounts(o: &MountsOpts) -> Result<(), String> {
    if o.mounts.len() < 2 || o.rounds == 0 {
        return Err("want at least two counts of mounts and one round".into());
    }
    let r = &o.run;
    let mut runs: Vec<(usize, Summary)> = Vec::new();
    // `--name` names the table and its runs, so that a second comparison (another binary, say)
    // does not overwrite the first's; by default they are named after the load.
    let run_prefix = r
        .name
        .clone()
        .unwrap_or_else(|| format!("mounts-{}c-{}k", r.clients, r.bitrate_kbps));
    let stem = r.name.clone().unwrap_or_else(|| {
        let counts: Vec<String> = o.mounts.iter().map(|m| m.to_string()).collect();
        format!("{run_prefix}-{}", counts.join("-"))
    });
    for round in 1..=o.rounds {
        let mut order = o.mounts.clone();
        if round % 2 == 0 {
            order.reverse();
        }
        for mounts in order {
            let opts = RunOpts {
                mounts,
                name: Some(format!("{run_prefix}{}-r{round}", mounts_suffix(mounts))),
                ..r.clone()
            };
            let s = run::run(&opts)?;
            run::print_summary(&s);
            runs.push((round, s));
            write_json(&r.out_dir.join(format!("{stem}.json")), &runs)?;
            // Let the previous run's sockets and processes go before the next.
            std::thread::sleep(std::time::Duration::from_secs(3));
        }
    }
    let md = table(&o.mounts, &runs);
    println!("\n{md}");
    let path = r.out_dir.join(format!("{stem}.md"));
    std::fs::write(&path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("written to {}", path.display());
    Ok(())
}

/// A run's figures set against the base count's run of the same round: the whole server's CPU
/// per listener-second, and the workers' alone.
struct Ratio {
    whole: Option<f64>,
    workers: Option<f64>,
}

fn ratio(of: &Summary, base: &Summary) -> Ratio {
    let div = |a: f64, b: f64| (b > 0.0).then(|| a / b);
    Ratio {
        whole: div(of.cpu_us_per_listener_sec, base.cpu_us_per_listener_sec),
        workers: of
            .workers_cpu_us_per_listener_sec
            .zip(base.workers_cpu_us_per_listener_sec)
            .and_then(|(a, b)| div(a, b)),
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn table(counts: &[usize], runs: &[(usize, Summary)]) -> String {
    let fmt = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.1}"));
    let times = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}×"));
    let mut t = String::new();
    if let Some((_, s)) = runs.first() {
        t += &format!(
            "{} listeners at {} kbit/s ({} B every {} ms), spread evenly over each count of mounts (one source each), {:.0} s windows; machine: {}\n\n",
            s.clients, s.bitrate_kbps, s.piece_bytes, s.interval_ms, s.window_secs, s.machine
        );
    }
    t += "| round | mounts | started (UTC) | load avg before | delivered | integrity errors | latency p99 ms | server CPU µs per listener-s | workers' CPU µs per listener-s | ingest % of a core | fan-out wake-ups a second | RSS MiB |\n";
    t += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (round, s) in runs {
        t += &format!(
            "| {round} | {} | {} | {} | {:.3}% | {} | {:.0} | {:.1} | {} | {} | {} | {:.1} |\n",
            s.mounts,
            s.started_utc,
            s.loadavg_before,
            s.delivered_ratio * 100.0,
            s.integrity.total(),
            s.latency_p99_ms,
            s.cpu_us_per_listener_sec,
            fmt(s.workers_cpu_us_per_listener_sec),
            fmt(s.ingest_cpu_pct),
            s.wakeups_per_sec
                .map_or("n/a".into(), |v| format!("{v:.0}")),
            s.server_rss_bytes as f64 / 1048576.0,
        );
    }
    let base = counts[0];
    let of = |round: usize, mounts: usize| {
        runs.iter()
            .find(|(r, s)| *r == round && s.mounts == mounts)
            .map(|(_, s)| s)
    };
    let rounds = runs.iter().map(|(r, _)| *r).max().unwrap_or(0);
    t += &format!("\nCPU per listener-second against {base} mount(s) in the same round:\n\n");
    t += "| mounts | whole server, each round | median | workers alone, each round | median |\n";
    t += "|---|---|---|---|---|\n";
    for &mounts in &counts[1..] {
        let ratios: Vec<Ratio> = (1..=rounds)
            .filter_map(|round| Some(ratio(of(round, mounts)?, of(round, base)?)))
            .collect();
        let list = |v: &[Option<f64>]| {
            v.iter()
                .map(|x| x.map_or("n/a".into(), |x| format!("{x:.2}")))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let whole: Vec<Option<f64>> = ratios.iter().map(|r| r.whole).collect();
        let workers: Vec<Option<f64>> = ratios.iter().map(|r| r.workers).collect();
        t += &format!(
            "| {mounts} | {} | {} | {} | {} |\n",
            list(&whole),
            times(median(whole.iter().flatten().copied().collect())),
            list(&workers),
            times(median(workers.iter().flatten().copied().collect())),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mounts: usize, whole: f64, workers: f64) -> Summary {
        Summary {
            mounts,
            cpu_us_per_listener_sec: whole,
            workers_cpu_us_per_listener_sec: Some(workers),
            ..Summary::default()
        }
    }

    #[test]
    fn each_round_is_set_against_the_base_count_of_its_own_round() {
        let runs = vec![
            (1, run(1, 10.0, 9.0)),
            (1, run(1000, 20.0, 12.0)),
            // The machine got busier: both sides of round 2 cost more.
            (2, run(1000, 33.0, 18.0)),
            (2, run(1, 15.0, 12.0)),
            (3, run(1, 10.0, 10.0)),
            (3, run(1000, 19.0, 13.0)),
        ];
        let t = table(&[1, 1000], &runs);
        let row = t.lines().find(|l| l.starts_with("| 1000 | 2.00")).unwrap();
        assert_eq!(
            row,
            "| 1000 | 2.00, 2.20, 1.90 | 2.00× | 1.33, 1.50, 1.30 | 1.33× |"
        );
    }

    #[test]
    fn a_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![f64::NAN, 5.0]), Some(5.0));
    }
}
