//! fanstream-load: load runs against fanstream (or Icecast, for comparison).
//!
//! - `source`: one Icecast source sending verifiable records at a steady pace.
//! - `listen`: thousands of verifying listeners in one process.
//! - `run`: one whole run (server, sources, listen processes, summary); `make load`.
//! - `sweep`: runs at growing listener counts, two bitrates and one or more mount counts, with
//!   plots; `make sweep`.
//! - `compare`: the same run against Icecast and fanstream, at one or more mount counts;
//!   `make compare`.
//! - `mounts`: the same listeners on several counts of mounts, round after round, with the
//!   ratios of their CPU per listener-second; `make many-mounts`.
//! - `coalesce`: the same run at several write coalescing settings; `make coalescing`.
//! - `icy-compare`: the same run with plain listeners, then ICY ones; `make icy-compare`.
//! - `tls-compare`: the same run with plain listeners, then TLS ones; `make tls-compare`.
//! - `hls`: HLS clients verifying every segment, directly or through nginx, and fanstream's
//!   CPU beside as many direct listeners; `make hls-load`.
//!
//! Layout: [`record`] (the stream format and its verifier), [`schedule`] (the source's pace),
//! [`source`], [`listen`] (with [`icy`], the ICY listener's framing), [`servers`] (the servers
//! under test), [`procstat`] (/proc), [`run`] (one run and its summary, with [`titles`], the
//! title updates, and [`flood`], stalled TLS handshakes beside the listeners), [`sweep`] (with [`plot`]), [`compare`], [`mounts`], [`coalesce`], [`icy_compare`], [`tls_compare`] and [`hls`].

mod coalesce;
mod compare;
mod flood;
mod hls;
mod icy;
mod icy_compare;
mod listen;
mod mounts;
mod plot;
mod procstat;
mod record;
mod run;
mod schedule;
mod servers;
mod source;
mod sweep;
mod titles;
mod tls_compare;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::schedule::{unix_us, Schedule};

#[derive(Parser)]
#[command(about = "Load runs against fanstream and Icecast: verifying listeners, steady sources")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Push one source (Icecast PUT) for a while.
    Source {
        #[arg(long, default_value = "127.0.0.1:8000")]
        addr: SocketAddr,
        #[arg(long, default_value = "/load0")]
        mount: String,
        #[arg(long, default_value = "source")]
        user: String,
        #[arg(long, env = "FANSTREAM_SOURCE_PASSWORD")]
        password: String,
        #[arg(long, default_value_t = 128)]
        bitrate_kbps: u64,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Bytes per write (each its own syscall), paced over each interval; default: one write
        /// per interval.
        #[arg(long)]
        piece_bytes: Option<usize>,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Verifying listeners in this process; prints JSON lines (progress, then a report).
    Listen {
        #[arg(long, default_value = "127.0.0.1:8000")]
        addr: SocketAddr,
        /// Comma-separated mounts; listeners are spread over them.
        #[arg(long, default_value = "/load0", value_delimiter = ',')]
        mounts: Vec<String>,
        #[arg(long, default_value_t = 100)]
        clients: usize,
        #[arg(long, default_value_t = 0)]
        first_index: usize,
        #[arg(long, default_value_t = 1000.0)]
        ramp_per_sec: f64,
        /// When to start connecting (unix µs); default now.
        #[arg(long)]
        start_us: Option<u64>,
        /// When to stop (unix µs); default `--seconds` from now.
        #[arg(long)]
        end_us: Option<u64>,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Latency is sampled from then on (unix µs); default the start.
        #[arg(long)]
        measure_from_us: Option<u64>,
        /// When the source sent its first piece (unix µs), as `source` prints it: without it,
        /// bytes owed are not known and only integrity is checked.
        #[arg(long, default_value_t = 0)]
        t0_us: u64,
        #[arg(long, default_value_t = 128)]
        bitrate_kbps: u64,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        #[arg(long, default_value_t = 1000)]
        allowance_ms: u64,
        /// The share of listeners that ask for ICY metadata (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        icy_share: f64,
        /// The `icy-metaint` the server must announce; default: whatever it says.
        #[arg(long)]
        icy_metaint: Option<usize>,
        /// Connect over TLS, trusting the CA in this PEM file (for the name `localhost`).
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<std::path::PathBuf>,
    },
    /// One load run: server, sources, listeners, summary (also as JSON under --out-dir).
    Run(run::RunArgs),
    /// Runs at growing listener counts, bitrates and mount counts; table and plots under
    /// --out-dir.
    Sweep(sweep::SweepOpts),
    /// The same run against Icecast and fanstream, side by side, at each mount count.
    Compare(compare::CompareOpts),
    /// The same listeners on several counts of mounts, round after round: each run's CPU per
    /// listener-second against the first count's in the same round (whole server and workers).
    Mounts(mounts::MountsOpts),
    /// The same run at several write coalescing settings of fanstream.
    Coalesce(coalesce::CoalesceOpts),
    /// The same run twice: every listener plain, then every listener ICY (titles updated in
    /// both), side by side with the ratio.
    IcyCompare(run::RunArgs),
    /// The same run twice: every listener plain, then every listener over TLS, side by side
    /// with the ratio.
    TlsCompare(run::RunArgs),
    /// HLS clients polling one MP3 mount's playlist and verifying every segment, directly or
    /// through nginx; fanstream's requests and CPU (beside as many direct listeners).
    Hls(hls::HlsOpts),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Source {
            addr,
            mount,
            user,
            password,
            bitrate_kbps,
            interval_ms,
            piece_bytes,
            seconds,
        } => {
            let o = source::SourceOpts {
                addr,
                mount,
                user,
                password,
                piece_bytes,
            };
            let stream = match source::connect(&o) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            let schedule = Schedule::new(unix_us() + 100_000, bitrate_kbps, interval_ms);
            eprintln!(
                "source {} live: {} B every {} ms; listeners: --t0-us {}",
                o.mount, schedule.piece_bytes, interval_ms, schedule.t0_us
            );
            let running = source::start(vec![(o, stream)], schedule);
            std::thread::sleep(Duration::from_secs(seconds));
            let report = running.stop().pop().unwrap_or_default();
            println!("{}", serde_json::to_string(&report).expect("serialisable"));
            match report.error {
                Some(e) => fail(&e),
                None => ExitCode::SUCCESS,
            }
        }
        Cmd::Listen {
            addr,
            mounts,
            clients,
            first_index,
            ramp_per_sec,
            start_us,
            end_us,
            seconds,
            measure_from_us,
            t0_us,
            bitrate_kbps,
            interval_ms,
            allowance_ms,
            icy_share,
            icy_metaint,
            tls_ca,
        } => {
            let limit = procstat::raise_fd_limit();
            if clients as u64 + 32 > limit {
                return fail(&format!(
                    "{clients} connections need more open files than this process may have ({limit})"
                ));
            }
            let start_us = start_us.unwrap_or_else(unix_us);
            let opts = listen::ListenOpts {
                addr,
                mounts,
                clients,
                first_index,
                ramp_per_sec,
                start_us,
                end_us: end_us.unwrap_or(start_us + seconds * 1_000_000),
                measure_from_us: measure_from_us.unwrap_or(start_us),
                schedule: Schedule::new(t0_us, bitrate_kbps, interval_ms),
                allowance_ms,
                icy_share,
                icy_metaint,
                tls_ca,
            };
            let report = listen::run(opts);
            listen::print_line(&listen::Line::Report(Box::new(report)));
            ExitCode::SUCCESS
        }
        Cmd::Run(args) => match run::run(&args.opts()) {
            Ok(s) => {
                run::print_summary(&s);
                eprintln!(
                    "summary written to {}",
                    args.run.out_dir.join(format!("{}.json", s.name)).display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Cmd::Sweep(o) => sweep::sweep(&o).map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS),
        Cmd::Mounts(o) => mounts::mounts(&o).map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS),
        Cmd::Coalesce(o) => {
            coalesce::coalesce(&o).map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS)
        }
        Cmd::Compare(o) => compare::compare(&o).map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS),
        Cmd::IcyCompare(o) => {
            icy_compare::icy_compare(&o).map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS)
        }
        Cmd::Hls(o) => hls::hls(&o).map_or_else(|e| fail(&e), |_| ExitCode::SUCCESS),
        Cmd::TlsCompare(o) => {
            tls_compare::tls_compare(&o.opts()).map_or_else(|e| fail(&e), |()| ExitCode::SUCCESS)
        }
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("fanstream-load: {msg}");
    ExitCode::FAILURE
}
