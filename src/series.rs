//! Counters and gauges labelled by mount: series that come by the thousand on a hosting server.
//!
//! The prometheus crate gives every labelled series its own copy of its metric's description
//! (name, help, label names) and its label pairs as protobuf strings, about 400 bytes a series,
//! and builds all of a metric's series as protobuf messages again for each scrape. At 1,000
//! mounts with listeners, some 40 series a mount, that was 6-9 MiB held and up to 30 MiB more for
//! the length of a scrape. Here a series is its label values and one atomic, and the exposition's
//! text is written straight from them.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One series' value.
pub(crate) trait Value: Default + Send + Sync + 'static {
    /// The metric type, as the text format names it.
    const KIND: &'static str;
    fn write(&self, out: &mut Vec<u8>);
}

impl Value for AtomicU64 {
    const KIND: &'static str = "counter";
    fn write(&self, out: &mut Vec<u8>) {
        let _ = write!(out, "{}", self.load(Ordering::Relaxed));
    }
}

impl Value for AtomicI64 {
    const KIND: &'static str = "gauge";
    fn write(&self, out: &mut Vec<u8>) {
        let _ = write!(out, "{}", self.load(Ordering::Relaxed));
    }
}

/// A metric's series, by label values. Clones share them.
pub(crate) struct Family<V> {
    inner: Arc<Inner<V>>,
}

impl<V> Clone for Family<V> {
    fn clone(&self) -> Self {
        Family {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<V> {
    name: String,
    help: &'static str,
    labels: &'static [&'static str],
    /// Ordered by label values, as the prometheus crate orders a scrape's series.
    series: Mutex<Series<V>>,
}

/// Each series by its label values, in the order of the family's labels.
type Series<V> = BTreeMap<Box<[Box<str>]>, Arc<V>>;

/// Counters: `fanstream_*_total`.
pub(crate) type CounterFamily = Family<AtomicU64>;
/// Gauges.
pub(crate) type GaugeFamily = Family<AtomicI64>;

impl<V: Value> Family<V> {
    pub fn new(name: String, help: &'static str, labels: &'static [&'static str]) -> Self {
        Family {
            inner: Arc::new(Inner {
                name,
                help,
                labels,
                series: Mutex::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Series<V>> {
        // Every change to the map is a single step: it stays consistent across a panic.
        self.inner.series.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The series with these label values, created at zero if it does not exist.
    fn series(&self, values: &[&str]) -> Arc<V> {
        debug_assert_eq!(values.len(), self.inner.labels.len(), "{}", self.inner.name);
        // Handles are looked up once per mount, shard or listener and kept: building the key
        // for the lookup costs a few small allocations, no more than hashing the values did.
        let key: Box<[Box<str>]> = values.iter().map(|&v| Box::from(v)).collect();
        self.lock().entry(key).or_default().clone()
    }
}

/// What the exposition and a mount's removal need of a family, whatever its value type.
pub(crate) trait Labelled: Send + Sync {
    /// The metric's name.
    fn name(&self) -> &str;
    /// Appends the metric in the text exposition format; nothing while it has no series.
    fn render(&self, out: &mut Vec<u8>);
    /// Removes every series whose first label (the mount) has this value.
    fn remove_first(&self, value: &str);
}

impl<V: Value> Labelled for Family<V> {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn remove_first(&self, value: &str) {
        self.lock()
            .retain(|key, _| key.first().is_none_or(|v| &**v != value));
    }

    fn render(&self, out: &mut Vec<u8>) {
        let series = self.lock();
        if series.is_empty() {
            return;
        }
        let name = &self.inner.name;
        out.extend_from_slice(b"# HELP ");
        out.extend_from_slice(name.as_bytes());
        out.push(b' ');
        escape(out, self.inner.help, false);
        let _ = writeln!(out, "\n# TYPE {name} {}", V::KIND);
        for (values, value) in series.iter() {
            out.extend_from_slice(name.as_bytes());
            out.push(b'{');
            for (i, (label, v)) in self.inner.labels.iter().zip(values.iter()).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(label.as_bytes());
                out.extend_from_slice(b"=\"");
                escape(out, v, true);
                out.push(b'"');
            }
            out.extend_from_slice(b"} ");
            value.write(out);
            out.push(b'\n');
        }
    }
}

/// The text format's escapes: a backslash and a line feed in help text, and a double quote as
/// well in a label value.
fn escape(out: &mut Vec<u8>, text: &str, quote: bool) {
    for b in text.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'"' if quote => out.extend_from_slice(b"\\\""),
            _ => out.push(b),
        }
    }
}

impl Family<AtomicU64> {
    pub fn with_label_values(&self, values: &[&str]) -> Counter {
        Counter(self.series(values))
    }

    /// The total over every series.
    pub fn sum(&self) -> u64 {
        self.lock()
            .values()
            .map(|v| v.load(Ordering::Relaxed))
            .sum()
    }
}

impl Family<AtomicI64> {
    pub fn with_label_values(&self, values: &[&str]) -> Gauge {
        Gauge(self.series(values))
    }
}

/// One counter series: cheap to clone, one atomic add to count.
#[derive(Clone, Debug, Default)]
pub(crate) struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One gauge series.
#[derive(Clone, Debug, Default)]
pub(crate) struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, v: i64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn sub(&self, v: i64) {
        self.0.fetch_sub(v, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn dec(&self) {
        self.sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format_in_label_order_with_escapes() {
        let f = CounterFamily::new(
            "fanstream_x_total".into(),
            "Things, by \\ mount.\nMore.",
            &["mount", "reason"],
        );
        let mut out = Vec::new();
        f.render(&mut out);
        assert!(out.is_empty(), "no series, no family");
        f.with_label_values(&["/b", "slow"]).inc_by(3);
        f.with_label_values(&["/a\"q", "x"]);
        f.with_label_values(&["/b", "slow"]).inc();
        f.render(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "# HELP fanstream_x_total Things, by \\\\ mount.\\nMore.\n\
             # TYPE fanstream_x_total counter\n\
             fanstream_x_total{mount=\"/a\\\"q\",reason=\"x\"} 0\n\
             fanstream_x_total{mount=\"/b\",reason=\"slow\"} 4\n"
        );
        assert_eq!(f.sum(), 4);
    }

    #[test]
    fn removes_every_series_of_a_mount() {
        let g = GaugeFamily::new("fanstream_g".into(), "G.", &["mount", "worker"]);
        g.with_label_values(&["/a", "0"]).set(-2);
        g.with_label_values(&["/a", "1"]).inc();
        g.with_label_values(&["/b", "0"]).add(5);
        g.with_label_values(&["/b", "1"]).dec();
        let mut out = Vec::new();
        g.render(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("fanstream_g{mount=\"/a\",worker=\"0\"} -2\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE fanstream_g gauge\n"), "{text}");
        g.remove_first("/a");
        let mut out = Vec::new();
        g.render(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("/a"), "{text}");
        assert!(
            text.contains("fanstream_g{mount=\"/b\",worker=\"0\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("fanstream_g{mount=\"/b\",worker=\"1\"} -1\n"),
            "{text}"
        );
    }
}
