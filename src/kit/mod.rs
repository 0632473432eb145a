//! `luaproxy._kit`: the Rust half of `luaproxy.test` (`lua/luaproxy/test.lua` is the API specs
//! use). A kit runs policies in the calling VM on a runtime of its own, a current-thread tokio
//! runtime whose time is virtual (`clock.rs`): it moves when a spec advances it, or when every
//! task waits (then straight to the next timer due), so a spec never waits in real time.
//! Requests reach the policy through in-memory pipes (`server::kit`), upstreams are fakes
//! (`fake.rs`), and nothing listens on or connects to a socket.
//!
//! A drive polls the runtime with a waker that notes wake-ups: after a turn of the runtime in
//! which nothing was woken, every task waits at this instant; then the call's work is done
//! (it returns, with everything it set going settled), or the clock moves to the next timer.
//!
//! The kit lives in the VM's app data and goes with it; `reset` drops it early (apps, fakes,
//! tasks and timers), flushes every shared dict and cache, and puts the clock back.

mod fake;

use crate::server::kit::{self as server_kit, App, Source};
use mlua::prelude::*;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// How long (virtual) a kit call may take before it gives up: a policy waiting on something
/// that never comes meets it at once, since the clock jumps there.
const DEFAULT_LIMIT: Duration = Duration::from_secs(3600);

/// Real time a kit call may take: only a task that never stops waking itself (a Lua loop
/// around `luaproxy.sleep(0)`) keeps the clock from moving that long.
const REAL_LIMIT: Duration = Duration::from_secs(60);

struct Kit {
    rt: Option<tokio::runtime::Runtime>,
    local: Option<tokio::task::LocalSet>,
    fakes: Rc<fake::Fakes>,
    apps: RefCell<Vec<Rc<App>>>,
    driving: Cell<bool>,
    /// The log level when the kit started (a config's `log_level` changes it meanwhile).
    level: u8,
    /// `lua_budget` of the last app loaded: what tasks and timers run under.
    budget: Cell<Duration>,
    next_port: Cell<u16>,
}

impl Drop for Kit {
    fn drop(&mut self) {
        self.fakes.clear();
        crate::h1::stream::clear_listeners();
        self.apps.borrow_mut().clear();
        if let Some(rt) = &self.rt {
            // Tasks go while their runtime is still there to unregister their timers.
            let _g = rt.enter();
            drop(self.local.take());
        }
        drop(self.rt.take());
        crate::upstream::clear_pool();
        crate::clock::stop_virtual();
        crate::log::set_capture(false);
        crate::log::set_level(self.level);
    }
}

/// The VM's kit, if one was started.
#[derive(Default)]
struct Slot(RefCell<Option<Rc<Kit>>>);

fn kit(lua: &Lua) -> LuaResult<Rc<Kit>> {
    if lua.app_data_ref::<Slot>().is_none() {
        lua.set_app_data(Slot::default());
    }
    let slot = lua.app_data_ref::<Slot>().expect("set above");
    if let Some(k) = &*slot.0.borrow() {
        return Ok(k.clone());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LuaError::runtime(format!("luaproxy.test: {e}")))?;
    crate::clock::start_virtual(rt.handle().id());
    let k = Rc::new(Kit {
        rt: Some(rt),
        local: Some(tokio::task::LocalSet::new()),
        fakes: fake::Fakes::new(lua),
        apps: RefCell::new(Vec::new()),
        driving: Cell::new(false),
        level: crate::log::level(),
        budget: Cell::new(crate::settings::Settings::default().lua_budget),
        next_port: Cell::new(40000),
    });
    *slot.0.borrow_mut() = Some(k.clone());
    Ok(k)
}

/// A waker that notes being woken before passing it on: how a drive tells "everything waits"
/// from "something is about to run".
#[derive(Default)]
struct Noting {
    woken: AtomicBool,
    inner: Mutex<Option<Waker>>,
}

impl Wake for Noting {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, SeqCst);
        if let Some(w) = &*self.inner.lock().unwrap_or_else(|e| e.into_inner()) {
            w.wake_by_ref();
        }
    }
}

impl Kit {
    /// Runs `fut` on the kit's runtime (virtual time jumping to the next timer whenever every
    /// task waits), then lets whatever it set going that can run at this instant run (without
    /// moving the clock) before returning its output. Errors raised by fake upstreams
    /// meanwhile are raised here.
    fn drive<T: 'static>(&self, what: &str, fut: impl Future<Output = T>) -> LuaResult<T> {
        if self.driving.get() {
            return Err(LuaError::runtime(format!(
                "{what}: the kit is already running (called from a policy or a fake upstream?)"
            )));
        }
        if crate::runtime::in_loop() || tokio::runtime::Handle::try_current().is_ok() {
            return Err(LuaError::runtime(format!(
                "{what}: cannot run inside luaproxy.run (call it from the spec itself)"
            )));
        }
        let (Some(rt), Some(local)) = (&self.rt, &self.local) else {
            return Err(LuaError::runtime(format!("{what}: the kit was reset")));
        };
        struct During<'a>(&'a Cell<bool>, Duration);
        impl Drop for During<'_> {
            fn drop(&mut self) {
                self.0.set(false);
                crate::log::set_capture(false);
                crate::log::set_worker(None);
                crate::budget::set_thread_budget(self.1);
            }
        }
        self.driving.set(true);
        let _during = During(&self.driving, crate::budget::thread_budget());
        crate::log::set_worker(Some(0));
        // What the policy and luaproxy log meanwhile is the app's (`app:logs()`).
        crate::log::set_capture(true);
        crate::budget::set_thread_budget(self.budget.get());
        let guard = crate::runtime::LoopGuard::enter();
        let out: Rc<RefCell<Option<T>>> = Rc::new(RefCell::new(None));
        let out2 = out.clone();
        let main = async move {
            let v = fut.await;
            *out2.borrow_mut() = Some(v);
            std::future::pending::<()>().await
        };
        let mut run = std::pin::pin!(local.run_until(main));
        let noting = Arc::new(Noting::default());
        let waker = Waker::from(noting.clone());
        let mut probing = false;
        let mut stalled = None;
        let began = std::time::Instant::now();
        let mut polls = 0u64;
        rt.block_on(std::future::poll_fn(|cx| {
            *noting.inner.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            let before = noting.woken.swap(false, SeqCst);
            let _ = run.as_mut().poll(&mut Context::from_waker(&waker));
            let during = noting.woken.swap(false, SeqCst);
            polls += 1;
            if polls.is_multiple_of(1024) && began.elapsed() > REAL_LIMIT {
                stalled = Some("something kept running without waiting");
                return Poll::Ready(());
            }
            if during {
                // Something is about to run (the LocalSet's queue, a wake-up meanwhile).
                probing = false;
                return Poll::Pending;
            }
            if !probing || before {
                // One more turn of the runtime (I/O and wake-ups) without moving the clock:
                // wake ourselves directly, then see whether anything else was woken.
                probing = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            // Everything waits at this instant.
            probing = false;
            if out.borrow().is_some() {
                return Poll::Ready(());
            }
            if crate::clock::advance_to_next() {
                // The clock moved to the next timer and woke what waited on it.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            stalled = Some("every task waits and no timer is set");
            Poll::Ready(())
        }));
        drop(guard);
        let errors = std::mem::take(&mut *self.fakes.errors.borrow_mut());
        if !errors.is_empty() {
            return Err(LuaError::runtime(format!(
                "fake upstream raised an error: {}",
                errors.join("; ")
            )));
        }
        let v = out.borrow_mut().take();
        v.ok_or_else(|| {
            LuaError::runtime(format!(
                "{what}: did not finish: {}",
                stalled.unwrap_or("stopped")
            ))
        })
    }
}

/// A loaded app as Lua holds it: gone once the kit is reset.
struct AppRef(Weak<App>);

impl LuaUserData for AppRef {}

fn app_of(ud: &LuaAnyUserData) -> LuaResult<Rc<App>> {
    let r = ud.borrow::<AppRef>()?;
    r.0.upgrade()
        .ok_or_else(|| LuaError::runtime("this app was dropped by t.reset()"))
}

/// `app, err = _kit.load(policy, config, settings, record)`: `policy` a file path or a table
/// `{ handler =, init_worker =, log = }`; `config` plain data for the policy; `settings` the
/// server settings; `record(info, ctx)` called in every request's log phase.
fn lua_load(
    lua: &Lua,
    (policy, config, settings, record): (LuaValue, LuaValue, LuaTable, LuaFunction),
) -> LuaResult<(Option<LuaAnyUserData>, Option<String>)> {
    let source = match policy {
        LuaValue::String(s) => Source::File(s.to_str()?.to_string()),
        LuaValue::Table(t) => Source::Table(t),
        other => {
            return Err(LuaError::runtime(format!(
                "t.load: policy must be a file path or a table (got a {})",
                other.type_name()
            )))
        }
    };
    let k = kit(lua)?;
    let lua2 = lua.clone();
    let loaded = k.drive("t.load", async move {
        match crate::clock::timeout(
            DEFAULT_LIMIT,
            server_kit::load(&lua2, source, config, &settings, record),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Ok(Err(format!(
                "policy did not finish loading within {} s",
                DEFAULT_LIMIT.as_secs()
            ))),
        }
    })??;
    match loaded {
        Ok(app) => {
            k.budget.set(app.budget());
            let app = Rc::new(app);
            k.apps.borrow_mut().push(app.clone());
            Ok((
                Some(lua.create_userdata(AppRef(Rc::downgrade(&app)))?),
                None,
            ))
        }
        Err(e) => Ok((None, Some(e))),
    }
}

/// `results = _kit.requests(app, { { raw =, method =, remote =, timeout =, at = }, ... })`:
/// runs the requests concurrently, each on a connection of its own, each starting `at`
/// seconds after the first; each result is `{ status =, headers = { {name, value}, ... },
/// body =, error = }`, or `{ failed = why }`.
fn lua_requests(lua: &Lua, (app, list): (LuaAnyUserData, LuaTable)) -> LuaResult<LuaTable> {
    let app = app_of(&app)?;
    let k = kit(lua)?;
    let mut reqs = Vec::new();
    for item in list.sequence_values::<LuaTable>() {
        let item = item?;
        let raw: LuaString = item.get("raw")?;
        let method: String = item.get("method")?;
        let method = hyper::Method::from_bytes(method.as_bytes())
            .map_err(|_| LuaError::runtime(format!("app:request: bad method '{method}'")))?;
        let remote: String = item.get("remote")?;
        let peer = match remote.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                let ip: IpAddr = remote.parse().map_err(|_| {
                    LuaError::runtime(format!("app:request: bad remote_addr '{remote}'"))
                })?;
                let port = k.next_port.get();
                k.next_port
                    .set(if port == u16::MAX { 40000 } else { port + 1 });
                SocketAddr::new(ip, port)
            }
        };
        let limit = match item.get::<Option<f64>>("timeout")? {
            Some(t) => crate::units::seconds(t)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| LuaError::runtime("app:request: timeout must be seconds > 0"))?,
            None => DEFAULT_LIMIT,
        };
        let at = match item.get::<Option<f64>>("at")? {
            Some(t) => crate::units::seconds(t)
                .ok_or_else(|| LuaError::runtime("app:requests: at must be seconds >= 0"))?,
            None => Duration::ZERO,
        };
        let raw = bytes::Bytes::copy_from_slice(&raw.as_bytes());
        reqs.push((raw, method, peer, limit, at));
    }
    let answers = k.drive("app:request", async move {
        let tasks: Vec<_> = reqs
            .into_iter()
            .map(|(raw, method, peer, limit, at)| {
                let app = app.clone();
                tokio::task::spawn_local(async move {
                    if !at.is_zero() {
                        crate::clock::sleep(at).await;
                    }
                    match crate::clock::timeout(limit, app.request(raw, &method, peer)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!(
                            "no response within {} s (virtual)",
                            limit.as_secs_f64()
                        )),
                    }
                })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(
                t.await
                    .unwrap_or_else(|e| Err(format!("request failed: {e}"))),
            );
        }
        out
    })?;
    let results = lua.create_table_with_capacity(answers.len(), 0)?;
    for a in answers {
        let r = lua.create_table()?;
        match a {
            Ok(a) => {
                r.set("status", a.status)?;
                let headers = lua.create_table_with_capacity(a.headers.len(), 0)?;
                for (name, value) in a.headers {
                    let pair = lua.create_table_with_capacity(2, 0)?;
                    pair.raw_push(lua.create_string(&name)?)?;
                    pair.raw_push(lua.create_string(&value)?)?;
                    headers.raw_push(pair)?;
                }
                r.set("headers", headers)?;
                r.set("body", lua.create_string(&a.body)?)?;
                r.set("error", a.error)?;
            }
            Err(e) => r.set("failed", e)?,
        }
        results.raw_push(r)?;
    }
    Ok(results)
}

/// `_kit.listen(addr, fn | nil)`: a fake upstream at `addr` answering with `fn(req)` (a table
/// as `fake.rs` reads it), or none (connections refused).
fn lua_listen(lua: &Lua, (addr, f): (String, Option<LuaFunction>)) -> LuaResult<bool> {
    let k = kit(lua)?;
    k.fakes.set(&addr, f);
    Ok(true)
}

/// `_kit.advance(seconds)`: moves the clock on, running every timer due on the way in order.
fn lua_advance(lua: &Lua, secs: f64) -> LuaResult<bool> {
    let d = crate::units::seconds(secs)
        .ok_or_else(|| LuaError::runtime("t.clock:advance: seconds must be a number >= 0"))?;
    let k = kit(lua)?;
    k.drive("t.clock:advance", async move {
        if d.is_zero() {
            tokio::task::yield_now().await;
        } else {
            crate::clock::sleep(d).await;
        }
    })?;
    Ok(true)
}

/// `_kit.logs()`: the lines captured since the last call, `{ kind =, level =, message =,
/// line = }` each.
fn lua_logs(lua: &Lua, (): ()) -> LuaResult<LuaTable> {
    let lines = crate::log::take_captured();
    let t = lua.create_table_with_capacity(lines.len(), 0)?;
    for c in lines {
        let e = lua.create_table_with_capacity(0, 4)?;
        e.set("kind", c.kind)?;
        if !c.level.is_empty() {
            e.set("level", c.level)?;
        }
        e.set("message", c.message)?;
        e.set("line", c.line)?;
        t.raw_push(e)?;
    }
    Ok(t)
}

/// `_kit.reset()`: drops the kit (apps, fakes, tasks, timers), empties every shared dict and
/// cache, and puts the clock back to where kits start.
fn lua_reset(lua: &Lua, (): ()) -> LuaResult<bool> {
    let old = lua
        .app_data_ref::<Slot>()
        .and_then(|s| s.0.borrow_mut().take());
    if let Some(k) = old {
        if k.driving.get() {
            return Err(LuaError::runtime(
                "t.reset: cannot reset from inside a running kit",
            ));
        }
        drop(k);
    }
    crate::shared::store::flush_all_dicts();
    crate::shared::cache::flush_all_caches();
    Ok(true)
}

/// `_kit.start()`: starts the kit (its clock, its log capture) if it has not started.
fn lua_start(lua: &Lua, (): ()) -> LuaResult<bool> {
    kit(lua).map(|_| true)
}

/// `luaproxy._kit`.
pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.set("start", lua.create_function(lua_start)?)?;
    t.set("load", lua.create_function(lua_load)?)?;
    t.set("requests", lua.create_function(lua_requests)?)?;
    t.set("listen", lua.create_function(lua_listen)?)?;
    t.set("advance", lua.create_function(lua_advance)?)?;
    t.set("logs", lua.create_function(lua_logs)?)?;
    t.set("reset", lua.create_function(lua_reset)?)?;
    Ok(t)
}
