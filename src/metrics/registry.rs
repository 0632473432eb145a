//! The metrics every worker shares (no mlua): counters, gauges and histograms, each with a
//! fixed list of label names and one *series* per list of label values, and the Prometheus
//! text exposition (format 0.0.4) of all of them.
//!
//! Updates are atomics on a series handle (`Arc<Series>`): a counter's `inc` by a whole
//! number is one `fetch_add`, a histogram's `observe` two atomic adds (its bucket, its sum).
//! Finding a series by label values takes the metric's read lock and a hash; a
//! `SeriesCache` per thread (the Lua side keeps one per metric) keeps the handles found, so
//! a known series costs a hash of its label values and no lock. Names, label names and buckets are checked here, once, at
//! registration; the same registration again (every worker's `init_worker` makes the same
//! ones) returns the metric already there, a different one under a taken name is an error.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use crate::metrics::series::{Kind, Series};
use crate::metrics::text::{
    escape_help, escape_value, fmt_f64, valid_label_name, valid_metric_name,
};
use std::sync::{Arc, OnceLock, RwLock};

/// The `Content-Type` of `render()`'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// nginx-lua-prometheus's default histogram buckets: 5 ms to 10 s.
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0,
    5.0, 10.0,
];

/// Label names a metric may have at most (a guard against a label list built by mistake).
pub const MAX_LABELS: usize = 32;

/// What a callback metric's function is handed: `emit(label_values, value)` per series.
pub type Emit<'a> = &'a mut dyn FnMut(&[&str], f64);
type Callback = Box<dyn Fn(Emit<'_>) + Send + Sync>;

/// A metric: a name, help text, kind and label names, and its series.
pub struct Metric {
    /// Its index in its registry (what the Lua objects hold).
    pub id: usize,
    name: String,
    help: String,
    kind: Kind,
    labels: Box<[String]>,
    bounds: Arc<[f64]>,
    /// The `le` label of each bucket, then `+Inf`.
    le: Box<[String]>,
    /// The one series of a metric without labels.
    single: Option<Arc<Series>>,
    series: RwLock<HashMap<Box<[String]>, Arc<Series>, ahash::RandomState>>,
    /// Bumped when series are removed, so that handles kept elsewhere (the Lua side's
    /// per-thread caches) know to look them up again.
    epoch: AtomicU64,
    /// Set for metrics whose values are read at render time from a function.
    callback: Option<Callback>,
}

impl Metric {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn label_names(&self) -> &[String] {
        &self.labels
    }

    /// A histogram's finite bucket bounds (empty for other kinds).
    pub fn buckets(&self) -> &[f64] {
        &self.bounds
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Relaxed)
    }

    pub fn is_callback(&self) -> bool {
        self.callback.is_some()
    }

    /// The one series of a metric without labels (`None` when it has labels, or is a
    /// callback metric).
    pub fn single(&self) -> Option<&Arc<Series>> {
        self.single.as_ref()
    }

    /// The series for `values` (one per label name, in order), made on first use. Invalid
    /// UTF-8 in a value becomes U+FFFD (the exposition is UTF-8). Errors: a wrong number of
    /// values, or a callback metric (its values come from its function).
    pub fn series<S: AsRef<str>>(&self, values: &[S]) -> Result<Arc<Series>, String> {
        self.check_values(values.len())?;
        if let Some(s) = &self.single {
            return Ok(s.clone());
        }
        let key: Box<[String]> = values.iter().map(|v| v.as_ref().to_owned()).collect();
        Ok(self.series_owned(key))
    }

    /// `series` for values given as bytes (from Lua strings).
    pub fn series_bytes(&self, values: &[&[u8]]) -> Result<Arc<Series>, String> {
        self.check_values(values.len())?;
        if let Some(s) = &self.single {
            return Ok(s.clone());
        }
        let key: Box<[String]> = values
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        Ok(self.series_owned(key))
    }

    /// `Ok` when `n` label values are right for this metric, else the error `series` gives.
    pub fn check_values(&self, n: usize) -> Result<(), String> {
        if self.callback.is_some() {
            return Err(format!(
                "{} '{}' is computed by luaproxy; it cannot be updated",
                self.kind.as_str(),
                self.name
            ));
        }
        if n != self.labels.len() {
            return Err(format!(
                "{} '{}': expected {} label value{} ({}), got {}",
                self.kind.as_str(),
                self.name,
                self.labels.len(),
                if self.labels.len() == 1 { "" } else { "s" },
                self.labels.join(", "),
                n
            ));
        }
        Ok(())
    }

    fn series_owned(&self, key: Box<[String]>) -> Arc<Series> {
        if let Some(s) = self.series.read().unwrap().get(&key) {
            return s.clone();
        }
        let mut map = self.series.write().unwrap();
        map.entry(key.clone())
            .or_insert_with(|| Arc::new(Series::new(self.kind, &self.bounds, key)))
            .clone()
    }

    /// Removes the series for `values`; `true` if there was one. A metric without labels
    /// has its one series zeroed instead.
    pub fn remove<S: AsRef<str>>(&self, values: &[S]) -> Result<bool, String> {
        self.check_values(values.len())?;
        if let Some(s) = &self.single {
            s.clear();
            return Ok(true);
        }
        let key: Box<[String]> = values.iter().map(|v| v.as_ref().to_owned()).collect();
        let removed = self.series.write().unwrap().remove(&key).is_some();
        self.epoch.fetch_add(1, Relaxed);
        Ok(removed)
    }

    /// Removes every series (zeroes the one of a metric without labels).
    pub fn reset(&self) {
        if let Some(s) = &self.single {
            s.clear();
            return;
        }
        self.series.write().unwrap().clear();
        self.epoch.fetch_add(1, Relaxed);
    }

    fn same_shape(&self, kind: Kind, labels: &[String], bounds: &[f64], callback: bool) -> bool {
        self.kind == kind
            && *self.labels == *labels
            && *self.bounds == *bounds
            && self.callback.is_some() == callback
    }

    fn describe(&self) -> String {
        let mut d = format!("a {}", self.kind.as_str());
        if self.callback.is_some() {
            d.push_str(" computed by luaproxy");
        }
        if self.labels.is_empty() {
            d.push_str(" without labels");
        } else {
            let _ = write!(d, " with labels ({})", self.labels.join(", "));
        }
        if self.kind == Kind::Histogram && *self.bounds != *DEFAULT_BUCKETS {
            d.push_str(" and other buckets");
        }
        d
    }

    /// The names of the samples this metric renders.
    fn sample_names(name: &str, kind: Kind) -> Vec<String> {
        match kind {
            Kind::Histogram => ["_bucket", "_sum", "_count"]
                .iter()
                .map(|s| format!("{name}{s}"))
                .collect(),
            _ => vec![name.to_owned()],
        }
    }

    fn render(&self, out: &mut String) {
        out.push_str("# HELP ");
        out.push_str(&self.name);
        out.push(' ');
        escape_help(out, &self.help);
        out.push_str("\n# TYPE ");
        out.push_str(&self.name);
        out.push(' ');
        out.push_str(self.kind.as_str());
        out.push('\n');
        if let Some(f) = &self.callback {
            let mut rows: Vec<(Vec<String>, f64)> = Vec::new();
            let n = self.labels.len();
            f(&mut |values: &[&str], v: f64| {
                if values.len() == n {
                    rows.push((values.iter().map(|s| (*s).to_owned()).collect(), v));
                }
            });
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            rows.dedup_by(|a, b| a.0 == b.0);
            for (values, v) in rows {
                self.sample(out, "", &values[..], None);
                fmt_f64(out, v);
                out.push('\n');
            }
            return;
        }
        let all: Vec<Arc<Series>> = match &self.single {
            Some(s) => vec![s.clone()],
            None => {
                let mut v: Vec<_> = self.series.read().unwrap().values().cloned().collect();
                v.sort_by(|a, b| a.label_values().cmp(b.label_values()));
                v
            }
        };
        for s in &all {
            if self.kind != Kind::Histogram {
                self.sample(out, "", s.label_values(), None);
                fmt_f64(out, s.value());
                out.push('\n');
                continue;
            }
            // _count is the +Inf bucket, so the two always agree (the sum may be a few
            // observations ahead or behind while other threads observe).
            let cumulative = s.cumulative();
            for (le, n) in self.le.iter().zip(&cumulative) {
                self.sample(out, "_bucket", s.label_values(), Some(le.as_str()));
                let _ = writeln!(out, "{n}");
            }
            self.sample(out, "_sum", s.label_values(), None);
            fmt_f64(out, s.value());
            out.push('\n');
            self.sample(out, "_count", s.label_values(), None);
            let _ = writeln!(out, "{}", cumulative.last().copied().unwrap_or(0));
        }
    }

    /// `name{label="value",...} ` (the value follows).
    fn sample<S: AsRef<str>>(
        &self,
        out: &mut String,
        suffix: &str,
        values: &[S],
        le: Option<&str>,
    ) {
        out.push_str(&self.name);
        out.push_str(suffix);
        if !values.is_empty() || le.is_some() {
            out.push('{');
            for (i, (k, v)) in self.labels.iter().zip(values).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(k);
                out.push_str("=\"");
                escape_value(out, v.as_ref());
                out.push('"');
            }
            if let Some(le) = le {
                if !values.is_empty() {
                    out.push(',');
                }
                out.push_str("le=\"");
                out.push_str(le);
                out.push('"');
            }
            out.push('}');
        }
        out.push(' ');
    }
}

/// Appends one label value to a cache key: its length (4 bytes) and its bytes.
pub fn push_key(key: &mut Vec<u8>, value: &[u8]) {
    key.extend_from_slice(&(value.len() as u32).to_le_bytes());
    key.extend_from_slice(value);
}

/// The label values a cache key holds.
pub fn split_key(mut key: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while key.len() >= 4 {
        let n = u32::from_le_bytes([key[0], key[1], key[2], key[3]]) as usize;
        let n = n.min(key.len() - 4);
        out.push(&key[4..4 + n]);
        key = &key[4 + n..];
    }
    out
}

/// One thread's handles to the series of one metric, found by label values without a lock
/// (after the first time) and without touching anything shared but the series itself: keep
/// one per thread (a `thread_local!`) for a metric updated on a hot path. Series removed
/// (`Metric::remove`, `reset`) are noticed through the metric's epoch and looked up again.
pub struct SeriesCache {
    metric: Arc<Metric>,
    epoch: u64,
    map: HashMap<Box<[u8]>, Arc<Series>, ahash::RandomState>,
    key: Vec<u8>,
}

impl SeriesCache {
    pub fn new(metric: Arc<Metric>) -> SeriesCache {
        SeriesCache {
            epoch: metric.epoch(),
            metric,
            map: HashMap::default(),
            key: Vec::new(),
        }
    }

    pub fn metric(&self) -> &Arc<Metric> {
        &self.metric
    }

    /// `f(series)` for the series of `values` (as `Metric::series` finds it, and with its
    /// errors): `cache.with(&["200", upstream], |s| s.inc_by(1))`.
    pub fn with<S: AsRef<[u8]>, R>(
        &mut self,
        values: &[S],
        f: impl FnOnce(&Series) -> R,
    ) -> Result<R, String> {
        let mut key = std::mem::take(&mut self.key);
        key.clear();
        for v in values {
            push_key(&mut key, v.as_ref());
        }
        let r = self.with_encoded(&key, values.len(), f);
        self.key = key;
        r
    }

    /// `with` for the `n` label values `key` holds (`push_key`'s encoding).
    pub fn with_encoded<R>(
        &mut self,
        key: &[u8],
        n: usize,
        f: impl FnOnce(&Series) -> R,
    ) -> Result<R, String> {
        self.metric.check_values(n)?;
        if let Some(s) = &self.metric.single {
            return Ok(f(s));
        }
        let epoch = self.metric.epoch();
        if epoch != self.epoch {
            self.map.clear();
            self.epoch = epoch;
        }
        // A borrowed series, not a clone of its Arc: the count is one more shared write.
        if let Some(s) = self.map.get(key) {
            return Ok(f(s));
        }
        let s = self.metric.series_bytes(&split_key(key))?;
        let r = f(&s);
        self.map.insert(key.into(), s);
        Ok(r)
    }
}

/// What a registration asks for.
struct Spec<'a> {
    name: &'a str,
    help: &'a str,
    kind: Kind,
    labels: &'a [&'a str],
    buckets: Option<&'a [f64]>,
    callback: Option<Callback>,
}

#[derive(Default)]
struct Inner {
    /// Every metric, by id.
    all: Vec<Arc<Metric>>,
    by_name: HashMap<String, usize>,
    /// Every sample name a metric renders (`x`, or `x_bucket`, `x_sum`, `x_count`) -> its id,
    /// so that a counter `x_count` and a histogram `x` cannot both exist.
    samples: HashMap<String, usize>,
}

/// A set of metrics and their exposition. The process's is `registry()`; tests make their own.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// A counter (a value that only goes up). `labels` are its label names (may be empty).
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> Result<Arc<Metric>, String> {
        self.register(Spec {
            name,
            help,
            kind: Kind::Counter,
            labels,
            buckets: None,
            callback: None,
        })
    }

    /// A gauge (a value that goes up and down, or is set).
    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> Result<Arc<Metric>, String> {
        self.register(Spec {
            name,
            help,
            kind: Kind::Gauge,
            labels,
            buckets: None,
            callback: None,
        })
    }

    /// A histogram with `buckets` (finite upper bounds, increasing; a trailing `+Inf` is
    /// allowed and implied anyway), or `DEFAULT_BUCKETS`.
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Option<&[f64]>,
    ) -> Result<Arc<Metric>, String> {
        self.register(Spec {
            name,
            help,
            kind: Kind::Histogram,
            labels,
            buckets: Some(buckets.unwrap_or(DEFAULT_BUCKETS)),
            callback: None,
        })
    }

    /// A counter or gauge whose series are read at render time: `f(emit)` calls
    /// `emit(label_values, value)` once per series (a call with the wrong number of values
    /// is skipped; of two calls with the same values the first counts). For values kept
    /// elsewhere (dict memory, connections open). Registering the name again is an error.
    pub fn callback<F>(
        &self,
        kind: Kind,
        name: &str,
        help: &str,
        labels: &[&str],
        f: F,
    ) -> Result<Arc<Metric>, String>
    where
        F: Fn(Emit<'_>) + Send + Sync + 'static,
    {
        if kind == Kind::Histogram {
            return Err("a callback metric is a counter or a gauge".into());
        }
        self.register(Spec {
            name,
            help,
            kind,
            labels,
            buckets: None,
            callback: Some(Box::new(f)),
        })
    }

    fn register(&self, spec: Spec) -> Result<Arc<Metric>, String> {
        let Spec {
            name,
            help,
            kind,
            labels,
            buckets,
            callback,
        } = spec;
        if !valid_metric_name(name) {
            return Err(format!(
                "bad metric name '{name}' (letters, digits, '_' and ':', not starting with a digit)"
            ));
        }
        if labels.len() > MAX_LABELS {
            return Err(format!("{name}: more than {MAX_LABELS} labels"));
        }
        for (i, l) in labels.iter().enumerate() {
            if !valid_label_name(l) {
                return Err(format!(
                    "{name}: bad label name '{l}' (letters, digits and '_', not starting with a digit or '__')"
                ));
            }
            if labels[..i].contains(l) {
                return Err(format!("{name}: label '{l}' given twice"));
            }
            if kind == Kind::Histogram && *l == "le" {
                return Err(format!("{name}: 'le' is the bucket label of a histogram"));
            }
        }
        let bounds: Arc<[f64]> = match buckets {
            None => Arc::from(Vec::new()),
            Some(b) => {
                let mut v = b.to_vec();
                if v.last() == Some(&f64::INFINITY) {
                    v.pop();
                }
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(format!("{name}: buckets must be finite numbers"));
                }
                if v.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(format!("{name}: buckets must be increasing"));
                }
                Arc::from(v)
            }
        };
        let owned: Box<[String]> = labels.iter().map(|s| (*s).to_owned()).collect();
        let is_callback = callback.is_some();
        let mut inner = self.inner.write().unwrap();
        if let Some(&id) = inner.by_name.get(name) {
            let m = &inner.all[id];
            if m.same_shape(kind, &owned, &bounds, is_callback) && !is_callback {
                return Ok(m.clone());
            }
            return Err(format!(
                "metric '{name}' exists already as {}",
                m.describe()
            ));
        }
        let samples = Metric::sample_names(name, kind);
        for s in &samples {
            if let Some(&other) = inner.samples.get(s) {
                let o = &inner.all[other];
                return Err(format!(
                    "metric '{name}' would render '{s}', which {} '{}' renders",
                    o.kind.as_str(),
                    o.name
                ));
            }
        }
        let id = inner.all.len();
        let mut le: Vec<String> = bounds
            .iter()
            .map(|b| {
                let mut s = String::new();
                fmt_f64(&mut s, *b);
                s
            })
            .collect();
        le.push("+Inf".into());
        let single = (labels.is_empty() && !is_callback)
            .then(|| Arc::new(Series::new(kind, &bounds, Box::new([]))));
        let m = Arc::new(Metric {
            id,
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            labels: owned,
            bounds,
            le: le.into(),
            single,
            series: RwLock::new(HashMap::default()),
            epoch: AtomicU64::new(0),
            callback,
        });
        inner.all.push(m.clone());
        inner.by_name.insert(name.to_owned(), id);
        for s in samples {
            inner.samples.insert(s, id);
        }
        Ok(m)
    }

    /// The metric with this id (`Metric::id`).
    pub fn get(&self, id: usize) -> Option<Arc<Metric>> {
        self.inner.read().unwrap().all.get(id).cloned()
    }

    pub fn find(&self, name: &str) -> Option<Arc<Metric>> {
        let inner = self.inner.read().unwrap();
        inner.by_name.get(name).map(|&id| inner.all[id].clone())
    }

    /// The text exposition (format 0.0.4, `CONTENT_TYPE`) of every metric: sorted by name,
    /// series sorted by label values.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out);
        out
    }

    pub fn render_into(&self, out: &mut String) {
        let mut all = self.inner.read().unwrap().all.clone();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        for m in all {
            m.render(out);
        }
    }
}

/// The registry every worker thread shares.
pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::new)
}
