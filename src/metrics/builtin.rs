//! luaproxy's own metrics (a policy registers its own from Lua): what the server counts on
//! every request, the Lua errors of every phase, and counters sharded per thread for values
//! that change twice per request (in flight), summed when rendered.
//!
//! Names follow nginx-lua-prometheus's `nginx_http_*` with a `luaproxy_` prefix.

use crate::metrics::registry::{registry, Kind, Metric, Series};
use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

pub const REQUESTS: &str = "luaproxy_http_requests_total";
pub const UPSTREAM_TIME: &str = "luaproxy_upstream_response_time_seconds";
pub const LUA_ERRORS: &str = "luaproxy_lua_errors_total";
pub const IN_FLIGHT: &str = "luaproxy_http_requests_in_flight";
pub const CONNECTIONS: &str = "luaproxy_http_connections";

struct Builtin {
    requests: Arc<Metric>,
    upstream_time: Arc<Metric>,
    lua_errors: Arc<Metric>,
}

fn builtin() -> &'static Builtin {
    static B: OnceLock<Builtin> = OnceLock::new();
    B.get_or_init(|| {
        let r = registry();
        // These names are ours: a policy that took one first gets its own metric kept and
        // ours is left out of the exposition rather than failing every request.
        let or_private = |m: Result<Arc<Metric>, String>, make: &dyn Fn() -> Arc<Metric>| {
            m.unwrap_or_else(|e| {
                crate::log!(WARN, "built-in metric not registered: {e}");
                make()
            })
        };
        let private = crate::metrics::registry::Registry::new();
        let private = Box::leak(Box::new(private));
        Builtin {
            requests: or_private(
                r.counter(REQUESTS, "HTTP requests by status and upstream", &["status", "upstream"]),
                &|| private.counter("r", "", &["status", "upstream"]).expect("fresh"),
            ),
            upstream_time: or_private(
                r.histogram(
                    UPSTREAM_TIME,
                    "Upstream response time (to the end of the response body), by upstream",
                    &["upstream"],
                    None,
                ),
                &|| private.histogram("u", "", &["upstream"], None).expect("fresh"),
            ),
            lua_errors: or_private(
                r.counter(
                    LUA_ERRORS,
                    "Lua errors by phase (handler, log, timer, task), budget and memory aborts included",
                    &["phase"],
                ),
                &|| private.counter("e", "", &["phase"]).expect("fresh"),
            ),
        }
    })
}

/// Makes sure the built-in metrics exist (they render from the first server on).
pub fn register() {
    builtin();
}

/// The series this thread counted lately, found by a scan of a few entries (the label values
/// of one proxy's requests repeat: a handful of statuses times its backends). Cheaper than
/// `SeriesCache`'s key encoding and hash (~600 instructions per request for both metrics,
/// by callgrind).
struct Recent {
    epochs: (u64, u64),
    requests: Vec<(u16, Box<str>, Arc<Series>)>,
    upstreams: Vec<(Box<str>, Arc<Series>)>,
}

/// Entries kept per metric; past it the list starts again (a proxy with more distinct
/// label values than this pays a registry lookup now and then).
const RECENT_MAX: usize = 32;

thread_local! {
    static RECENT: RefCell<Recent> = const {
        RefCell::new(Recent { epochs: (u64::MAX, u64::MAX), requests: Vec::new(), upstreams: Vec::new() })
    };
}

fn with_recent<R>(f: impl FnOnce(&Builtin, &mut Recent) -> R) -> R {
    let b = builtin();
    RECENT.with(|r| {
        let mut r = r.borrow_mut();
        // Series removed (a policy's `del`/`reset` on these names) are looked up again.
        let epochs = (b.requests.epoch(), b.upstream_time.epoch());
        if r.epochs != epochs {
            r.requests.clear();
            r.upstreams.clear();
            r.epochs = epochs;
        }
        f(b, &mut r)
    })
}

/// One finished request: its status and the upstream that answered (`""`: none).
pub fn request_done(status: u16, upstream: &str) {
    with_recent(|b, r| {
        if let Some((_, _, s)) = r
            .requests
            .iter()
            .find(|(st, up, _)| *st == status && **up == *upstream)
        {
            s.inc_by(1);
            return;
        }
        let mut digits = [0u8; 5];
        let code = status_text(status, &mut digits);
        if let Ok(s) = b.requests.series_bytes(&[code, upstream.as_bytes()]) {
            s.inc_by(1);
            if r.requests.len() >= RECENT_MAX {
                r.requests.clear();
            }
            r.requests.push((status, upstream.into(), s));
        }
    })
}

/// One upstream attempt's response time.
pub fn upstream_time(upstream: &str, seconds: f64) {
    with_recent(|b, r| {
        if let Some((_, s)) = r.upstreams.iter().find(|(up, _)| **up == *upstream) {
            s.observe(seconds);
            return;
        }
        if let Ok(s) = b.upstream_time.series_bytes(&[upstream.as_bytes()]) {
            s.observe(seconds);
            if r.upstreams.len() >= RECENT_MAX {
                r.upstreams.clear();
            }
            r.upstreams.push((upstream.into(), s));
        }
    })
}

/// A Lua error (or budget or memory abort) in `phase`.
pub fn lua_error(phase: &str) {
    if let Ok(s) = builtin().lua_errors.series(&[phase]) {
        s.inc_by(1);
    }
}

fn status_text(status: u16, buf: &mut [u8; 5]) -> &[u8] {
    let mut n = status;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// A count changed by every thread and read rarely: one cache line per thread slot, so
/// workers never write the same line; `sum` adds the slots.
pub struct Sharded {
    slots: [Padded; SLOTS],
}

const SLOTS: usize = 32;

#[repr(align(128))]
struct Padded(AtomicI64);

thread_local! {
    static SLOT: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Relaxed) % SLOTS
    };
}

impl Sharded {
    pub const fn new() -> Sharded {
        Sharded {
            slots: [const { Padded(AtomicI64::new(0)) }; SLOTS],
        }
    }

    pub fn add(&self, n: i64) {
        let i = SLOT.with(|s| *s);
        self.slots[i].0.fetch_add(n, Relaxed);
    }

    pub fn sum(&self) -> i64 {
        self.slots.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

impl Default for Sharded {
    fn default() -> Self {
        Sharded::new()
    }
}

/// Requests being handled now, in every server of the process.
pub static IN_FLIGHT_COUNT: Sharded = Sharded::new();
/// Client connections open now, in every server of the process.
pub static CONNECTION_COUNT: Sharded = Sharded::new();

/// Registers a gauge read at render time (once per process; a second call is a no-op).
pub fn gauge_fn(
    name: &str,
    help: &str,
    labels: &[&str],
    f: impl Fn(crate::metrics::registry::Emit<'_>) + Send + Sync + 'static,
) {
    if registry().find(name).is_none() {
        if let Err(e) = registry().callback(Kind::Gauge, name, help, labels, f) {
            crate::log!(WARN, "built-in metric not registered: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_digits() {
        let mut b = [0u8; 5];
        assert_eq!(status_text(200, &mut b), b"200");
        assert_eq!(status_text(0, &mut b), b"0");
        assert_eq!(status_text(999, &mut b), b"999");
    }

    #[test]
    fn sharded_sums_every_thread() {
        static S: Sharded = Sharded::new();
        let hs: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..1000 {
                        S.add(2);
                        S.add(-1);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(S.sum(), 4000);
    }
}
