//! The page at `/`: what a new user's browser gets. It lists the mounts of `/status.json` with
//! their name, description, format, bitrate, listeners and now-playing title, an `<audio>`
//! player and the `.m3u` link for each, and the server's version and uptime. The list is written
//! here, on the server, so it works without JavaScript; a small script in the page refreshes it
//! from `/status.json` every few seconds. Everything is in the binary (`page.html`, no external
//! assets): nothing to install, and nothing fetched from another site.

use crate::http::{Method, Request};
use crate::markup::escape;
use crate::shared::Shared;
use crate::status::{self, MountStatus};

/// The page's template: `{{...}}` marks what is filled in per request.
const TEMPLATE: &str = include_str!("page.html");

/// The whole HTTP response for a `GET` or `HEAD` of `/`.
pub(crate) fn response(shared: &Shared, req: &Request) -> Vec<u8> {
    // The page links to mounts by path, so it needs no listen URL of its own.
    let doc = status::own(shared, &status::listen_base(shared, req, None));
    let rows: String = doc.mounts.iter().map(row).collect();
    let body = TEMPLATE
        .replace(
            "{{none_hidden}}",
            if doc.mounts.is_empty() { "" } else { " hidden" },
        )
        .replace("{{mounts}}", &rows)
        .replace("{{version}}", env!("CARGO_PKG_VERSION"))
        .replace("{{uptime}}", &uptime(doc.uptime_seconds));
    let mut out = format!(
        "HTTP/1.0 200 OK\r\nServer: fanstream/{}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        body.len()
    )
    .into_bytes();
    if req.method != Method::Head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// One mount's entry, as the page's script builds it too (`row` and `fill` in `page.html`).
fn row(m: &MountStatus) -> String {
    let mount = escape(&m.mount);
    let name = escape(m.name.as_deref().unwrap_or(&m.mount));
    let description = escape(m.description.as_deref().unwrap_or(""));
    let playing = match (&m.artist, &m.title) {
        (_, None) => String::new(),
        (Some(artist), Some(title)) => format!("Now playing: {artist} - {title}"),
        (None, Some(title)) => format!("Now playing: {title}"),
    };
    format!(
        "<li class=\"mount\" data-mount=\"{mount}\"><div class=\"name\">{name}</div><div class=\"description\">{description}</div><div class=\"facts\">{}</div><div class=\"playing\">{}</div><audio controls preload=\"none\" src=\"{mount}\"></audio><div><a class=\"m3u\" href=\"{mount}.m3u\">{mount}.m3u</a></div></li>\n",
        escape(&facts(m)),
        escape(&playing),
    )
}

/// Format, bitrate, listeners, and whether the source is away.
fn facts(m: &MountStatus) -> String {
    let mut parts = vec![m.subtype.clone().unwrap_or_else(|| m.content_type.clone())];
    if let Some(kbps) = m.bitrate_kbps {
        parts.push(format!("{kbps} kbit/s"));
    }
    let plural = if m.listeners == 1 { "" } else { "s" };
    parts.push(format!("{} listener{plural}", m.listeners));
    if m.state != "live" {
        parts.push("waiting for its source".into());
    }
    parts.join(" · ")
}

/// `3d 4h 5m`, `4h 5m` or `5m 6s`, as the page's script writes it.
fn uptime(secs: u64) -> String {
    let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{m}m {}s", secs % 60),
        (0, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h {m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_reads_like_the_script_writes_it() {
        assert_eq!(uptime(65), "1m 5s");
        assert_eq!(uptime(3600 + 120), "1h 2m");
        assert_eq!(uptime(2 * 86400 + 3600), "2d 1h 0m");
    }

    #[test]
    fn the_template_has_every_placeholder_once() {
        for p in ["{{none_hidden}}", "{{mounts}}", "{{version}}", "{{uptime}}"] {
            assert_eq!(TEMPLATE.matches(p).count(), 1, "{p}");
        }
        assert!(!TEMPLATE.contains("http://") && !TEMPLATE.contains("https://"));
    }
}
