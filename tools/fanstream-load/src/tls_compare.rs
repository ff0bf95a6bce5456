//! What TLS costs the server: the same run twice, back to back on the same machine, every
//! listener plain, then every listener over TLS (fanstream's TLS port, a certificate made for
//! the run), so that the only difference is the encryption. Server CPU cannot be split by
//! listener kind within one run, so the two runs are compared: both rows and their ratio.

use crate::compare::{side_by_side, variant_rows};
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
    variant_rows(&mut t, plain, tls, Vec::new());
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
