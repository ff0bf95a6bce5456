//! Why connections end: the fixed sets of reasons that label `fanstream_rejected_requests_total`
//! and `fanstream_listener_disconnects_total` and name the cause in log lines.
//!
//! A refusal is a value: a check returns `Err(Refusal::...)`, and one function (`refuse`, in
//! the `conn` module, a layer above) answers it, counts it and logs it. Each variant knows its status,
//! its label and the headers it needs, so no call site spells any of them out.
//!
//! The `reason` labels of `fanstream_rejected_requests_total`, all of them:
//!
//! | label | status | when |
//! |---|---|---|
//! | `per_ip_limit` | 429 | the address holds `max_connections_per_ip` connections already |
//! | `malformed_request` | 400 | the request head is not HTTP/1.x |
//! | `uri_too_long` | 414 | the request line alone exceeds the head limit |
//! | `headers_too_large` | 431 | the head exceeds 8 KiB or 64 headers |
//! | `method_not_allowed` | 405 | not GET, HEAD, OPTIONS, SOURCE or PUT (or not GET/HEAD on the admin port) |
//! | `bad_path` | 400 | not a mount path (odd bytes, `..`, empty segments, too long) |
//! | `bad_query` | 400 | a title update without `mode=updinfo`, a mount or a title |
//! | `unknown_mount` | 404 | no such mount |
//! | `mount_idle` | 404 | the mount waits for its source |
//! | `mount_full` | 503 | the mount holds its `max_listeners` |
//! | `server_full` | 503 | the server holds `max_listeners` |
//! | `unsupported_transfer_encoding` | 501 | a source body neither plain nor chunked |
//! | `conflicting_length` | 400 | `Content-Length` with `Transfer-Encoding: chunked`, given twice with different values, or not a number (RFC 9112: a proxy in front could frame it differently) |
//! | `missing_content_type` | 400 | a `PUT` source without Content-Type |
//! | `auth_required` | 401 | no credentials (a source, the admin API, or a listener of an `htpasswd` mount) |
//! | `bad_credentials` | 401 | wrong user or password, or a listener `listener_add_url` refused |
//! | `auth_rate_limited` | 429 | too many failed logins from the address |
//! | `mount_in_use` | 403 | a source is live on the mount |
//! | `too_many_sources` | 503 | `max_sources` sources are live |
//! | `admin_password_not_set` | 403 | the admin API on the listener port, with no `admin_password` configured |
//! | `unknown_command` | 400 | an `/admin/` path that is no admin command |
//! | `no_such_source` | 400 | an admin command for a mount that does not exist (or, for `killsource`, has no source) |
//! | `auth_unavailable` | 503 | listener authentication could not decide: `listener_add_url` unreachable or too slow (without `auth_allow_on_timeout`), or the users file unreadable |
//! | `bad_destination` | 400 | `moveclients` to a mount with no live source, or to the mount itself |
//! | `other_format` | 409 | `moveclients` to a mount streaming another format (MP3 and Ogg, MP3 and AAC): its listeners could not go on decoding |
//! | `hls_off` | 404 | an HLS playlist or segment of a mount whose `hls` is off |
//! | `hls_unsupported_format` | 404 | HLS of a mount whose stream is not MP3, AAC (ADTS), Ogg Opus, Vorbis or FLAC, or WebM/Matroska with an Opus, Vorbis or FLAC track (video-only WebM, Ogg Speex...) |
//! | `hls_not_ready` | 404 | HLS of a mount whose first segment is not complete yet |
//! | `too_many_edges` | 503 | an edge's registration when 1000 edges are registered |
//! | `segment_gone` | 404 | a segment no longer (or never) in the mount's HLS window |
//! | `hls_msn_too_far` | 400 | a blocking playlist reload (`_HLS_msn`) for a segment more than two past the newest (an `_HLS_msn` that is no number is a `bad_query`) |
//! | `hls_msn_timeout` | 503 | a blocking playlist reload whose segment did not come within three target durations |
//! | `header_timeout` | none | the head did not arrive within `header_timeout_secs` (`header_timeout_under_pressure_secs` when accepted above 80% of `max_connections`); closed |
//! | `pending_heads_per_ip` | none | the address holds `max_pending_heads_per_ip` connections still sending their head; closed at accept |
//! | `idle_head_evicted` | none | at `max_connections`, the oldest connection still without a head (after 250 ms; 100 ms on the admin port) was closed to make room |
//! | `workers_full` | none | the server holds `max_connections`; accepting paused (once per episode) |
//! | `accept_resources_exhausted` | none | accept failed for lack of descriptors or memory |
//! | `plain_http_on_tls_port` | 400 | a plain HTTP request sent to the TLS port (`http://` where `https://` was meant); answered in plain HTTP |
//! | `tls_handshake_failed` | none | a TLS handshake that failed (no common version, cipher or ALPN protocol; not TLS at all); closed |
//! | `untrusted_proxy` | none | with `proxy_protocol`, a connection from outside `trusted_proxies`; closed at accept |
//! | `bad_proxy_header` | none | with `proxy_protocol`, a connection that did not start with a PROXY v1 or v2 header (or sent a malformed one, or one over 1 KiB); closed |

use std::io;

use crate::http;

/// The challenge a 401 carries: sources and the admin API are told apart, so that a browser or a
/// password manager does not offer one's credentials for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Realm {
    Source,
    Admin,
    /// A mount's listeners (`auth = "htpasswd"` or `"url"`).
    Listener,
    /// Edges' relays (`relay_user`/`relay_password`).
    Relay,
}

impl Realm {
    fn challenge(self) -> &'static str {
        match self {
            Realm::Source => "Basic realm=\"fanstream\"",
            Realm::Admin => "Basic realm=\"fanstream admin\"",
            Realm::Listener => "Basic realm=\"fanstream listener\"",
            Realm::Relay => "Basic realm=\"fanstream relay\"",
        }
    }
}

/// Asked of clients refused for load: when to try again, in seconds.
const RETRY_AFTER_SECS: u64 = 10;

/// A request turned away with an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    PerIpLimit,
    Malformed,
    UriTooLong,
    HeadersTooLarge,
    /// Carries the methods the port allows, for `Allow`.
    MethodNotAllowed(&'static str),
    BadPath,
    BadQuery,
    UnknownMount,
    MountIdle,
    MountFull,
    ServerFull,
    UnsupportedTransferEncoding,
    ConflictingLength,
    MissingContentType,
    AuthRequired(Realm),
    BadCredentials(Realm),
    AuthRateLimited {
        retry_after_secs: u64,
    },
    MountInUse,
    TooManySources,
    AdminPasswordNotSet,
    UnknownCommand,
    NoSuchSource,
    BadDestination,
    /// `moveclients` between mounts whose streams are not of one format
    /// ([`crate::framing::same_format`]).
    OtherFormat,
    /// Listener authentication could not decide: `listener_add_url` did not answer in time (or
    /// could not be reached), or the users file cannot be read.
    AuthUnavailable,
    HlsOff,
    HlsUnsupportedFormat,
    HlsNotReady,
    SegmentGone,
    /// An edge's registration when the table of edges is full.
    TooManyEdges,
    HlsMsnTooFar,
    HlsMsnTimeout,
    /// A plain HTTP request on the TLS port.
    PlainHttpOnTls,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::Malformed
            | Refusal::BadPath
            | Refusal::BadQuery
            | Refusal::ConflictingLength
            | Refusal::MissingContentType
            | Refusal::UnknownCommand
            | Refusal::NoSuchSource
            | Refusal::BadDestination
            | Refusal::HlsMsnTooFar
            | Refusal::PlainHttpOnTls => 400,
            Refusal::AuthRequired(_) | Refusal::BadCredentials(_) => 401,
            Refusal::MountInUse | Refusal::AdminPasswordNotSet => 403,
            Refusal::UnknownMount
            | Refusal::MountIdle
            | Refusal::HlsOff
            | Refusal::HlsUnsupportedFormat
            | Refusal::HlsNotReady
            | Refusal::SegmentGone => 404,
            Refusal::MethodNotAllowed(_) => 405,
            Refusal::OtherFormat => 409,
            Refusal::UriTooLong => 414,
            Refusal::PerIpLimit | Refusal::AuthRateLimited { .. } => 429,
            Refusal::HeadersTooLarge => 431,
            Refusal::UnsupportedTransferEncoding => 501,
            Refusal::MountFull
            | Refusal::ServerFull
            | Refusal::TooManySources
            | Refusal::TooManyEdges
            | Refusal::AuthUnavailable
            | Refusal::HlsMsnTimeout => 503,
        }
    }

    /// The metric label and the log's `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::PerIpLimit => "per_ip_limit",
            Refusal::Malformed => "malformed_request",
            Refusal::UriTooLong => "uri_too_long",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::MethodNotAllowed(_) => "method_not_allowed",
            Refusal::BadPath => "bad_path",
            Refusal::BadQuery => "bad_query",
            Refusal::UnknownMount => "unknown_mount",
            Refusal::MountIdle => "mount_idle",
            Refusal::MountFull => "mount_full",
            Refusal::ServerFull => "server_full",
            Refusal::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            Refusal::ConflictingLength => "conflicting_length",
            Refusal::MissingContentType => "missing_content_type",
            Refusal::AuthRequired(_) => "auth_required",
            Refusal::BadCredentials(_) => "bad_credentials",
            Refusal::AuthRateLimited { .. } => "auth_rate_limited",
            Refusal::MountInUse => "mount_in_use",
            Refusal::TooManySources => "too_many_sources",
            Refusal::AdminPasswordNotSet => "admin_password_not_set",
            Refusal::UnknownCommand => "unknown_command",
            Refusal::NoSuchSource => "no_such_source",
            Refusal::BadDestination => "bad_destination",
            Refusal::OtherFormat => "other_format",
            Refusal::AuthUnavailable => "auth_unavailable",
            Refusal::HlsOff => "hls_off",
            Refusal::HlsUnsupportedFormat => "hls_unsupported_format",
            Refusal::HlsNotReady => "hls_not_ready",
            Refusal::SegmentGone => "segment_gone",
            Refusal::TooManyEdges => "too_many_edges",
            Refusal::HlsMsnTooFar => "hls_msn_too_far",
            Refusal::HlsMsnTimeout => "hls_msn_timeout",
            Refusal::PlainHttpOnTls => "plain_http_on_tls_port",
        }
    }

    /// The whole response: status line, the headers this refusal needs, and a one-line body
    /// that says why (`503 Service Unavailable: mount full`).
    /// For a limit an operator sets, which setting refused: a hosting server that outgrows it
    /// must know what to raise.
    fn setting_hint(self) -> &'static str {
        match self {
            Refusal::TooManySources => " (raise max_sources)",
            Refusal::OtherFormat => {
                " (the destination streams another format: its listeners could not go on decoding)"
            }
            Refusal::ServerFull => " (max_listeners)",
            Refusal::HlsOff => " (set hls = true for this mount)",
            Refusal::HlsUnsupportedFormat => {
                " (HLS is cut from MP3, AAC (ADTS), Ogg Opus, Vorbis and FLAC streams, and the Opus, Vorbis or FLAC audio of WebM and Matroska streams, only; native FLAC, Speex, video-only WebM and other formats are not)"
            }
            Refusal::HlsNotReady => " (the first segment is still being cut; retry shortly)",
            Refusal::SegmentGone => " (it is not in the mount's HLS window; reload the playlist)",
            Refusal::HlsMsnTooFar => {
                " (_HLS_msn may name at most the newest segment's media sequence number plus two)"
            }
            Refusal::HlsMsnTimeout => {
                " (the segment did not come within three target durations; reload the playlist)"
            }
            Refusal::PlainHttpOnTls => " (this port speaks HTTPS: use an https:// URL)",
            _ => "",
        }
    }

    pub fn response(self) -> Vec<u8> {
        self.answer(false)
    }

    /// The refusal in the form `req` asked for: a client that wants JSON (a panel calling the
    /// admin API with `format=json`) gets `{"error": {"status", "reason", "message"}}`, with the
    /// same status and headers as the text.
    pub fn response_for(self, req: &http::Request) -> Vec<u8> {
        self.answer(req.wants_json())
    }

    fn answer(self, json: bool) -> Vec<u8> {
        let status = self.status();
        let phrase = http::status_phrase(status);
        let retry;
        let header: Option<(&str, &str)> = match self {
            Refusal::AuthRequired(realm) | Refusal::BadCredentials(realm) => {
                Some(("WWW-Authenticate", realm.challenge()))
            }
            Refusal::MethodNotAllowed(allow) => Some(("Allow", allow)),
            Refusal::PerIpLimit | Refusal::MountFull | Refusal::ServerFull => {
                retry = RETRY_AFTER_SECS.to_string();
                Some(("Retry-After", &retry))
            }
            Refusal::AuthRateLimited { retry_after_secs } => {
                retry = retry_after_secs.to_string();
                Some(("Retry-After", &retry))
            }
            _ => None,
        };
        let message = format!("{}{}", self.reason().replace('_', " "), self.setting_hint());
        if json {
            let body = serde_json::json!({"error": {
                "status": status,
                "reason": self.reason(),
                "message": message,
            }});
            let body = format!("{body}\n");
            return http::typed_response(
                status,
                phrase,
                header.as_slice(),
                "application/json",
                &body,
            );
        }
        let body = format!("{status} {phrase}: {message}\n");
        http::response(status, phrase, header.as_slice(), &body)
    }
}

impl From<http::HeadError> for Refusal {
    fn from(e: http::HeadError) -> Self {
        match e {
            http::HeadError::Malformed => Refusal::Malformed,
            http::HeadError::UriTooLong => Refusal::UriTooLong,
            http::HeadError::HeadersTooLarge => Refusal::HeadersTooLarge,
            http::HeadError::ConflictingLength => Refusal::ConflictingLength,
        }
    }
}

/// A connection turned away without an answer, counted under the same metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unanswered {
    HeaderTimeout,
    PendingHeadsPerIp,
    IdleHeadEvicted,
    WorkersFull,
    AcceptResourcesExhausted,
    UntrustedProxy,
    BadProxyHeader,
    TlsHandshakeFailed,
}

impl Unanswered {
    pub fn reason(self) -> &'static str {
        match self {
            Unanswered::HeaderTimeout => "header_timeout",
            Unanswered::PendingHeadsPerIp => "pending_heads_per_ip",
            Unanswered::IdleHeadEvicted => "idle_head_evicted",
            Unanswered::WorkersFull => "workers_full",
            Unanswered::AcceptResourcesExhausted => "accept_resources_exhausted",
            Unanswered::UntrustedProxy => "untrusted_proxy",
            Unanswered::BadProxyHeader => "bad_proxy_header",
            Unanswered::TlsHandshakeFailed => "tls_handshake_failed",
        }
    }

    /// What happened, for the log line of a connection closed this way.
    pub fn message(self) -> &'static str {
        match self {
            Unanswered::HeaderTimeout => "closed: request head not complete in time",
            Unanswered::PendingHeadsPerIp => {
                "closed at once: the address has max_pending_heads_per_ip connections still sending their request head"
            }
            Unanswered::IdleHeadEvicted => {
                "closed: no request head yet, and the server at its connection limit needed the room"
            }
            Unanswered::WorkersFull => "the server holds max_connections",
            Unanswered::AcceptResourcesExhausted => "accept failed: out of resources",
            Unanswered::UntrustedProxy => {
                "closed at once: proxy_protocol is on and the peer is not in trusted_proxies"
            }
            Unanswered::BadProxyHeader => {
                "closed: proxy_protocol is on and the connection did not start with a PROXY header"
            }
            Unanswered::TlsHandshakeFailed => "closed: the TLS handshake failed",
        }
    }
}

/// Why a listener was let go: the `reason` label of `fanstream_listener_disconnects_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Disconnect {
    /// The peer closed or reset the connection.
    ClientClosed,
    /// A write failed for another reason.
    WriteError,
    /// Fell more than `max_lag_bytes` behind under `lag_policy = "disconnect"`.
    Slow,
    /// The source left and did not come back within the grace period.
    SourceGone,
    /// The server is shutting down.
    Shutdown,
    /// Its socket accepted no byte for `send_timeout_secs`.
    SendTimeout,
    /// Serving it panicked (a bug); only this listener is lost.
    Panic,
    /// An operator closed it (`/admin/killclient`).
    Killed,
    /// It had listened for its mount's `max_listener_duration_secs`.
    MaxDuration,
}

impl Disconnect {
    /// Every reason, so that each mount's counters start at zero.
    pub const ALL: [Disconnect; 9] = [
        Disconnect::ClientClosed,
        Disconnect::WriteError,
        Disconnect::Slow,
        Disconnect::SourceGone,
        Disconnect::Shutdown,
        Disconnect::SendTimeout,
        Disconnect::Panic,
        Disconnect::Killed,
        Disconnect::MaxDuration,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Disconnect::ClientClosed => "client_closed",
            Disconnect::WriteError => "write_error",
            Disconnect::Slow => "slow",
            Disconnect::SourceGone => "source_gone",
            Disconnect::Shutdown => "shutdown",
            Disconnect::SendTimeout => "send_timeout",
            Disconnect::Panic => "panic",
            Disconnect::Killed => "killed",
            Disconnect::MaxDuration => "max_duration",
        }
    }

    pub fn from_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected => Disconnect::ClientClosed,
            _ => Disconnect::WriteError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: Refusal) -> String {
        String::from_utf8(r.response()).unwrap()
    }

    #[test]
    fn each_refusal_carries_its_status_reason_and_headers() {
        let r = text(Refusal::MountFull);
        assert!(r.starts_with("HTTP/1.0 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("Retry-After: 10\r\n"), "{r}");
        assert!(
            r.ends_with("\r\n\r\n503 Service Unavailable: mount full\n"),
            "{r}"
        );

        let r = text(Refusal::AuthRequired(Realm::Admin));
        assert!(r.starts_with("HTTP/1.0 401 Unauthorized\r\n"), "{r}");
        assert!(
            r.contains("WWW-Authenticate: Basic realm=\"fanstream admin\"\r\n"),
            "{r}"
        );

        let r = text(Refusal::AuthRateLimited {
            retry_after_secs: 42,
        });
        assert!(r.starts_with("HTTP/1.0 429 Too Many Requests\r\n"), "{r}");
        assert!(r.contains("Retry-After: 42\r\n"), "{r}");

        let r = text(Refusal::MethodNotAllowed("GET, HEAD"));
        assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");

        let r = text(Refusal::OtherFormat);
        assert!(r.starts_with("HTTP/1.0 409 Conflict\r\n"), "{r}");

        let r = text(Refusal::BadPath);
        assert!(r.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{r}");
        assert!(!r.contains("Retry-After") && !r.contains("WWW-Authenticate"));
    }

    #[test]
    fn head_errors_map_to_their_refusals() {
        assert_eq!(Refusal::from(http::HeadError::UriTooLong).status(), 414);
        assert_eq!(
            Refusal::from(http::HeadError::HeadersTooLarge).reason(),
            "headers_too_large"
        );
    }
}
