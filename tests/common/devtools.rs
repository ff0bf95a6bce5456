//! Headless Chromium driven over the DevTools protocol, to act on a page as a user would (press
//! play on the page's own `<audio>`) and to read its state, where a page of the test's own
//! cannot: the page is the server's, on its origin. The protocol runs on a pipe
//! (`--remote-debugging-pipe`): Chromium reads commands on descriptor 3 and writes answers and
//! events on descriptor 4, each a JSON text ended by a NUL byte.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use super::clients::Program;
use super::process::require;

pub struct DevTools {
    /// Killed (with its renderers) on drop.
    pub browser: Program,
    commands: File,
    answers: BufReader<File>,
    next_id: u64,
    /// The page's session, once [`DevTools::open`] has attached to it.
    session: Option<String>,
}

/// A pipe's two ends, each closed on exec (the child gets its ends by `dup2`, which clears it).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given, which has room for two.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just made by pipe2 and belong to nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl DevTools {
    /// `timeout SECS chromium --headless --disable-gpu --no-sandbox
    /// --autoplay-policy=no-user-gesture-required --remote-debugging-pipe
    /// --user-data-dir=DIR/chromium-devtools --enable-logging=stderr --v=0 EXTRA...`
    pub fn start(dir: &Path, secs: u32, extra: &[&str]) -> DevTools {
        use std::os::unix::process::CommandExt;
        require("timeout");
        require("chromium");
        let (command_read, command_write) = pipe();
        let (answer_read, answer_write) = pipe();
        let (cr, aw) = (command_read.as_raw_fd(), answer_write.as_raw_fd());
        let mut cmd = Command::new("timeout");
        cmd.arg(secs.to_string())
            .args([
                "chromium",
                "--headless",
                "--disable-gpu",
                "--no-sandbox",
                "--autoplay-policy=no-user-gesture-required",
                "--remote-debugging-pipe",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.join("chromium-devtools").display()
            ))
            .args(["--enable-logging=stderr", "--v=0"])
            .args(extra);
        // SAFETY: only dup2 and fcntl, async-signal-safe, between fork and exec; the descriptors
        // stay open in the parent until after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                for (fd, to) in [(cr, 3), (aw, 4)] {
                    // A descriptor already where it goes (a test that opened nothing before: the
                    // first pipe is 3 and 4) is not copied by dup2, which then leaves it
                    // close-on-exec: the browser would start without it.
                    let done = if fd == to {
                        libc::fcntl(fd, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(fd, to)
                    };
                    if done < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let browser = Program::spawn("chromium (DevTools)", &mut cmd);
        // The child's ends, closed here so that a browser gone shows as the end of the pipe.
        drop((command_read, answer_write));
        DevTools {
            browser,
            commands: File::from(command_write),
            answers: BufReader::new(File::from(answer_read)),
            next_id: 1,
            session: None,
        }
    }

    /// Sends `method` with `params` (to the page's session once attached, `to_page`) and
    /// returns its result, skipping the events that come before it, or the error it answered.
    fn call(&mut self, method: &str, params: Value, to_page: bool) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if to_page {
            message["sessionId"] = json!(self.session.clone().expect("attached to a page"));
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("chromium gone before {method}: {e}"));
        loop {
            let mut raw = Vec::new();
            let n = self.answers.read_until(0, &mut raw).unwrap();
            if n == 0 {
                self.browser.collect();
                panic!(
                    "chromium closed its DevTools pipe before answering {method}; its output:\n{}",
                    self.browser.log.join("\n")
                );
            }
            raw.pop();
            let answer: Value = serde_json::from_slice(&raw).unwrap();
            if answer["id"] != json!(id) {
                continue;
            }
            if let Some(error) = answer.get("error") {
                return Err(format!("DevTools {method}: {error}"));
            }
            return Ok(answer["result"].clone());
        }
    }

    /// Opens `url` in a new page of `width` by `height` pixels and attaches to it.
    pub fn open(&mut self, url: &str, width: u32, height: u32) {
        let target = self
            .call(
                "Target.createTarget",
                json!({"url": url, "width": width, "height": height, "newWindow": true}),
                false,
            )
            .unwrap();
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
                false,
            )
            .unwrap();
        self.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    }

    /// The value of `expression` evaluated in the page (a promise's, once settled), or why
    /// not: a script error, or no page to run it in yet (while the page is still loading).
    pub fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            true,
        )?;
        match result.get("exceptionDetails") {
            Some(e) => Err(format!("{expression:?} failed: {e}")),
            None => Ok(result["result"]["value"].clone()),
        }
    }

    /// The page as it looks now, as PNG.
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}), true)
            .unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }
}
