//! `lua_budget`: how long Lua may run without yielding before it is stopped, and the watchdog
//! thread that stops it.
//!
//! The normal path costs no clock read and no hook: a Lua count hook left on all the time
//! doubles what Lua code costs on 5.4 (measured: a 3e7-step loop, 0.27 s -> 0.50-0.58 s with
//! `debug.sethook(f, "", 100000)`). Instead each thread that runs Lua under a loop with a budget
//! has a [`Slot`] saying which coroutine it is running right now and since when, on a coarse
//! clock of the thread's own CPU time that the watchdog thread reads every 10 ms. When a
//! coroutine has run past its budget, the watchdog sets a count hook on it (`lua_sethook` is
//! made to be called from outside the running code: the Lua 5.4 interpreter's own Ctrl-C
//! handling does it from a signal handler); the hook suspends the coroutine at its next
//! instruction, and the protected call it runs under ends with an error.
//!
//! Charging: a call is charged the clock's advance from the start of each of its polls to the
//! end; the clock moves every 10 ms, so a poll that spans a move is charged 10 ms and one that
//! does not is charged nothing: over many short polls that averages to the real time, with no
//! clock read per poll. The clock is CPU time, not wall time: on a machine so loaded that a
//! worker waits for a core, a request is not charged for the wait (the soak of session 6 saw
//! two good requests stopped at a 200 ms budget when it counted wall time).
//!
//! What it cannot stop: a loop inside one C function (a pathological `string.find` pattern),
//! and, on LuaJIT, a loop the JIT compiled (machine code checks no hook). Those are logged
//! once when they pass twice the budget.

use mlua::ffi;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::raw::c_int;
use std::pin::Pin;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering::*};
use std::sync::Mutex;

use std::task::{Context, Poll};
use std::time::Duration;

/// How often the watchdog wakes (while any thread has a budget): the budget's resolution.
const TICK: Duration = Duration::from_millis(10);

/// The budget state of one thread that runs Lua.
pub struct Slot {
    /// The budget of the call being polled, in ms (0: none).
    budget_ms: AtomicU64,
    /// The coroutine being polled (null between polls). Written by the thread that owns the
    /// slot; see `busy` for how the watchdog never hooks a coroutine that is gone.
    running: AtomicPtr<ffi::lua_State>,
    /// The owning thread's CPU time in ms, as the watchdog last read it: the clock polls are
    /// charged by.
    cpu_ms: AtomicU64,
    /// The owning thread's CPU clock (`pthread_getcpuclockid`).
    clock: libc::clockid_t,
    /// `cpu_ms` at its poll's start, less what its call was charged before.
    since: AtomicU64,
    /// The coroutine the watchdog hooked, if any (written while `busy`).
    hooked: AtomicPtr<ffi::lua_State>,
    /// Logged that the hook did not stop it (LuaJIT trace, C loop).
    stuck_logged: AtomicBool,
    /// Set by the watchdog while it looks at `running` and hooks it. The owning thread, after
    /// taking its coroutine out of `running`, waits while this is set. Both sides store, then
    /// load the other's flag, all sequentially consistent: either the watchdog sees the
    /// coroutine gone, or the owner sees the watchdog at work and waits for it (Dekker's
    /// pattern); a lock would cost the owner two read-modify-writes per poll.
    busy: AtomicBool,
    worker: Option<usize>,
}

thread_local! {
    /// This thread's slot, made the first time a call with a budget runs here.
    /// Never freed: a thread that ran Lua under a budget keeps it (the workers live as long as
    /// the process; a slot left by a thread that ended sits idle), so the watchdog and the
    /// polls share it without reference counting.
    static SLOT: Cell<Option<&'static Slot>> = const { Cell::new(None) };
    /// The budget of protected calls on this thread that are not given one.
    static DEFAULT: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// Sets the budget of every protected call on this thread that is not given its own (a
/// policy worker's thread: all its Lua is policy code); zero for none (the main program).
pub fn set_thread_budget(budget: Duration) {
    DEFAULT.with(|d| d.set(budget));
}

/// The budget of protected calls on this thread that are not given one.
pub fn thread_budget() -> Duration {
    DEFAULT.with(|d| d.get())
}

/// The calling thread's CPU clock (the process's, should the thread's be unavailable).
fn thread_cpu_clock() -> libc::clockid_t {
    let mut clock: libc::clockid_t = libc::CLOCK_PROCESS_CPUTIME_ID;
    // SAFETY: pthread_getcpuclockid writes one clockid_t for the calling thread's handle; on
    // failure it writes nothing and the process clock stays.
    unsafe {
        libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock);
    }
    clock
}

/// CPU time of `clock` in ms (`None` once its thread has ended).
fn cpu_ms(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; a clock whose thread is gone gives EINVAL.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000)
}

/// This thread's slot, registered with the watchdog on first use.
fn slot() -> &'static Slot {
    SLOT.with(|c| match c.get() {
        Some(s) => s,
        None => {
            let s: &'static Slot = Box::leak(Box::new(Slot {
                budget_ms: AtomicU64::new(0),
                running: AtomicPtr::new(ptr::null_mut()),
                cpu_ms: AtomicU64::new(0),
                clock: thread_cpu_clock(),
                since: AtomicU64::new(0),
                hooked: AtomicPtr::new(ptr::null_mut()),
                stuck_logged: AtomicBool::new(false),
                busy: AtomicBool::new(false),
                worker: crate::log::worker_id(),
            }));
            watchdog().register(s);
            c.set(Some(s));
            s
        }
    })
}

struct Watchdog {
    slots: Mutex<Vec<&'static Slot>>,
}

fn watchdog() -> &'static Watchdog {
    static W: std::sync::OnceLock<&'static Watchdog> = std::sync::OnceLock::new();
    W.get_or_init(|| {
        let w: &'static Watchdog = Box::leak(Box::new(Watchdog {
            slots: Mutex::new(Vec::new()),
        }));
        let _ = std::thread::Builder::new()
            .name("luaproxy-watchdog".into())
            .spawn(move || w.run());
        w
    })
}

impl Watchdog {
    fn register(&self, s: &'static Slot) {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    fn run(&self) {
        loop {
            std::thread::sleep(TICK);
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for s in slots {
                // A slot whose thread has ended keeps its last reading (it runs nothing).
                if let Some(now) = cpu_ms(s.clock) {
                    s.cpu_ms.store(now, Relaxed);
                    s.check(now);
                }
            }
        }
    }
}

impl Slot {
    fn check(&self, now: u64) {
        let budget = self.budget_ms.load(Acquire);
        if budget == 0 || self.running.load(Acquire).is_null() {
            return;
        }
        let ran = now.saturating_sub(self.since.load(Acquire));
        if ran < budget {
            return;
        }
        self.busy.store(true, SeqCst);
        let l = self.running.load(SeqCst);
        if l.is_null() {
            self.busy.store(false, SeqCst);
            return;
        }
        let hooked = self.hooked.load(SeqCst) == l;
        if !hooked {
            // SAFETY: `l` was in `running` after `busy` was set, so its thread, which waits
            // while `busy` is set once it has taken `l` out, has not let it go: `l` is alive.
            // lua_sethook only stores the hook and sets flags the interpreter checks at its
            // next instruction (Lua's own Ctrl-C handler calls it from a signal handler).
            unsafe { ffi::lua_sethook(l, Some(budget_hook), ffi::LUA_MASKCOUNT, 1) };
            self.hooked.store(l, SeqCst);
        }
        self.busy.store(false, SeqCst);
        if hooked && ran >= budget * 2 && !self.stuck_logged.swap(true, Relaxed) {
            crate::log::log_as(
                crate::log::CRIT,
                self.worker,
                &format!(
                    "lua code has run for {ran} ms without yielding and the budget hook cannot stop it (a compiled LuaJIT loop or a long C call): this worker serves nothing until it ends"
                ),
            );
        }
    }
}

/// When the hook cannot suspend the coroutine (it runs inside a C call that cannot yield,
/// as a `table.sort` comparator), it raises an error instead and fires again after this many
/// instructions, until the coroutine reaches a point where it can be suspended.
const REFIRE_EVERY: c_int = 1000;

/// The message a stopped call ends with.
pub const EXCEEDED: &str = "lua_budget exceeded";

thread_local! {
    /// Where the budget hook found the coroutine, for the log.
    static TRACE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Suspends the coroutine for good: the hook yields (Lua 5.4 and LuaJIT let a count hook
/// yield), the protected call's future sees its coroutine was the one hooked and ends with
/// an error without resuming it. Unlike an error, a `pcall` in the policy cannot catch this.
unsafe extern "C-unwind" fn budget_hook(l: *mut ffi::lua_State, _ar: *mut ffi::lua_Debug) {
    // SAFETY: Lua calls a hook on the running coroutine `l`, inside the interpreter, with
    // LUA_MINSTACK free slots. luaL_traceback may raise a memory error and lua_yield an error
    // where it cannot yield: both unwind (longjmp) to the protected call, and nothing here has
    // a destructor pending at those points (the trace is copied out and dropped in between).
    unsafe {
        if TRACE.with(|t| t.borrow().is_none()) {
            ffi::luaL_traceback(l, l, c"lua_budget exceeded".as_ptr(), 0);
            let mut len = 0;
            let p = ffi::lua_tolstring(l, -1, &mut len);
            let s = match p.is_null() {
                true => EXCEEDED.to_string(),
                false => {
                    let s = std::slice::from_raw_parts(p as *const u8, len);
                    String::from_utf8_lossy(s).into_owned()
                }
            };
            TRACE.with(|t| *t.borrow_mut() = Some(s));
            ffi::lua_pop(l, 1);
        }
        ffi::lua_sethook(l, Some(budget_hook), ffi::LUA_MASKCOUNT, REFIRE_EVERY);
        ffi::lua_yield(l, 0);
    }
}

/// `mark()`: called first thing in every protected call's coroutine, so the slot knows which
/// coroutine is running.
///
/// # Safety
/// A C function Lua calls (capi.rs rules); it only records `l`.
pub unsafe extern "C-unwind" fn mark(l: *mut ffi::lua_State) -> c_int {
    if let Some(s) = SLOT.with(|c| c.get()) {
        s.running.store(l, Release);
    }
    0
}

/// A protected call's future under a budget (none: zero).
pub struct Budgeted<F> {
    budget: Duration,
    /// Gone once the budget stopped it (dropping it abandons the suspended coroutine).
    inner: Option<F>,
    /// Its coroutine, once `mark` has named it.
    l: *mut ffi::lua_State,
    /// Ticks charged to it by earlier polls.
    charged: u64,
}

impl<F> Budgeted<F> {
    pub fn new(inner: F, budget: Duration) -> Budgeted<F> {
        Budgeted {
            budget,
            inner: Some(inner),
            l: ptr::null_mut(),
            charged: 0,
        }
    }
}

impl<F, T> Future for Budgeted<F>
where
    F: Future<Output = Result<T, String>>,
{
    type Output = Result<T, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `inner` is never moved: it is polled where it is and dropped where it is
        // (set to `None`), which is what pinning allows.
        let this = unsafe { self.get_unchecked_mut() };
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(format!("{EXCEEDED} (polled again)")));
        };
        // SAFETY: as above; `inner` stays in place inside the pinned `Budgeted`.
        let mut inner = unsafe { Pin::new_unchecked(inner) };
        // A thread where no call ever had a budget has no slot and pays nothing.
        let slot = match SLOT.with(|c| c.get()) {
            Some(s) => s,
            None if this.budget.is_zero() => return inner.as_mut().poll(cx),
            None => slot(),
        };
        // Polls nest (a Lua callback run by a binding the outer coroutine awaits): the outer
        // coroutine's state comes back when this poll ends, and its time keeps counting.
        let prev_running = slot.running.load(Relaxed);
        let prev_since = slot.since.load(Relaxed);
        let prev_budget = slot.budget_ms.load(Relaxed);
        let start = slot.cpu_ms.load(Relaxed);
        slot.since
            .store(start.saturating_sub(this.charged), Release);
        let budget_ms = match this.budget.as_millis() {
            0 if this.budget.is_zero() => 0,
            ms => ms.clamp(1, u64::MAX as u128) as u64,
        };
        slot.budget_ms.store(budget_ms, Release);
        slot.running.store(this.l, SeqCst);

        let out = inner.as_mut().poll(cx);

        if this.l.is_null() {
            // Its first poll: `mark`, the coroutine's first step, named it in `running`
            // (where a nested call's poll, ending, puts it back).
            this.l = slot.running.load(Relaxed);
        }
        // This coroutine leaves `running` (the outer one, if any, comes back, with its clock
        // and budget first); then, if the watchdog is at work, wait until it is done before
        // looking at what it did.
        slot.since.store(prev_since, Release);
        slot.budget_ms.store(prev_budget, Release);
        slot.running.store(prev_running, SeqCst);
        while slot.busy.load(SeqCst) {
            std::hint::spin_loop();
        }
        let mut trace = None;
        if !this.l.is_null() && slot.hooked.load(SeqCst) == this.l {
            // SAFETY: `this.l` is this call's coroutine, owned by `inner` (still alive), on
            // this thread; the hook goes before the coroutine can be reused.
            unsafe { ffi::lua_sethook(this.l, None, 0, 0) };
            slot.hooked.store(ptr::null_mut(), SeqCst);
            slot.stuck_logged.store(false, Relaxed);
            // Hooked but not yet run (the poll was ending in Rust code): nothing was stopped,
            // and the next poll is over budget from its start, so the watchdog hooks again.
            trace = TRACE.with(|t| t.borrow_mut().take());
        }
        this.charged += slot.cpu_ms.load(Relaxed).saturating_sub(start);
        let Some(trace) = trace else {
            return out;
        };
        // Suspended by the hook (or stopped by its error where it could not yield): it is
        // over. The coroutine is dropped unresumed; mlua resets it before any reuse.
        this.inner = None;
        drop(out);
        let rest = trace.strip_prefix(EXCEEDED).unwrap_or(&trace);
        Poll::Ready(Err(format!(
            "{EXCEEDED}: ran {} ms of a {} ms budget without finishing{rest}",
            this.charged,
            this.budget.as_millis()
        )))
    }
}
