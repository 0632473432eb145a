//! One series: the values of one metric for one list of label values, as atomics (no mlua,
//! nothing from the rest of the crate). A counter's whole-number increments are one
//! `fetch_add`; fractional ones, gauges and sums are f64 bits updated with compare-exchange.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Adds `v` to the f64 whose bits `a` holds.
fn add_f64(a: &AtomicU64, v: f64) {
    let mut cur = a.load(Relaxed);
    loop {
        let new = (f64::from_bits(cur) + v).to_bits();
        match a.compare_exchange_weak(cur, new, Relaxed, Relaxed) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

/// One series: the values of one metric for one list of label values. Aligned to a cache
/// line, so two hot series never share one.
#[repr(align(64))]
pub struct Series {
    kind: Kind,
    /// Counter: the sum of the whole-number increments. Gauge: the value's f64 bits.
    a: AtomicU64,
    /// Counter: the sum of the other increments (f64 bits). Histogram: the sum of the
    /// observations (f64 bits).
    b: AtomicU64,
    /// Histogram: observations per bucket, not cumulative; the last is `+Inf`'s.
    counts: Box<[AtomicU64]>,
    /// Histogram: the finite upper bounds, increasing.
    bounds: Arc<[f64]>,
    values: Box<[String]>,
}

impl Series {
    pub(super) fn new(kind: Kind, bounds: &Arc<[f64]>, values: Box<[String]>) -> Series {
        let n = if kind == Kind::Histogram {
            bounds.len() + 1
        } else {
            0
        };
        Series {
            kind,
            a: AtomicU64::new(if kind == Kind::Gauge {
                0f64.to_bits()
            } else {
                0
            }),
            b: AtomicU64::new(0f64.to_bits()),
            counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bounds: bounds.clone(),
            values,
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The label values, in the order of the metric's label names.
    pub fn label_values(&self) -> &[String] {
        &self.values
    }

    /// Counter: adds `v` (callers check `v >= 0`; a negative or NaN `v` is ignored).
    /// Gauge: adds `v` (negative allowed). Histogram: nothing.
    #[inline]
    pub fn inc(&self, v: f64) {
        match self.kind {
            Kind::Counter => {
                // Whole numbers up to 2^53 go to the integer part: one fetch_add, exact.
                if (0.0..=9007199254740992.0).contains(&v) && v.fract() == 0.0 {
                    self.a.fetch_add(v as u64, Relaxed);
                } else if v >= 0.0 {
                    add_f64(&self.b, v);
                }
            }
            Kind::Gauge => add_f64(&self.a, v),
            Kind::Histogram => {}
        }
    }

    /// Counter: adds `n`, one `fetch_add`. Gauge: adds `n`. Histogram: nothing.
    #[inline]
    pub fn inc_by(&self, n: u64) {
        match self.kind {
            Kind::Counter => {
                self.a.fetch_add(n, Relaxed);
            }
            Kind::Gauge => add_f64(&self.a, n as f64),
            Kind::Histogram => {}
        }
    }

    /// Gauge: sets the value. Other kinds: nothing.
    #[inline]
    pub fn set(&self, v: f64) {
        if self.kind == Kind::Gauge {
            self.a.store(v.to_bits(), Relaxed);
        }
    }

    /// Histogram: counts `v` in the first bucket whose bound is `>= v` (`+Inf` past the
    /// last) and adds it to the sum. Other kinds: nothing.
    #[inline]
    pub fn observe(&self, v: f64) {
        if self.kind != Kind::Histogram {
            return;
        }
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i].fetch_add(1, Relaxed);
        add_f64(&self.b, v);
    }

    /// Counter or gauge: the current value. Histogram: the sum of observations.
    pub fn value(&self) -> f64 {
        match self.kind {
            Kind::Counter => self.a.load(Relaxed) as f64 + f64::from_bits(self.b.load(Relaxed)),
            Kind::Gauge => f64::from_bits(self.a.load(Relaxed)),
            Kind::Histogram => f64::from_bits(self.b.load(Relaxed)),
        }
    }

    /// Histogram: the cumulative counts, one per bound and then `+Inf`'s (the total).
    pub fn cumulative(&self) -> Vec<u64> {
        let mut total = 0;
        self.counts
            .iter()
            .map(|c| {
                total += c.load(Relaxed);
                total
            })
            .collect()
    }

    pub(super) fn clear(&self) {
        self.a.store(
            if self.kind == Kind::Gauge {
                0f64.to_bits()
            } else {
                0
            },
            Relaxed,
        );
        self.b.store(0f64.to_bits(), Relaxed);
        for c in self.counts.iter() {
            c.store(0, Relaxed);
        }
    }
}
