//! The servers under test, started as child processes on loopback with a generated config:
//! fanstream, or Icecast 2.4 for comparison. A child never outlives this process.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procstat;

/// The password of every load source.
pub const PASSWORD: &str = "load-secret";
/// Same burst and lag window on both servers, so that they are compared on equal terms.
pub const BURST_BYTES: u64 = 65_536;
pub const MAX_LAG_BYTES: u64 = 524_288;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Fanstream,
    Icecast,
}

/// Settings of the server under test.
#[derive(Clone, Debug)]
pub struct ServerOpts {
    pub target: Target,
    /// fanstream workers; 0 = one per core.
    pub workers: usize,
    pub max_clients: usize,
    pub mounts: usize,
    pub min_write_bytes: Option<usize>,
    pub max_write_delay_ms: Option<u64>,
    /// Audio bytes between ICY blocks (the mounts' `icy_metaint`); None: the server's default.
    pub icy_metaint: Option<usize>,
    /// Extra `KEY=VALUE` lines for fanstream's config: top-level, or, as `defaults.KEY=VALUE`,
    /// in its `[defaults]` table, in place of the tool's own value of that key.
    pub settings: Vec<String>,
    /// An edge of a tree (fanstream only): each mount (`/load0`...) is relayed from this
    /// origin instead of pushed by a source.
    pub relay_from: Option<SocketAddr>,
    pub fanstream_bin: PathBuf,
    pub icecast_bin: String,
}

/// A running server, killed on drop.
pub struct ServerProc {
    child: Child,
    pub addr: SocketAddr,
    /// fanstream's /metrics.
    pub admin: Option<SocketAddr>,
}

impl ServerProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The /metrics text (fanstream only).
    pub fn metrics(&self) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.admin?, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut all = String::new();
        s.read_to_string(&mut all).ok()?;
        Some(all.split_once("\r\n\r\n")?.1.to_string())
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of a metric's samples (all labels); 0 when it has none (not -0, the empty f64 sum).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    let sum: f64 = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum();
    sum + 0.0
}

/// A metric's samples summed by the value of one label (e.g. disconnects by `reason`).
pub fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for l in text.lines().filter(|l| l.starts_with(name)) {
        let Some((series, value)) = l.rsplit_once(' ') else {
            continue;
        };
        if series.split('{').next() != Some(name) {
            continue;
        }
        let Some(v) = series
            .split_once(&key)
            .and_then(|(_, r)| r.split('"').next())
        else {
            continue;
        };
        *out.entry(v.to_string()).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// What a run over TLS needs: fanstream's settings for its TLS port, the port, and the CA the
/// listeners trust.
pub struct TlsSetup {
    pub settings: Vec<String>,
    pub addr: SocketAddr,
    pub ca: std::path::PathBuf,
}

/// Makes a CA and a certificate for `localhost` signed by it (ECDSA P-256, what a certificate
/// authority issues by default today) under `dir`, and picks the TLS port.
pub fn tls_setup(dir: &Path) -> Result<TlsSetup, String> {
    use rcgen::{CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(e)?).map_err(e)?;
    let key = KeyPair::generate().map_err(e)?;
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .map_err(e)?
        .signed_by(&key, &ca)
        .map_err(e)?;
    let (ca_path, cert_path, key_path) = (
        dir.join("tls-ca.pem"),
        dir.join("tls-cert.pem"),
        dir.join("tls-key.pem"),
    );
    for (path, pem) in [
        (&ca_path, ca.pem()),
        (&cert_path, cert.pem()),
        (&key_path, key.serialize_pem()),
    ] {
        fs::write(path, pem).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let addr: SocketAddr = ([127, 0, 0, 1], free_port().map_err(|e| e.to_string())?).into();
    Ok(TlsSetup {
        settings: vec![
            format!("tls_listen = \"{addr}\""),
            format!("tls_cert = \"{}\"", cert_path.display()),
            format!("tls_key = \"{}\"", key_path.display()),
        ],
        addr,
        ca: ca_path,
    })
}

/// A loopback port free right now.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Makes the child die with us (SIGKILL when this process exits, however it exits), and gives
/// it the open-file limit it needs for the load.
fn child_of_ours(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (prctl, and getrlimit and setrlimit in raise_fd_limit) on memory it owns.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            procstat::raise_fd_limit();
            Ok(())
        })
    }
}

/// Starts a child whose output goes to `log`, killed when we exit.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child, String> {
    let out = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    child_of_ours(cmd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))
}

/// Starts a child whose stdout we read, killed when we exit.
pub fn spawn_piped(cmd: &mut Command) -> Result<Child, String> {
    child_of_ours(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))
}

pub fn start(o: &ServerOpts, dir: &Path) -> Result<ServerProc, String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut server = match o.target {
        Target::Fanstream => start_fanstream(o, dir, addr)?,
        Target::Icecast => start_icecast(o, dir, addr)?,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(addr).is_err() {
        if !server.alive() || Instant::now() > deadline {
            return Err(format!(
                "{:?} did not start listening on {addr}; see its log in {}",
                o.target,
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

fn start_fanstream(o: &ServerOpts, dir: &Path, addr: SocketAddr) -> Result<ServerProc, String> {
    let admin: SocketAddr = ([127, 0, 0, 1], free_port().map_err(|e| e.to_string())?).into();
    let config = fanstream_config(o, addr, admin);
    let path = dir.join("fanstream.toml");
    fs::write(&path, config).map_err(|e| e.to_string())?;
    let child = spawn_logged(
        Command::new(&o.fanstream_bin).arg("--config").arg(&path),
        &dir.join("fanstream.log"),
    )?;
    Ok(ServerProc {
        child,
        addr,
        admin: Some(admin),
    })
}

/// A `--server-setting` that sets a mount default, `defaults.KEY=VALUE`, as (KEY, VALUE)
/// trimmed; None for a top-level setting.
fn mount_default(kv: &str) -> Option<(&str, &str)> {
    let (key, value) = kv.strip_prefix("defaults.")?.split_once('=')?;
    Some((key.trim(), value.trim()))
}

/// The value `settings` give the mount default `key` (the last one, as in the config).
pub fn defaults_setting<'a>(settings: &'a [String], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .filter_map(|kv| mount_default(kv))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// fanstream's config for a run: the tool's listen addresses and limits, the load's mounts
/// defaults, `o.settings` added, and a relay for each mount on an edge.
fn fanstream_config(o: &ServerOpts, addr: SocketAddr, admin: SocketAddr) -> String {
    let mut defaults = vec![
        ("burst_bytes".to_string(), BURST_BYTES.to_string()),
        ("max_lag_bytes".to_string(), MAX_LAG_BYTES.to_string()),
    ];
    if let Some(b) = o.min_write_bytes {
        defaults.push(("min_write_bytes".into(), b.to_string()));
    }
    if let Some(ms) = o.max_write_delay_ms {
        defaults.push(("max_write_delay_ms".into(), ms.to_string()));
    }
    if let Some(m) = o.icy_metaint {
        defaults.push(("icy_metaint".into(), m.to_string()));
    }
    let mut extra = String::new();
    for kv in &o.settings {
        match mount_default(kv) {
            // TOML refuses a key twice in a table: the tool's own value gives way.
            Some((key, value)) => {
                defaults.retain(|(k, _)| k != key);
                defaults.push((key.to_string(), value.to_string()));
            }
            None => extra += &format!("{kv}\n"),
        }
    }
    let defaults: String = defaults
        .iter()
        .map(|(key, value)| format!("{key} = {value}\n"))
        .collect();
    let config = format!(
        "listen = \"{addr}\"\nadmin_listen = \"{admin}\"\nworkers = {}\ndemo = false\n\
         source_password = \"{PASSWORD}\"\nmax_listeners = {}\nmax_sources = {}\n{extra}\n[defaults]\n{defaults}",
        o.workers,
        // A run with sources only (`--clients 0`) still needs a valid config.
        o.max_clients.max(1),
        o.mounts + 1,
    );
    let relays: String = o.relay_from.map_or_else(String::new, |origin| {
        (0..o.mounts)
            .map(|m| {
                format!(
                    "\n[[relays]]\nmount = \"/load{m}\"\nupstreams = [\"http://{origin}/load{m}\"]\n"
                )
            })
            .collect()
    });
    config + &relays
}

/// Icecast refuses to run as root: it runs as the Debian package's user, or nobody.
fn icecast_user() -> (u32, u32) {
    for name in [c"icecast2", c"nobody"] {
        // SAFETY: getpwnam with a NUL-terminated name; the result is read at once, before any
        // other call could reuse its static buffer.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: non-null, points to a valid passwd entry.
            let pw = unsafe { &*pw };
            return (pw.pw_uid, pw.pw_gid);
        }
    }
    (65534, 65534)
}

fn start_icecast(o: &ServerOpts, dir: &Path, addr: SocketAddr) -> Result<ServerProc, String> {
    if o.icy_metaint.is_some() {
        return Err("--icy-metaint is set on fanstream only: Icecast keeps its own (16000)".into());
    }
    let (uid, gid) = icecast_user();
    let logdir = dir.join("icecast-log");
    fs::create_dir_all(&logdir).map_err(|e| e.to_string())?;
    let c_logdir =
        std::ffi::CString::new(logdir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: chown with a NUL-terminated path we own.
    if unsafe { libc::chown(c_logdir.as_ptr(), uid, gid) } != 0 {
        return Err(format!("cannot chown {}", logdir.display()));
    }
    // Fair to Icecast: room for every client, the same burst (65,536) and lag limit (the queue)
    // as fanstream, logging at warnings only.
    let config = format!(
        r#"<icecast>
  <location>loopback</location>
  <admin>load@localhost</admin>
  <limits>
    <clients>{clients}</clients>
    <sources>{sources}</sources>
    <queue-size>{MAX_LAG_BYTES}</queue-size>
    <client-timeout>30</client-timeout>
    <header-timeout>15</header-timeout>
    <source-timeout>10</source-timeout>
    <burst-on-connect>1</burst-on-connect>
    <burst-size>{BURST_BYTES}</burst-size>
  </limits>
  <authentication>
    <source-password>{PASSWORD}</source-password>
    <relay-password>{PASSWORD}</relay-password>
    <admin-user>admin</admin-user>
    <admin-password>{PASSWORD}</admin-password>
  </authentication>
  <hostname>127.0.0.1</hostname>
  <listen-socket>
    <port>{port}</port>
    <bind-address>127.0.0.1</bind-address>
  </listen-socket>
  <fileserve>0</fileserve>
  <paths>
    <basedir>/usr/share/icecast2</basedir>
    <logdir>{logdir}</logdir>
    <webroot>/usr/share/icecast2/web</webroot>
    <adminroot>/usr/share/icecast2/admin</adminroot>
  </paths>
  <logging>
    <accesslog>access.log</accesslog>
    <errorlog>error.log</errorlog>
    <loglevel>2</loglevel>
  </logging>
  <security>
    <chroot>0</chroot>
  </security>
</icecast>
"#,
        clients = o.max_clients + o.mounts + 10,
        sources = o.mounts + 1,
        port = addr.port(),
        logdir = logdir.display(),
    );
    let path = dir.join("icecast.xml");
    fs::write(&path, config).map_err(|e| e.to_string())?;
    let child = spawn_logged(
        Command::new(&o.icecast_bin)
            .arg("-c")
            .arg(&path)
            .uid(uid)
            .gid(gid),
        &dir.join("icecast.log"),
    )?;
    Ok(ServerProc {
        child,
        addr,
        admin: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_metric_by_label() {
        let text =
            "# HELP x\nfanstream_listener_disconnects_total{mount=\"/a\",reason=\"slow\"} 2\n\
                    fanstream_listener_disconnects_total{mount=\"/b\",reason=\"slow\"} 3\n\
                    fanstream_listener_disconnects_total{mount=\"/a\",reason=\"shutdown\"} 1\n\
                    fanstream_listener_disconnects_totalx{reason=\"slow\"} 9\n";
        let by = metric_by_label(text, "fanstream_listener_disconnects_total", "reason");
        assert_eq!(by.get("slow"), Some(&5.0));
        assert_eq!(by.get("shutdown"), Some(&1.0));
        assert_eq!(by.len(), 2);
        assert_eq!(
            metric_sum(text, "fanstream_listener_disconnects_total"),
            6.0
        );
        let none = metric_sum(text, "fanstream_icy_listeners");
        assert!(none == 0.0 && none.is_sign_positive(), "{none}");
    }

    // `--server-setting defaults.burst_bytes=...` replaces the tool's own burst in the
    // `[defaults]` table (TOML refuses a key twice); a plain setting stays top-level.
    #[test]
    fn a_defaults_setting_replaces_the_tools_own() {
        let o = ServerOpts {
            target: Target::Fanstream,
            workers: 0,
            max_clients: 10,
            mounts: 2,
            min_write_bytes: None,
            max_write_delay_ms: Some(200),
            icy_metaint: None,
            settings: vec![
                "listener_send_buffer_bytes=262144".into(),
                "defaults.burst_bytes = 32768".into(),
                "defaults.max_write_delay_ms=100".into(),
            ],
            relay_from: None,
            fanstream_bin: PathBuf::new(),
            icecast_bin: String::new(),
        };
        let addr: SocketAddr = ([127, 0, 0, 1], 8000).into();
        let config = fanstream_config(&o, addr, addr);
        let (top, defaults) = config.split_once("\n[defaults]\n").unwrap();
        assert!(
            top.contains("\nlistener_send_buffer_bytes=262144\n"),
            "{config}"
        );
        let lines: Vec<&str> = defaults.lines().collect();
        assert_eq!(
            lines,
            [
                "max_lag_bytes = 524288",
                "burst_bytes = 32768",
                "max_write_delay_ms = 100"
            ],
            "{config}"
        );
    }
}
