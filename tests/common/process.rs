//! Real programs in tests: required ones fail loudly when missing, and children never outlive
//! their test.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Panics with an actionable message unless `program` is on PATH.
pub fn require(program: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{program} is required by this test but is not installed: run `make deps` (it installs the \
         Makefile's APT_PACKAGES, e.g. `apt-get install -y --no-install-recommends {}`)",
        debian_package(program)
    );
}

/// The Debian package that provides `program`, for `require`'s message.
fn debian_package(program: &str) -> &str {
    match program {
        "ffprobe" => "ffmpeg",
        "promtool" => "prometheus",
        "gst-launch-1.0" | "gst-inspect-1.0" => {
            "gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
        }
        "timeout" => "coreutils",
        "systemd-analyze" => "systemd",
        "dpkg-shlibdeps" => "dpkg-dev",
        "man" => "man-db",
        "nginx" => "nginx-light",
        "cvlc" => "vlc-bin vlc-plugin-base",
        "runuser" => "util-linux",
        other => other,
    }
}

/// Panics with an actionable message unless GStreamer has `element` (e.g. `souphttpsrc`).
pub fn require_gst_element(element: &str) {
    require("gst-inspect-1.0");
    let found = Command::new("gst-inspect-1.0")
        .arg(element)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "GStreamer element {element} is required by this test but is missing: run `make deps` (apt-get install -y --no-install-recommends gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad)"
    );
}

/// A fresh scratch directory for one test, under target/.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process killed on drop: the child alone, or with `spawn_group` its whole process group
/// (a program that starts its own children, such as chromium, or one run under `timeout`).
pub struct ChildGuard {
    pub child: Option<Child>,
    pub name: String,
    /// Killed as a process group (the child leads it) rather than alone.
    pub group: bool,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        ChildGuard {
            child: Some(child),
            name: name.into(),
            group: false,
        }
    }

    /// Starts the child as the leader of a new process group; drop kills the whole group, so
    /// nothing it started (renderers, the program under `timeout`) outlives the test.
    pub fn spawn_group(name: &str, cmd: &mut Command) -> ChildGuard {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let mut guard = ChildGuard::spawn(name, cmd);
        guard.group = true;
        guard
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Waits for the child to exit, failing the test at the deadline.
    pub fn wait_for(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "{} did not exit within {deadline:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "cannot signal {}", self.name);
    }

    /// Collects the child's stderr (or stdout) lines into a channel, read by a thread.
    pub fn lines<R: std::io::Read + Send + 'static>(stream: R) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end even when nobody listens any more: a closed pipe would make the
            // child's writes fail.
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.group {
            if let Some(c) = &self.child {
                // SAFETY: kill(2) on the process group our child leads; the child is not reaped
                // yet, so the group id cannot have been reused.
                unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a line matching `pred` and returns it.
pub fn wait_line(
    rx: &mpsc::Receiver<String>,
    what: &str,
    mut pred: impl FnMut(&str) -> bool,
) -> String {
    let deadline = Instant::now() + super::DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if pred(&line) => return line,
            Ok(_) => {}
            Err(_) => panic!("no line with {what} before the deadline"),
        }
    }
}

/// Reads until the peer closes (or the read timeout), returning what arrived.
pub fn read_all(s: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}
