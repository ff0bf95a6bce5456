//! The `fanstream` binary: flags over the config file over the embedded defaults, then the server
//! until SIGTERM (graceful drain) or SIGINT (stop at once).

use std::io::{IsTerminal, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fanstream::config::parse_admin_listen;
use fanstream::{Config, Server, Stop};
use tokio::signal::unix::{signal, SignalKind};

/// jemalloc rather than glibc's malloc: after a storm of idle connections closes, glibc keeps
/// what they used for the process (only `malloc_trim` gives it back), while jemalloc returns
/// freed pages to the system after `dirty_decay_ms` (10 s). See docs/performance/allocator.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start. It purges freed pages only when the arena they belong
/// to allocates again, which a server with nothing more to do after a storm may not; a
/// background thread purges them on time instead. One is enough for the few threads that
/// allocate here (by default jemalloc starts one per core).
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_OPTIONS: &[u8; 48] = b"background_thread:true,max_background_threads:1\0";

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
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanstream: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration as the command line describes it: defaults, the file, then the flags.
fn load_config(args: &Args) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    apply_flags(&mut config, args)?;
    config.resolve_password_files()?;
    Ok(config)
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
    let mut config = load_config(&args)?;
    if config.source_password.is_none() {
        let generated = random_password()?;
        println!("fanstream: no source password configured; generated for this run: {generated}");
        config.source_password = Some(generated);
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
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining listeners, then exiting");
                    server.stop(Stop::Drain);
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping now");
                    server.stop(Stop::Now);
                    break;
                }
                _ = hup.recv() => {
                    if args.config.is_none() {
                        tracing::warn!("SIGHUP: no --config file to reload");
                        continue;
                    }
                    match load_config(&args).and_then(|c| server.reload(c)) {
                        Ok(()) => {}
                        Err(e) => tracing::error!(error = %e, "SIGHUP: config refused; the running config stays"),
                    }
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
