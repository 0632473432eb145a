//! luaproxy's own metrics (a policy registers its own from Lua): what the server counts on
//! every request, the Lua errors of every phase, and counters sharded per thread for values
//! that change twice per request (in flight), summed when rendered.
//!
//! Names follow nginx-lua-prometheus's `nginx_http_*` with a `luaproxy_` prefix.

use crate::metrics::registry::{registry, Kind, Metric, SeriesCache};
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

thread_local! {
    static REQUESTS_CACHE: RefCell<Option<SeriesCache>> = const { RefCell::new(None) };
    static UPSTREAM_CACHE: RefCell<Option<SeriesCache>> = const { RefCell::new(None) };
}

fn with_cache(
    cache: &'static std::thread::LocalKey<RefCell<Option<SeriesCache>>>,
    metric: fn(&Builtin) -> &Arc<Metric>,
    values: &[&[u8]],
    f: impl FnOnce(&crate::metrics::Series),
) {
    cache.with(|c| {
        let mut c = c.borrow_mut();
        let c = c.get_or_insert_with(|| SeriesCache::new(metric(builtin()).clone()));
        let _ = c.with(values, f);
    });
}

/// One finished request: its status and the upstream that answered (`""`: none).
pub fn request_done(status: u16, upstream: &str) {
    let mut digits = [0u8; 5];
    let status = status_text(status, &mut digits);
    with_cache(
        &REQUESTS_CACHE,
        |b| &b.requests,
        &[status, upstream.as_bytes()],
        |s| s.inc_by(1),
    );
}

/// One upstream attempt's response time.
pub fn upstream_time(upstream: &str, seconds: f64) {
    with_cache(
        &UPSTREAM_CACHE,
        |b| &b.upstream_time,
        &[upstream.as_bytes()],
        |s| s.observe(seconds),
    );
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
