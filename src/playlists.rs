//! Playlists, as Icecast serves them: `GET /MOUNT.m3u` and `GET /MOUNT.xspf` for every listed
//! mount (live, not `hidden`), pointing at the stream by the host the client used (its `Host`
//! header, port included), so a playlist fetched through a proxy or a public name plays from
//! there. A mount whose own path ends in `.m3u` or `.xspf` is the stream, not a playlist.

use crate::conn::{log_response, Incoming};
use crate::http::{self, Method};
use crate::markup::escape;
use crate::shared::Shared;
use crate::store::SourceState;

/// The two formats, by the extension that asks for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    M3u,
    Xspf,
}

/// The mount a playlist request names, and the format, if `path` is one for a listed mount.
fn wanted(shared: &Shared, path: &str) -> Option<(String, Kind)> {
    let (mount, kind) = match (path.strip_suffix(".m3u"), path.strip_suffix(".xspf")) {
        (Some(m), _) => (m, Kind::M3u),
        (_, Some(m)) => (m, Kind::Xspf),
        _ => return None,
    };
    let live = |p: &str| {
        shared
            .mounts
            .get(p)
            .map(|m| m.store.load_full())
            .filter(|snap| snap.state == SourceState::Live)
    };
    if live(path).is_some() {
        return None;
    }
    let snap = live(mount)?;
    (!snap.settings.hidden).then(|| (mount.to_string(), kind))
}

/// Whether the router should answer `path` with a playlist.
pub(crate) fn is_playlist(shared: &Shared, path: &str) -> bool {
    wanted(shared, path).is_some()
}

/// Answers a `GET` or `HEAD` of a playlist and closes.
pub(crate) async fn serve(shared: &Shared, incoming: Incoming) {
    let req = &incoming.req;
    let Some((mount, kind)) = wanted(shared, &req.path) else {
        // The mount went between routing and now: as for any unknown path.
        return incoming
            .refuse(shared, crate::reasons::Refusal::UnknownMount)
            .await;
    };
    // Over TLS, a playlist points at the stream over TLS: a player given the page's https link
    // gets an https stream (the Host header carries the TLS port; without one, the address the
    // request came to, as status pages do).
    let (scheme, local) = match incoming.stream.tls_local() {
        Some(local) => ("https", local),
        None => ("http", shared.listen_addr),
    };
    let url = format!(
        "{scheme}://{}{mount}",
        crate::status::host_and_port(req.header("host"), local)
    );
    let name = shared
        .mounts
        .get(&mount)
        .and_then(|m| m.store.load().info.meta.name.clone());
    let (content_type, body) = match kind {
        Kind::M3u => ("audio/x-mpegurl", format!("{url}\n")),
        Kind::Xspf => ("application/xspf+xml", xspf(&url, name.as_deref())),
    };
    let mut resp = format!(
        "HTTP/1.0 200 OK\r\nServer: fanstream/{}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nContent-Disposition: inline; filename=\"{}\"\r\nCache-Control: no-cache, no-store\r\n{}Connection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        body.len(),
        req.path.rsplit('/').next().unwrap_or("listen.m3u"),
        crate::cors::headers(&shared.config.load(), req),
    )
    .into_bytes();
    if req.method != Method::Head {
        resp.extend_from_slice(body.as_bytes());
    }
    log_response(shared, req, incoming.peer, &resp);
    http::write_and_close(incoming.stream, &resp).await;
}

fn xspf(url: &str, name: Option<&str>) -> String {
    let title = name
        .map(|n| format!("<title>{}</title>", escape(n)))
        .unwrap_or_default();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<playlist xmlns=\"http://xspf.org/ns/0/\" version=\"1\">{title}<trackList><track><location>{}</location>{title}</track></trackList></playlist>\n",
        escape(url)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xspf_is_escaped() {
        let x = xspf("http://h/m", Some("Rock & <Roll>"));
        assert!(x.contains("<location>http://h/m</location>"), "{x}");
        assert!(x.contains("<title>Rock &amp; &lt;Roll&gt;</title>"), "{x}");
    }
}
