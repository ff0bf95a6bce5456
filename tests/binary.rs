//! The `fanstream` binary as an operator runs it: flags, the generated password, the demo, signals.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{wait_line, ChildGuard};
use common::*;

fn fanstream() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fanstream"));
    c.env_remove("FANSTREAM_SOURCE_PASSWORD")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env("FANSTREAM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Starts the binary on ephemeral loopback ports; returns it, its address and its stdout lines.
fn start(
    args: &[&str],
    env: &[(&str, &str)],
) -> (ChildGuard, SocketAddr, std::sync::mpsc::Receiver<String>) {
    let (child, addr, stdout, _) = start_logged(args, env);
    (child, addr, stdout)
}

/// [`start`], with the log's lines after the start-up line.
fn start_logged(
    args: &[&str],
    env: &[(&str, &str)],
) -> (
    ChildGuard,
    SocketAddr,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<String>,
) {
    let mut cmd = fanstream();
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--no-pin",
    ])
    .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = ChildGuard::spawn("fanstream", &mut cmd);
    let c = child.child.as_mut().unwrap();
    let stdout = ChildGuard::lines(c.stdout.take().unwrap());
    let stderr = ChildGuard::lines(c.stderr.take().unwrap());
    let started = wait_line(&stderr, "the start-up line", |l| {
        l.contains("fanstream started")
    });
    let addr = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen_addr="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listen address in {started:?}"));
    (child, addr, stdout, stderr)
}

#[test]
fn help_documents_every_common_setting() {
    let out = fanstream().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--admin-listen",
        "--workers",
        "--source-password",
        "FANSTREAM_SOURCE_PASSWORD",
        "--admin-password",
        "FANSTREAM_ADMIN_PASSWORD",
        "--no-demo",
        "--no-pin",
        "--check-config",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn without_a_password_one_is_generated_and_the_demo_plays_then_sigterm_exits_cleanly() {
    let (mut child, addr, stdout, log) = start_logged(&[], &[]);
    let line = wait_line(&stdout, "the generated password", |l| {
        l.contains("generated for this run")
    });
    let password = line.rsplit(' ').next().unwrap().to_string();
    assert!(password.len() >= 16, "weak generated password {password:?}");
    // And where to listen, as a browser on this host reaches it.
    let urls = wait_line(&log, "the page's and the demo's URLs", |l| {
        l.contains("the page: ")
    });
    let base = format!("http://localhost:{}", addr.port());
    assert!(
        urls.contains(&format!("the page: {base}/ and the demo: {base}/demo")),
        "{urls}"
    );

    // The demo plays at once: a WAV header, then PCM.
    let mut demo = Listener::connect(addr, "/demo");
    assert!(
        demo.head.contains("Content-Type: audio/wav"),
        "{}",
        demo.head
    );
    demo.read_at_least(44 + 3200);
    assert_eq!(&demo.body[..4], b"RIFF");

    // The generated password admits a source; a wrong one does not.
    let put = |pw: &str| {
        format!(
            "PUT /live HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
            basic("source", pw)
        )
    };
    let (status, _, _) = request(addr, put("hackme").as_bytes());
    assert_eq!(status, 401);
    let mut source = Source::connect_raw(addr, put(&password).as_bytes());
    source.send(b"some bytes");

    child.signal(libc::SIGTERM);
    let status = child.wait_for(Duration::from_secs(15));
    assert!(status.success(), "SIGTERM exit: {status}");
    demo.read_to_end(); // the server closed the listener
}

#[test]
fn the_password_can_come_from_the_environment_and_sigint_stops_at_once() {
    let (mut child, addr, stdout) =
        start(&["--no-demo"], &[("FANSTREAM_SOURCE_PASSWORD", "from-env")]);
    let put = format!(
        "PUT /live HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
        basic("source", "from-env")
    );
    let mut source = Source::connect_raw(addr, put.as_bytes());
    source.send(&pattern(0, 1000));
    let (status, _, _) = request(addr, b"GET /demo HTTP/1.0\r\n\r\n");
    assert_eq!(status, 404, "--no-demo must turn the demo off");
    child.signal(libc::SIGINT);
    let status = child.wait_for(Duration::from_secs(5));
    assert!(status.success(), "SIGINT exit: {status}");
    assert!(
        stdout.try_iter().all(|l| !l.contains("generated")),
        "a password was generated although one was given"
    );
}

#[test]
fn a_bad_config_file_is_refused_naming_the_setting() {
    let dir = common::process::scratch_dir("bad_config");
    let path = dir.join("fanstream.toml");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "[defaults]\nburst_bytes = 2000000").unwrap();
    let out = fanstream()
        .args([
            "--source-password",
            "x",
            "--listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("defaults.burst_bytes"), "{err}");

    writeln!(f, "listen_addr = \"oops\"").unwrap();
    let out = fanstream().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_addr"));
}

#[test]
fn flags_override_the_config_file() {
    let dir = common::process::scratch_dir("flags_override");
    let path = dir.join("fanstream.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:1\"\nsource_password = \"file-pw\"\ndemo = true\n",
    )
    .unwrap();
    let (_child, addr, _) = start(&["--config", path.to_str().unwrap(), "--no-demo"], &[]);
    assert_ne!(addr.port(), 1, "--listen must override the file");
    let (status, _, _) = request(addr, b"GET /demo HTTP/1.0\r\n\r\n");
    assert_eq!(status, 404, "--no-demo must override demo = true");
    let put = format!(
        "PUT /live HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
        basic("source", "file-pw")
    );
    let _source = Source::connect_raw(addr, put.as_bytes());
}

#[test]
fn serving_survives_a_closed_log_pipe() {
    use std::io::{BufRead, BufReader};
    let mut cmd = fanstream();
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "none",
        "--no-pin",
        "--source-password",
        "x",
    ]);
    let mut child = ChildGuard::spawn("fanstream", &mut cmd);
    let stderr = child.child.as_mut().unwrap().stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("fanstream started"))
        .expect("start-up line");
    let addr: SocketAddr = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen_addr="))
        .and_then(|a| a.parse().ok())
        .unwrap();
    drop(lines); // the operator's log pipe goes away
    for _ in 0..3 {
        let (status, _, _) = request(addr, b"GET /nothing HTTP/1.0\r\n\r\n");
        assert_eq!(status, 404);
    }
}

/// Starts the binary with a config file; returns it, its address, and its stderr lines.
fn start_with_config(
    toml: &str,
    dir: &std::path::Path,
    wrap: Option<&str>,
) -> (ChildGuard, SocketAddr, std::sync::mpsc::Receiver<String>) {
    let path = dir.join("fanstream.toml");
    std::fs::write(&path, toml).unwrap();
    let bin = env!("CARGO_BIN_EXE_fanstream");
    let mut cmd = match wrap {
        // A shell prefix, e.g. to lower the open-file limit for this process only.
        Some(prefix) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{prefix} exec {bin} \"$@\""))
                .arg("sh");
            c
        }
        None => Command::new(bin),
    };
    cmd.env_remove("FANSTREAM_SOURCE_PASSWORD")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env("FANSTREAM_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--no-pin",
            "--config",
        ])
        .arg(&path);
    let mut child = ChildGuard::spawn("fanstream", &mut cmd);
    let stderr = ChildGuard::lines(child.child.as_mut().unwrap().stderr.take().unwrap());
    let started = wait_line(&stderr, "the start-up line", |l| {
        l.contains("fanstream started")
    });
    let addr = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen_addr="))
        .and_then(|a| a.parse().ok())
        .unwrap();
    (child, addr, stderr)
}

fn put_as(mount: &str, pw: &str) -> String {
    format!(
        "PUT {mount} HTTP/1.1\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\n\r\n",
        basic("source", pw)
    )
}

#[test]
fn sighup_reloads_passwords_and_limits_without_dropping_anyone() {
    let dir = common::process::scratch_dir("sighup");
    let first =
        "demo = false\nsource_password = \"old-pw\"\n[mounts.\"/live\"]\nsource_grace_secs = 30\n";
    let (child, addr, stderr) = start_with_config(first, &dir, None);
    let mut source = Source::connect_raw(addr, put_as("/live", "old-pw").as_bytes());
    source.send_pattern(0, 4000, 1000, Duration::ZERO);
    let mut l = Listener::connect(addr, "/live");
    l.read_at_least(4000);

    // A broken file is refused; the running config stays.
    std::fs::write(dir.join("fanstream.toml"), "source_password = \n").unwrap();
    child.signal(libc::SIGHUP);
    wait_line(&stderr, "the refusal", |l| l.contains("config refused"));
    let _other = Source::connect_raw(addr, put_as("/other", "old-pw").as_bytes());

    let second = "demo = false\nsource_password = \"new-pw\"\n[mounts.\"/live\"]\nsource_grace_secs = 30\nmax_listeners = 1\n";
    std::fs::write(dir.join("fanstream.toml"), second).unwrap();
    child.signal(libc::SIGHUP);
    wait_line(&stderr, "the reload", |l| {
        l.contains("configuration reloaded")
    });
    assert_eq!(request(addr, put_as("/third", "old-pw").as_bytes()).0, 401);
    let _third = Source::connect_raw(addr, put_as("/third", "new-pw").as_bytes());
    // The new per-mount limit applies to newcomers; the connected listener and source carry on.
    assert_eq!(request(addr, b"GET /live HTTP/1.0\r\n\r\n").0, 503);
    source.send_pattern(4000, 8000, 1000, Duration::ZERO);
    l.read_at_least(8000);
    assert_exact_suffix(&l.body[..8000], 8000, "listener across the reload");
}

#[test]
fn passwords_can_live_in_files_and_never_appear_in_logs() {
    let dir = common::process::scratch_dir("password_file");
    std::fs::write(dir.join("pw"), "file-secret-1\n").unwrap();
    let toml = format!(
        "demo = false\nsource_password_file = \"{}\"\n",
        dir.join("pw").display()
    );
    let (mut child, addr, stderr) = start_with_config(&toml, &dir, None);
    assert_eq!(
        request(addr, put_as("/live", "wrong-secret-2").as_bytes()).0,
        401
    );
    let _source = Source::connect_raw(addr, put_as("/live", "file-secret-1").as_bytes());
    child.signal(libc::SIGTERM);
    assert!(child.wait_for(Duration::from_secs(15)).success());
    let logs: Vec<String> = stderr.try_iter().collect();
    assert!(
        logs.iter().any(|l| l.contains("authentication failed")),
        "the failure is logged"
    );
    for l in &logs {
        assert!(
            !l.contains("file-secret-1") && !l.contains("wrong-secret-2"),
            "password in log: {l}"
        );
    }
}

#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let dir = common::process::scratch_dir("emfile");
    // A limit far above the open-file limit, so that accept() itself runs out of descriptors.
    let toml = "demo = false\nsource_password = \"x\"\nmax_connections = 100000\nheader_timeout_secs = 30\n";
    let (child, addr, stderr) = start_with_config(toml, &dir, Some("ulimit -n 64;"));
    let mut held = Vec::new();
    for _ in 0..80 {
        match TcpStream::connect(addr) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    wait_line(&stderr, "the back-off", |l| l.contains("out of resources"));
    // Backing off, not spinning: little CPU while the descriptors stay exhausted.
    let cpu_before = process_cpu_ticks(child.pid());
    let wall = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let used = process_cpu_ticks(child.pid()) - cpu_before;
    let ticks = (wall.elapsed().as_secs_f64() * 100.0) as u64; // 100 ticks per second
    assert!(
        used * 4 < ticks,
        "used {used} of {ticks} CPU ticks while out of descriptors"
    );
    drop(held);
    wait_until("service to recover", || {
        TcpStream::connect(addr).is_ok_and(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /nothing HTTP/1.0\r\n\r\n").is_ok()
                && common::process::read_all(&mut s).starts_with(b"HTTP/1.0 404")
        })
    });
}

use std::net::TcpStream;

/// User + system CPU of a process, in clock ticks, from /proc.
fn process_cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_refusal_is_logged_once_with_the_peer_and_the_reason() {
    let dir = common::process::scratch_dir("refusal-log");
    let (_child, addr, stderr) =
        start_with_config("demo = false\nsource_password = \"x\"\n", &dir, None);
    let mut first = TcpStream::connect(addr).unwrap();
    let peer = first.local_addr().unwrap().to_string();
    first.write_all(b"BREW /pot HTTP/1.0\r\n\r\n").unwrap();
    assert!(common::process::read_all(&mut first).starts_with(b"HTTP/1.0 405"));
    // A second refusal marks the end: every line about the first was logged before it.
    let mut second = TcpStream::connect(addr).unwrap();
    let marker = second.local_addr().unwrap().to_string();
    second.write_all(b"GET /nothing HTTP/1.0\r\n\r\n").unwrap();
    assert!(common::process::read_all(&mut second).starts_with(b"HTTP/1.0 404"));
    let mut about_first = Vec::new();
    wait_line(&stderr, "the second refusal", |l| {
        if l.contains(&peer) {
            about_first.push(l.to_string());
        }
        l.contains(&marker)
    });
    assert_eq!(about_first.len(), 1, "{about_first:?}");
    assert!(
        about_first[0].contains("method_not_allowed") && about_first[0].contains("405"),
        "{}",
        about_first[0]
    );
}

#[test]
fn under_systemd_it_notifies_ready_once_listening_then_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = common::process::scratch_dir("sd_notify");
    let socket_path = dir.join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let next = || {
        let mut buf = [0u8; 1024];
        let n = socket
            .recv(&mut buf)
            .expect("a notification before the deadline");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let config = dir.join("fanstream.toml");
    std::fs::write(&config, "demo = false\nsource_password = \"x\"\n").unwrap();
    let mut cmd = fanstream();
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--no-pin",
        "--config",
    ])
    .arg(&config)
    .env("NOTIFY_SOCKET", &socket_path);
    let mut child = ChildGuard::spawn("fanstream", &mut cmd);
    let stderr = ChildGuard::lines(child.child.as_mut().unwrap().stderr.take().unwrap());

    // READY=1 is the first word, and both ports answer as soon as it arrives.
    let ready = next();
    let status = ready
        .strip_prefix("READY=1\nSTATUS=listening on ")
        .unwrap_or_else(|| panic!("not READY=1 with the addresses: {ready:?}"));
    let (listen, admin) = status.split_once(", admin on ").unwrap();
    let listen: SocketAddr = listen.parse().unwrap();
    let admin: SocketAddr = admin.parse().unwrap();
    assert_eq!(request(listen, b"GET /nothing HTTP/1.0\r\n\r\n").0, 404);
    assert_eq!(request(admin, b"GET /metrics HTTP/1.0\r\n\r\n").0, 200);

    // A reload is bracketed by RELOADING=1 and READY=1, whether the file is taken or refused.
    child.signal(libc::SIGHUP);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next(), "READY=1\nSTATUS=config reloaded");
    std::fs::write(&config, "workers = 5000\n").unwrap();
    child.signal(libc::SIGHUP);
    assert!(next().starts_with("RELOADING=1\n"));
    let refused = next();
    assert!(
        refused.starts_with("READY=1\nSTATUS=config refused") && refused.contains("workers"),
        "{refused:?}"
    );
    assert_eq!(
        refused.lines().count(),
        2,
        "one line of status: {refused:?}"
    );

    child.signal(libc::SIGTERM);
    assert!(next().starts_with("STOPPING=1\n"));
    assert!(child.wait_for(Duration::from_secs(15)).success());
    drop(stderr);
}

#[test]
fn the_source_password_comes_from_a_credential_then_beside_the_config_and_flags_come_first() {
    let dir = common::process::scratch_dir("password_fallbacks");
    let config = dir.join("fanstream.toml");
    std::fs::write(&config, "demo = false\n").unwrap();
    std::fs::write(dir.join("source_password"), "beside-pw\n").unwrap();
    let credentials = dir.join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("source_password"), "credential-pw\n").unwrap();
    let config_arg = ["--config", config.to_str().unwrap()];
    let admits = |addr, pw: &str| {
        // 404: authenticated, and no source on the mount; 401: the password is wrong.
        let query = format!(
            "GET /admin/metadata?mode=updinfo&mount=/live&song=x HTTP/1.0\r\nAuthorization: Basic {}\r\n\r\n",
            basic("source", pw)
        );
        match request(addr, query.as_bytes()).0 {
            404 => true,
            401 => false,
            other => panic!("title update answered {other}"),
        }
    };

    let credential = credentials.to_str().unwrap();
    let (_child, addr, stdout) = start(&config_arg, &[("CREDENTIALS_DIRECTORY", credential)]);
    assert!(admits(addr, "credential-pw") && !admits(addr, "beside-pw"));
    let (_child, addr, _) = start(&config_arg, &[]);
    assert!(admits(addr, "beside-pw"));
    assert!(stdout.try_iter().all(|l| !l.contains("generated")));

    // A flag beats the config's password file (which beats both fallbacks).
    let password_file = dir.join("file-pw");
    std::fs::write(&password_file, "file-pw\n").unwrap();
    let toml = format!(
        "demo = false\nsource_password_file = \"{}\"\n",
        password_file.display()
    );
    std::fs::write(&config, toml).unwrap();
    let (_child, addr, _) = start(&config_arg, &[]);
    assert!(admits(addr, "file-pw") && !admits(addr, "beside-pw"));
    let (_child, addr, _) = start(
        &[config_arg[0], config_arg[1], "--source-password", "flag-pw"],
        &[],
    );
    assert!(admits(addr, "flag-pw") && !admits(addr, "file-pw"));

    // A fallback that is there but cannot be read stops the start, naming it.
    std::fs::write(&config, "demo = false\n").unwrap();
    std::fs::remove_file(dir.join("source_password")).unwrap();
    std::fs::create_dir(dir.join("source_password")).unwrap();
    let out = fanstream().args(config_arg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("source password file") && err.contains("source_password"),
        "{err}"
    );
}

#[test]
fn check_config_says_why_and_binds_nothing() {
    let dir = common::process::scratch_dir("check_config");
    let config = dir.join("fanstream.toml");
    // The address is in use: a check must not care, as the running server holds it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    std::fs::write(
        &config,
        format!("listen = \"{addr}\"\nsource_password = \"x\"\n"),
    )
    .unwrap();
    let check = |extra: &[&str]| {
        let out = fanstream()
            .arg("--check-config")
            .arg(&config)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = check(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("is valid"), "{stdout}");

    // The flags are checked over the file, as start-up applies them.
    let (code, _, stderr) = check(&["--workers", "5000"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("workers = 5000"), "{stderr}");

    // A file it names must be readable.
    std::fs::write(&config, "admin_password_file = \"/nonexistent/pw\"\n").unwrap();
    let (code, _, stderr) = check(&[]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("admin_password_file = /nonexistent/pw"),
        "{stderr}"
    );
    let apache_users = dir.join("users");
    std::fs::write(
        &apache_users,
        "alice:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n",
    )
    .unwrap();
    let apache_config = format!(
        "[mounts.\"/members\"]\nauth = \"htpasswd\"\nhtpasswd_file = {:?}\n",
        apache_users.display().to_string()
    );
    // So must the files start-up opens and a reload does not: the access log, the TLS
    // certificate and key (the packaged unit reloads only after this check passes; a restart
    // must not fail where it passed).
    for (file, says) in [
        (
            "access_log = \"/nonexistent/dir/access.log\"\n",
            "access_log = \"/nonexistent/dir/access.log\"",
        ),
        (
            "tls_listen = \"127.0.0.1:0\"\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
            "tls_cert /nonexistent/c.pem",
        ),
        // Not fatal at start-up (it is read for each listener, so it may come later), but a
        // check that passed it would let a typo refuse every listener of the mount.
        (
            "[mounts.\"/members\"]\nauth = \"htpasswd\"\nhtpasswd_file = \"/nonexistent/users\"\n",
            "htpasswd_file = /nonexistent/users: No such file",
        ),
        // Apache's default hash (`htpasswd` without -B) is never checked: its users would
        // always be refused.
        (
            apache_config.as_str(),
            "the hash of alice is of a kind not checked",
        ),
    ] {
        std::fs::write(&config, format!("source_password = \"x\"\n{file}")).unwrap();
        let (code, _, stderr) = check(&[]);
        assert_eq!(code, Some(1), "{file}: {stderr}");
        assert!(stderr.contains(says), "{file}: {stderr}");
    }
    // An operator moving from Icecast is pointed at the README's table, not at a TOML error.
    std::fs::write(
        &config,
        "<icecast>\n  <limits><clients>100</clients></limits>\n</icecast>\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&[]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("this is XML (an icecast.xml?)") && stderr.contains("Moving from Icecast"),
        "{stderr}"
    );
    let (code, _, stderr) = check(&["--config", "x.toml"]);
    assert_eq!(
        code,
        Some(2),
        "--config with --check-config is a usage error: {stderr}"
    );
}

/// A listen address in use is an error that names the setting, and no generated password is
/// printed for a server that never ran.
#[test]
fn a_listen_address_in_use_names_the_setting_and_prints_no_password() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = fanstream()
        .args(["--listen", &addr, "--admin-listen", "none", "--no-pin"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr} (listen)")),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("generated"), "{stdout}");
}
