//! The same run against Icecast and fanstream, one after the other on the same machine, with
//! the same sources, listeners, burst and lag limit, at each count of mounts: a pair of rows per
//! count and their ratio.
//!
//! Icecast runs a thread per source and has its own limits; a run that cannot be made at some
//! count (a source refused, the server gone) is a result, written in the table in place of its
//! figures, and the other counts still run.

use crate::run::{self, mount_count, mounts_suffix, write_json, RunOpts, Summary};
use crate::servers::Target;

#[derive(clap::Args, Clone, Debug)]
pub struct CompareOpts {
    /// Counts of mounts (one source each): both servers run at each, the listeners spread
    /// evenly over the mounts.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = mount_count())]
    pub mounts: Vec<usize>,
    #[command(flatten)]
    pub run: RunOpts,
}

pub fn compare(o: &CompareOpts) -> Result<(), String> {
    let r = &o.run;
    let mut pairs = Vec::new();
    for &mounts in &o.mounts {
        // `--name` names the table and its runs, so that a second comparison (another binary,
        // say) does not overwrite the first's; by default they are named after the load.
        let run_name = |target| match &r.name {
            Some(name) => format!(
                "{name}-{}{}",
                run::target_name(target),
                mounts_suffix(mounts)
            ),
            None => format!(
                "compare-{}-{}c-{}k{}",
                run::target_name(target),
                r.clients,
                r.bitrate_kbps,
                mounts_suffix(mounts)
            ),
        };
        let variant = |target| RunOpts {
            target,
            mounts,
            name: Some(run_name(target)),
            ..r.clone()
        };
        pairs.push((
            mounts,
            run_pair([variant(Target::Icecast), variant(Target::Fanstream)]),
        ));
    }
    let stem = r.name.clone().unwrap_or_else(|| {
        // One mount keeps the name it had before mount counts were compared.
        let mut stem = format!("compare-{}c-{}k", r.clients, r.bitrate_kbps);
        if o.mounts != [1] {
            let counts: Vec<String> = o.mounts.iter().map(|m| m.to_string()).collect();
            stem += &format!("-mounts-{}", counts.join("-"));
        }
        stem
    });
    let md = table(r, &pairs);
    println!("\n{md}");
    let md_path = r.out_dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    let rows: Vec<Row> = pairs
        .iter()
        .map(|(mounts, [ice, fan])| Row {
            mounts: *mounts,
            icecast: ice.into(),
            fanstream: fan.into(),
        })
        .collect();
    write_json(&r.out_dir.join(format!("{stem}.json")), &rows)?;
    eprintln!("written to {}", md_path.display());
    if pairs.iter().flat_map(|(_, p)| p).all(Result::is_err) {
        return Err("no run could be made (see the table)".into());
    }
    Ok(())
}

/// One mount count in the JSON: both servers' summaries, or why a server could not run.
#[derive(serde::Serialize)]
struct Row<'a> {
    mounts: usize,
    icecast: Outcome<'a>,
    fanstream: Outcome<'a>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum Outcome<'a> {
    Ran(&'a Summary),
    Failed { error: &'a str },
}

impl<'a> From<&'a Result<Summary, String>> for Outcome<'a> {
    fn from(r: &'a Result<Summary, String>) -> Self {
        match r {
            Ok(s) => Outcome::Ran(s),
            Err(error) => Outcome::Failed { error },
        }
    }
}

/// Runs two variants back to back on the same machine and prints each summary; a variant that
/// could not run gives the reason instead.
pub fn run_pair(variants: [RunOpts; 2]) -> [Result<Summary, String>; 2] {
    variants.map(|opts| {
        let r = run::run(&opts);
        match &r {
            Ok(s) => run::print_summary(s),
            Err(e) => eprintln!("{}: could not run: {e}", opts.name()),
        }
        // Let sockets of one run drain before the next.
        std::thread::sleep(std::time::Duration::from_secs(3));
        r
    })
}

/// Runs two variants back to back on the same machine, prints each summary, and writes the
/// table of both (`<stem>.md`) and their summaries (`<stem>.json`); fails if either could not
/// run.
pub fn side_by_side(
    variants: [RunOpts; 2],
    stem: &std::path::Path,
    table: fn(&Summary, &Summary) -> String,
) -> Result<(), String> {
    let [a, b] = run_pair(variants);
    let rows = [a?, b?];
    let table = table(&rows[0], &rows[1]);
    println!("\n{table}");
    let md = stem.with_extension("md");
    std::fs::write(&md, &table).map_err(|e| e.to_string())?;
    write_json(&stem.with_extension("json"), &rows)?;
    eprintln!("written to {}", md.display());
    Ok(())
}

/// The rows every two-run comparison of fanstream shows (plain listeners against ICY or TLS
/// ones): the figures with their ratio, the integrity of each run, then `extra` rows of the
/// variant's own, then how each run went. Appended to `t`, a table with a header row.
pub fn variant_rows(
    t: &mut String,
    base: &Summary,
    other: &Summary,
    extra: Vec<(&str, String, String)>,
) {
    let metrics_us = |s: &Summary| {
        s.server_cpu_pct_metrics
            .map_or(0.0, |p| p * 1e4 / s.streaming_at_end.max(1) as f64)
    };
    let mb = |s: &Summary| s.server_rss_bytes as f64 / 1048576.0;
    let numeric: [(&str, f64, f64, usize); 9] = [
        (
            "listeners streaming at the end",
            base.streaming_at_end as f64,
            other.streaming_at_end as f64,
            0,
        ),
        (
            "delivered (% of bytes owed)",
            base.delivered_ratio * 100.0,
            other.delivered_ratio * 100.0,
            3,
        ),
        (
            "server CPU, % of a core",
            base.server_cpu_pct,
            other.server_cpu_pct,
            1,
        ),
        (
            "**CPU µs per listener-second** (/proc)",
            base.cpu_us_per_listener_sec,
            other.cpu_us_per_listener_sec,
            1,
        ),
        (
            "CPU µs per listener-second (/metrics threads)",
            metrics_us(base),
            metrics_us(other),
            1,
        ),
        (
            "RSS per listener, bytes",
            base.rss_per_listener_bytes,
            other.rss_per_listener_bytes,
            0,
        ),
        ("server RSS, MiB", mb(base), mb(other), 1),
        (
            "write syscalls per listener-second",
            base.write_syscalls_per_listener_sec.unwrap_or(0.0),
            other.write_syscalls_per_listener_sec.unwrap_or(0.0),
            3,
        ),
        (
            "bytes per write (audio)",
            base.bytes_per_write.unwrap_or(0.0),
            other.bytes_per_write.unwrap_or(0.0),
            0,
        ),
    ];
    for (name, b, o, prec) in numeric {
        *t += &format!("| {name} | {b:.prec$} | {o:.prec$} | {} |\n", ratio(o, b));
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
    let latency = |s: &Summary| format!("{:.0} / {:.0}", s.latency_p50_ms, s.latency_p99_ms);
    let load_tool = |s: &Summary| format!("{:.0}", s.load_cpu_pct.iter().sum::<f64>());
    let busy = |s: &Summary| format!("{:.0}", s.machine_busy_pct);
    let mut text = vec![("integrity errors", integrity(base), integrity(other))];
    text.extend(extra);
    text.extend([
        ("latency p50 / p99, ms", latency(base), latency(other)),
        (
            "load tool CPU, % of a core",
            load_tool(base),
            load_tool(other),
        ),
        ("machine busy, % (of 200%)", busy(base), busy(other)),
        (
            "started",
            base.started_utc.clone(),
            other.started_utc.clone(),
        ),
        (
            "load average before",
            base.loadavg_before.clone(),
            other.loadavg_before.clone(),
        ),
        ("limited by", base.limit.clone(), other.limit.clone()),
    ]);
    for (name, b, o) in text {
        *t += &format!("| {name} | {b} | {o} | |\n");
    }
}

/// `a / b` for a table cell, or `n/a` without a `b`.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "n/a".into()
    }
}

/// The figures of a row, each with the precision it is shown at; the ratio row divides them.
fn figures(s: &Summary) -> [(f64, usize); 6] {
    [
        (s.streaming_at_end as f64, 0),
        (s.delivered_ratio * 100.0, 3),
        (s.server_cpu_pct, 1),
        (s.cpu_us_per_listener_sec, 1),
        (s.rss_per_listener_bytes, 0),
        (s.server_rss_bytes as f64 / 1048576.0, 1),
    ]
}

fn table(o: &RunOpts, pairs: &[(usize, [Result<Summary, String>; 2])]) -> String {
    let mut t = format!(
        "{} listeners at {} kbit/s (a piece every {} ms), {} s windows, spread evenly over the mounts (one source each); machine: {}\n\n",
        o.clients,
        o.bitrate_kbps,
        o.interval_ms,
        o.seconds,
        run::machine()
    );
    t += "| mounts | server | listeners streaming at the end | delivered (% of bytes owed) | server CPU, % of a core | CPU µs per listener-second | RSS per listener, bytes | server RSS, MiB | integrity errors | time to first byte p50 / p99, ms | latency p50 / p99, ms | load tool CPU, % of a core | load average before | limited by |\n";
    t += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (mounts, [ice, fan]) in pairs {
        for (server, r) in [("Icecast", ice), ("fanstream", fan)] {
            t += &match r {
                Ok(s) => {
                    let cells: Vec<String> =
                        figures(s).iter().map(|(v, p)| format!("{v:.p$}")).collect();
                    format!(
                        "| {mounts} | {server} | {} | {} | {:.1} / {:.1} | {:.0} / {:.0} | {:.0} | {} | {} |\n",
                        cells.join(" | "),
                        s.integrity.total(),
                        s.ttfb_p50_ms,
                        s.ttfb_p99_ms,
                        s.latency_p50_ms,
                        s.latency_p99_ms,
                        s.load_cpu_pct.iter().sum::<f64>(),
                        s.loadavg_before,
                        s.limit
                    )
                }
                // Table cells hold one line.
                Err(e) => format!(
                    "| {mounts} | {server} | could not run: {} | | | | | | | | | | | |\n",
                    e.replace(['\n', '|'], " ")
                ),
            };
        }
        let ratios: Vec<String> = match (ice, fan) {
            (Ok(i), Ok(f)) => figures(i)
                .iter()
                .zip(figures(f))
                .map(|((a, _), (b, _))| ratio(*a, b))
                .collect(),
            _ => vec!["n/a".into(); 6],
        };
        t += &format!(
            "| {mounts} | Icecast / fanstream | {} | | | | | | |\n",
            ratios.join(" | ")
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: CompareOpts,
    }

    #[test]
    fn a_mount_count_icecast_could_not_take_is_a_row_of_the_table() {
        let o = Cli::parse_from(["compare", "--clients", "200", "--mounts", "1,1000"]).o;
        assert_eq!(o.mounts, [1, 1000]);
        let ran = |target: &str, cpu| {
            Ok(Summary {
                target: target.into(),
                cpu_us_per_listener_sec: cpu,
                ..Summary::default()
            })
        };
        let pairs = [
            (1, [ran("icecast", 60.0), ran("fanstream", 10.0)]),
            (
                1000,
                [
                    Err("source 734 of 1000: source /load733 refused: | HTTP/1.0 403\n".into()),
                    ran("fanstream", 20.0),
                ],
            ),
        ];
        let t = table(&o.run, &pairs);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with('|')).collect();
        // The head and its rule, then Icecast, fanstream and their ratio per mount count.
        assert_eq!(rows.len(), 2 + 3 * 2, "{t}");
        let cells = |row: &str| row.matches('|').count();
        assert!(rows.iter().all(|r| cells(r) == cells(rows[0])), "{t}");
        assert!(rows[4].contains("| 6.00 |"), "{t}");
        assert!(
            rows[5].starts_with("| 1000 | Icecast | could not run: source 734 of 1000"),
            "{t}"
        );
        assert!(rows[6].starts_with("| 1000 | fanstream | "), "{t}");
        assert!(
            rows[7].starts_with("| 1000 | Icecast / fanstream | n/a"),
            "{t}"
        );
    }
}
