//! Settings: embedded defaults, overridden by a TOML file (`--config`), overridden by flags.
//!
//! Every field carries its unit in its name and its default in its doc comment. [`Config::validate`]
//! rejects nonsense, naming the setting, before anything binds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What to do with a listener that falls more than `max_lag_bytes` behind the live edge.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LagPolicy {
    /// Close it, as Icecast does.
    Disconnect,
    /// Move it to the live edge at a chunk boundary; it loses the bytes in between.
    Skip,
}

/// Per-mount settings; in `[mounts."/path"]` every field is optional and falls back to
/// `[defaults]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MountSettings {
    /// Password a source must give for this mount. Default: the global `source_password`.
    pub source_password: Option<String>,
    /// File holding this mount's source password (first line), instead of writing it in the
    /// config. Default none.
    pub source_password_file: Option<PathBuf>,
    /// Most listeners this mount admits at once. Default 0 = only the global limit.
    pub max_listeners: usize,
    /// How far behind the live edge a new listener starts. Default 65536 (64 KiB).
    pub burst_bytes: u64,
    /// How far a listener may fall behind before `lag_policy` applies. Default 524288 (512 KiB).
    pub max_lag_bytes: u64,
    /// Default `disconnect`.
    pub lag_policy: LagPolicy,
    /// How long listeners wait for a source that went away. Default 10.
    pub source_grace_secs: u64,
    /// Where listeners go when the grace period ends instead of being closed. Default none.
    pub fallback_mount: Option<String>,
    /// A listener is written once this many bytes are pending... Default 65536 (64 KiB).
    pub min_write_bytes: usize,
    /// ...or once its oldest pending byte is this old (0 = write every chunk at once). Default
    /// 1000. Both chosen from `fanstream-load coalesce` (README, "Performance"): a write costs
    /// about 10 µs whatever its size, so one write a second per listener at 128 kbit/s (or one
    /// per 64 KiB at higher bitrates) is what keeps a listener cheap; the price is up to this
    /// much added latency, which players' buffers of several seconds absorb.
    pub max_write_delay_ms: u64,
}

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings {
            source_password: None,
            source_password_file: None,
            max_listeners: 0,
            burst_bytes: 64 * 1024,
            max_lag_bytes: 512 * 1024,
            lag_policy: LagPolicy::Disconnect,
            source_grace_secs: 10,
            fallback_mount: None,
            min_write_bytes: 64 * 1024,
            max_write_delay_ms: 1000,
        }
    }
}

impl MountSettings {
    /// Bytes behind the live edge the store must keep readable: a newcomer's burst, a listener
    /// up to the lag limit, and what write coalescing holds back for a listener that keeps up.
    pub fn window_bytes(&self) -> u64 {
        self.burst_bytes
            .max(self.max_lag_bytes)
            .max(self.min_write_bytes as u64)
    }
}

/// A mount as written in the file: each setting given overrides `[defaults]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountOverrides {
    source_password: Option<String>,
    source_password_file: Option<PathBuf>,
    max_listeners: Option<usize>,
    burst_bytes: Option<u64>,
    max_lag_bytes: Option<u64>,
    lag_policy: Option<LagPolicy>,
    source_grace_secs: Option<u64>,
    fallback_mount: Option<String>,
    min_write_bytes: Option<usize>,
    max_write_delay_ms: Option<u64>,
}

impl MountOverrides {
    fn apply(self, base: &MountSettings) -> MountSettings {
        MountSettings {
            source_password: self
                .source_password
                .or_else(|| base.source_password.clone()),
            source_password_file: self
                .source_password_file
                .or_else(|| base.source_password_file.clone()),
            max_listeners: self.max_listeners.unwrap_or(base.max_listeners),
            burst_bytes: self.burst_bytes.unwrap_or(base.burst_bytes),
            max_lag_bytes: self.max_lag_bytes.unwrap_or(base.max_lag_bytes),
            lag_policy: self.lag_policy.unwrap_or(base.lag_policy),
            source_grace_secs: self.source_grace_secs.unwrap_or(base.source_grace_secs),
            fallback_mount: self.fallback_mount.or_else(|| base.fallback_mount.clone()),
            min_write_bytes: self.min_write_bytes.unwrap_or(base.min_write_bytes),
            max_write_delay_ms: self.max_write_delay_ms.unwrap_or(base.max_write_delay_ms),
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Where listeners and sources connect. Default `0.0.0.0:8000` (Icecast's port).
    pub listen: SocketAddr,
    /// Where `/metrics` and the status pages are served, on its own thread. Default
    /// `127.0.0.1:8001`; none disables it.
    pub admin_listen: Option<SocketAddr>,
    /// User name for the admin listener, when `admin_password` is set. Default `admin`.
    pub admin_user: String,
    /// Password the admin listener (`/metrics`, status pages) asks for with HTTP Basic auth.
    /// Default none: no authentication, for an admin listener kept on loopback.
    pub admin_password: Option<String>,
    /// File holding the admin password (first line). Default none.
    pub admin_password_file: Option<PathBuf>,
    /// Worker threads serving listeners. Default 0 = one per core.
    pub workers: usize,
    /// Pin each worker to a core. Default true.
    pub pin_workers: bool,
    /// User name sources authenticate with. Default `source`.
    pub source_user: String,
    /// Password for mounts without their own; also admits sources on mounts not in the file.
    /// Default: none given means a random one is generated at start-up and printed once.
    pub source_password: Option<String>,
    /// Serve the built-in demo mount (a tone as WAV). Default true.
    pub demo: bool,
    /// Path of the demo mount. Default `/demo`.
    pub demo_mount: String,
    /// File holding the global source password (first line). Default none.
    pub source_password_file: Option<PathBuf>,
    /// Most listeners the server admits at once; past it, 503. Default 100000.
    pub max_listeners: usize,
    /// Most sources live at once (the demo counts); past it, 503. Default 100.
    pub max_sources: usize,
    /// Most open connections (listeners, sources, requests in progress). When every worker holds
    /// its share, the acceptor stops accepting until one closes. Default 0 = the process's open
    /// file limit less 64 for everything else.
    pub max_connections: usize,
    /// Most connections from one IP address; past it, 429. Default 0 = no limit (listeners behind
    /// one NAT share an address).
    pub max_connections_per_ip: usize,
    /// Failed source logins from one address within `auth_failure_window_secs` before further
    /// attempts get 429 until the window ends. Default 10.
    pub auth_max_failures: u32,
    /// Default 60.
    pub auth_failure_window_secs: u64,
    /// A listener that accepts no byte for this long is dropped. Default 30.
    pub send_timeout_secs: u64,
    /// Kernel send buffer of each listener socket (`SO_SNDBUF`; Linux doubles it for its own
    /// bookkeeping). Left to autotuning, a stalled listener can hold megabytes in the kernel, and
    /// the lag policy sees it only once they are full; bounded, a listener costs at most this in
    /// the kernel and `max_lag_bytes` means what it says. Default 65536; 0 = the kernel's choice.
    pub listener_send_buffer_bytes: usize,
    /// A request's head must arrive within this. Default 10.
    pub header_timeout_secs: u64,
    /// A source that sends nothing for this long is dropped. Default 10.
    pub source_timeout_secs: u64,
    /// On SIGTERM, listeners get this long to receive what is pending. Default 5.
    pub shutdown_grace_secs: u64,
    /// Settings for every mount, unless overridden in `mounts`.
    pub defaults: MountSettings,
    /// Mounts declared in the file, by path, with their resolved settings.
    pub mounts: BTreeMap<String, MountSettings>,
    /// Test hook, not settable from the file: serving listeners of this mount panics, and so
    /// does a request for `<mount>/panic`, so tests can prove a panic costs one connection only.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub panic_injection_mount: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8000".parse().expect("literal address"),
            admin_listen: Some("127.0.0.1:8001".parse().expect("literal address")),
            admin_user: "admin".into(),
            admin_password: None,
            admin_password_file: None,
            workers: 0,
            pin_workers: true,
            source_user: "source".into(),
            source_password: None,
            demo: true,
            demo_mount: "/demo".into(),
            source_password_file: None,
            max_listeners: 100_000,
            max_sources: 100,
            max_connections: 0,
            max_connections_per_ip: 0,
            auth_max_failures: 10,
            auth_failure_window_secs: 60,
            send_timeout_secs: 30,
            listener_send_buffer_bytes: 64 * 1024,
            header_timeout_secs: 10,
            source_timeout_secs: 10,
            shutdown_grace_secs: 5,
            defaults: MountSettings::default(),
            mounts: BTreeMap::new(),
            #[cfg(feature = "fault-injection")]
            panic_injection_mount: None,
        }
    }
}

/// The file's shape: every field optional, so a file states only what it changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    admin_listen: Option<String>,
    admin_user: Option<String>,
    admin_password: Option<String>,
    admin_password_file: Option<PathBuf>,
    workers: Option<usize>,
    pin_workers: Option<bool>,
    source_user: Option<String>,
    source_password: Option<String>,
    demo: Option<bool>,
    demo_mount: Option<String>,
    source_password_file: Option<PathBuf>,
    max_sources: Option<usize>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    auth_max_failures: Option<u32>,
    auth_failure_window_secs: Option<u64>,
    send_timeout_secs: Option<u64>,
    listener_send_buffer_bytes: Option<usize>,
    max_listeners: Option<usize>,
    header_timeout_secs: Option<u64>,
    source_timeout_secs: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    defaults: Option<MountSettings>,
    #[serde(default)]
    mounts: BTreeMap<String, MountOverrides>,
}

impl Config {
    /// Reads a TOML file over the embedded defaults.
    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        let file: FileConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let d = Config::default();
        let defaults = file.defaults.unwrap_or(d.defaults);
        let admin_listen = match file.admin_listen.as_deref() {
            None => d.admin_listen,
            Some("" | "none" | "off") => None,
            Some(a) => Some(
                a.parse()
                    .map_err(|e| format!("admin_listen = {a:?}: {e}"))?,
            ),
        };
        let mounts = file
            .mounts
            .into_iter()
            .map(|(path, o)| {
                let m = o.apply(&defaults);
                (path, m)
            })
            .collect();
        Ok(Config {
            listen: file.listen.unwrap_or(d.listen),
            admin_listen,
            admin_user: file.admin_user.unwrap_or(d.admin_user),
            admin_password: file.admin_password,
            admin_password_file: file.admin_password_file,
            workers: file.workers.unwrap_or(d.workers),
            pin_workers: file.pin_workers.unwrap_or(d.pin_workers),
            source_user: file.source_user.unwrap_or(d.source_user),
            source_password: file.source_password,
            demo: file.demo.unwrap_or(d.demo),
            demo_mount: file.demo_mount.unwrap_or(d.demo_mount),
            source_password_file: file.source_password_file,
            max_listeners: file.max_listeners.unwrap_or(d.max_listeners),
            max_sources: file.max_sources.unwrap_or(d.max_sources),
            max_connections: file.max_connections.unwrap_or(d.max_connections),
            max_connections_per_ip: file
                .max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip),
            auth_max_failures: file.auth_max_failures.unwrap_or(d.auth_max_failures),
            auth_failure_window_secs: file
                .auth_failure_window_secs
                .unwrap_or(d.auth_failure_window_secs),
            send_timeout_secs: file.send_timeout_secs.unwrap_or(d.send_timeout_secs),
            listener_send_buffer_bytes: file
                .listener_send_buffer_bytes
                .unwrap_or(d.listener_send_buffer_bytes),
            header_timeout_secs: file.header_timeout_secs.unwrap_or(d.header_timeout_secs),
            source_timeout_secs: file.source_timeout_secs.unwrap_or(d.source_timeout_secs),
            shutdown_grace_secs: file.shutdown_grace_secs.unwrap_or(d.shutdown_grace_secs),
            defaults,
            mounts,
            #[cfg(feature = "fault-injection")]
            panic_injection_mount: None,
        })
    }

    /// Reads the password files into the passwords they stand for, so that secrets can live
    /// outside the config (mounted secrets, files readable only by the service user).
    pub fn resolve_password_files(&mut self) -> Result<(), String> {
        fn read(what: &str, path: &Path) -> Result<String, String> {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("{what} = {}: {e}", path.display()))?;
            let pw = text.lines().next().unwrap_or("").trim().to_string();
            if pw.is_empty() {
                return Err(format!(
                    "{what} = {}: the file holds no password",
                    path.display()
                ));
            }
            Ok(pw)
        }
        if let Some(path) = &self.source_password_file {
            self.source_password = Some(read("source_password_file", path)?);
        }
        if let Some(path) = &self.admin_password_file {
            self.admin_password = Some(read("admin_password_file", path)?);
        }
        if let Some(path) = &self.defaults.source_password_file {
            self.defaults.source_password = Some(read("defaults.source_password_file", path)?);
        }
        for (mount, m) in self.mounts.iter_mut() {
            if let Some(path) = &m.source_password_file {
                m.source_password = Some(read(
                    &format!("mounts.\"{mount}\".source_password_file"),
                    path,
                )?);
            }
        }
        Ok(())
    }

    /// The connection limit in force: `max_connections`, or the open-file limit less a reserve.
    pub fn connection_limit(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let soft = crate::open_files::soft_limit().unwrap_or(1024);
        (soft as usize).saturating_sub(64).max(16)
    }

    /// Settings for a mount: its own if declared, else the defaults.
    pub fn mount(&self, path: &str) -> MountSettings {
        self.mounts
            .get(path)
            .cloned()
            .unwrap_or_else(|| self.defaults.clone())
    }

    /// Whether a source may create `path` (declared, the demo, or admitted by a global password).
    pub fn source_password_for(&self, path: &str) -> Option<&str> {
        match self.mounts.get(path) {
            Some(m) => m.source_password.as_deref(),
            None => self.defaults.source_password.as_deref(),
        }
        .or(self.source_password.as_deref())
    }

    /// Number of workers to start: `workers`, or one per core when 0.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Rejects settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.workers > 1024 {
            return Err(format!("workers = {}: at most 1024", self.workers));
        }
        if self.source_user.is_empty() || self.source_user.contains(':') {
            return Err("source_user must be non-empty and contain no ':'".into());
        }
        if self.header_timeout_secs == 0 {
            return Err("header_timeout_secs must be at least 1".into());
        }
        if self.source_timeout_secs == 0 {
            return Err("source_timeout_secs must be at least 1".into());
        }
        if self.max_listeners == 0 {
            return Err("max_listeners must be at least 1".into());
        }
        if self.max_sources == 0 {
            return Err("max_sources must be at least 1".into());
        }
        if self.send_timeout_secs == 0 {
            return Err("send_timeout_secs must be at least 1".into());
        }
        let sndbuf = self.listener_send_buffer_bytes;
        if sndbuf != 0 && !(4096..=64 << 20).contains(&sndbuf) {
            return Err(format!(
                "listener_send_buffer_bytes = {sndbuf}: 0 (the kernel's choice) or 4096 to 64 MiB"
            ));
        }
        if self.auth_max_failures == 0 {
            return Err("auth_max_failures must be at least 1".into());
        }
        if let Some(p) = &self.source_password {
            if p.is_empty() {
                return Err("source_password must not be empty".into());
            }
        }
        if self.admin_password.as_deref() == Some("") {
            return Err(
                "admin_password must not be empty (leave it out for no authentication)".into(),
            );
        }
        if self.admin_user.is_empty() || self.admin_user.contains(':') {
            return Err("admin_user must be non-empty and contain no ':'".into());
        }
        check_mount_path("demo_mount", &self.demo_mount)?;
        check_mount("defaults", &self.defaults, self)?;
        for (path, m) in &self.mounts {
            check_mount_path(&format!("mounts.\"{path}\""), path)?;
            check_mount(&format!("mounts.\"{path}\""), m, self)?;
        }
        Ok(())
    }
}

fn check_mount_path(what: &str, path: &str) -> Result<(), String> {
    if crate::http::valid_mount_path(path) {
        Ok(())
    } else {
        Err(format!(
            "{what}: {path:?} is not a mount path (must start with '/', at most 256 bytes of letters, digits and -_.~/, no '..')"
        ))
    }
}

fn check_mount(what: &str, m: &MountSettings, cfg: &Config) -> Result<(), String> {
    if m.max_lag_bytes < 4096 {
        return Err(format!(
            "{what}.max_lag_bytes = {}: at least 4096",
            m.max_lag_bytes
        ));
    }
    if m.max_lag_bytes > 1 << 30 {
        return Err(format!(
            "{what}.max_lag_bytes = {}: at most 1 GiB",
            m.max_lag_bytes
        ));
    }
    if m.burst_bytes > m.max_lag_bytes {
        return Err(format!(
            "{what}.burst_bytes = {} exceeds max_lag_bytes = {}: a new listener would start already too far behind",
            m.burst_bytes, m.max_lag_bytes
        ));
    }
    if m.min_write_bytes > 1 << 20 {
        return Err(format!(
            "{what}.min_write_bytes = {}: at most 1 MiB",
            m.min_write_bytes
        ));
    }
    if m.max_write_delay_ms > 10_000 {
        return Err(format!(
            "{what}.max_write_delay_ms = {}: at most 10000",
            m.max_write_delay_ms
        ));
    }
    if let Some(p) = &m.source_password {
        if p.is_empty() {
            return Err(format!("{what}.source_password must not be empty"));
        }
    }
    if let Some(f) = &m.fallback_mount {
        check_mount_path(&format!("{what}.fallback_mount"), f)?;
        let known = cfg.mounts.contains_key(f) || (cfg.demo && *f == cfg.demo_mount);
        if !known {
            return Err(format!(
                "{what}.fallback_mount = {f:?}: not a declared mount (declare it under [mounts] or use the demo mount)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_are_valid() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.listen.port(), 8000);
        assert_eq!(c.defaults.burst_bytes, 65536);
        assert_eq!(c.defaults.max_lag_bytes, 524288);
        assert_eq!(c.defaults.lag_policy, LagPolicy::Disconnect);
        assert_eq!(c.defaults.source_grace_secs, 10);
    }

    #[test]
    fn file_overrides_defaults_and_mounts_inherit() {
        let c = Config::from_toml(
            r#"
            listen = "127.0.0.1:9000"
            source_password = "global"
            [defaults]
            burst_bytes = 1000
            max_lag_bytes = 100000
            [mounts."/live"]
            source_password = "livepw"
            max_listeners = 5
            lag_policy = "skip"
            fallback_mount = "/demo"
            [mounts."/other"]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen.port(), 9000);
        let live = c.mount("/live");
        assert_eq!(live.burst_bytes, 1000);
        assert_eq!(live.max_listeners, 5);
        assert_eq!(live.lag_policy, LagPolicy::Skip);
        assert_eq!(c.source_password_for("/live"), Some("livepw"));
        assert_eq!(c.source_password_for("/other"), Some("global"));
        assert_eq!(c.source_password_for("/undeclared"), Some("global"));
        assert_eq!(c.mount("/undeclared").max_lag_bytes, 100000);
    }

    #[test]
    fn the_readme_example_is_valid_and_states_every_default() {
        let readme = include_str!("../README.md");
        let example = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("README has a toml example");
        let mut c = Config::from_toml(example).unwrap();
        c.validate().unwrap();
        assert_eq!(c.mounts.len(), 2);
        assert_eq!(c.mount("/live").max_listeners, 500);
        assert_eq!(c.mount("/lowlatency").max_write_delay_ms, 0);
        c.mounts.clear();
        assert_eq!(
            c,
            Config::default(),
            "the README's defaults differ from the code's"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = Config::from_toml("lissten = \"x\"").unwrap_err();
        assert!(e.contains("lissten"), "{e}");
        let e = Config::from_toml("[defaults]\nlag_policy = \"drop\"").unwrap_err();
        assert!(e.contains("drop"), "{e}");
        let c = Config::from_toml("[defaults]\nburst_bytes = 900000").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("defaults.burst_bytes"), "{e}");
        let c = Config::from_toml("[mounts.\"live\"]").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("mounts.\"live\""), "{e}");
        let c = Config::from_toml("[mounts.\"/a\"]\nfallback_mount = \"/nowhere\"").unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains("fallback_mount"), "{e}");
    }
}
