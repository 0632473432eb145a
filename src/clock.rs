//! The time everything Lua can observe is measured by, and the timers that wait on it:
//! `luaproxy.now()`, sleeps and timers, dict and cache time to live, request and upstream
//! timings, upstream and client deadlines, pooled connections' idle time, log and access log
//! stamps, the `Date` field.
//!
//! Normally the system's clocks and tokio's timers. Under `luaproxy.test` (src/kit) a thread may
//! run a kit: a runtime whose time is virtual. It stands still until the kit moves it, to a
//! time a spec asks for or, when every task waits, to the next timer due; the timers made on
//! that runtime ([`sleep`], [`sleep_until`], [`timeout`]) are the kit's, kept here in deadline
//! order. What decides is one relaxed load of [`VIRTUAL`], false unless a kit was ever started
//! in this process; after that, each call asks whether it runs on the kit's runtime (or
//! outside any runtime on the kit's thread, between a spec's kit calls). Every other runtime,
//! on any thread, keeps the real clock. (tokio's own paused clock would do this too, but its
//! `test-util` feature reads the time driver's clock under a mutex on every park: +1 % of the
//! instructions of a proxied request, callgrind post5k.)

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Set once a test kit has started in this process (never cleared).
static VIRTUAL: AtomicBool = AtomicBool::new(false);

/// A kit's clock: its runtime, the real instant its virtual time started from and the wall
/// time that stands for, where virtual time is now, and its timers by deadline.
struct Kit {
    runtime: tokio::runtime::Id,
    start: Instant,
    epoch: SystemTime,
    now: Cell<Instant>,
    timers: RefCell<BTreeMap<(Instant, u64), Weak<Slot>>>,
    seq: Cell<u64>,
}

/// A virtual timer's waker, while something waits on it.
struct Slot(RefCell<Option<Waker>>);

thread_local! {
    static KIT: RefCell<Option<Kit>> = const { RefCell::new(None) };
}

/// The wall time the first kit of the process started at: every kit starts there again, so
/// `t.reset()` puts `luaproxy.now()` back where it was.
static EPOCH: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();

/// `f(kit)` when the caller runs on this thread's kit: on its runtime, or outside any runtime.
fn with_kit<R>(f: impl FnOnce(&Kit) -> R) -> Option<R> {
    KIT.with(|k| {
        let k = k.borrow();
        let kit = k.as_ref()?;
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.id() != kit.runtime => None,
            _ => Some(f(kit)),
        }
    })
}

/// True when the caller runs on a test kit (its connections go to fake upstreams only, its
/// timers are virtual). Another runtime on the kit's thread (`luaproxy.run` in a spec) is the
/// real world.
#[inline]
pub fn in_kit() -> bool {
    VIRTUAL.load(Relaxed) && with_kit(|_| ()).is_some()
}

/// Now, on the monotonic clock Lua-visible durations are measured with.
#[inline]
pub fn now() -> Instant {
    if VIRTUAL.load(Relaxed) {
        if let Some(t) = with_kit(|k| k.now.get()) {
            return t;
        }
    }
    Instant::now()
}

/// Now, as wall time (`luaproxy.now()`, log and access log stamps, `Date`).
#[inline]
pub fn system_now() -> SystemTime {
    if VIRTUAL.load(Relaxed) {
        if let Some(t) = with_kit(|k| k.epoch + k.now.get().saturating_duration_since(k.start)) {
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

/// Puts this thread's runtime `runtime` on a virtual clock starting at the process's kit
/// epoch, with no timers.
pub fn start_virtual(runtime: tokio::runtime::Id) {
    VIRTUAL.store(true, Relaxed);
    let epoch = *EPOCH.get_or_init(|| {
        // Whole seconds: log stamps and `luaproxy.now()` read evenly.
        let s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        UNIX_EPOCH + Duration::from_secs(s)
    });
    let start = Instant::now();
    KIT.with(|k| {
        *k.borrow_mut() = Some(Kit {
            runtime,
            start,
            epoch,
            now: Cell::new(start),
            timers: RefCell::new(BTreeMap::new()),
            seq: Cell::new(0),
        })
    });
}

/// Takes this thread off its kit's clock (its timers never fire).
pub fn stop_virtual() {
    let gone = KIT.with(|k| k.borrow_mut().take());
    drop(gone);
}

/// Moves this thread's kit clock to the earliest pending timer (if it is ahead) and wakes
/// every timer due then. False when no timer is pending.
pub fn advance_to_next() -> bool {
    let due: Vec<Rc<Slot>> = KIT
        .with(|k| {
            let k = k.borrow();
            let kit = k.as_ref()?;
            let mut timers = kit.timers.borrow_mut();
            // Timers whose waiter went (dropped, or moved to another deadline) do not count.
            let first = loop {
                let (&key, slot) = timers.first_key_value()?;
                if slot.strong_count() == 0 {
                    timers.remove(&key);
                    continue;
                }
                break key.0;
            };
            if first > kit.now.get() {
                kit.now.set(first);
            }
            let now = kit.now.get();
            let mut due = Vec::new();
            while let Some(entry) = timers.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                if let Some(slot) = entry.remove().upgrade() {
                    due.push(slot);
                }
            }
            Some(due)
        })
        .unwrap_or_default();
    let any = !due.is_empty();
    for slot in due {
        let w = slot.0.borrow_mut().take();
        if let Some(w) = w {
            w.wake();
        }
    }
    any
}

/// Where a sleep too long to add to now ends instead (about 30 years, as tokio's far future).
const FAR: Duration = Duration::from_secs(86400 * 365 * 30);

/// Completes at `deadline`.
pub struct Sleep {
    inner: Timer,
}

enum Timer {
    Real(tokio::time::Sleep),
    Virtual {
        deadline: Instant,
        /// The deadline it is registered for, and its slot in the kit's timers.
        slot: Option<(Instant, Rc<Slot>)>,
    },
}

/// A timer for `deadline` (an instant of [`now`]): tokio's, or the kit's on a kit.
#[inline(always)]
pub fn sleep_until(deadline: Instant) -> Sleep {
    let inner = if in_kit() {
        Timer::Virtual {
            deadline,
            slot: None,
        }
    } else {
        Timer::Real(tokio::time::sleep_until(tokio::time::Instant::from_std(
            deadline,
        )))
    };
    Sleep { inner }
}

/// A timer for `d` from now.
#[inline(always)]
pub fn sleep(d: Duration) -> Sleep {
    let now = now();
    sleep_until(match now.checked_add(d) {
        Some(t) => t,
        None => now + FAR,
    })
}

impl Sleep {
    /// The instant it completes at.
    #[inline]
    pub fn deadline(&self) -> Instant {
        match &self.inner {
            Timer::Real(s) => s.deadline().into_std(),
            Timer::Virtual { deadline, .. } => *deadline,
        }
    }

    /// Moves the deadline (the timer waits again if it had completed).
    #[inline]
    pub fn reset(self: Pin<&mut Self>, deadline: Instant) {
        // SAFETY: structural pinning: `inner` is never moved out of a pinned `Sleep`, and a
        // pinned tokio `Sleep` is only reached through `Pin::new_unchecked` on its place.
        match unsafe { &mut self.get_unchecked_mut().inner } {
            Timer::Real(s) => {
                unsafe { Pin::new_unchecked(s) }.reset(tokio::time::Instant::from_std(deadline))
            }
            Timer::Virtual { deadline: d, .. } => *d = deadline,
        }
    }
}

impl Future for Sleep {
    type Output = ();

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: as in `reset`.
        match unsafe { &mut self.get_unchecked_mut().inner } {
            Timer::Real(s) => unsafe { Pin::new_unchecked(s) }.poll(cx),
            Timer::Virtual { deadline, slot } => poll_virtual(*deadline, slot, cx),
        }
    }
}

fn poll_virtual(
    deadline: Instant,
    slot: &mut Option<(Instant, Rc<Slot>)>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    KIT.with(|k| {
        let k = k.borrow();
        // The kit is gone (reset): its timers never fire.
        let Some(kit) = k.as_ref() else {
            return Poll::Pending;
        };
        if kit.now.get() >= deadline {
            *slot = None;
            return Poll::Ready(());
        }
        match slot {
            Some((at, s)) if *at == deadline => {
                let mut w = s.0.borrow_mut();
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
            }
            _ => {
                let s = Rc::new(Slot(RefCell::new(Some(cx.waker().clone()))));
                let seq = kit.seq.get();
                kit.seq.set(seq + 1);
                kit.timers
                    .borrow_mut()
                    .insert((deadline, seq), Rc::downgrade(&s));
                *slot = Some((deadline, s));
            }
        }
        Poll::Pending
    })
}

/// `timeout`'s error: the time ran out first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// `f`'s output, unless `d` passes first (as `tokio::time::timeout`, on this clock).
pub async fn timeout<F: Future>(d: Duration, f: F) -> Result<F::Output, Elapsed> {
    let timer = sleep(d);
    let mut timer = std::pin::pin!(timer);
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_timers_fire_in_order_as_the_clock_moves() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        start_virtual(rt.handle().id());
        let t0 = now();
        let order = Rc::new(RefCell::new(Vec::new()));
        let local = tokio::task::LocalSet::new();
        for d in [30u64, 10, 20] {
            let order = order.clone();
            local.spawn_local(async move {
                sleep(Duration::from_secs(d)).await;
                order.borrow_mut().push((d, now() - t0));
            });
        }
        rt.block_on(local.run_until(async {
            tokio::task::yield_now().await;
            while advance_to_next() {
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
            }
        }));
        let secs = |s| Duration::from_secs(s);
        assert_eq!(
            *order.borrow(),
            vec![(10, secs(10)), (20, secs(20)), (30, secs(30))]
        );
        assert_eq!(now() - t0, secs(30));
        // Outside the kit's runtime the clock is the real one.
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(other.block_on(async { !in_kit() }));
        stop_virtual();
        assert!(!in_kit());
    }
}
