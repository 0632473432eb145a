//! The time everything Lua can observe is measured by: `luaproxy.now()`, dict and cache time
//! to live, request and upstream timings, upstream deadlines, pooled connections' idle time,
//! log and access log stamps, the `Date` field.
//!
//! Normally the system's clocks. Under `luaproxy.test` (`kit.rs`) a thread may run on a
//! virtual clock instead: tokio's paused clock of the test kit's own runtime, which moves only
//! when a spec advances it or when every task waits on time (then to the next timer, as tokio
//! does for paused runtimes). What decides is one relaxed load of [`VIRTUAL`], false unless a
//! kit was ever started in this process; after that, each call asks tokio for the clock of the
//! runtime it runs in (a real one for every runtime but the kit's) and, outside any runtime on
//! the kit's thread, the kit's.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Set once a test kit has started in this process (never cleared: other threads and later
/// runtimes are told apart by tokio, whose clock is the real one outside the kit's runtime).
static VIRTUAL: AtomicBool = AtomicBool::new(false);

/// The kit running on this thread: its runtime (whose paused clock is the virtual one), the
/// virtual instant it started at, and the wall time that instant stands for.
struct Kit {
    handle: tokio::runtime::Handle,
    start: Instant,
    epoch: SystemTime,
}

thread_local! {
    static KIT: RefCell<Option<Kit>> = const { RefCell::new(None) };
}

/// The wall time the first kit of the process started at: every kit starts there again, so
/// `t.reset()` puts `luaproxy.now()` back where it was.
static EPOCH: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();

/// Now, on the monotonic clock Lua-visible durations are measured with.
#[inline]
pub fn now() -> Instant {
    if VIRTUAL.load(Relaxed) {
        return virtual_now().0;
    }
    Instant::now()
}

/// Now, as wall time (`luaproxy.now()`, log and access log stamps, `Date`).
#[inline]
pub fn system_now() -> SystemTime {
    if VIRTUAL.load(Relaxed) {
        if let (_, Some(t)) = virtual_now() {
            return t;
        }
    }
    SystemTime::now()
}

/// Seconds since the epoch as `luaproxy.now()` gives them.
pub fn unix_now() -> f64 {
    system_now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The instant on this thread's clock and, when that is a kit's, the wall time it stands for.
#[cold]
fn virtual_now() -> (Instant, Option<SystemTime>) {
    KIT.with(|k| {
        let k = k.borrow();
        let Some(kit) = k.as_ref() else {
            // Another thread: tokio's clock of the runtime it runs in is a real one.
            return (tokio::time::Instant::now().into_std(), None);
        };
        let t = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.id() == kit.handle.id() => tokio::time::Instant::now().into_std(),
            // Another runtime on the kit's thread (`luaproxy.run` inside a spec): real time.
            Ok(_) => return (tokio::time::Instant::now().into_std(), None),
            // Spec code between kit calls: the kit's clock, standing still.
            Err(_) => {
                let _g = kit.handle.enter();
                tokio::time::Instant::now().into_std()
            }
        };
        let wall = kit.epoch + t.saturating_duration_since(kit.start);
        (t, Some(wall))
    })
}

/// Puts this thread on the paused clock of `rt` (a current-thread runtime built with
/// `start_paused`), starting at the process's kit epoch.
pub fn start_virtual(rt: &tokio::runtime::Runtime) {
    VIRTUAL.store(true, Relaxed);
    let start = {
        let _g = rt.enter();
        tokio::time::Instant::now().into_std()
    };
    let epoch = *EPOCH.get_or_init(|| {
        // Whole seconds: log stamps and `luaproxy.now()` read evenly.
        let s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        UNIX_EPOCH + Duration::from_secs(s)
    });
    KIT.with(|k| {
        *k.borrow_mut() = Some(Kit {
            handle: rt.handle().clone(),
            start,
            epoch,
        })
    });
}

/// Takes this thread off its kit's clock.
pub fn stop_virtual() {
    KIT.with(|k| *k.borrow_mut() = None);
}

/// True when the caller runs on a test kit's runtime (its connections go to fake upstreams
/// only). Another runtime on the same thread (`luaproxy.run` in a spec) is the real world.
pub fn in_kit() -> bool {
    VIRTUAL.load(Relaxed)
        && KIT.with(|k| {
            k.borrow().as_ref().is_some_and(|kit| {
                tokio::runtime::Handle::try_current().is_ok_and(|h| h.id() == kit.handle.id())
            })
        })
}
