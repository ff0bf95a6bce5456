//! The Debian package as an operator meets it (README, "Install as a service"): `make deb` builds
//! it, Debian's tools check it, `dpkg` installs it, the installed binary serves the demo with the
//! installed config as the service's user, and removing then purging it leaves what Debian's
//! rules say. It installs into this machine's root: CI runs as root on Debian, and so must this.
//! Where systemd runs (not in CI's container), installing also starts the service, on port 8000,
//! until the purge at the end.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::process::{require, scratch_dir, wait_line, ChildGuard};

const CONFIG: &str = "/etc/fanstream/fanstream.toml";
const PASSWORD_FILE: &str = "/etc/fanstream/source_password";
const UNIT: &str = "/usr/lib/systemd/system/fanstream.service";
/// The package from the dev profile, which `cargo test` has just built (the Makefile says why).
/// Its binary replaces the test build's `target/debug/fanstream` for the tests run after this
/// one: it lacks only the `fault-injection` feature, which no test of the binary uses.
const DEB_PROFILE: &str = "DEB_PROFILE=dev";

/// Runs `program` with `args`, returning its output whatever its status.
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs `program` and fails the test, with its output, unless it succeeds; returns its stdout.
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `fanstream ARGS` as the package's unprivileged user, as the unit runs it.
fn as_service_user(args: &[&str]) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "fanstream", "--", "/usr/bin/fanstream"])
        .args(args)
        .env_remove("FANSTREAM_SOURCE_PASSWORD")
        .env_remove("FANSTREAM_ADMIN_PASSWORD")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    cmd
}

fn check_config(file: &Path) -> Output {
    as_service_user(&["--check-config", file.to_str().unwrap()])
        .output()
        .unwrap()
}

fn installed() -> bool {
    run("dpkg-query", &["-W", "-f=${Status}", "fanstream"])
        .stdout
        .starts_with(b"install ok installed")
}

/// `make deb`, as a developer runs it but unoptimised (the Makefile says why);
/// returns the package's path.
fn build_package() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("make")
        .args(["deb", DEB_PROFILE])
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make deb: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let arch = run_ok("dpkg", &["--print-architecture"]);
    let deb = root.join(format!(
        "target/debian/fanstream_{}-1_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.trim()
    ));
    assert!(deb.is_file(), "make deb made no {}", deb.display());
    deb
}

#[test]
fn the_debian_package_builds_installs_serves_and_purges() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "tests/package.rs installs the package into this machine with dpkg, which needs root: \
         run it as root (CI does), in a container or a VM you can spare"
    );
    for program in [
        "make",
        "man",
        "dpkg-deb",
        "lintian",
        "systemd-analyze",
        "logrotate",
        "runuser",
        "curl",
    ] {
        require(program);
    }
    // An earlier run that stopped half-way may have left it installed.
    run_ok("dpkg", &["--purge", "fanstream"]);

    let deb = build_package();
    let deb = deb.to_str().unwrap();

    // `make install` (for hosts without dpkg) stages the same files under a prefix, the unit
    // pointing at them.
    let stage = scratch_dir("package-install");
    let out = Command::new("make")
        .args(["install", DEB_PROFILE, "PREFIX=/opt/fs"])
        .arg(format!("DESTDIR={}", stage.display()))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for path in [
        "opt/fs/bin/fanstream",
        "opt/fs/etc/fanstream/fanstream.toml",
        "opt/fs/etc/logrotate.d/fanstream",
        "opt/fs/share/man/man8/fanstream.8.gz",
        "opt/fs/share/doc/fanstream/LICENSE",
    ] {
        assert!(stage.join(path).is_file(), "make install made no {path}");
    }
    let unit =
        std::fs::read_to_string(stage.join("opt/fs/lib/systemd/system/fanstream.service")).unwrap();
    assert!(
        unit.contains(
            "ExecStart=/opt/fs/bin/fanstream --config /opt/fs/etc/fanstream/fanstream.toml"
        ) && unit.contains("LoadCredential=source_password:/opt/fs/etc/fanstream/source_password")
            && !unit.contains("/usr/bin/fanstream"),
        "{unit}"
    );

    // What the package holds.
    let contents = run_ok("dpkg-deb", &["-c", deb]);
    for path in [
        "./usr/bin/fanstream",
        "./etc/fanstream/fanstream.toml",
        // cargo-deb's place for units; /lib is /usr/lib on Debian 12 and later (merged /usr).
        "./usr/lib/systemd/system/fanstream.service",
        "./etc/logrotate.d/fanstream",
        "./usr/share/man/man8/fanstream.8.gz",
        "./usr/share/doc/fanstream/copyright",
        "./usr/share/doc/fanstream/changelog.Debian.gz",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} is not in the package:\n{contents}"
        );
    }
    // The summary is one line of at most 80 characters (Debian policy 3.4.1); the long
    // description follows it.
    let summary = run_ok("dpkg-deb", &["-f", deb, "Description"]);
    let first = summary.lines().next().unwrap_or_default();
    assert!(
        first.len() <= 80 && first.starts_with("Live broadcast streaming server"),
        "{summary}"
    );
    assert!(
        summary
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with(" Encoders push")),
        "{summary}"
    );
    let conffiles = run_ok("dpkg-deb", &["-I", deb, "conffiles"]);
    assert!(
        conffiles.lines().any(|l| l == CONFIG),
        "the config is not a conffile: {conffiles:?}"
    );

    // Debian's checks: no error, and no warning that is not overridden with its reason
    // (packaging/fanstream.lintian-overrides).
    let lintian = run("lintian", &["--fail-on", "error,warning", deb]);
    assert!(
        lintian.status.success(),
        "lintian: {}\n{}{}",
        lintian.status,
        String::from_utf8_lossy(&lintian.stdout),
        String::from_utf8_lossy(&lintian.stderr)
    );

    run_ok("dpkg", &["-i", deb]);
    assert!(installed());
    run_ok("id", &["fanstream"]);
    let password = std::fs::read_to_string(PASSWORD_FILE).unwrap();
    let password = password.trim();
    assert!(password.len() >= 20, "weak password {password:?}");
    let mode = run_ok("stat", &["-c", "%a %U %G", PASSWORD_FILE]);
    assert_eq!(mode.trim(), "640 root fanstream");

    // Installing again (an upgrade to the same version) keeps the operator's config and the
    // password written the first time.
    let local = std::fs::read_to_string(CONFIG).unwrap() + "# changed here\n";
    std::fs::write(CONFIG, &local).unwrap();
    run_ok("dpkg", &["-i", deb]);
    assert_eq!(std::fs::read_to_string(CONFIG).unwrap(), local);
    assert_eq!(
        std::fs::read_to_string(PASSWORD_FILE).unwrap().trim(),
        password
    );

    // The manual renders without groff's complaints, with the flags and the README's sections.
    // Read from the package, not the installed file: slim Debian images exclude /usr/share/man
    // from what dpkg installs.
    let unpacked = scratch_dir("package-unpacked");
    run_ok("dpkg-deb", &["-x", deb, unpacked.to_str().unwrap()]);
    let man = Command::new("man")
        .args(["--warnings", "-l", "-Tutf8"])
        .arg(unpacked.join("usr/share/man/man8/fanstream.8.gz"))
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    // Bold and underline come as overstrikes (a character, a backspace, a character): keep the
    // last of each.
    let mut page = String::new();
    for c in String::from_utf8_lossy(&man.stdout).chars() {
        if c == '\u{8}' {
            page.pop();
        } else {
            page.push(c);
        }
    }
    assert!(
        man.status.success() && man.stderr.is_empty(),
        "man: {}\n{}",
        man.status,
        String::from_utf8_lossy(&man.stderr)
    );
    for text in [
        "--check-config",
        "CONFIGURATION",
        "max_lag_bytes",
        "systemctl reload fanstream",
        "/var/log/fanstream/*.log",
    ] {
        assert!(page.contains(text), "the manual lacks {text:?}:\n{page}");
    }

    // The unit, as systemd reads it, and its sandbox as systemd scores it (0 = locked down,
    // 10 = exposed; threshold in tenths).
    let verify = run("systemd-analyze", &["verify", UNIT]);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}\n{}",
        verify.status,
        String::from_utf8_lossy(&verify.stderr)
    );
    run_ok(
        "systemd-analyze",
        &["security", "--offline=true", "--threshold=20", UNIT],
    );
    // A rotation with the packaged file, in the log directory as systemd's LogsDirectory= makes
    // it (owned by the service's user): the log moves aside, a new one is created for the
    // server, and the postrotate signal (to no running unit here) does not fail it.
    let logs = Path::new("/var/log/fanstream");
    std::fs::create_dir_all(logs).unwrap();
    run_ok("chown", &["fanstream:fanstream", "/var/log/fanstream"]);
    std::fs::write(logs.join("access.log"), "a request\n").unwrap();
    let state = scratch_dir("package-logrotate").join("state");
    run_ok(
        "logrotate",
        &[
            "--force",
            "--state",
            state.to_str().unwrap(),
            "/etc/logrotate.d/fanstream",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(logs.join("access.log.1")).unwrap(),
        "a request\n"
    );
    let created = run_ok(
        "stat",
        &["-c", "%a %U %G %s", "/var/log/fanstream/access.log"],
    );
    assert_eq!(created.trim(), "640 fanstream adm 0");

    // --check-config: the installed file passes as the service's user; bad ones fail, saying why.
    let good = check_config(Path::new(CONFIG));
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(String::from_utf8_lossy(&good.stdout).contains("is valid"));
    let dir = scratch_dir("package");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for (name, text, reason) in [
        ("workers.toml", "workers = 5000\n", "workers = 5000"),
        ("typo.toml", "lissten = \"0.0.0.0:80\"\n", "lissten"),
        (
            "missing.toml",
            "admin_password_file = \"/nonexistent/admin\"\n",
            "admin_password_file",
        ),
        (
            "unreadable.toml",
            "source_password_file = \"/etc/shadow\"\n",
            "Permission denied",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = check_config(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(reason), "{name}: {stderr}");
    }

    // The installed binary with the installed config, as the service's user, on ephemeral ports.
    let mut cmd = as_service_user(&[
        "--config",
        CONFIG,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--no-pin",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut server = ChildGuard::spawn_group("installed fanstream", &mut cmd);
    let child = server.child.as_mut().unwrap();
    let stdout = ChildGuard::lines(child.stdout.take().unwrap());
    let stderr = ChildGuard::lines(child.stderr.take().unwrap());
    let started = wait_line(&stderr, "the start-up line", |l| {
        l.contains("fanstream started")
    });
    let addr = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen_addr="))
        .unwrap_or_else(|| panic!("no listen address in {started:?}"))
        .to_string();
    let capture = dir.join("demo.wav");
    let curl = run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "2",
            "-o",
            capture.to_str().unwrap(),
            &format!("http://{addr}/demo"),
        ],
    );
    // curl ends the endless stream at --max-time (exit 28) with what arrived.
    assert_eq!(curl.status.code(), Some(28), "{curl:?}");
    let wav = std::fs::read(&capture).unwrap();
    assert!(
        wav.len() > 16_000 && wav.starts_with(b"RIFF"),
        "/demo gave {} bytes",
        wav.len()
    );
    // The source password is the one written at install: it admits a title update (404: no
    // source is live on the mount); another is refused.
    let title = |pass: &str| {
        let out = run_ok(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-u",
                &format!("source:{pass}"),
                &format!("http://{addr}/admin/metadata?mode=updinfo&mount=/live&song=x"),
            ],
        );
        out.trim().to_string()
    };
    assert_eq!(title(password), "404");
    assert_eq!(title("change-me"), "401");
    // SIGTERM to the server itself, as systemd sends it (runuser would pass on its own as a
    // SIGTERM death): it drains, exits 0, and runuser exits with its status.
    let runuser = server.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{runuser}/task/{runuser}/children")).unwrap();
    let fanstream: i32 = children.trim().parse().expect("runuser runs one child");
    // SAFETY: kill(2) on runuser's child, which runuser has not reaped: it is still running.
    assert_eq!(unsafe { libc::kill(fanstream, libc::SIGTERM) }, 0);
    let status = server.wait_for(Duration::from_secs(20));
    assert!(status.success(), "SIGTERM: {status}");
    assert!(
        stdout.try_iter().all(|l| !l.contains("generated")),
        "a password was generated although the package wrote one"
    );

    // Remove keeps the conffile (and the password beside it); purge removes both.
    run_ok("dpkg", &["-r", "fanstream"]);
    assert!(!installed());
    assert!(!Path::new("/usr/bin/fanstream").exists());
    assert!(!Path::new(UNIT).exists());
    assert!(Path::new(CONFIG).exists(), "dpkg -r removed the conffile");
    assert!(Path::new(PASSWORD_FILE).exists());
    run_ok("dpkg", &["--purge", "fanstream"]);
    assert!(
        !Path::new(CONFIG).exists(),
        "dpkg --purge left the conffile"
    );
    assert!(
        !Path::new("/etc/fanstream").exists(),
        "purge left /etc/fanstream"
    );
    assert!(!logs.exists(), "purge left /var/log/fanstream");
}
