//! The `fanstream` binary: flags over the environment over the config file over the embedded
//! defaults, then the server until SIGTERM (graceful drain) or SIGINT (stop at once). It tells a
//! service manager how it is going (`sd_notify`), checks a config without starting
//! (`--check-config`), and prints its own manual page (`--man`, for packaging).

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use fanstream::config::{parse_admin_listen, read_password_file};
use fanstream::sd_notify::{self, Notifier};
use fanstream::{Config, Server, Stop};
use tokio::signal::unix::{signal, SignalKind};

/// jemalloc rather than glibc's malloc: after a storm of idle connections closes, glibc keeps
/// what they used for the process (only `malloc_trim` gives it back), while jemalloc returns
/// freed pages to the system after `dirty_decay_ms` (1 s, below). See docs/performance/allocator.md.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start. It purges freed pages only when the arena they belong
/// to allocates again, which a server with nothing more to do after a storm may not; a
/// background thread purges them on time instead. One is enough for the few threads that
/// allocate here (by default jemalloc starts one per core).
///
/// One arena, not four per core: each arena keeps its own partly used slabs of every size
/// class, and here a handful of threads allocate (ingest, the workers, the acceptor), each
/// through its own thread cache. At 1,000 mounts × 10 listeners one arena holds 1.8-2.7 MiB
/// less (98.3-98.8 MiB RSS against 100.5-101.0, back to back), the CPU per listener-second the
/// same within the runs' spread (docs/performance/many-stations.md, fifth pass).
///
/// Freed pages are purged after 1 s, not jemalloc's 10 s: at 1,000 mounts ingest frees each
/// mount's oldest pieces as it stores new ones, and pages left dirty for 10 s were 0.7 MiB of RSS
/// more at 1,000 × 10 listeners, at no CPU cost seen (the background thread purges; seventh pass).
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_OPTIONS: &[u8; 78] =
    b"background_thread:true,max_background_threads:1,narenas:1,dirty_decay_ms:1000\0";

/// A live broadcast streaming server: Icecast-compatible sources in, many HTTP listeners out.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; flags override what it sets.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address for listeners and sources [default: 0.0.0.0:8000].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Address for /metrics and the status pages [default: 127.0.0.1:8001]; "none" disables it.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Password the admin listener asks for (user "admin"); without one it asks for none, so
    /// keep it on loopback.
    #[arg(
        long,
        env = "FANSTREAM_ADMIN_PASSWORD",
        value_name = "PASS",
        hide_env_values = true
    )]
    admin_password: Option<String>,
    /// Worker threads serving listeners [default: one per core].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Do not pin worker threads to cores.
    #[arg(long)]
    no_pin: bool,
    /// Password sources authenticate with (user "source"); without one, a random password is
    /// generated and printed at start-up.
    #[arg(
        long,
        env = "FANSTREAM_SOURCE_PASSWORD",
        value_name = "PASS",
        hide_env_values = true
    )]
    source_password: Option<String>,
    /// Do not serve the built-in demo mount.
    #[arg(long)]
    no_demo: bool,
    /// Check FILE (with the other flags over it, and every file it names) as start-up would,
    /// print what is wrong, and exit: 0 when it would start, 1 when not. Binds nothing.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Print the manual page, fanstream(8), as roff, and exit.
    #[arg(long, hide = true)]
    man: bool,
    /// Address for listeners and sources over TLS [default: none]; needs --tls-cert and
    /// --tls-key.
    #[arg(long, value_name = "ADDR")]
    tls_listen: Option<SocketAddr>,
    /// Certificate chain for TLS, PEM (reloaded on SIGHUP).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key for TLS, PEM (reloaded on SIGHUP).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FANSTREAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A closed log pipe must not break serving: by default a failed log write is reported
        // with eprintln!, which panics when stderr is gone.
        .log_internal_errors(false)
        .init();
    let mut args = Args::parse();
    let outcome = if args.man {
        std::io::stdout()
            .write_all(&man_page())
            .map_err(|e| format!("cannot write the manual page: {e}"))
    } else if let Some(file) = args.check_config.take() {
        args.config = Some(file);
        check_config(&args)
    } else {
        run(args)
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanstream: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration as the command line describes it: the embedded defaults, the file (and the
/// password files it names), then the environment and the flags; then, for a source password
/// none of them gave, [`source_password_fallback`].
fn load_config(args: &Args) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.resolve_password_files()?;
    apply_flags(&mut config, args)?;
    if config.source_password.is_none() {
        config.source_password = source_password_fallback(args.config.as_deref())?;
    }
    Ok(config)
}

/// The file that holds the source password when neither the flags, the environment nor the
/// config give one, first found first: the systemd credential `source_password` (the packaged
/// unit loads it with `LoadCredential=`, so that it can be readable by root alone), then
/// `source_password` beside the config file (`/etc/fanstream/source_password`, which the Debian
/// package writes at install). Without either, a password is generated for the run.
fn source_password_fallback(config_file: Option<&Path>) -> Result<Option<String>, String> {
    const FILE: &str = "source_password";
    let credential =
        std::env::var_os("CREDENTIALS_DIRECTORY").map(|dir| Path::new(&dir).join(FILE));
    let beside_config = config_file.map(|file| file.with_file_name(FILE));
    for path in credential.into_iter().chain(beside_config) {
        // A file that is there but unreadable (its mode, its owner) is an error to fix, not a
        // reason to fall through to a password nobody knows.
        if path.try_exists().unwrap_or(true) {
            let password = read_password_file("source password file", &path)?;
            tracing::info!(path = %path.display(), "source password read from a file");
            return Ok(Some(password));
        }
    }
    Ok(None)
}

/// `--check-config`: everything start-up refuses, without binding or starting anything.
fn check_config(args: &Args) -> Result<(), String> {
    // Loading reads every file the config names (password files, and below the intro and
    // fallback files, the access log, the TLS certificate and key, the relays' CA file, the
    // listeners' users files) and so
    // checks them: a start or a reload cannot then fail on a file the check passed.
    let config = load_config(args)?;
    let file = args.config.as_deref().unwrap_or(Path::new("")).display();
    config
        .validate()
        .map_err(|e| format!("config {file}: {e}"))?;
    fanstream::server::check_media_files(&config).map_err(|e| format!("config {file}: {e}"))?;
    fanstream::server::check_relay_ca_file(&config).map_err(|e| format!("config {file}: {e}"))?;
    fanstream::server::check_startup_files(&config).map_err(|e| format!("config {file}: {e}"))?;
    fanstream::server::check_users_files(&config).map_err(|e| format!("config {file}: {e}"))?;
    println!("fanstream: config {file} is valid");
    Ok(())
}

/// Connections the kernel queues for the acceptor (capped by `net.core.somaxconn`). std's 128
/// overflows when thousands of players connect at once (a restart, a link shared on air): the
/// kernel then drops their SYNs and each one waits 1 s, then 3 s, to try again.
const LISTEN_BACKLOG: i32 = 4096;

fn bind_listen_socket(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    // `[::]` serves IPv4 clients too (as `::ffff:a.b.c.d`), whatever the host's
    // `net.ipv6.bindv6only` says: one `listen` line for both.
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn run(args: Args) -> Result<(), String> {
    fanstream::open_files::raise_to_hard_limit();
    // A service manager that cannot be told (a socket of a kind not known here, one that stopped
    // listening) must not stop the server: say so and go on.
    let notifier = Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
        None
    });
    let notify = |state: &str| {
        if let Some(n) = &notifier {
            if let Err(e) = n.send(state) {
                tracing::warn!(error = %e, state, "cannot notify the service manager");
            }
        }
    };
    let mut config = load_config(&args)?;
    let generated = match config.source_password {
        Some(_) => None,
        None => Some(random_password()?),
    };
    if let Some(password) = &generated {
        config.source_password = Some(password.clone());
    }
    config.validate()?;
    let listen_socket = bind_listen_socket(config.startup.listen)
        .map_err(|e| format!("cannot listen on {} (listen): {e}", config.startup.listen))?;
    if let Some(addr) = config.startup.admin_listen {
        if !addr.ip().is_loopback() && config.admin_password.is_none() {
            tracing::warn!(%addr, "the admin listener is reachable beyond this host and asks for no password: set admin_password, or keep it behind a firewall");
        }
    }
    // The same backlog on the admin port: a burst of connections there waits in the kernel
    // instead of having its SYNs dropped, which would cost a scrape a second.
    let admin_socket = match config.startup.admin_listen {
        Some(addr) => Some(
            bind_listen_socket(addr)
                .map_err(|e| format!("cannot listen on {addr} (admin_listen): {e}"))?,
        ),
        None => None,
    };
    // Told once the server can start: a password printed above a bind error is one for a
    // server that never ran.
    if let Some(password) = generated {
        println!("fanstream: no source password configured; generated for this run: {password}");
    }
    // Signal handling is in place before the server starts: a signal that arrives early is
    // handled, not fatal, and running out of descriptors later cannot take it away.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the signal runtime: {e}"))?;
    let (mut term, mut int, mut hup) = {
        let _in_runtime = rt.enter();
        let on = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
        (
            on(SignalKind::terminate())?,
            on(SignalKind::interrupt())?,
            on(SignalKind::hangup())?,
        )
    };
    let tls_socket = match config.startup.tls_listen {
        Some(addr) => Some(
            bind_listen_socket(addr)
                .map_err(|e| format!("cannot listen on {addr} (tls_listen): {e}"))?,
        ),
        None => None,
    };
    let server = Server::start_with_tls(config, listen_socket, admin_socket, tls_socket)
        .map_err(|e| e.to_string())?;
    // Both ports are bound and listening, and every stage runs: a client connecting now is served.
    let admin = server
        .admin_addr()
        .map_or(String::new(), |a| format!(", admin on {a}"));
    notify(&format!(
        "READY=1\nSTATUS=listening on {}{admin}",
        server.listen_addr()
    ));
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining listeners, then exiting");
                    notify("STOPPING=1\nSTATUS=draining listeners");
                    server.stop(Stop::Drain);
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping now");
                    notify("STOPPING=1");
                    server.stop(Stop::Now);
                    break;
                }
                _ = hup.recv() => {
                    server.reopen_logs();
                    if args.config.is_none() {
                        tracing::warn!("SIGHUP: no --config file to reload");
                        continue;
                    }
                    notify(&sd_notify::reloading());
                    let status = match load_config(&args).and_then(|c| server.reload(c)) {
                        Ok(()) => "config reloaded".to_string(),
                        Err(e) => {
                            tracing::error!(error = %e, "SIGHUP: config refused; the running config stays");
                            // One line: a new line would start another assignment.
                            format!("config refused, the running config stays: {}", e.replace('\n', " "))
                        }
                    };
                    notify(&format!("READY=1\nSTATUS={status}"));
                }
            }
        }
        Ok::<_, String>(())
    })?;
    server.join();
    tracing::info!("fanstream stopped");
    Ok(())
}

fn apply_flags(config: &mut Config, args: &Args) -> Result<(), String> {
    let startup = &mut config.startup;
    if let Some(l) = args.listen {
        startup.listen = l;
    }
    if let Some(a) = &args.admin_listen {
        startup.admin_listen =
            parse_admin_listen(a).map_err(|e| format!("--admin-listen {a:?}: {e}"))?;
    }
    if let Some(w) = args.workers {
        startup.workers = w;
    }
    if args.no_pin {
        startup.pin_workers = false;
    }
    if args.no_demo {
        startup.demo = false;
    }
    if let Some(l) = args.tls_listen {
        startup.tls_listen = Some(l);
    }
    if let Some(c) = &args.tls_cert {
        startup.tls_cert = Some(c.clone());
    }
    if let Some(k) = &args.tls_key {
        startup.tls_key = Some(k.clone());
    }
    if let Some(p) = &args.source_password {
        config.source_password = Some(p.clone());
    }
    if let Some(p) = &args.admin_password {
        config.admin_password = Some(p.clone());
    }
    Ok(())
}

/// 16 characters from the kernel's random source, URL- and shell-safe.
fn random_password() -> Result<String, String> {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| format!("cannot read /dev/urandom for a source password: {e}"))?;
    Ok(raw
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

/// fanstream(8): the flags as clap knows them, then the README's sections on configuration and on
/// running as a service, so the manual says what the README says.
fn man_page() -> Vec<u8> {
    use clap_mangen::roff::{bold, roman, Roff};
    let man = clap_mangen::Man::new(Args::command())
        .section("8")
        .manual("System Administration");
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = man
        .render_title(&mut out)
        .and_then(|()| man.render_name_section(&mut out))
        .and_then(|()| man.render_synopsis_section(&mut out))
        .and_then(|()| man.render_description_section(&mut out))
        .and_then(|()| man.render_options_section(&mut out));
    let mut roff = Roff::new();
    for (heading, title) in [
        ("## Configuration", "CONFIGURATION"),
        ("## Install as a service", "SERVICE"),
    ] {
        roff.control("SH", [title]);
        markdown_to_roff(&mut roff, readme_section(heading));
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("systemctl"),
        roman("(1), "),
        bold("journalctl"),
        roman("(1), "),
        bold("logrotate"),
        roman("(8), "),
        bold("systemd.exec"),
        roman("(5)"),
    ]);
    let _ = roff.to_writer(&mut out);
    let _ = man.render_version_section(&mut out);
    out
}

/// The README's section under `heading`, up to the next one of its level.
fn readme_section(heading: &str) -> &'static str {
    const README: &str = include_str!("../README.md");
    let start = README
        .find(&format!("\n{heading}\n"))
        .map(|at| at + heading.len() + 2)
        .unwrap_or_else(|| panic!("README.md has no section {heading:?}"));
    let rest = &README[start..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// The Markdown the README's prose uses, as roff: paragraphs, `- ` lists, and fenced code shown
/// verbatim. Inline marks are dropped: a terminal shows `code` and **bold** as plain text.
fn markdown_to_roff(roff: &mut clap_mangen::roff::Roff, markdown: &str) {
    use clap_mangen::roff::roman;
    let plain = |text: &str| text.replace('`', "").replace("**", "");
    let mut lines = markdown.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("```") {
            roff.control("PP", [])
                .control("nf", [])
                .control("RS", ["4"]);
            for code in lines.by_ref().take_while(|l| !l.starts_with("```")) {
                roff.text([roman(code)]);
            }
            roff.control("RE", []).control("fi", []);
        } else if let Some(heading) = line.strip_prefix('#') {
            roff.control(
                "SS",
                [plain(heading.trim_start_matches('#').trim()).as_str()],
            );
        } else if !line.trim().is_empty() {
            let mut paragraph = line.strip_prefix("- ").unwrap_or(line).to_string();
            while let Some(more) = lines.next_if(|l| !l.trim().is_empty() && !l.starts_with("- ")) {
                paragraph.push(' ');
                paragraph.push_str(more.trim());
            }
            if line.starts_with("- ") {
                roff.control("IP", ["\\(bu", "2"]);
            } else {
                roff.control("PP", []);
            }
            roff.text([roman(plain(&paragraph))]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manual_has_the_flags_and_the_readme_sections() {
        let page = String::from_utf8(man_page()).unwrap();
        assert!(page.contains("\n.TH fanstream 8 "), "{page}");
        for text in [
            ".SH OPTIONS",
            "check\\-config",
            ".SH CONFIGURATION",
            "max_lag_bytes = 524288",
            ".SH SERVICE",
            "LoadCredential=",
        ] {
            assert!(page.contains(text), "the manual lacks {text:?}:\n{page}");
        }
        assert!(!page.contains("\\-\\-man"), "--man is hidden:\n{page}");
    }
}
