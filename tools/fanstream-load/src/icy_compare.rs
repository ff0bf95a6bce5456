//! What ICY metadata costs the server: the same run twice, back to back on the same machine,
//! every listener plain, then every listener ICY, titles updated in both (every 5 s unless told
//! otherwise) so that the only difference is the listeners' kind. Server CPU cannot be split by
//! listener kind within one run, so the two runs are compared: both rows and their ratio.

use crate::compare::{side_by_side, variant_rows};
use crate::run::{RunArgs, RunOpts, Summary};

/// The target: ICY at most this many times plain, in CPU per listener-second.
const TARGET_RATIO: f64 = 1.2;
const DEFAULT_TITLE_EVERY_SECS: f64 = 5.0;

pub fn icy_compare(args: &RunArgs) -> Result<(), String> {
    let o = &args.opts();
    let title_every = o.title_every_secs.or(Some(DEFAULT_TITLE_EVERY_SECS));
    let variant = |kind, icy_share| RunOpts {
        icy_share,
        title_every_secs: title_every,
        name: Some(format!(
            "icy-compare-{kind}-{}c-{}k",
            o.clients, o.bitrate_kbps
        )),
        ..o.clone()
    };
    let stem = format!("icy-{}c-{}k", o.clients, o.bitrate_kbps);
    side_by_side(
        [variant("plain", 0.0), variant("icy", 1.0)],
        &o.out_dir.join(stem),
        table,
    )
}

fn table(plain: &Summary, icy: &Summary) -> String {
    let mut t = format!(
        "{} listeners at {} kbit/s ({} B every {} ms), {:.0} s window, icy_metaint {}, title updated every {} s in both runs; machine: {}\n\n",
        icy.clients,
        icy.bitrate_kbps,
        icy.piece_bytes,
        icy.interval_ms,
        icy.window_secs,
        icy.icy_metaint
            .map_or("16000 (default)".into(), |m| m.to_string()),
        icy.title_every_secs.unwrap_or_default(),
        icy.machine
    );
    t += "| | plain | ICY | ICY / plain |\n|---|---|---|---|\n";
    let icy_line = |s: &Summary| {
        format!(
            "{} ({} by the server)",
            s.icy.streaming_at_end,
            s.server_icy_listeners
                .map_or("n/a".into(), |n| format!("{n:.0}"))
        )
    };
    let blocks = |s: &Summary| {
        format!(
            "{} / {} ({:.1} / {:.1} per listener)",
            s.icy.counts.blocks,
            s.icy.counts.titles,
            s.icy_blocks_per_listener,
            s.icy_titles_per_listener
        )
    };
    let extra = vec![
        ("ICY listeners at the end", icy_line(plain), icy_line(icy)),
        ("ICY blocks / with a title", blocks(plain), blocks(icy)),
        (
            "ICY framing errors (in corrupt)",
            plain.icy.counts.framing_errors.to_string(),
            icy.icy.counts.framing_errors.to_string(),
        ),
        (
            "title updates sent / failed",
            format!(
                "{} / {}",
                plain.title_updates.sent, plain.title_updates.failed
            ),
            format!("{} / {}", icy.title_updates.sent, icy.title_updates.failed),
        ),
    ];
    variant_rows(&mut t, plain, icy, extra);
    let r = icy.cpu_us_per_listener_sec / plain.cpu_us_per_listener_sec.max(f64::MIN_POSITIVE);
    t += &format!(
        "\nICY / plain CPU per listener-second: {r:.2} (target: at most {TARGET_RATIO:.1}): {}; audio between blocks {}.\n",
        if r <= TARGET_RATIO { "within" } else { "over" },
        if icy.integrity.total() == 0 && icy.icy.counts.blocks > 0 {
            "byte-exact for every ICY listener"
        } else {
            "NOT verified clean: see the integrity row"
        }
    );
    t
}
