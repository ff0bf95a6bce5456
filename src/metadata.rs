//! Title updates, as encoders send them: Icecast's `GET /admin/metadata?mode=updinfo&mount=/m&
//! song=TEXT` (libshout: ezstream, ices2, GStreamer `shout2send`; liquidsoap; butt), with
//! `artist=` and `title=` instead of `song=`, optional `url=` and `charset=`; and SHOUTcast v1's
//! `GET /admin.cgi?mode=updinfo&pass=PASS&song=TEXT` (butt and older encoders in SHOUTcast mode).
//!
//! Accepted with the mount's source credentials or the admin credentials (HTTP Basic, or
//! `pass=` for the SHOUTcast form), failures counted like other logins. The update goes to
//! ingest, which publishes it with the mount's stream; ICY listeners get it at their next block.

use std::net::SocketAddr;

use tokio::sync::mpsc::UnboundedSender;

use crate::auth;
use crate::conn::{TitleUpdate, ToIngest};
use crate::http::{valid_mount_path, Request};
use crate::icy::{decode_text, windows_1252};
use crate::reasons::{Realm, Refusal};
use crate::shared::Shared;
use crate::store::SourceState;

/// Icecast's path for title updates.
pub(crate) const ICECAST_PATH: &str = "/admin/metadata";
/// SHOUTcast v1's.
pub(crate) const SHOUTCAST_PATH: &str = "/admin.cgi";
/// Longest title (or artist, or URL) kept, in bytes.
const MAX_FIELD_BYTES: usize = 4096;

pub(crate) fn is_metadata_path(path: &str) -> bool {
    path == ICECAST_PATH || path == SHOUTCAST_PATH
}

/// Applies a title update and returns the whole response, or why not.
pub(crate) fn update(
    shared: &Shared,
    to_ingest: &UnboundedSender<ToIngest>,
    req: &Request,
    peer: SocketAddr,
) -> Result<Vec<u8>, Refusal> {
    let params = Params::of(req);
    let shoutcast = req.path == SHOUTCAST_PATH;
    let cfg = shared.config.load();
    // SHOUTcast has one stream: the mount its sources feed (`shoutcast_mount`).
    let mount = match params.text("mount") {
        Some(m) => m,
        None if shoutcast => cfg.shoutcast_mount.clone(),
        None => return Err(Refusal::BadQuery),
    };
    if !valid_mount_path(&mount) {
        return Err(Refusal::BadPath);
    }
    let given = match params.text("pass") {
        Some(pass) if shoutcast => Some((cfg.source_user_for(&mount).to_string(), pass)),
        _ => req.basic_auth(),
    };
    let source_password = cfg.source_password_for(&mount).unwrap_or_default();
    let admin_password = cfg.admin_password.as_deref().unwrap_or_default();
    auth::check_given(
        &shared.auth_failures,
        &cfg,
        peer,
        &req.path,
        Realm::Source,
        given,
        &[
            (cfg.source_user_for(&mount), source_password),
            (&cfg.admin_user, admin_password),
        ],
    )?;
    if params.text("mode").as_deref() != Some("updinfo") {
        return Err(Refusal::BadQuery);
    }
    let (title, artist) = match (params.text("song"), params.text("title")) {
        (Some(song), _) => (Some(song), None),
        (None, Some(title)) => (Some(title), params.text("artist")),
        (None, None) => match params.text("artist") {
            Some(artist) => (None, Some(artist)),
            // Given blank, `song=` clears the title, as on Icecast: an encoder between tracks.
            None if params.has("song") => (None, None),
            None => return Err(Refusal::BadQuery),
        },
    };
    let live = shared
        .mounts
        .get(&mount)
        .is_some_and(|m| m.store.load().state == SourceState::Live);
    if !live {
        return Err(Refusal::UnknownMount);
    }
    tracing::info!(%peer, %mount, title = ?title, artist = ?artist, "title updated");
    let update = TitleUpdate {
        mount,
        title,
        artist,
        url: params.text("url"),
    };
    // Fails only while the server stops.
    let _ = to_ingest.send(ToIngest::Title(update));
    let body = "<?xml version=\"1.0\"?>\n<iceresponse><message>Metadata update successful</message><return>1</return></iceresponse>\n";
    Ok(format!(
        "HTTP/1.0 200 OK\r\nServer: fanstream/{}\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        env!("CARGO_PKG_VERSION"),
        body.len()
    )
    .into_bytes())
}

/// The query's parameters, decoded as its `charset=` says: Latin-1 and Windows-1252 (by any of
/// their usual names) as Windows-1252, which holds Latin-1's printable characters and is what
/// Windows encoders mean by either; anything else as UTF-8, or as Windows-1252 where it is not
/// valid UTF-8 ([`decode_text`]), since old encoders send their code page without a charset.
struct Params {
    params: Vec<(String, Vec<u8>)>,
    latin1: bool,
}

impl Params {
    fn of(req: &Request) -> Self {
        let params = req.query_params();
        let latin1 = params.iter().any(|(k, v)| {
            k == "charset"
                && matches!(
                    String::from_utf8_lossy(v).to_ascii_lowercase().as_str(),
                    "iso-8859-1"
                        | "latin1"
                        | "latin-1"
                        | "iso8859-1"
                        | "l1"
                        | "windows-1252"
                        | "cp1252"
                        | "x-cp1252"
                )
        });
        Params { params, latin1 }
    }

    /// A parameter's text, bounded, without control characters; None if absent or blank.
    fn has(&self, name: &str) -> bool {
        self.params.iter().any(|(k, _)| k == name)
    }

    fn text(&self, name: &str) -> Option<String> {
        let raw = &self.params.iter().find(|(k, _)| k == name)?.1;
        let text = if self.latin1 {
            windows_1252(raw)
        } else {
            decode_text(raw)
        };
        let mut text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if text.len() > MAX_FIELD_BYTES {
            let mut end = MAX_FIELD_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_head;

    fn params(target: &str) -> Params {
        let raw = format!("GET {target} HTTP/1.0\r\n\r\n");
        Params::of(&parse_head(raw.as_bytes()).unwrap().unwrap().0)
    }

    #[test]
    fn text_is_decoded_in_the_given_charset_and_made_safe() {
        let p = params("/admin/metadata?song=Caf%C3%A9%0A&x=%20");
        assert_eq!(p.text("song").as_deref(), Some("Café"));
        assert_eq!(p.text("x"), None, "blank is absent");
        let p = params("/admin/metadata?charset=ISO-8859-1&song=Caf%E9");
        assert_eq!(p.text("song").as_deref(), Some("Café"));
        let p = params("/admin/metadata?song=Caf%E9");
        assert_eq!(
            p.text("song").as_deref(),
            Some("Café"),
            "not UTF-8: Windows-1252, as old encoders send it"
        );
        let p = params("/admin/metadata?charset=windows-1252&song=%93Caf%E9%94");
        assert_eq!(p.text("song").as_deref(), Some("“Café”"));
        let long = Params {
            params: vec![("song".into(), "é".repeat(5000).into_bytes())],
            latin1: false,
        };
        let t = long.text("song").unwrap();
        assert!(
            t.len() <= MAX_FIELD_BYTES && t.ends_with('é'),
            "cut at a character"
        );
    }
}
