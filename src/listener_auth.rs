//! Listener authentication, per mount: Icecast's URL auth (`auth = "url"`: a form POST to
//! `listener_add_url` for each listener, which is let in when the answer carries
//! `icecast-auth-user: 1`, and `listener_remove_url` told when it leaves) and a users file
//! (`auth = "htpasswd"`: bcrypt or Icecast's MD5 hashes, `401` with a challenge otherwise).
//!
//! A check never holds up a worker's other listeners: the URL call is awaited by the listener's
//! own request task, and a bcrypt check (tens of milliseconds of CPU) runs on the blocking pool.
//! Both take a turn from one server-wide semaphore (`max_listener_auth_calls`), so a flood of
//! listeners on an authenticated mount costs the auth server and the CPU a bounded amount; a
//! listener waits for its turn within its mount's `auth_timeout_ms`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::auth::{AuthFailures, AuthLimits};
use crate::config::{Config, HttpUrl, ListenerAuthKind, MountSettings};
use crate::http::{secrets_equal, Request};
use crate::reasons::{Realm, Refusal};

/// The most of an auth server's answer read: its head is all that counts.
const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// What listener authentication keeps between listeners: the turns, and each users file as last
/// read.
pub(crate) struct ListenerAuth {
    calls: Arc<Semaphore>,
    files: Mutex<HashMap<PathBuf, Arc<UsersFile>>>,
}

struct UsersFile {
    modified: Option<SystemTime>,
    users: HashMap<String, String>,
}

impl ListenerAuth {
    pub fn new(max_calls: usize) -> Self {
        ListenerAuth {
            calls: Arc::new(Semaphore::new(max_calls)),
            files: Mutex::default(),
        }
    }
}

/// Who is asking to listen, as the auth calls describe them.
pub(crate) struct Asker<'a> {
    pub req: &'a Request,
    pub peer: SocketAddr,
    /// The listener's id (`client` in the form).
    pub id: u64,
    /// The listener port, for `port`.
    pub port: u16,
}

/// What to tell `listener_remove_url` when the listener leaves.
pub(crate) struct LeaveCall {
    url: HttpUrl,
    /// The form fields but `action` and `duration`.
    fields: String,
    timeout: Duration,
    calls: Arc<Semaphore>,
    since: Instant,
}

impl Drop for LeaveCall {
    /// Sends `action=listener_remove` in the background (on the runtime of the thread dropping
    /// the listener); a failure is logged, never waited for. Every listener the auth server
    /// was told of is told off, however it ends.
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let duration = self.since.elapsed().as_secs();
        let body = format!("action=listener_remove&{}&duration={duration}", self.fields);
        let (url, timeout, calls) = (self.url.clone(), self.timeout, self.calls.clone());
        rt.spawn(async move {
            let Ok(_turn) = calls.acquire().await else {
                return;
            };
            if let Err(e) = tokio::time::timeout(timeout, post(&url, &body))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            {
                tracing::warn!(url = %url.host, error = %e, "listener_remove_url call failed");
            }
        });
    }
}

/// Lets the listener in (with what to do when it leaves, for URL auth), or says why not.
pub(crate) async fn check(
    state: &ListenerAuth,
    failures: &AuthFailures,
    cfg: &Config,
    settings: &MountSettings,
    asker: Asker<'_>,
) -> Result<Option<LeaveCall>, Refusal> {
    match settings.auth {
        None => Ok(None),
        Some(ListenerAuthKind::Htpasswd) => {
            check_users_file(state, failures, cfg, settings, &asker).await?;
            Ok(None)
        }
        Some(ListenerAuthKind::Url) => check_url(state, settings, &asker).await,
    }
}

async fn check_users_file(
    state: &ListenerAuth,
    failures: &AuthFailures,
    cfg: &Config,
    settings: &MountSettings,
    asker: &Asker<'_>,
) -> Result<(), Refusal> {
    let (peer, path) = (asker.peer, &asker.req.path);
    let limits = AuthLimits::of(cfg);
    let now = Instant::now();
    if let Some(wait) = failures.blocked(peer.ip(), Realm::Listener, now, limits) {
        return Err(Refusal::AuthRateLimited {
            retry_after_secs: wait.as_secs() + 1,
        });
    }
    let (user, pass) = asker
        .req
        .basic_auth()
        .ok_or(Refusal::AuthRequired(Realm::Listener))?;
    let Some(file) = settings.htpasswd_file.clone() else {
        return Err(Refusal::AuthUnavailable);
    };
    let timeout = Duration::from_millis(settings.auth_timeout_ms);
    let users = users_file(state, &file).map_err(|e| {
        tracing::warn!(file = %file.display(), error = %e, "htpasswd_file cannot be read: listeners refused");
        Refusal::AuthUnavailable
    })?;
    let Some(hash) = users.users.get(&user).cloned() else {
        failures.failed(peer.ip(), Realm::Listener, now, limits);
        tracing::warn!(%peer, %path, %user, "listener authentication failed: no such user");
        return Err(Refusal::BadCredentials(Realm::Listener));
    };
    let verify = async {
        let _turn = state.calls.acquire().await.ok()?;
        tokio::task::spawn_blocking(move || verify(&pass, &hash))
            .await
            .ok()
    };
    match tokio::time::timeout(timeout, verify).await {
        Ok(Some(true)) => {
            failures.succeeded(peer.ip(), Realm::Listener);
            Ok(())
        }
        Ok(Some(false)) => {
            failures.failed(peer.ip(), Realm::Listener, now, limits);
            tracing::warn!(%peer, %path, %user, "listener authentication failed: wrong password");
            Err(Refusal::BadCredentials(Realm::Listener))
        }
        _ => {
            tracing::warn!(%peer, %path, "listener authentication timed out waiting for a turn");
            Err(Refusal::AuthUnavailable)
        }
    }
}

/// Reads every users file the config names, for `--check-config` (an error) and for start-up
/// and reloads (a warning: the file is read again at each listener's check, so it may be put in
/// place later, but until then that mount's listeners are refused). A file that names no user,
/// or users whose hash is of a kind never checked (Apache's `$apr1$`, `{SHA}`, crypt), is wrong
/// the same way: those listeners are refused whatever password they give.
pub fn check_users_files(config: &Config) -> Result<(), String> {
    for file in config.htpasswd_files() {
        let refused = "listeners of its mounts are refused";
        let text = std::fs::read_to_string(file).map_err(|e| {
            format!(
                "htpasswd_file = {}: {e} ({refused} until it can be read)",
                file.display()
            )
        })?;
        let users = parse_users(&text);
        if users.is_empty() {
            return Err(format!(
                "htpasswd_file = {}: no `user:hash` line ({refused})",
                file.display()
            ));
        }
        let mut unchecked: Vec<&str> = users
            .iter()
            .filter(|(_, hash)| !checkable(hash))
            .map(|(user, _)| user.as_str())
            .collect();
        if !unchecked.is_empty() {
            unchecked.sort_unstable();
            return Err(format!(
                "htpasswd_file = {}: the hash of {} is of a kind not checked (bcrypt, as \
                 `htpasswd -B` writes, or Icecast's MD5), so they are refused",
                file.display(),
                unchecked.join(", ")
            ));
        }
    }
    Ok(())
}

/// The users file as it is now: read again when its modification time changed.
fn users_file(state: &ListenerAuth, file: &Path) -> std::io::Result<Arc<UsersFile>> {
    let modified = std::fs::metadata(file)?.modified().ok();
    if let Some(known) = state.files.lock().expect("not poisoned").get(file) {
        if known.modified.is_some() && known.modified == modified {
            return Ok(known.clone());
        }
    }
    let text = std::fs::read_to_string(file)?;
    let users = parse_users(&text);
    let read = Arc::new(UsersFile { modified, users });
    let mut files = state.files.lock().expect("not poisoned");
    files.insert(file.to_path_buf(), read.clone());
    Ok(read)
}

/// A users file's `user:hash` lines (blank lines and `#` comments passed over).
fn parse_users(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(user, hash)| (user.to_string(), hash.trim().to_string()))
        .collect()
}

/// Icecast's own hash: 32 hex digits, the password's MD5.
fn is_md5_hex(hash: &str) -> bool {
    hash.len() == 32 && hash.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether [`verify`] knows the kind of `hash`.
fn checkable(hash: &str) -> bool {
    hash.starts_with("$2") || is_md5_hex(hash)
}

/// Checks a password against a users file's hash: bcrypt (`$2a$`, `$2b$`, `$2y$`), or Icecast's
/// own MD5. Any other kind matches nothing.
fn verify(pass: &str, hash: &str) -> bool {
    if hash.starts_with("$2") {
        return bcrypt::verify(pass, hash).unwrap_or(false);
    }
    if is_md5_hex(hash) {
        let digest = Md5::digest(pass.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        return secrets_equal(&hex, &hash.to_ascii_lowercase());
    }
    false
}

async fn check_url(
    state: &ListenerAuth,
    settings: &MountSettings,
    asker: &Asker<'_>,
) -> Result<Option<LeaveCall>, Refusal> {
    let add = settings
        .listener_add_url
        .as_deref()
        .and_then(HttpUrl::parse)
        .ok_or(Refusal::AuthUnavailable)?;
    let req = asker.req;
    let (user, pass) = req.basic_auth().unwrap_or_default();
    let mount = match req.query.as_str() {
        "" => req.path.clone(),
        query => format!("{}?{query}", req.path),
    };
    let server = req
        .header("host")
        .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host))
        .unwrap_or("");
    let fields = form(&[
        ("server", server),
        ("port", &asker.port.to_string()),
        ("client", &asker.id.to_string()),
        ("mount", &mount),
        ("user", &user),
        ("pass", &pass),
        ("ip", &asker.peer.ip().to_string()),
        ("agent", req.header("user-agent").unwrap_or("")),
    ]);
    let body = format!("action=listener_add&{fields}");
    let timeout = Duration::from_millis(settings.auth_timeout_ms);
    let call = async {
        let _turn = state
            .calls
            .acquire()
            .await
            .map_err(|_| std::io::Error::other("shutting down"))?;
        post(&add, &body).await
    };
    let peer = asker.peer;
    let answer = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(head)) => head,
        failed => {
            let error = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {timeout:?}"),
            };
            if settings.auth_allow_on_timeout {
                tracing::warn!(%peer, mount = %req.path, url = %add.host, %error, "listener_add_url failed: listener let in (auth_allow_on_timeout)");
                return Ok(None);
            }
            tracing::warn!(%peer, mount = %req.path, url = %add.host, %error, "listener_add_url failed: listener refused");
            return Err(Refusal::AuthUnavailable);
        }
    };
    if !allowed(&answer) {
        tracing::info!(%peer, mount = %req.path, %user, "listener refused by listener_add_url");
        return Err(Refusal::BadCredentials(Realm::Listener));
    }
    let leave = settings
        .listener_remove_url
        .as_deref()
        .and_then(HttpUrl::parse)
        .map(|url| LeaveCall {
            url,
            fields,
            timeout,
            calls: state.calls.clone(),
            since: Instant::now(),
        });
    Ok(leave)
}

/// Whether an auth server's answer head lets the listener in.
fn allowed(head: &str) -> bool {
    head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("icecast-auth-user") && value.trim() == "1"
        })
    })
}

/// POSTs a form and returns the answer's head.
async fn post(url: &HttpUrl, body: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(&url.authority).await?;
    let request = format!(
        "POST {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: fanstream/{}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        url.target,
        url.host,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.len() < MAX_ANSWER_BYTES {
        match stream.read(&mut buf).await? {
            0 => break,
            n => answer.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&answer);
    let head = head.split("\r\n\r\n").next().unwrap_or("").to_string();
    if !head.starts_with("HTTP/1.") {
        return Err(std::io::Error::other("the answer is not HTTP"));
    }
    Ok(head)
}

/// `application/x-www-form-urlencoded`, every byte but the unreserved ones escaped.
fn form(fields: &[(&str, &str)]) -> String {
    let escape = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file_hashes_bcrypt_and_icecasts_md5() {
        let bcrypted = bcrypt::hash("s3cret", 4).unwrap();
        assert!(verify("s3cret", &bcrypted));
        assert!(!verify("wrong", &bcrypted));
        // Icecast's htpasswd: the MD5 of "s3cret" in hex.
        let md5 = "33e1b232a4e6fa0028a6670753749a17";
        assert!(verify("s3cret", md5));
        assert!(verify("s3cret", &md5.to_ascii_uppercase()));
        assert!(!verify("wrong", md5));
        assert!(!verify("s3cret", "{SHA}whatever"));
        assert!(!verify("", ""));
    }

    #[test]
    fn a_users_file_is_checked_for_users_and_for_hashes_it_can_verify() {
        let dir = std::env::temp_dir().join(format!("fanstream-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let check = |name: &str, text: &str| {
            let file = dir.join(name);
            std::fs::write(&file, text).unwrap();
            let config = Config::from_toml(&format!(
                "[mounts.\"/m\"]\nauth = \"htpasswd\"\nhtpasswd_file = {:?}\n",
                file.display().to_string()
            ))
            .unwrap();
            check_users_files(&config)
        };
        let md5 = "33e1b232a4e6fa0028a6670753749a17";
        let bcrypted = bcrypt::hash("s3cret", 4).unwrap();
        assert_eq!(
            check("good", &format!("# members\n\nann:{md5}\nbob:{bcrypted}\n")),
            Ok(())
        );
        let empty = check("empty", "# nobody yet\n\n").unwrap_err();
        assert!(empty.contains("no `user:hash` line"), "{empty}");
        let apache = check(
            "apache",
            &format!("zed:$apr1$salt$hash\nann:{md5}\ncy:{{SHA}}abc=\n"),
        )
        .unwrap_err();
        assert!(
            apache.contains("the hash of cy, zed is of a kind not checked"),
            "{apache}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn forms_escape_and_answers_allow_only_with_the_header() {
        assert_eq!(
            form(&[("mount", "/a?t=1 2"), ("agent", "x&y")]),
            "mount=%2Fa%3Ft%3D1%202&agent=x%26y"
        );
        assert!(allowed("HTTP/1.1 200 OK\r\nicecast-auth-user: 1"));
        assert!(allowed("HTTP/1.0 200 OK\r\nIcecast-Auth-User:1"));
        assert!(!allowed("HTTP/1.1 200 OK\r\nicecast-auth-user: 0"));
        assert!(!allowed("HTTP/1.1 200 OK\r\nX: icecast-auth-user: 1"));
        assert!(!allowed("icecast-auth-user: 1"));
    }
}
