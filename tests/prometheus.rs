//! The dashboard and the alert rules against a real Prometheus: it scrapes a fanstream under
//! load (a source pushing, listeners on both workers), and every PromQL expression in
//! `dashboards/fanstream.json` and `dashboards/alerts.yml` must return data. `promtool` checks
//! the rules and the example configuration.
//!
//! Prometheus comes from Debian's `prometheus` package (`make deps` installs it); without it
//! this test fails, never skips.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::process::{require, scratch_dir, ChildGuard};
use common::*;
use serde_json::Value;

/// The test's stand-in for Grafana's `$__rate_interval`: four 1 s scrapes and a margin.
const RATE_INTERVAL: &str = "5s";
/// Prometheus starting, scraping and evaluating rules on a shared machine.
const PROM_DEADLINE: Duration = Duration::from_secs(60);
/// The dashboard's `$top`, as the test sets it: how many mounts a per-mount panel shows.
const TOP: usize = 10;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A Prometheus server on a loopback ephemeral port, killed on drop.
struct Prometheus {
    _child: ChildGuard,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, with the alert rules loaded.
    fn start(dir: &Path, target: SocketAddr) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: fanstream\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules = repo_file("dashboards/alerts.yml").display()
            ),
        )
        .unwrap();
        // The port is free when probed; another program may take it before Prometheus binds it,
        // so a failed start on "address already in use" is retried on a fresh port.
        for attempt in 1..=3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let log_path = dir.join(format!("prometheus-{attempt}.log"));
            let log = File::create(&log_path).unwrap();
            let mut cmd = Command::new("prometheus");
            cmd.arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            // SAFETY: prctl only sets a flag of the child being created; it allocates nothing and
            // is async-signal-safe. If this test process dies without unwinding, the kernel
            // kills Prometheus with it.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = ChildGuard::spawn("prometheus", &mut cmd);
            let start = Instant::now();
            loop {
                if let Some(status) = child.child.as_mut().unwrap().try_wait().unwrap() {
                    child.child = None;
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if log.contains("address already in use") && attempt < 3 {
                        break;
                    }
                    panic!("prometheus exited ({status}) at start-up:\n{log}");
                }
                if matches!(http_get(addr, "/-/ready"), Some((200, _))) {
                    return Prometheus {
                        _child: child,
                        addr,
                    };
                }
                assert!(
                    start.elapsed() < PROM_DEADLINE,
                    "prometheus not ready within {PROM_DEADLINE:?}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
        unreachable!("every attempt either returned or panicked");
    }

    /// An instant query; panics on an API error (a bad expression), returns the result vector.
    fn query(&self, expr: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (status, body) = http_get(self.addr, &path)
            .unwrap_or_else(|| panic!("prometheus did not answer the query {expr}"));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            status == 200 && v["status"] == "success",
            "query failed ({status}): {expr}\n{v}"
        );
        match &v["data"]["result"] {
            Value::Array(series) => series.clone(),
            // A scalar or a string result is one value.
            other => vec![other.clone()],
        }
    }

    /// Polls `expr` until it returns data; panics with the expression at the deadline.
    fn wait_for_data(&self, expr: &str, what: &str, deadline: Instant) -> Vec<Value> {
        loop {
            let result = self.query(expr);
            if !result.is_empty() {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "{what} returned no data from a fanstream under load:\n  {expr}"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }

    fn api(&self, path: &str) -> Value {
        let (status, body) =
            http_get(self.addr, path).unwrap_or_else(|| panic!("no answer to {path}"));
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

/// A plain HTTP/1.0 GET; None if the connection fails (not listening yet).
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(DEADLINE)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut all = Vec::new();
    s.read_to_end(&mut all).ok()?;
    let (status, _, body) = split_response(&all);
    Some((status, body))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `expr` of every panel (rows' nested panels included), with its panel's title.
fn dashboard_exprs(panels: &Value, out: &mut Vec<(String, String)>) {
    for p in panels.as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    e.to_string(),
                ));
            }
        }
        dashboard_exprs(&p["panels"], out);
    }
}

/// An alert's expression with `bool` after each comparison, so that it returns 0 or 1 for every
/// series it compares instead of only the firing ones: it returns data if and only if the
/// series it reads exist and match. Label matchers (`{job="x"}`) and strings are left alone.
fn with_bool(expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::new();
    let (mut braces, mut quote) = (0, None::<char>);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            out.push(c);
            if c == '\\' && i + 1 < chars.len() {
                out.push(chars[i + 1]);
                i += 1;
            } else if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces -= 1,
            _ => {}
        }
        let next = chars.get(i + 1).copied();
        let op_len = match (c, next) {
            ('=', Some('=')) | ('!', Some('=')) | ('>', Some('=')) | ('<', Some('=')) => 2,
            ('>', _) | ('<', _) => 1,
            _ => 0,
        };
        if braces == 0 && op_len > 0 {
            out.extend(&chars[i..i + op_len]);
            i += op_len;
            let rest: String = chars[i..].iter().collect();
            if !rest.trim_start().starts_with("bool") {
                out.push_str(" bool");
            }
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

#[test]
fn with_bool_rewrites_comparisons_only() {
    assert_eq!(
        with_bool("up{job=\"a\",x!=\"b\"} == 0"),
        "up{job=\"a\",x!=\"b\"} == bool 0"
    );
    assert_eq!(
        with_bool("a > 1.5 * b and on (i) c >= 100"),
        "a > bool 1.5 * b and on (i) c >= bool 100"
    );
    assert_eq!(with_bool("a < bool 3"), "a < bool 3");
}

/// Grafana's variables, as the dashboard would substitute them for one mount and one worker.
fn substitute(expr: &str, mount: &str, worker: &str) -> String {
    let out = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$top", &TOP.to_string())
        .replace("${mount}", mount)
        .replace("$mount", mount)
        .replace("${worker}", worker)
        .replace("$worker", worker);
    // `$1` in label_replace is PromQL's, not Grafana's; anything else left is a typo.
    let chars: Vec<char> = out.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if *c == '$' {
            let next = chars.get(i + 1).copied().unwrap_or(' ');
            assert!(
                next.is_ascii_digit(),
                "unknown variable at {:?} in {expr}",
                chars[i..].iter().collect::<String>()
            );
        }
    }
    out
}

/// Sources come and go on new mount names, each scraped while it lives: once their grace periods
/// are over, Prometheus has no series of theirs, `fanstream_source_up == 0` returns the declared
/// mount without a source and nothing else, and `FanstreamSourceDown` is pending for it alone.
///
/// While they live, each with a listener, every panel that shows mounts one by one shows only
/// the `$top` of them.
fn mounts_that_leave_leave_no_alert(
    prom: &Prometheus,
    srv: &TestServer,
    exprs: &[(String, String)],
) {
    const CHURNED: usize = 20;
    let deadline = Instant::now() + PROM_DEADLINE;
    let sources: Vec<Source> = (0..CHURNED)
        .map(|i| {
            let mut s = Source::connect(srv.addr, &format!("/churn-{i}"));
            s.send(&pattern(0, 1000));
            s
        })
        .collect();
    let listeners: Vec<Listener> = (0..CHURNED)
        .map(|i| Listener::connect(srv.addr, &format!("/churn-{i}")))
        .collect();
    prom.wait_for_data(
        &format!("count(fanstream_source_up{{mount=~\"/churn-.*\"}} == 1) == {CHURNED}"),
        "the churned mounts, live",
        deadline,
    );
    per_mount_panels_show_the_top_mounts(prom, exprs, CHURNED, deadline);
    drop(listeners);
    drop(sources);
    let mounts = |result: &[Value]| -> Vec<String> {
        let mut m: Vec<String> = result
            .iter()
            .map(|s| s["metric"]["mount"].as_str().unwrap_or("").to_string())
            .collect();
        m.sort();
        m
    };
    loop {
        let churn_series = prom.query("{mount=~\"/churn-.*\"}");
        let down = mounts(&prom.query("fanstream_source_up == 0"));
        let alerts = prom.api("/api/v1/alerts")["data"]["alerts"].clone();
        let source_down: Vec<String> = alerts
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == "FanstreamSourceDown")
            .map(|a| a["labels"]["mount"].as_str().unwrap_or("").to_string())
            .collect();
        if churn_series.is_empty() && down == ["/declared"] && source_down == ["/declared"] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after the churn: {} series of churned mounts, source_up == 0 for {down:?}, \
             FanstreamSourceDown for {source_down:?}",
            churn_series.len()
        );
        thread::sleep(Duration::from_millis(250));
    }
}

/// With all mounts selected and `churned` mounts more than `$top`, each with a listener: a panel
/// grouped by mount is a `topk($top, ...)`, what it ranks has a series for every mount, and it
/// shows `$top` of them. A hosting server's thousand mounts would otherwise be a thousand lines.
fn per_mount_panels_show_the_top_mounts(
    prom: &Prometheus,
    exprs: &[(String, String)],
    churned: usize,
    deadline: Instant,
) {
    assert!(churned > TOP);
    let per_mount: Vec<_> = exprs
        .iter()
        .filter(|(_, e)| {
            e.split("by (").skip(1).any(|g| {
                g.split(')')
                    .next()
                    .unwrap()
                    .split(", ")
                    .any(|l| l == "mount")
            })
        })
        .collect();
    assert!(
        per_mount.len() >= 5,
        "only {} per-mount queries",
        per_mount.len()
    );
    for (title, expr) in per_mount {
        let ranked = expr
            .strip_prefix("topk($top, ")
            .and_then(|e| e.strip_suffix(')'))
            .unwrap_or_else(|| panic!("panel {title:?} shows every mount: {expr}"));
        let ranked = substitute(ranked, ".*", ".*");
        prom.wait_for_data(
            &format!("count({ranked}) > {churned}"),
            &format!("panel {title:?}, every mount ranked"),
            deadline,
        );
        let shown = prom.query(&substitute(expr, ".*", ".*"));
        assert_eq!(shown.len(), TOP, "panel {title:?} shows {shown:?}");
    }
}

#[test]
fn every_dashboard_and_alert_expression_returns_data_from_a_real_prometheus() {
    require("prometheus");
    require("promtool");

    // promtool validates the rules and the example configuration as shipped.
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(repo_file("dashboards"))
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("dashboards/fanstream.json")).unwrap(),
    )
    .expect("dashboards/fanstream.json is JSON");
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable in the dashboard"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");

    // fanstream under load: a source pushing steadily, listeners on both workers; and a mount
    // declared in the config whose source never comes.
    let srv = TestServer::start(|c| {
        c.defaults.max_lag_bytes = 16 * 1024 * 1024;
        declare(c, "/declared");
    });
    let mut source = Source::connect(srv.addr, "/live");
    source.send(&pattern(0, 4096));
    srv.wait_metric(
        "fanstream_source_received_bytes_total",
        &["mount=\"/live\""],
        |v| v >= 4096.0,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let listeners: Vec<_> = (0..4)
        .map(|_| {
            let addr = srv.addr;
            thread::spawn(move || {
                let mut l = Listener::connect(addr, "/live");
                l.read_to_end();
            })
        })
        .collect();
    srv.wait_metric("fanstream_listeners", &["mount=\"/live\""], |v| v == 4.0);
    let sender = {
        let stop = stop.clone();
        thread::spawn(move || {
            // About 1.6 Mbit/s in 4 KiB pieces: a radio stream, a little generous.
            let mut at = 4096;
            while !stop.load(Ordering::Relaxed) {
                source.send(&pattern(at, 4096));
                at += 4096;
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let worker = (0..2)
        .map(|w| w.to_string())
        .find(|w| srv.metric("fanstream_listeners", &[&format!("worker=\"{w}\"")]) > 0.0)
        .expect("a worker with listeners");

    let dir = scratch_dir("prometheus");
    let prom = Prometheus::start(&dir, srv.admin);
    let deadline = Instant::now() + PROM_DEADLINE;
    let up = prom.wait_for_data("up{job=\"fanstream\"} == 1", "the scrape target", deadline);
    assert_eq!(up.len(), 1);

    // The variables' label_values() queries, as Grafana runs them.
    for (name, want) in [("mount", "/live"), ("worker", worker.as_str())] {
        let def = var(name)["definition"].as_str().unwrap();
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or_else(|| panic!("${name} is not a label_values() query: {def}"));
        let (metric, label) = inner.split_once(',').unwrap();
        let path = format!(
            "/api/v1/label/{}/values?match[]={}",
            label.trim(),
            percent_encode(metric.trim())
        );
        let values = prom.api(&path)["data"].clone();
        assert!(
            values.as_array().unwrap().iter().any(|v| v == want),
            "${name} ({def}) offers {values}, not {want}"
        );
    }

    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 20, "only {} dashboard queries", exprs.len());
    for (title, expr) in &exprs {
        let expr = substitute(expr, "/live", &worker);
        prom.wait_for_data(&expr, &format!("panel {title:?}"), deadline);
    }

    // The rules, as Prometheus loaded them from alerts.yml: every one evaluated without error,
    // and every one reads series that exist.
    let rules = loop {
        let groups = prom.api("/api/v1/rules")["data"]["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated without error: {rules:#?}"
        );
        thread::sleep(Duration::from_millis(250));
    };
    let alerts = rules.iter().filter(|r| r["type"] == "alerting").count();
    assert!(alerts >= 5, "only {alerts} alerts loaded");
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        let expr = rule["query"].as_str().unwrap();
        if rule["type"] == "alerting" {
            // The alert as written returns only firing series (none, on a healthy server);
            // with `bool` it returns every series it compares.
            prom.query(expr);
            prom.wait_for_data(&with_bool(expr), &format!("alert {name}"), deadline);
        } else {
            prom.wait_for_data(expr, &format!("recording rule {name}"), deadline);
        }
    }

    // The headline number is sane: some CPU, and not more than a whole core per listener.
    let (_, headline) = exprs
        .iter()
        .find(|(title, _)| title == "CPU per listener, whole server")
        .expect("the headline panel");
    let cpu_per_listener = prom.wait_for_data(
        &substitute(headline, "/live", &worker),
        "CPU per listener",
        deadline,
    );
    let value: f64 = cpu_per_listener[0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        value > 0.0 && value < 1e6,
        "CPU per listener is {value} µs per listener-second"
    );

    mounts_that_leave_leave_no_alert(&prom, &srv, &exprs);

    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    drop(prom);
    drop(srv); // closes the listeners
    for l in listeners {
        l.join().unwrap();
    }
}
