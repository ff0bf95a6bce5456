//! CORS, for web players on other sites: which pages may read a stream or a status page, and
//! the answer to a browser's preflight. A `<audio src>` plays across origins without any of
//! this; what needs it is a player that reads the stream with `fetch` (to parse ICY titles, or
//! Media Source Extensions), asks for `Icy-MetaData: 1` (not a header browsers send without a
//! preflight), or reads `/status.json` for the now-playing title.

use crate::config::Config;
use crate::http::Request;

/// The response headers a page's script may read besides the safelisted ones: the stream's
/// description and the ICY interval a player needs to find the metadata blocks.
const EXPOSED_HEADERS: &str =
    "icy-br, icy-description, icy-genre, icy-metaint, icy-name, icy-pub, icy-url";

/// Request headers a preflight may ask for: the ICY request, and a range (which players send,
/// and a stream ignores).
const ALLOWED_HEADERS: &str = "Icy-MetaData, Range";

/// What the preflight allows: fanstream serves nothing else to web pages.
const ALLOWED_METHODS: &str = "GET, HEAD, OPTIONS";

/// How long a browser may keep a preflight's answer, in seconds.
const PREFLIGHT_MAX_AGE_SECS: u32 = 86400;

/// The CORS lines (each ending in CRLF) for a response to `req`: the allowed origin (`*`, or the
/// request's `Origin` when the configured list names it) and the exposed headers. When the
/// answer depends on the request's origin, `Vary: Origin` keeps a cache from serving one
/// origin's answer to another. Nothing when `cors_allowed_origins` is empty.
pub(crate) fn headers(cfg: &Config, req: &Request) -> String {
    let allowed = &cfg.cors_allowed_origins;
    if allowed.is_empty() {
        return String::new();
    }
    let origin = if allowed.iter().any(|o| o == "*") {
        "*".to_string()
    } else {
        match req.header("origin") {
            Some(o) if allowed.iter().any(|a| a.eq_ignore_ascii_case(o)) => {
                format!("{o}\r\nVary: Origin")
            }
            _ => return "Vary: Origin\r\n".into(),
        }
    };
    format!(
        "Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Expose-Headers: {EXPOSED_HEADERS}\r\n"
    )
}

/// The whole answer to an `OPTIONS` request: `204` with what a preflight asks, on any path (a
/// preflight for a mount that is not live yet still learns what it may send), and `Allow` for
/// a plain `OPTIONS`.
pub(crate) fn preflight(cfg: &Config, req: &Request) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 204 No Content\r\nServer: fanstream/{}\r\nAllow: {ALLOWED_METHODS}\r\n{}",
        env!("CARGO_PKG_VERSION"),
        headers(cfg, req)
    );
    if !cfg.cors_allowed_origins.is_empty() {
        out.push_str(&format!(
            "Access-Control-Allow-Methods: {ALLOWED_METHODS}\r\nAccess-Control-Allow-Headers: {ALLOWED_HEADERS}\r\nAccess-Control-Max-Age: {PREFLIGHT_MAX_AGE_SECS}\r\n"
        ));
    }
    out.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(origin: Option<&str>) -> Request {
        let (req, _) = crate::http::parse_head(
            match origin {
                Some(o) => format!("GET /live HTTP/1.1\r\nOrigin: {o}\r\n\r\n"),
                None => "GET /live HTTP/1.1\r\n\r\n".into(),
            }
            .as_bytes(),
        )
        .unwrap()
        .unwrap();
        req
    }

    fn config(origins: &[&str]) -> Config {
        Config {
            cors_allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
            ..Config::default()
        }
    }

    #[test]
    fn any_origin_by_default() {
        let h = headers(&Config::default(), &req(Some("https://a.example")));
        assert!(h.starts_with("Access-Control-Allow-Origin: *\r\n"), "{h}");
        assert!(h.contains("Access-Control-Expose-Headers: icy-br,"), "{h}");
        assert!(!h.contains("Vary"), "{h}");
    }

    #[test]
    fn a_list_echoes_the_origins_it_names_only() {
        let cfg = config(&["https://a.example", "http://b.example:8080"]);
        let h = headers(&cfg, &req(Some("https://a.example")));
        assert!(
            h.starts_with("Access-Control-Allow-Origin: https://a.example\r\nVary: Origin\r\n"),
            "{h}"
        );
        let h = headers(&cfg, &req(Some("https://evil.example")));
        assert_eq!(h, "Vary: Origin\r\n");
        assert_eq!(headers(&cfg, &req(None)), "Vary: Origin\r\n");
        assert_eq!(headers(&config(&[]), &req(Some("https://a.example"))), "");
    }

    #[test]
    fn a_preflight_allows_the_icy_request() {
        let r = String::from_utf8(preflight(
            &Config::default(),
            &req(Some("https://a.example")),
        ))
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 204 No Content\r\n"), "{r}");
        assert!(
            r.contains("Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n"),
            "{r}"
        );
        assert!(
            r.contains("Access-Control-Allow-Headers: Icy-MetaData, Range\r\n"),
            "{r}"
        );
        assert!(r.ends_with("\r\n\r\n"), "{r}");
    }
}
