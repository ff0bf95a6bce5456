//! Drivers for the real encoders, players and browser that tests/formats.rs, titles.rs and
//! browser.rs run against fanstream. Each function requires its program (the test fails with the
//! package to install when it is missing, never skips), runs exactly the command its doc comment
//! shows, and hands back a guard that kills the program, and anything it started, when the test
//! ends however it ends. /work/shared/CLIENTS.md tells how each of them talks to a server.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::process::{require, require_gst_element, ChildGuard};
use super::{DEADLINE, PASSWORD};

/// A running program whose stdout and stderr lines (split at `\n` and `\r`, lossily decoded) are
/// gathered in `log`, for assertions and for failure messages.
pub struct Program {
    pub guard: ChildGuard,
    lines: Receiver<String>,
    pub log: Vec<String>,
}

impl Program {
    /// Spawns `cmd` as the leader of its own process group, stdin closed, output piped.
    pub fn spawn(name: &str, cmd: &mut Command) -> Program {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = ChildGuard::spawn_group(name, cmd);
        let child = guard.child.as_mut().unwrap();
        let (tx, rx) = mpsc::channel();
        let outputs: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for out in outputs {
            let tx = tx.clone();
            std::thread::spawn(move || {
                // Read to the end even when nobody listens any more: a closed pipe would make the
                // child's writes fail.
                let mut r = BufReader::new(out);
                let mut buf = Vec::new();
                while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                    for part in String::from_utf8_lossy(&buf).split(['\n', '\r']) {
                        if !part.trim().is_empty() {
                            let _ = tx.send(part.to_string());
                        }
                    }
                    buf.clear();
                }
            });
        }
        Program {
            guard,
            lines: rx,
            log: Vec::new(),
        }
    }

    /// Moves the lines that arrived so far into `log`.
    pub fn collect(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
    }

    /// The whole log so far, one line each, for failure messages.
    pub fn text(&mut self) -> String {
        self.collect();
        self.log.join("\n")
    }

    /// Waits until a line of the log (from its start) satisfies `pred`; fails after `deadline`
    /// naming `what` and showing the log.
    pub fn wait_line(
        &mut self,
        what: &str,
        deadline: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> String {
        let end = Instant::now() + deadline;
        let mut checked = 0;
        loop {
            self.collect();
            if let Some(l) = self.log[checked..].iter().find(|l| pred(l)) {
                return l.clone();
            }
            checked = self.log.len();
            let left = end.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(_) => {
                    let log = self.text();
                    panic!(
                        "{}: no line with {what} (within {deadline:?}); its output:\n{log}",
                        self.guard.name
                    )
                }
            }
        }
    }

    /// Waits for the program to exit (failing after `deadline`), then for the rest of its output.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        let status = loop {
            self.collect();
            if let Some(s) = self.guard.child.as_mut().unwrap().try_wait().unwrap() {
                self.guard.child = None;
                break s;
            }
            if Instant::now() > end {
                let log = self.text();
                panic!(
                    "{} did not exit within {deadline:?}; its output:\n{log}",
                    self.guard.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let drain_end = Instant::now() + Duration::from_secs(2);
        while let Ok(line) = self
            .lines
            .recv_timeout(drain_end.saturating_duration_since(Instant::now()))
        {
            self.log.push(line);
        }
        status
    }

    /// How a player run to its end went: [`Program::wait_exit`], then its output.
    pub fn outcome(mut self, deadline: Duration) -> (ExitStatus, String) {
        let status = self.wait_exit(deadline);
        (status, self.text())
    }

    pub fn running(&mut self) -> bool {
        match self.guard.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server as an operator runs it

/// The fanstream binary on ephemeral loopback ports.
pub struct Fanstream {
    pub program: Program,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

/// Writes `toml` to DIR/fanstream.toml and runs, with `FANSTREAM_LOG=info`:
/// `fanstream --config DIR/fanstream.toml --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
/// --no-pin --no-demo --workers 2 --source-password test-secret`
pub fn fanstream(dir: &Path, toml: &str) -> Fanstream {
    fanstream_listening(dir, toml, "127.0.0.1:0")
}

/// [`fanstream`] with `--listen LISTEN` instead of `127.0.0.1:0`.
pub fn fanstream_listening(dir: &Path, toml: &str, listen: &str) -> Fanstream {
    fanstream_with(dir, toml, listen, &[])
}

/// [`fanstream_listening`] with `extra` flags after the others.
pub fn fanstream_with(dir: &Path, toml: &str, listen: &str, extra: &[&str]) -> Fanstream {
    let path = dir.join("fanstream.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanstream"));
    cmd.env_remove("FANSTREAM_SOURCE_PASSWORD")
        .env("FANSTREAM_LOG", "info")
        .arg("--config")
        .arg(&path)
        .args([
            "--listen",
            listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--no-pin",
            "--no-demo",
            "--workers",
            "2",
            "--source-password",
            PASSWORD,
        ])
        .args(extra);
    let mut program = Program::spawn("fanstream", &mut cmd);
    let started = program.wait_line("the start-up line", DEADLINE, |l| {
        l.contains("fanstream started")
    });
    let addr = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen_addr="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listen address in {started:?}"));
    let admin = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin=Some("))
        .and_then(|a| a.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no admin address in {started:?}"));
    Fanstream {
        program,
        addr,
        admin,
    }
}

// ---------------------------------------------------------------------------------------------
// HAProxy in front

pub struct HaProxy {
    pub program: Program,
    /// Where clients connect: its frontend.
    pub addr: SocketAddr,
}

/// HAProxy on loopback in front of `server`: `haproxy -db -f DIR/haproxy.cfg` with a generated
/// config (`mode MODE`, the `frontend_lines`, and `server fanstream SERVER SERVER_OPTIONS`). Its
/// frontend listens on a socket the test bound and hands over as descriptor 3 (`bind fd@3`): no
/// port picked and raced for, and it accepts as soon as the test returns (connections made
/// before HAProxy is up wait in the socket's backlog).
pub fn haproxy(
    dir: &Path,
    mode: &str,
    frontend_lines: &str,
    server: SocketAddr,
    server_options: &str,
) -> HaProxy {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    require("haproxy");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = format!(
        "global\n  maxconn 1000\n\ndefaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\nfrontend fe\n  bind fd@3\n{frontend_lines}\n  default_backend be\n\nbackend be\n  server fanstream {server} {server_options}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto another descriptor clears close-on-exec; onto itself it does not.
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if ok < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = Program::spawn("haproxy", &mut cmd);
    HaProxy { program, addr }
}

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8 is this host):
/// a client of its own address, as seen by a proxy.
pub fn connect_from(from: &str, to: SocketAddr) -> std::net::TcpStream {
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

// ---------------------------------------------------------------------------------------------
// Media made by ffmpeg

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Codec {
    Mp3,
    Aac,
    Opus,
    Vorbis,
    /// FLAC in Ogg.
    Flac,
    /// Speex in Ogg.
    Speex,
}

impl Codec {
    /// What a source announces for it.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Mp3 => "audio/mpeg",
            Codec::Aac => "audio/aac",
            Codec::Opus | Codec::Vorbis | Codec::Flac | Codec::Speex => "audio/ogg",
        }
    }

    /// ffprobe's `codec_name`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Mp3 => "mp3",
            Codec::Aac => "aac",
            Codec::Opus => "opus",
            Codec::Vorbis => "vorbis",
            Codec::Flac => "flac",
            Codec::Speex => "speex",
        }
    }

    /// ffmpeg's encoder and muxer.
    fn encoder_and_muxer(self) -> (&'static str, &'static str) {
        match self {
            Codec::Mp3 => ("libmp3lame", "mp3"),
            Codec::Aac => ("aac", "adts"),
            Codec::Opus => ("libopus", "ogg"),
            Codec::Vorbis => ("libvorbis", "ogg"),
            Codec::Flac => ("flac", "ogg"),
            Codec::Speex => ("libspeex", "ogg"),
        }
    }
}

/// A tone to encode: a sine with some noise, so that variable-rate encoders (Vorbis, Opus) still
/// produce about `kbps` (a pure sine compresses to almost nothing), with optional title and artist
/// tags: `aevalsrc=0.5*sin(2*PI*F*t)+0.2*(random(0)-0.5):s=RATE:d=SECONDS`.
#[derive(Clone, Debug)]
pub struct Tone {
    pub codec: Codec,
    pub seconds: f64,
    pub frequency: u32,
    pub sample_rate: u32,
    pub kbps: u32,
    pub title: Option<String>,
    pub artist: Option<String>,
}

impl Tone {
    pub fn new(codec: Codec, seconds: f64) -> Tone {
        Tone {
            codec,
            seconds,
            frequency: 440,
            sample_rate: match codec {
                Codec::Opus => 48000,
                // Speex codes 8, 16 or 32 kHz only.
                Codec::Speex => 16000,
                _ => 44100,
            },
            kbps: 128,
            title: None,
            artist: None,
        }
    }

    pub fn tagged(mut self, artist: &str, title: &str) -> Tone {
        self.artist = Some(artist.into());
        self.title = Some(title.into());
        self
    }

    fn input_args(&self) -> Vec<String> {
        vec![
            "-f".into(),
            "lavfi".into(),
            "-i".into(),
            format!(
                "aevalsrc=0.5*sin(2*PI*{}*t)+0.2*(random(0)-0.5):s={}:d={}",
                self.frequency, self.sample_rate, self.seconds
            ),
        ]
    }

    fn encode_args(&self) -> Vec<String> {
        let (encoder, muxer) = self.codec.encoder_and_muxer();
        let mut a: Vec<String> = ["-c:a", encoder, "-b:a", &format!("{}k", self.kbps)]
            .map(String::from)
            .to_vec();
        for (key, value) in [("title", &self.title), ("artist", &self.artist)] {
            if let Some(v) = value {
                a.extend(["-metadata".into(), format!("{key}={v}")]);
            }
        }
        a.extend(["-f".into(), muxer.into()]);
        a
    }
}

/// Encodes `tone` into DIR/NAME:
/// `ffmpeg -hide_banner -loglevel error -y -f lavfi -i aevalsrc=...:s=RATE:d=SECONDS
/// -c:a ENCODER -b:a Kk [-metadata title=T -metadata artist=A] -f MUXER DIR/NAME`
/// (ENCODER/MUXER: libmp3lame/mp3, aac/adts, libopus/ogg, libvorbis/ogg, flac/ogg,
/// libspeex/ogg).
pub fn make_file(dir: &Path, name: &str, tone: &Tone) -> PathBuf {
    require("ffmpeg");
    let out = dir.join(name);
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(tone.input_args())
        .args(tone.encode_args())
        .arg(&out)
        .status()
        .expect("ffmpeg runs");
    assert!(
        status.success(),
        "ffmpeg could not make {name} from {tone:?}"
    );
    out
}

fn icecast_url(addr: SocketAddr, mount: &str) -> String {
    format!("icecast://source:{PASSWORD}@{addr}{mount}")
}

/// A live source encoding `tone` in real time:
/// `ffmpeg -hide_banner -loglevel error -re -f lavfi -i aevalsrc=... -c:a ENCODER -b:a Kk
/// [-metadata ...] -f MUXER -content_type TYPE icecast://source:PASS@ADDR/MOUNT`
/// (`PUT` with `Expect: 100-continue`).
pub fn ffmpeg_source(addr: SocketAddr, mount: &str, tone: &Tone) -> Program {
    ffmpeg_source_as(addr, mount, tone, ("source", PASSWORD))
}

/// [`ffmpeg_source`] with other credentials: `icecast://USER:PASS@ADDR/MOUNT`.
pub fn ffmpeg_source_as(
    addr: SocketAddr,
    mount: &str,
    tone: &Tone,
    (user, password): (&str, &str),
) -> Program {
    require("ffmpeg");
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(tone.input_args())
        .args(tone.encode_args())
        .args(["-content_type", tone.codec.content_type()])
        .arg(format!("icecast://{user}:{password}@{addr}{mount}"));
    Program::spawn("ffmpeg source", &mut cmd)
}

/// [`ffmpeg_source`] over TLS, to the TLS port at `addr` by the name `localhost`:
/// `... -content_type TYPE -tls 1 icecast://source:PASS@localhost:PORT/MOUNT`.
pub fn ffmpeg_source_tls(addr: SocketAddr, mount: &str, tone: &Tone) -> Program {
    require("ffmpeg");
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(tone.input_args())
        .args(tone.encode_args())
        .args(["-content_type", tone.codec.content_type(), "-tls", "1"])
        .arg(format!(
            "icecast://source:{PASSWORD}@localhost:{}{mount}",
            addr.port()
        ));
    Program::spawn("ffmpeg TLS source", &mut cmd)
}

/// A live source sending a file as it is, in real time:
/// `ffmpeg -hide_banner -loglevel error -re -i FILE -c copy -f MUXER -content_type TYPE
/// icecast://source:PASS@ADDR/MOUNT`
pub fn ffmpeg_source_file(addr: SocketAddr, mount: &str, file: &Path, codec: Codec) -> Program {
    require("ffmpeg");
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-re", "-i"])
        .arg(file)
        .args(["-c", "copy", "-f", codec.encoder_and_muxer().1])
        .args(["-content_type", codec.content_type()])
        .arg(icecast_url(addr, mount));
    Program::spawn("ffmpeg file source", &mut cmd)
}

/// A live WebM source in real time: Opus from `tone` (its codec ignored), with VP8 video (a
/// keyframe each second, and so a Cluster) when `video`:
/// `ffmpeg -hide_banner -loglevel error -re [-f lavfi -i testsrc=size=320x240:rate=25:duration=S]
/// -f lavfi -i aevalsrc=... [-c:v libvpx -g 25 -deadline realtime -cpu-used 8 -b:v 300k]
/// -c:a libopus -b:a Kk [-metadata ...] -f webm -content_type audio/webm|video/webm
/// icecast://source:PASS@ADDR/MOUNT`
pub fn ffmpeg_webm_source(addr: SocketAddr, mount: &str, tone: &Tone, video: bool) -> Program {
    require("ffmpeg");
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-re"]);
    if video {
        cmd.args(["-f", "lavfi", "-i"]).arg(format!(
            "testsrc=size=320x240:rate=25:duration={}",
            tone.seconds
        ));
    }
    cmd.args(tone.input_args());
    if video {
        cmd.args(["-c:v", "libvpx", "-g", "25", "-deadline", "realtime"])
            .args(["-cpu-used", "8", "-b:v", "300k"]);
    }
    cmd.args(["-c:a", "libopus", "-b:a"])
        .arg(format!("{}k", tone.kbps));
    for (key, value) in [("title", &tone.title), ("artist", &tone.artist)] {
        if let Some(v) = value {
            cmd.arg("-metadata").arg(format!("{key}={v}"));
        }
    }
    let content_type = if video { "video/webm" } else { "audio/webm" };
    cmd.args(["-f", "webm", "-content_type", content_type])
        .arg(icecast_url(addr, mount));
    Program::spawn("ffmpeg WebM source", &mut cmd)
}

/// A live WebM source of VP8 video only, in real time, for `seconds`:
/// `ffmpeg -hide_banner -loglevel error -re -f lavfi -i testsrc=size=320x240:rate=25:duration=S
/// -c:v libvpx -g 25 -deadline realtime -cpu-used 8 -b:v 300k -f webm -content_type video/webm
/// icecast://source:PASS@ADDR/MOUNT`
pub fn ffmpeg_webm_video_only_source(addr: SocketAddr, mount: &str, seconds: f64) -> Program {
    require("ffmpeg");
    let mut cmd = Command::new("ffmpeg");
    cmd.args([
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
    ])
    .arg(format!("testsrc=size=320x240:rate=25:duration={seconds}"))
    .args(["-c:v", "libvpx", "-g", "25", "-deadline", "realtime"])
    .args(["-cpu-used", "8", "-b:v", "300k"])
    .args(["-f", "webm", "-content_type", "video/webm"])
    .arg(icecast_url(addr, mount));
    Program::spawn("ffmpeg WebM video source", &mut cmd)
}

/// What ffprobe says about a capture.
#[derive(Debug, Default)]
pub struct Probe {
    pub codec: String,
    pub sample_rate: u32,
    pub duration: f64,
    /// From the stream's tags (Ogg comments) or the format's (ID3).
    pub title: Option<String>,
    pub artist: Option<String>,
    pub errors: String,
}

/// `ffprobe -v error -show_entries stream=codec_name,sample_rate:stream_tags=title,artist:
/// format=duration:format_tags=title,artist -of json FILE`
pub fn ffprobe(file: &Path) -> Probe {
    require("ffprobe");
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries"])
        .arg("stream=codec_name,sample_rate:stream_tags=title,artist:format=duration:format_tags=title,artist")
        .args(["-of", "json"])
        .arg(file)
        .output()
        .expect("ffprobe runs");
    let errors = String::from_utf8_lossy(&out.stderr).to_string();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let stream = &json["streams"][0];
    let format = &json["format"];
    let tag = |name: &str| {
        stream["tags"][name]
            .as_str()
            .or(format["tags"][name].as_str())
            .or(stream["tags"][name.to_uppercase()].as_str())
            .map(String::from)
    };
    Probe {
        codec: stream["codec_name"].as_str().unwrap_or("").into(),
        sample_rate: stream["sample_rate"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        duration: format["duration"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0),
        title: tag("title"),
        artist: tag("artist"),
        errors,
    }
}

/// The result of decoding a capture from its first byte to its last.
#[derive(Debug)]
pub struct Decoded {
    pub success: bool,
    pub errors: String,
    /// Seconds of audio decoded (resampled to 8 kHz mono, so a chain of sample rates adds up).
    pub seconds: f64,
}

/// `ffmpeg -hide_banner -v error -i - -f s16le -ac 1 -ar 8000 - < FILE` (stdout counted). The
/// capture goes in on stdin, as the stream it was: given a file, ffmpeg's Ogg demuxer reads its end
/// for the duration, and a chained capture then fails with "failed to create or replace stream".
pub fn ffmpeg_decode(file: &Path) -> Decoded {
    require("ffmpeg");
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i", "-"])
        .args(["-f", "s16le", "-ac", "1", "-ar", "8000", "-"])
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .expect("ffmpeg runs");
    Decoded {
        success: out.status.success(),
        errors: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        seconds: out.stdout.len() as f64 / 16000.0,
    }
}

/// GStreamer decoding a live stream until `buffers` decoded buffers went through:
/// `timeout SECS gst-launch-1.0 -q souphttpsrc location=URL ! decodebin ! audioconvert !
/// identity eos-after=BUFFERS ! fakesink` (exit 0 once they did).
pub fn gst_decode_url(url: &str, buffers: u32, secs: u32) -> (ExitStatus, String) {
    require("timeout");
    require("gst-launch-1.0");
    for e in ["souphttpsrc", "decodebin", "identity"] {
        require_gst_element(e);
    }
    let mut cmd = Command::new("timeout");
    cmd.arg(secs.to_string())
        .args(["gst-launch-1.0", "-q", "souphttpsrc"])
        .arg(format!("location={url}"))
        .args(["!", "decodebin", "!", "audioconvert", "!", "identity"])
        .arg(format!("eos-after={buffers}"))
        .args(["!", "fakesink"]);
    let mut p = Program::spawn("gst-launch-1.0 souphttpsrc", &mut cmd);
    let status = p.wait_exit(Duration::from_secs(secs as u64 + 10));
    (status, p.text())
}

/// GStreamer decoding a live stream until `buffers` decoded buffers went through (or `secs`
/// passed), then stopped: `timeout SECS gst-launch-1.0 -v souphttpsrc location=URL ! decodebin !
/// audioconvert ! identity silent=false ! fakesink`. For a demuxer that does not end its
/// pipeline on a downstream EOS nor, reliably, on its source's (matroskademux 1.22 in push mode:
/// `identity eos-after` and souphttpsrc's `num-buffers` leave it running). Returns how many
/// buffers it decoded, and its log (`ERROR:` lines if it failed).
pub fn gst_decode_url_until(url: &str, buffers: usize, secs: u32) -> (usize, String) {
    require("timeout");
    require("gst-launch-1.0");
    for e in ["souphttpsrc", "decodebin", "identity"] {
        require_gst_element(e);
    }
    let mut cmd = Command::new("timeout");
    cmd.arg(secs.to_string())
        .args(["gst-launch-1.0", "-v", "souphttpsrc"])
        .arg(format!("location={url}"))
        .args(["!", "decodebin", "!", "audioconvert", "!", "identity"])
        .args(["silent=false", "!", "fakesink"]);
    let mut p = Program::spawn("gst-launch-1.0 souphttpsrc", &mut cmd);
    let end = Instant::now() + Duration::from_secs(secs.into());
    let decoded = loop {
        p.collect();
        let decoded = p
            .log
            .iter()
            .filter(|l| l.contains("chain   ******* (identity0:sink)"))
            .count();
        if decoded >= buffers || !p.running() || Instant::now() > end {
            break decoded;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (decoded, p.text())
}

/// GStreamer decoding a capture to its end:
/// `timeout 30 gst-launch-1.0 -q filesrc location=FILE ! decodebin ! audioconvert ! fakesink`
pub fn gst_decode_file(file: &Path) -> (ExitStatus, String) {
    require("timeout");
    require("gst-launch-1.0");
    require_gst_element("decodebin");
    let mut cmd = Command::new("timeout");
    cmd.args(["30", "gst-launch-1.0", "-q", "filesrc"])
        .arg(format!("location={}", file.display()))
        .args(["!", "decodebin", "!", "audioconvert", "!", "fakesink"]);
    let mut p = Program::spawn("gst-launch-1.0 filesrc", &mut cmd);
    let status = p.wait_exit(Duration::from_secs(40));
    (status, p.text())
}

/// mpv playing a stream to a null output for `length` seconds:
/// `timeout SECS mpv --no-config --no-video --ao=null --quiet --length=LENGTH URL`
/// (exit 0 when it played; `icy-title: ...` lines when ICY titles arrive).
pub fn mpv(url: &str, length: u32, secs: u32) -> Program {
    require("timeout");
    require("mpv");
    let mut cmd = Command::new("timeout");
    cmd.arg(secs.to_string())
        .args(["mpv", "--no-config", "--no-video", "--ao=null", "--quiet"])
        .arg(format!("--length={length}"))
        .arg(url);
    Program::spawn("mpv", &mut cmd)
}

/// VLC playing a live stream for `run_time` seconds, as `nobody` since `cvlc` refuses root:
/// `timeout SECS runuser -u nobody -- cvlc -vv --no-video --aout dummy --run-time N
/// --play-and-exit URL`. Its verbose log names the demuxer and decoder it opened (`using audio
/// decoder module "opus"`), which it does only once the stream's headers made sense to it.
pub fn cvlc(url: &str, run_time: u32, secs: u32) -> Program {
    require("timeout");
    require("runuser");
    require("cvlc");
    let mut cmd = Command::new("timeout");
    cmd.args([
        &secs.to_string(),
        "runuser",
        "-u",
        "nobody",
        "--",
        "cvlc",
        "-vv",
    ])
    .args(["--no-video", "--aout", "dummy", "--play-and-exit"])
    .arg(format!("--run-time={run_time}"))
    .arg(url);
    Program::spawn("cvlc", &mut cmd)
}

/// A request with curl, parameters URL-encoded:
/// `curl -sS -i -G [-u USER:PASS] --data-urlencode K=V ... http://ADDR/PATH`
/// Returns (status, head, body).
pub fn curl_get(
    addr: SocketAddr,
    path: &str,
    credentials: Option<(&str, &str)>,
    params: &[(&str, &str)],
) -> (u16, String, String) {
    require("curl");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "-G", "--max-time", "20"]);
    if let Some((u, p)) = credentials {
        cmd.args(["-u", &format!("{u}:{p}")]);
    }
    for (k, v) in params {
        cmd.args(["--data-urlencode", &format!("{k}={v}")]);
    }
    let out = cmd
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, head, body) = super::split_response(&out.stdout);
    (status, head, String::from_utf8_lossy(&body).to_string())
}

/// The body `/admin/metadata` answers a successful update with: Icecast's, byte for byte, but for
/// the newline Icecast 2.4.4 adds at its end (tests compare it with the body's end trimmed).
pub const METADATA_OK: &str = "<?xml version=\"1.0\"?>\n<iceresponse><message>Metadata update successful</message><return>1</return></iceresponse>";

// ---------------------------------------------------------------------------------------------
// libshout sources

fn write_playlist(dir: &Path, files: &[PathBuf]) -> PathBuf {
    let path = dir.join("playlist.txt");
    let text: String = files.iter().map(|f| format!("{}\n", f.display())).collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// ezstream (libshout) streaming a playlist once, in real time, with a title per file from its
/// tags: writes DIR/ezstream.xml (mode 0600, as ezstream demands) and DIR/playlist.txt, then
/// `ezstream -v -c DIR/ezstream.xml`. `format` is `MP3` or `OGG`. Each title change is a
/// `GET /admin/metadata?mode=updinfo&mount=MOUNT&song=ARTIST - TITLE`; a failed one logs
/// `shout_set_metadata: ...`.
pub fn ezstream(
    dir: &Path,
    addr: SocketAddr,
    mount: &str,
    format: &str,
    files: &[PathBuf],
) -> Program {
    require("ezstream");
    let playlist = write_playlist(dir, files);
    let config = dir.join("ezstream.xml");
    let xml = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<ezstream>
  <servers>
    <server>
      <name>fanstream</name>
      <protocol>HTTP</protocol>
      <hostname>{host}</hostname>
      <port>{port}</port>
      <user>source</user>
      <password>{PASSWORD}</password>
    </server>
  </servers>
  <streams>
    <stream>
      <mountpoint>{mount}</mountpoint>
      <server>fanstream</server>
      <format>{format}</format>
      <intake>list</intake>
      <stream_name>ezstream test</stream_name>
    </stream>
  </streams>
  <intakes>
    <intake>
      <name>list</name>
      <type>playlist</type>
      <filename>{playlist}</filename>
      <stream_once>yes</stream_once>
    </intake>
  </intakes>
  <metadata>
    <format_str>@a@ - @t@</format_str>
  </metadata>
</ezstream>
"#,
        host = addr.ip(),
        port = addr.port(),
        playlist = playlist.display(),
    );
    std::fs::write(&config, xml).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = Command::new("ezstream");
    cmd.args(["-v", "-c"]).arg(&config);
    Program::spawn("ezstream", &mut cmd)
}

/// ices2 (libshout) streaming a playlist of Ogg Vorbis files once, as they are (a chained Ogg
/// stream, a new header set per file): writes DIR/ices.xml and DIR/playlist.txt, then
/// `ices2 DIR/ices.xml` (console log at level 4).
pub fn ices2(dir: &Path, addr: SocketAddr, mount: &str, files: &[PathBuf]) -> Program {
    require("ices2");
    let playlist = write_playlist(dir, files);
    let config = dir.join("ices.xml");
    let xml = format!(
        r#"<?xml version="1.0"?>
<ices>
  <background>0</background>
  <logpath>{dir}</logpath>
  <logfile>ices.log</logfile>
  <logsize>2048</logsize>
  <loglevel>4</loglevel>
  <consolelog>1</consolelog>
  <stream>
    <metadata>
      <name>ices2 test</name>
    </metadata>
    <input>
      <module>playlist</module>
      <param name="type">basic</param>
      <param name="file">{playlist}</param>
      <param name="random">0</param>
      <param name="once">1</param>
    </input>
    <instance>
      <hostname>{host}</hostname>
      <port>{port}</port>
      <password>{PASSWORD}</password>
      <mount>{mount}</mount>
    </instance>
  </stream>
</ices>
"#,
        dir = dir.display(),
        host = addr.ip(),
        port = addr.port(),
        playlist = playlist.display(),
    );
    std::fs::write(&config, xml).unwrap();
    let mut cmd = Command::new("ices2");
    cmd.arg(&config);
    Program::spawn("ices2", &mut cmd)
}

/// liquidsoap 2.1 playing a playlist in order, re-encoded with `encoder` (e.g.
/// `%mp3(bitrate=128)`), to the mount: writes DIR/stream.liq and runs `liquidsoap DIR/stream.liq`:
///
/// ```text
/// settings.init.allow_root.set(true)
/// settings.log.stdout.set(true)
/// settings.log.file.set(false)
/// settings.log.level.set(3)
/// s = playlist(mode="normal", reload_mode="never", "DIR/playlist.txt")
/// output.icecast(ENCODER, host="HOST", port=PORT, user="source", password="PASS",
///                mount="MOUNT", mksafe(s))
/// ```
/// Each track change is a title update to `/admin/metadata`; a failed one logs
/// `Metadata update may have failed with error: ...`.
pub fn liquidsoap(
    dir: &Path,
    addr: SocketAddr,
    mount: &str,
    encoder: &str,
    files: &[PathBuf],
) -> Program {
    require("liquidsoap");
    let playlist = write_playlist(dir, files);
    let script = dir.join("stream.liq");
    let liq = format!(
        r#"settings.init.allow_root.set(true)
settings.log.stdout.set(true)
settings.log.file.set(false)
settings.log.level.set(3)
s = playlist(mode="normal", reload_mode="never", "{playlist}")
output.icecast({encoder}, host="{host}", port={port}, user="source", password="{PASSWORD}", mount="{mount}", mksafe(s))
"#,
        playlist = playlist.display(),
        host = addr.ip(),
        port = addr.port(),
    );
    std::fs::write(&script, liq).unwrap();
    let mut cmd = Command::new("liquidsoap");
    cmd.arg(&script);
    Program::spawn("liquidsoap", &mut cmd)
}

// ---------------------------------------------------------------------------------------------
// A browser

/// The file:// address of tests/web/player.html playing `stream_url`.
pub fn player_page(stream_url: &str) -> String {
    test_page("player.html", "src", stream_url)
}

/// The file:// address of tests/web/PAGE with `?PARAM=VALUE` (the value percent-encoded).
pub fn test_page(name: &str, param: &str, value: &str) -> String {
    let page = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/web")
        .join(name);
    assert!(page.exists(), "{} is missing", page.display());
    let encoded: String = value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("file://{}?{param}={encoded}", page.display())
}

/// Headless Chromium opening `page` (as root, hence `--no-sandbox`):
/// `timeout SECS chromium --headless --disable-gpu --no-sandbox
/// --autoplay-policy=no-user-gesture-required --user-data-dir=DIR/chromium --enable-logging=stderr
/// --v=0 PAGE`. The page's `console.log` lines appear in its stderr as `...:INFO:CONSOLE...`.
pub fn chromium(dir: &Path, page: &str, secs: u32) -> Program {
    chromium_with(dir, page, secs, &[])
}

/// [`chromium`] with `extra` flags before the page (`--ignore-certificate-errors` for a test
/// certificate).
pub fn chromium_with(dir: &Path, page: &str, secs: u32, extra: &[&str]) -> Program {
    require("timeout");
    require("chromium");
    let mut cmd = Command::new("timeout");
    cmd.arg(secs.to_string())
        .args([
            "chromium",
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--autoplay-policy=no-user-gesture-required",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .args(["--enable-logging=stderr", "--v=0"])
        .args(extra)
        .arg(page);
    Program::spawn("chromium", &mut cmd)
}

/// One state line of tests/web/player.html: `fanstream-player: t=MS WHAT readyState=N
/// currentTime=S ...`.
#[derive(Debug, Clone)]
pub struct PlayerState {
    pub ms: u64,
    pub what: String,
    pub ready_state: u32,
    pub current_time: f64,
    pub line: String,
}

pub fn player_state(line: &str) -> Option<PlayerState> {
    let at = line.find("fanstream-player: ")?;
    // Chromium quotes the console message: `...:INFO:CONSOLE:16] "MESSAGE", source: PAGE (16)`.
    let text = line[at + "fanstream-player: ".len()..].split('"').next()?;
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(String::from)
    };
    Some(PlayerState {
        ms: field("t=")?.parse().ok()?,
        what: text.split_whitespace().nth(1)?.to_string(),
        ready_state: field("readyState=")?.parse().ok()?,
        current_time: field("currentTime=")?.parse().ok()?,
        line: text.to_string(),
    })
}

/// Waits until the page's `<audio>` plays: readyState >= 3 and `currentTime` advanced by at
/// least `advance` seconds since it first reached readyState >= 3. Returns the player's lines
/// up to the one that shows it; fails after `deadline` with them.
pub fn wait_playing(browser: &mut Program, advance: f64, deadline: Duration) -> Vec<PlayerState> {
    let end = Instant::now() + deadline;
    loop {
        let mut first_ready: Option<f64> = None;
        browser.collect();
        let states: Vec<PlayerState> = browser.log.iter().filter_map(|l| player_state(l)).collect();
        for (i, s) in states.iter().enumerate() {
            if s.ready_state >= 3 {
                let first = *first_ready.get_or_insert(s.current_time);
                if s.current_time >= first + advance {
                    // Up to the state that proves it: a line read with it may be a later
                    // `waiting` (readyState 2) on a loaded machine.
                    return states[..=i].to_vec();
                }
            }
        }
        if Instant::now() > end || !browser.running() {
            let shown: Vec<&str> = states.iter().map(|s| s.line.as_str()).collect();
            panic!(
                "the browser's <audio> did not play {advance} s within {deadline:?} (readyState \
                 >= 3 and currentTime advancing); the player said:\n{}",
                shown.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
