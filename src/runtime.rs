//! The event loop: `luaproxy.run`, `spawn`, `sleep`, `now`, timers and `stop`.
//!
//! Each thread that runs Lua owns one current-thread tokio runtime and one `LocalSet`, because
//! mlua values are `!Send` in module mode: every future that touches Lua stays on its thread.

use mlua::prelude::*;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, LocalSet};

/// A flag set once, that a future can wait for. The loop's own future polls what ends it on
/// every wake-up of the loop, so these must cost next to nothing while unset (tokio's
/// `Notify::notified` cost 60-80 instructions a poll: callgrind, post5k).
#[derive(Default)]
pub struct Flag {
    set: Cell<bool>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl Flag {
    /// Sets the flag and wakes whoever waits.
    pub fn raise(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Waits until the flag is set (one waiter at a time).
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.set.get() {
                return std::task::Poll::Ready(());
            }
            let mut w = self.waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// Per-thread loop state, present while a loop runs on this thread.
pub struct LoopState {
    stop: Flag,
}

impl LoopState {
    pub fn request_stop(&self) {
        self.stop.raise();
    }
}

thread_local! {
    static LOOP: RefCell<Option<Rc<LoopState>>> = const { RefCell::new(None) };
}

// Which worker a thread is lives with the log, the lowest module that needs it.
pub use crate::log::{set_worker_id, worker_id};

pub fn in_loop() -> bool {
    LOOP.with(|l| l.borrow().is_some())
}

/// Raises the error every async binding gives when no loop runs on this thread.
pub fn check_loop(name: &str) -> LuaResult<()> {
    if in_loop() {
        Ok(())
    } else {
        Err(LuaError::runtime(format!(
            "{name}: no event loop is running; call it from inside luaproxy.run(function() ... end)"
        )))
    }
}

/// Marks this thread as running a loop until the guard drops.
pub struct LoopGuard(pub Rc<LoopState>);

impl LoopGuard {
    pub fn enter() -> LoopGuard {
        let st = Rc::new(LoopState {
            stop: Flag::default(),
        });
        LOOP.with(|l| *l.borrow_mut() = Some(st.clone()));
        LoopGuard(st)
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        LOOP.with(|l| *l.borrow_mut() = None);
    }
}

pub fn new_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs `local` until every task on it has finished, `stop()` is called or `until` completes,
/// then returns the result of `main` if it finished. Remaining tasks are dropped before this
/// returns, while the Lua state they hold is still alive.
pub fn drive<T: 'static>(
    rt: &tokio::runtime::Runtime,
    mut local: LocalSet,
    main: JoinHandle<T>,
    state: &LoopState,
    until: impl std::future::Future<Output = ()>,
) -> Option<T> {
    rt.block_on(async {
        // Polled on every wake-up of the loop: in a fixed order (no random draw), the tasks
        // first.
        tokio::select! {
            biased;
            _ = &mut local => {}
            _ = state.stop.wait() => {}
            _ = until => {}
        }
    });
    let out = if main.is_finished() {
        local.block_on(rt, main).ok()
    } else {
        main.abort();
        None
    };
    drop(local);
    out
}

/// A server worker VM's life, kept in its app data: `RUNNING`; `STOPPING` once its
/// generation retires (a reload) or the server stops, when timers fire with
/// `premature = true` and no new ones start; `KILLED` when what it still runs is dropped.
/// VMs without one (the main program's) run until their loop ends.
pub struct VmLife(pub tokio::sync::watch::Receiver<u8>);

pub const RUNNING: u8 = 0;
pub const STOPPING: u8 = 1;
pub const KILLED: u8 = 2;

type Life = Option<tokio::sync::watch::Receiver<u8>>;

/// This VM's life, if it has one.
fn life_of(lua: &Lua) -> Life {
    lua.app_data_ref::<VmLife>().map(|l| l.0.clone())
}

/// Waits until `life` reaches `state` (never, for a VM without a life, or once its sender is
/// gone: the worker dropping it is dropping its tasks too).
async fn reaches(life: &mut Life, state: u8) {
    if let Some(rx) = life {
        if rx.wait_for(|s| *s >= state).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}

/// Calls `f(...)` inside `xpcall` with a traceback handler, so errors come back as
/// `false, "message\nstack traceback: ..."` instead of a bare message.
pub fn protected_call(lua: &Lua) -> LuaResult<LuaFunction> {
    if let Some(f) = lua.app_data_ref::<ProtectedCall>() {
        return Ok(f.0.clone());
    }
    let handler: LuaFunction = lua
        .load(
            r#"
            local tostring = tostring
            local traceback = debug and debug.traceback or function(m) return tostring(m) end
            return function(e) return traceback(tostring(e), 2) end
            "#,
        )
        .set_name("=luaproxy")
        .eval()?;
    let f = crate::entry::make(lua, handler)?;
    lua.set_app_data(ProtectedCall(f.clone()));
    Ok(f)
}

struct ProtectedCall(LuaFunction);

/// Calls `f(args)` as a coroutine under [`protected_call`]; `Err` carries the message with
/// its traceback. Used by everything that runs Lua from the loop, under the thread's
/// `lua_budget` (`budget.rs`: a policy worker's, none on the main program's thread).
pub async fn call_protected(
    lua: &Lua,
    f: LuaFunction,
    args: LuaMultiValue,
) -> Result<LuaMultiValue, String> {
    let budget = crate::budget::thread_budget();
    crate::budget::Budgeted::new(call_protected_unbudgeted(lua, f, args), budget).await
}

/// [`call_protected`] under `budget` (zero: none) instead of the thread's.
pub async fn call_protected_budgeted(
    lua: &Lua,
    f: LuaFunction,
    args: LuaMultiValue,
    budget: Duration,
) -> Result<LuaMultiValue, String> {
    crate::budget::Budgeted::new(call_protected_unbudgeted(lua, f, args), budget).await
}

async fn call_protected_unbudgeted(
    lua: &Lua,
    f: LuaFunction,
    args: LuaMultiValue,
) -> Result<LuaMultiValue, String> {
    let pcall = protected_call(lua).map_err(|e| e.to_string())?;
    let mut all = LuaMultiValue::new();
    all.push_back(LuaValue::Function(f));
    all.extend(args);
    let mut res = pcall
        .call_async::<LuaMultiValue>(all)
        .await
        .map_err(|e| e.to_string())?;
    match res.pop_front() {
        Some(LuaValue::Boolean(true)) => Ok(res),
        _ => Err(match res.pop_front() {
            Some(LuaValue::String(s)) => s.to_string_lossy(),
            Some(v) => format!("{v:?}"),
            None => "unknown error".into(),
        }),
    }
}

/// Ignores SIGPIPE in the whole process, as nginx does. A write to a socket whose peer has
/// gone (a client that hung up mid-response, an upstream that closed while the request body
/// was still streaming to it) must fail with EPIPE on that connection; with the signal's
/// default action, which a Lua host keeps (Rust programs ignore it, Lua programs do not), one
/// `writev` killed the whole proxy. `send` passes MSG_NOSIGNAL, `writev` cannot.
pub fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

/// Raises the soft limit on open files to the hard one, once per process (HAProxy sizes its
/// own the same way): every client connection costs a descriptor, and a proxied one a second.
/// With Debian's default soft limit of 1024, about 500 clients would make `accept` fail with
/// EMFILE long before `max_connections`.
pub fn raise_nofile_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write the plain struct passed by pointer.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    });
}

/// The longest time a number of seconds from Lua stands for (100 years): larger values mean
/// the same, so no conversion or time arithmetic on them can overflow and panic.
pub use crate::units::MAX_SECONDS;

/// Seconds from Lua for `name` (`units::seconds`, which every timeout, sleep and time to live
/// goes through), or the error naming it.
fn seconds_arg(name: &str, v: f64) -> LuaResult<Duration> {
    match crate::units::seconds(v) {
        Some(d) => Ok(d),
        None => Err(LuaError::runtime(format!(
            "{name}: seconds must be a finite number >= 0"
        ))),
    }
}

/// `luaproxy.run(fn, ...)` -> the values `fn` returns. Runs the event loop on this thread until
/// `fn` and every task it started have finished, or `luaproxy.stop()` is called. An error raised
/// by `fn` stops the loop at once (pending tasks are dropped) and is raised again by `run`, with
/// its traceback.
fn lua_run(lua: &Lua, (f, args): (LuaFunction, LuaMultiValue)) -> LuaResult<LuaMultiValue> {
    if in_loop() {
        return Err(LuaError::runtime(
            "luaproxy.run: the event loop is already running on this thread",
        ));
    }
    let rt = new_runtime().map_err(|e| LuaError::runtime(format!("luaproxy.run: {e}")))?;
    let guard = LoopGuard::enter();
    let local = LocalSet::new();
    let lua2 = lua.clone();
    let state = guard.0.clone();
    let main = local.spawn_local(async move {
        let r = call_protected(&lua2, f, args).await;
        // A failing main function is a failing program: stop, rather than keep serving on
        // behalf of code that is gone (and never return, in a test whose assertion failed).
        if r.is_err() {
            state.request_stop();
        }
        r
    });
    let out = drive(&rt, local, main, &guard.0, std::future::pending());
    drop(guard);
    match out {
        Some(Ok(values)) => Ok(values),
        Some(Err(msg)) => Err(LuaError::runtime(msg)),
        None => Ok(LuaMultiValue::new()),
    }
}

/// `luaproxy.stop()` -> `true`. Ends the loop of this thread: `run` returns soon after,
/// dropping every task still pending.
fn lua_stop(_: &Lua, (): ()) -> LuaResult<bool> {
    LOOP.with(|l| {
        if let Some(st) = &*l.borrow() {
            st.request_stop();
        }
    });
    Ok(true)
}

/// `luaproxy.now()` -> seconds since the epoch as a float (ms resolution and better).
fn lua_now(_: &Lua, (): ()) -> LuaResult<f64> {
    Ok(crate::clock::unix_now())
}

/// `luaproxy.sleep(seconds)` -> `true`. Yields this coroutine; other requests keep running.
async fn lua_sleep(_: Lua, secs: f64) -> LuaResult<bool> {
    let d = seconds_arg("luaproxy.sleep", secs)?;
    if d.is_zero() {
        tokio::task::yield_now().await;
    } else {
        crate::clock::sleep(d).await;
    }
    Ok(true)
}

#[derive(Default)]
struct TaskState {
    result: Option<Result<LuaMultiValue, String>>,
    waiting: bool,
    waited: bool,
}

/// A coroutine started by `luaproxy.spawn`.
pub struct Task {
    state: Rc<RefCell<TaskState>>,
    done: Rc<Notify>,
    handle: JoinHandle<()>,
}

impl LuaUserData for Task {
    fn add_methods<M: LuaUserDataMethods<Self>>(m: &mut M) {
        // `ok, ... = task:wait()`: `true` and the task's return values, or `false, err`.
        m.add_async_method("wait", |lua, this, ()| async move {
            check_loop("task:wait")?;
            {
                let mut st = this.state.borrow_mut();
                if st.waited || st.waiting {
                    return Err(LuaError::runtime(
                        "task:wait: this task was already waited for",
                    ));
                }
                st.waiting = true;
            }
            loop {
                let notified = this.done.notified();
                if this.state.borrow().result.is_some() || this.handle.is_finished() {
                    break;
                }
                notified.await;
            }
            let mut st = this.state.borrow_mut();
            st.waiting = false;
            st.waited = true;
            let mut out = LuaMultiValue::new();
            match st.result.take() {
                Some(Ok(values)) => {
                    out.push_back(LuaValue::Boolean(true));
                    out.extend(values);
                }
                Some(Err(msg)) => {
                    out.push_back(LuaValue::Boolean(false));
                    out.push_back(LuaValue::String(lua.create_string(&msg)?));
                }
                None => {
                    out.push_back(LuaValue::Boolean(false));
                    out.push_back(LuaValue::String(lua.create_string("killed")?));
                }
            }
            Ok(out)
        });
        // `task:kill()` -> `true`: stops the task at its next yield point.
        m.add_method("kill", |_, this, ()| {
            this.handle.abort();
            this.done.notify_waiters();
            Ok(true)
        });
        // `task:done()` -> whether the task has finished.
        m.add_method("done", |_, this, ()| Ok(this.handle.is_finished()));
    }
}

/// `task = luaproxy.spawn(fn, ...)`: runs `fn(...)` as a new coroutine on this loop.
/// `task:wait()` returns `true, ...` or `false, err` (like `ngx.thread.wait`); an error in a
/// task nobody waits for is logged.
fn lua_spawn(lua: &Lua, (f, args): (LuaFunction, LuaMultiValue)) -> LuaResult<Task> {
    check_loop("luaproxy.spawn")?;
    let state = Rc::new(RefCell::new(TaskState::default()));
    let done = Rc::new(Notify::new());
    let (st2, done2, lua2) = (state.clone(), done.clone(), lua.clone());
    let mut life = life_of(lua);
    let handle = tokio::task::spawn_local(async move {
        let r = tokio::select! {
            r = call_protected(&lua2, f, args) => r,
            _ = reaches(&mut life, KILLED) => Err("killed: the worker stopped".into()),
        };
        if let Err(msg) = &r {
            if !msg.starts_with("killed") {
                crate::metrics::builtin::lua_error("task");
            }
            if !st2.borrow().waiting {
                crate::log!(ERR, "spawned task failed: {msg}");
            }
        }
        st2.borrow_mut().result = Some(r);
        done2.notify_waiters();
    });
    Ok(Task {
        state,
        done,
        handle,
    })
}

/// A timer started by `luaproxy.timer.at` or `luaproxy.timer.every`.
pub struct Timer {
    cancelled: Rc<Cell<bool>>,
    wake: Rc<Notify>,
}

impl LuaUserData for Timer {
    fn add_methods<M: LuaUserDataMethods<Self>>(m: &mut M) {
        // `timer:cancel()` -> `true`. A callback already running finishes; none starts after.
        m.add_method("cancel", |_, this, ()| {
            this.cancelled.set(true);
            this.wake.notify_waiters();
            Ok(true)
        });
    }
}

fn start_timer(
    lua: &Lua,
    name: &str,
    delay: f64,
    repeat: bool,
    f: LuaFunction,
    args: LuaMultiValue,
) -> LuaResult<Result<Timer, &'static str>> {
    check_loop(name)?;
    let d = seconds_arg(name, delay)?;
    if repeat && d.is_zero() {
        return Err(LuaError::runtime(format!("{name}: interval must be > 0")));
    }
    let mut life = life_of(lua);
    if life.as_ref().is_some_and(|l| *l.borrow() != RUNNING) {
        return Ok(Err("process exiting"));
    }
    let cancelled = Rc::new(Cell::new(false));
    let wake = Rc::new(Notify::new());
    let (c2, w2, lua2) = (cancelled.clone(), wake.clone(), lua.clone());
    let args: Vec<LuaValue> = args.into_iter().collect();
    tokio::task::spawn_local(async move {
        let mut next = crate::clock::now() + d;
        loop {
            // Cancelled before this task first ran: `notify_waiters` had no one to wake.
            if c2.get() {
                return;
            }
            // A worker that stops (or a generation a reload retires) runs its pending timers
            // at once with `premature = true`, as nginx does, so they can clean up.
            let mut premature = false;
            tokio::select! {
                _ = crate::clock::sleep_until(next) => {}
                _ = w2.notified() => {}
                _ = reaches(&mut life, STOPPING) => premature = true,
            }
            if c2.get() {
                return;
            }
            let mut call_args = LuaMultiValue::new();
            call_args.push_back(LuaValue::Boolean(premature)); // as in ngx.timer
            call_args.extend(args.iter().cloned());
            tokio::select! {
                r = call_protected(&lua2, f.clone(), call_args) => if let Err(msg) = r {
                    crate::metrics::builtin::lua_error("timer");
                    crate::log!(ERR, "timer callback failed: {msg}");
                },
                _ = reaches(&mut life, KILLED) => return,
            }
            if !repeat || premature || c2.get() {
                return;
            }
            // Fixed rate without catch-up bursts: a slow callback pushes the next tick back.
            next += d;
            let now = crate::clock::now();
            if next < now {
                next = now;
            }
        }
    });
    Ok(Ok(Timer { cancelled, wake }))
}

type TimerRet = (Option<Timer>, Option<&'static str>);

fn timer_ret(r: Result<Timer, &'static str>) -> TimerRet {
    match r {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(e)),
    }
}

/// `timer, err = luaproxy.timer.at(delay, fn, ...)`: calls `fn(premature, ...)` once after
/// `delay` seconds, with `premature = false` (the `ngx.timer.at` shape); when the worker stops
/// or a reload retires its policy first, at once with `premature = true`. `nil, "process
/// exiting"` once it is stopping. `timer:cancel()` stops it.
fn lua_timer_at(
    lua: &Lua,
    (delay, f, args): (f64, LuaFunction, LuaMultiValue),
) -> LuaResult<TimerRet> {
    start_timer(lua, "luaproxy.timer.at", delay, false, f, args).map(timer_ret)
}

/// `timer, err = luaproxy.timer.every(interval, fn, ...)`: calls `fn(premature, ...)` every
/// `interval` seconds until cancelled; calls never overlap. A stopping worker calls it once
/// more with `premature = true`, and no more.
fn lua_timer_every(
    lua: &Lua,
    (interval, f, args): (f64, LuaFunction, LuaMultiValue),
) -> LuaResult<TimerRet> {
    start_timer(lua, "luaproxy.timer.every", interval, true, f, args).map(timer_ret)
}

/// `luaproxy.worker.id()` -> 0-based index of this server worker, or `nil` on the main thread.
fn lua_worker_id(_: &Lua, (): ()) -> LuaResult<Option<usize>> {
    Ok(worker_id())
}

/// `luaproxy.worker.cpus()` -> number of CPUs (the default worker count).
fn lua_worker_cpus(_: &Lua, (): ()) -> LuaResult<usize> {
    Ok(default_workers())
}

/// Tells Lua's collector about `kb` of memory that Lua objects hold outside its heap (bodies and
/// buffers behind a request or response userdata): one incremental step as if that much had been
/// allocated. Without it the collector, which only counts the userdata's own bytes, falls far
/// behind under load.
pub fn gc_pressure(lua: &Lua, kb: i32) {
    // SAFETY: a GC step inside mlua's protected call; finalizers that fail are caught there.
    let _ = unsafe {
        lua.exec_raw::<()>((), |l| {
            mlua::ffi::lua_gc(l, mlua::ffi::LUA_GCSTEP, kb);
        })
    };
}

pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Set by `luaproxy._panic("connection")` (process-wide: a thread-local costs more per request
/// in a loaded library, and the specs that use it run one worker).
static PANIC_AFTER_HANDLER: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// True once when `luaproxy._panic("connection")` asked for a panic after a handler.
pub fn panic_requested() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    PANIC_AFTER_HANDLER.load(Relaxed) && PANIC_AFTER_HANDLER.swap(false, Relaxed)
}

/// `luaproxy._panic([where])`: a Rust panic, for the specs that show one stays inside its
/// connection. No argument: here, inside this Lua call (the handler gets an error); with
/// `"connection"`: in the connection's own code once the handler returns.
fn lua_panic(_: &Lua, place: Option<String>) -> LuaResult<()> {
    match place.as_deref() {
        None => panic!("luaproxy._panic() was called"),
        Some("connection") => {
            PANIC_AFTER_HANDLER.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        Some(other) => Err(LuaError::runtime(format!(
            "luaproxy._panic: unknown place '{other}' (nil or \"connection\")"
        ))),
    }
}

pub fn register(lua: &Lua, t: &LuaTable) -> LuaResult<()> {
    t.set("_panic", lua.create_function(lua_panic)?)?;
    t.set("run", lua.create_function(lua_run)?)?;
    t.set("stop", lua.create_function(lua_stop)?)?;
    t.set("now", lua.create_function(lua_now)?)?;
    t.set(
        "sleep",
        lua.create_async_function(|lua, secs: f64| {
            let ok = check_loop("luaproxy.sleep");
            async move {
                ok?;
                lua_sleep(lua, secs).await
            }
        })?,
    )?;
    t.set("spawn", lua.create_function(lua_spawn)?)?;
    let timer = lua.create_table()?;
    timer.set("at", lua.create_function(lua_timer_at)?)?;
    timer.set("every", lua.create_function(lua_timer_every)?)?;
    t.set("timer", timer)?;
    let worker = lua.create_table()?;
    worker.set("id", lua.create_function(lua_worker_id)?)?;
    worker.set("cpus", lua.create_function(lua_worker_cpus)?)?;
    t.set("worker", worker)?;
    Ok(())
}
