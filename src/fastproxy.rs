//! `req:proxy(addr)` without mlua's async-function machinery, for the call every proxying
//! policy makes once per request.
//!
//! mlua runs an async Rust function from Lua by boxing its future into a fresh userdata,
//! calling through its error-handling trampoline on every poll, and leaving the userdata for
//! the collector (~2.3k instructions per proxied request: BENCHMARKS.md, session 4). Here the exchange's
//! future lives in the request itself (`ReqInner::proxy`), two plain C functions start and
//! poll it, and a small Lua wrapper yields mlua's own "pending" marker between polls, so
//! the handler's coroutine is suspended and resumed by the same `AsyncThread` as before.
//!
//! The C functions poll with the waker of the request handler being polled right now
//! (`driving`). Anywhere else (a spawned task, a timer, a coroutine the loop does not drive
//! through `driving`), and for any call shape the fast path does not take (options, a
//! request that has ended, not a request), the wrapper calls the mlua method instead, which
//! behaves the same.

use crate::request::{live_at, ProxyCall, ReqInner};
use crate::upstream::Options;
use mlua::ffi;
use mlua::prelude::*;
use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::os::raw::c_int;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

thread_local! {
    /// The waker of the request handler this thread is polling, while it polls it.
    static WAKER: Cell<*const Waker> = const { Cell::new(std::ptr::null()) };
}

/// Runs `f` (a request handler's call into Lua) so that a `req:proxy` it makes can take the
/// fast path: while `f` is polled, its waker is the one the C functions poll with.
pub async fn driving<F: Future>(f: F) -> F::Output {
    struct Restore(*const Waker);
    impl Drop for Restore {
        fn drop(&mut self) {
            WAKER.with(|w| w.set(self.0));
        }
    }
    let mut f = pin!(f);
    poll_fn(|cx| {
        let _restore = Restore(WAKER.with(|w| w.replace(cx.waker())));
        f.as_mut().poll(cx)
    })
    .await
}

/// Polls the request's running exchange once; `true` when it has finished (its outcome is
/// then in `ProxyCall::Done`).
fn poll_call(inner: &ReqInner, waker: &Waker) -> bool {
    let mut call = inner.proxy.borrow_mut();
    let ProxyCall::Running(fut) = &mut *call else {
        return true;
    };
    let mut cx = Context::from_waker(waker);
    // A panic must not unwind through Lua's C frames.
    let polled =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)));
    let out = match polled {
        Ok(Poll::Pending) => return false,
        Ok(Poll::Ready(out)) => out,
        Err(_) => Err(LuaError::runtime("req:proxy: internal error (panic)")),
    };
    *call = ProxyCall::Done(out);
    true
}

/// `done = start(req, addr)`: `nil` when the fast path does not apply (the wrapper then calls
/// the mlua method, which also raises the misuse errors); else whether the exchange already
/// finished.
unsafe extern "C-unwind" fn start(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        match try_start(l) {
            None => ffi::lua_pushnil(l),
            Some(done) => ffi::lua_pushboolean(l, done as c_int),
        }
        1
    }
}

unsafe fn try_start(l: *mut ffi::lua_State) -> Option<bool> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let waker = WAKER.with(Cell::get);
        if waker.is_null() || ffi::lua_gettop(l) != 2 || ffi::lua_type(l, 2) != ffi::LUA_TSTRING {
            return None;
        }
        let inner = live_at(l, 1)?;
        if !matches!(*inner.proxy.borrow(), ProxyCall::Idle) {
            return None;
        }
        let mut len = 0;
        let p = ffi::lua_tolstring(l, 2, &mut len);
        let addr = std::str::from_utf8(std::slice::from_raw_parts(p as *const u8, len)).ok()?;
        let opts = Options::defaults(&inner.limits);
        let fut = crate::proxy::proxy_exchange(inner.clone(), addr.to_string(), opts);
        *inner.proxy.borrow_mut() = ProxyCall::Running(Box::pin(fut));
        Some(poll_call(&inner, &*waker))
    }
}

/// `done = poll(req)`: polls the exchange again after the handler was woken.
unsafe extern "C-unwind" fn poll(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let waker = WAKER.with(Cell::get);
        let done = match live_at(l, 1) {
            // `take` answers for a request that has ended.
            None => true,
            Some(inner) if waker.is_null() => {
                // Resumed by something other than its handler's poll: nothing can poll it now.
                *inner.proxy.borrow_mut() = ProxyCall::Done(Err(LuaError::runtime(
                    "req:proxy: resumed outside its request handler",
                )));
                true
            }
            Some(inner) => poll_call(&inner, &*waker),
        };
        ffi::lua_pushboolean(l, done as c_int);
        1
    }
}

/// `res, err = take(req)`: the finished exchange's result, as `req:proxy` returns it.
fn take(lua: &Lua, req: LuaValue) -> LuaResult<(Option<LuaAnyUserData>, Option<String>)> {
    let inner = match crate::request::request_of(&req) {
        Ok(Some(inner)) => inner,
        _ => return Ok((None, Some(crate::request::ENDED.to_string()))),
    };
    let out = std::mem::take(&mut *inner.proxy.borrow_mut());
    match out {
        ProxyCall::Done(Ok(Ok(res))) => Ok((Some(lua.create_userdata(res)?), None)),
        ProxyCall::Done(Ok(Err(e))) => Ok((None, Some(e))),
        ProxyCall::Done(Err(e)) => Err(e),
        _ => Err(LuaError::runtime("req:proxy: no finished call")),
    }
}

/// Replaces `methods.proxy` (the mlua async method) with the fast-path wrapper, which keeps
/// the mlua method for everything the fast path does not take.
pub fn install(lua: &Lua, methods: &LuaTable) -> LuaResult<()> {
    let slow: LuaFunction = methods.raw_get("proxy")?;
    // SAFETY: both are C functions following the Lua calling convention; they raise nothing.
    let (start, poll) = unsafe { (lua.create_c_function(start)?, lua.create_c_function(poll)?) };
    let take = lua.create_function(take)?;
    let coroutine: LuaTable = lua.globals().get("coroutine")?;
    let yield_fn: LuaFunction = coroutine.get("yield")?;
    let wrapper: LuaFunction = lua
        .load(
            r#"
            local start, poll, take, slow, yield, PENDING = ...
            return function(req, addr, opts)
                local done
                if opts == nil then done = start(req, addr) end
                if done == nil then return slow(req, addr, opts) end
                while not done do
                    yield(PENDING)
                    done = poll(req)
                end
                return take(req)
            end
            "#,
        )
        .set_name("=luaproxy.proxy")
        .call((start, poll, take, slow, yield_fn, Lua::poll_pending()))?;
    methods.raw_set("proxy", wrapper)
}
