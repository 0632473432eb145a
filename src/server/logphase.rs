//! The end of every request, however it ended (response sent, client gone, head rejected,
//! policy error): luaproxy's own metrics, the access log line, and the policy's log phase,
//! `log(info, ctx)` (nginx's `log_by_lua`, with nginx's variable names in `info`).
//!
//! The log phase runs after the last byte was written, so it never delays its own response.
//! Unlike nginx's, it may call async functions: it is polled once in place (a policy that
//! only counts or logs costs no task), and if it waits on something it goes on as a task of
//! its own, so the connection's next request does not wait for it either.

use crate::accesslog::{CtxValues, Facts, Format, Upstream, Writer};
use crate::h1::headers::Headers;
use crate::metrics::builtin;
use crate::request::ReqInner;
use crate::runtime;
use hyper::Version;
use mlua::prelude::*;
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often each worker writes out its buffered access log lines (when fewer than
/// `accesslog::FLUSH_AT` bytes came in meanwhile); nginx's `flush=` is often set to 1s-5s.
pub(super) const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// What a generation does at the end of each request besides counting it.
pub(super) struct LogPhase {
    /// The policy's `log(info, ctx)`, if it has one.
    pub(super) log_fn: Option<LuaFunction>,
    /// The access log, unless `access_log = "off"`.
    pub(super) access: Option<AccessLog>,
    /// `lua_budget`, for the log function's calls.
    pub(super) budget: Duration,
}

/// A generation's access log: its format and this thread's buffered writer (shared with the
/// task that flushes it every `FLUSH_EVERY`).
pub(super) struct AccessLog {
    format: Format,
    writer: Rc<RefCell<Writer>>,
    ctx: RefCell<CtxValues>,
    /// The `$ctx_NAME` names as Lua strings, referenced from the VM's registry once, so
    /// reading them per request allocates nothing (and so cannot raise).
    ctx_names: Vec<std::os::raw::c_int>,
    uses_request_id: bool,
}

impl AccessLog {
    /// This thread's writer to `template`'s destination; with a task flushing it until the
    /// generation (`life`) stops serving or goes.
    pub(super) fn new(
        lua: &Lua,
        format: Format,
        template: &Writer,
        life: watch::Receiver<u8>,
    ) -> LuaResult<AccessLog> {
        let mut ctx_names = Vec::new();
        for name in format.ctx_names() {
            // SAFETY: protected raw stack work on the VM's own stack: the name pushed as the
            // argument is referenced from the registry, its reference pushed back.
            let r = unsafe {
                lua.exec_raw::<i64>(name.as_str(), |l| {
                    let r = mlua::ffi::luaL_ref(l, mlua::ffi::LUA_REGISTRYINDEX);
                    mlua::ffi::lua_pushinteger(l, r as _);
                })
            }?;
            ctx_names.push(r as std::os::raw::c_int);
        }
        let writer = Rc::new(RefCell::new(template.another()));
        tokio::task::spawn_local(flusher(writer.clone(), life));
        Ok(AccessLog {
            uses_request_id: format.uses("request_id"),
            format,
            writer,
            ctx: RefCell::new(CtxValues::new()),
            ctx_names,
        })
    }
}

async fn flusher(writer: Rc<RefCell<Writer>>, mut life: watch::Receiver<u8>) {
    loop {
        tokio::select! {
            _ = crate::clock::sleep(FLUSH_EVERY) => writer.borrow_mut().flush(),
            changed = life.changed() => {
                if changed.is_err() || *life.borrow() != runtime::RUNNING {
                    break;
                }
            }
        }
    }
    // Lines of requests still finishing go out when the last holder drops the writer.
    writer.borrow_mut().flush();
}

/// What the connection knows of a request that has ended.
pub(super) struct Ended<'a> {
    /// `None`: the head was rejected before any policy saw it.
    pub(super) req: Option<&'a ReqInner>,
    /// The request line as received (the policy may have changed what went upstream).
    pub(super) method: &'a str,
    pub(super) target: &'a str,
    pub(super) version: Version,
    pub(super) start: Instant,
    pub(super) status: u16,
    pub(super) body_bytes_sent: u64,
    pub(super) bytes_sent: u64,
    pub(super) request_length: u64,
    pub(super) peer: SocketAddr,
    pub(super) peer_ip: &'a str,
    pub(super) response_headers: Option<&'a Headers>,
    pub(super) connection: u64,
    pub(super) connection_requests: u64,
}

/// The policy's log phase, when it must go on after its first poll.
pub(super) type Pending = Pin<Box<dyn Future<Output = ()>>>;

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        _ => "HTTP/1.1",
    }
}

fn secs(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64())
}

/// Counts the request, logs its access line, and starts the policy's `log(info, ctx)`:
/// `Some` when that has to go on (the caller polls it once, then spawns it).
pub(super) fn ended(lua: &Lua, w: &LogPhase, e: &Ended) -> Option<Pending> {
    let attempts = e.req.map(|r| r.attempts.borrow());
    let attempts: &[Rc<crate::upstream::Attempt>] = attempts.as_deref().map_or(&[], |a| a);
    for a in attempts {
        // An exchange the client's going away cut short ends now.
        a.ended();
        if let Some(t) = a.since_start(&a.end) {
            if a.status.get().is_some() {
                builtin::upstream_time(&a.addr, t.as_secs_f64());
            }
        }
    }
    builtin::request_done(e.status, attempts.last().map_or("", |a| &a.addr));
    if w.access.is_none() && w.log_fn.is_none() {
        return None;
    }
    let request_time = crate::clock::now().saturating_duration_since(e.start);
    let ups: Vec<Upstream> = attempts
        .iter()
        .map(|a| Upstream {
            addr: &a.addr,
            status: a.status.get(),
            connect_time: a.since_start(&a.connected),
            header_time: a.since_start(&a.header),
            response_time: a.since_start(&a.end),
        })
        .collect();
    if let Some(log) = &w.access {
        access_line(lua, log, e, &ups, request_time);
    }
    let f = w.log_fn.clone()?;
    match log_args(lua, e, &ups, request_time) {
        Ok(args) => Some(run_log_fn(lua, w.budget, f, args, e)),
        Err(err) => {
            crate::log!(ERR, "log phase not run: {err}");
            None
        }
    }
}

/// The `$ctx_NAME` values: `ctx[NAME]` for each name. Strings as they are, integers and
/// floats as Lua prints them (`%.14g`), booleans as `true`/`false`, anything else `-`.
///
/// Raw and unprotected, on the VM's main stack between Lua calls: every operation here is
/// one that cannot raise (registry and raw table reads of existing keys, type checks,
/// `lua_tolstring` on a string, `lua_checkstack`), so no protected call is needed (one cost
/// ~1.2k instructions per request).
fn ctx_values(
    lua: &Lua,
    r: std::os::raw::c_int,
    names: &[std::os::raw::c_int],
    out: &mut CtxValues,
) {
    use mlua::ffi;
    lua.exec_raw_lua(|raw| {
        let l = raw.state();
        // SAFETY: see above; the stack is left as found (each value popped before the next).
        unsafe {
            if ffi::lua_checkstack(l, 3) == 0 {
                names.iter().for_each(|_| out.push(None));
                return;
            }
            ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, r as _);
            for &name in names {
                ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, name as _);
                ffi::lua_rawget(l, -2);
                match ffi::lua_type(l, -1) {
                    ffi::LUA_TSTRING => {
                        let mut len = 0;
                        let p = ffi::lua_tolstring(l, -1, &mut len);
                        out.push(Some(std::slice::from_raw_parts(p as *const u8, len)));
                    }
                    ffi::LUA_TNUMBER => {
                        let mut isint = 0;
                        let i = ffi::lua_tointegerx(l, -1, &mut isint);
                        let text = if isint != 0 {
                            i.to_string()
                        } else {
                            lua_number(ffi::lua_tonumberx(l, -1, std::ptr::null_mut()))
                        };
                        out.push(Some(text.as_bytes()));
                    }
                    ffi::LUA_TBOOLEAN => out.push(Some(if ffi::lua_toboolean(l, -1) != 0 {
                        b"true"
                    } else {
                        b"false"
                    })),
                    _ => out.push(None),
                }
                ffi::lua_pop(l, 1);
            }
            ffi::lua_pop(l, 1);
        }
    })
}

/// A float as Lua's `tostring` prints it (`%.14g`).
fn lua_number(n: f64) -> String {
    if n.is_nan() {
        return if n.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if n.is_infinite() {
        return if n > 0.0 { "inf" } else { "-inf" }.into();
    }
    let s = format!("{n:.13e}");
    let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-5..14).contains(&exp) {
        let decimals = (13 - exp).max(0) as usize;
        let t = format!("{n:.decimals$}");
        let t = if t.contains('.') {
            t.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            t
        };
        return t;
    }
    let mant = mant.trim_end_matches('0').trim_end_matches('.');
    format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
}

fn access_line(lua: &Lua, log: &AccessLog, e: &Ended, ups: &[Upstream], request_time: Duration) {
    let mut ctx = log.ctx.borrow_mut();
    ctx.clear();
    let names = log.format.ctx_names();
    if !names.is_empty() {
        match e.req.map(|r| r.ctx_ref.get()).unwrap_or(0) {
            0 => names.iter().for_each(|_| ctx.push(None)),
            r => ctx_values(lua, r, &log.ctx_names, &mut ctx),
        }
    }
    let id = match e.req {
        Some(r) if log.uses_request_id => r.request_id(),
        Some(r) => r.request_id_if_made().unwrap_or_default(),
        None => String::new(),
    };
    let headers = e.req.map(|r| r.headers.borrow());
    let target = e.target;
    let now = e.req.map(|r| (r.uri.borrow(), r.path.borrow()));
    let uri = match &now {
        Some((_, p)) if p.is_some() => {
            std::str::from_utf8(p.as_deref().unwrap_or_default()).unwrap_or(target)
        }
        Some((u, _)) => u.path(),
        None => "",
    };
    let facts = Facts {
        remote_addr: e.peer_ip,
        remote_port: e.peer.port(),
        time: crate::clock::system_now(),
        method: e.method,
        request_uri: target,
        uri,
        protocol: protocol(e.version),
        status: e.status,
        body_bytes_sent: e.body_bytes_sent,
        bytes_sent: e.bytes_sent,
        request_length: e.request_length,
        request_time,
        upstreams: ups,
        request_id: &id,
        connection: e.connection,
        connection_requests: e.connection_requests,
        request_headers: headers.as_deref(),
        response_headers: e.response_headers,
        ctx: &ctx,
    };
    log.writer.borrow_mut().log(&log.format, &facts);
}

/// `info` (nginx's names; the `upstream_*` of the last attempt, every attempt in
/// `info.upstreams`) and `ctx` (the request's `req:ctx()`, or a fresh table).
fn log_args(
    lua: &Lua,
    e: &Ended,
    ups: &[Upstream],
    request_time: Duration,
) -> LuaResult<LuaMultiValue> {
    let info = lua.create_table_with_capacity(0, 24)?;
    info.raw_set("status", e.status)?;
    info.raw_set("body_bytes_sent", e.body_bytes_sent)?;
    info.raw_set("bytes_sent", e.bytes_sent)?;
    info.raw_set("request_length", e.request_length)?;
    info.raw_set("request_time", request_time.as_secs_f64())?;
    info.raw_set("remote_addr", e.peer_ip)?;
    info.raw_set("remote_port", e.peer.port())?;
    let request = if e.method.is_empty() {
        String::new()
    } else {
        format!("{} {} {}", e.method, e.target, protocol(e.version))
    };
    info.raw_set("request", request)?;
    info.raw_set("request_method", e.method)?;
    info.raw_set("request_uri", e.target)?;
    info.raw_set("server_protocol", protocol(e.version))?;
    info.raw_set("connection", e.connection)?;
    info.raw_set("connection_requests", e.connection_requests)?;
    if let Some(r) = e.req {
        info.raw_set("request_id", r.request_id())?;
        let path = match &*r.path.borrow() {
            Some(p) => lua.create_string(p)?,
            None => lua.create_string(r.uri.borrow().path())?,
        };
        info.raw_set("uri", path)?;
    }
    if let Some(last) = ups.last() {
        info.raw_set("upstream_addr", last.addr)?;
        info.raw_set("upstream_status", last.status)?;
        info.raw_set("upstream_connect_time", secs(last.connect_time))?;
        info.raw_set("upstream_header_time", secs(last.header_time))?;
        info.raw_set("upstream_response_time", secs(last.response_time))?;
        let list = lua.create_table_with_capacity(ups.len(), 0)?;
        for u in ups {
            let t = lua.create_table_with_capacity(0, 5)?;
            t.raw_set("addr", u.addr)?;
            t.raw_set("status", u.status)?;
            t.raw_set("connect_time", secs(u.connect_time))?;
            t.raw_set("header_time", secs(u.header_time))?;
            t.raw_set("response_time", secs(u.response_time))?;
            list.raw_push(t)?;
        }
        info.raw_set("upstreams", list)?;
    }
    let ctx = match e.req {
        Some(r) => r.ctx_or_new(lua)?,
        None => lua.create_table()?,
    };
    let mut args = LuaMultiValue::new();
    args.push_back(LuaValue::Table(info));
    args.push_back(LuaValue::Table(ctx));
    Ok(args)
}

fn run_log_fn(
    lua: &Lua,
    budget: Duration,
    f: LuaFunction,
    args: LuaMultiValue,
    e: &Ended,
) -> Pending {
    let lua = lua.clone();
    let line = format!("\"{} {}\"", e.method, e.target);
    let ip = e.peer.ip();
    Box::pin(async move {
        if let Err(msg) = runtime::call_protected_budgeted(&lua, f, args, budget).await {
            builtin::lua_error("log");
            crate::log!(
                ERR,
                "error in log phase: {msg}, client: {ip}, request: {line}"
            );
        }
    })
}

/// Polls the log phase once here; if it waits on something, it goes on as a task.
pub(super) async fn finish(pending: Option<Pending>) {
    let Some(mut fut) = pending else { return };
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    if first.is_pending() {
        tokio::task::spawn_local(fut);
    }
}

/// luaproxy's own metrics whose values live elsewhere, read when rendered (once per
/// process).
pub(super) fn register_metrics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        builtin::register();
        builtin::gauge_fn(
            builtin::IN_FLIGHT,
            "Requests being handled now (head read, response not yet written)",
            &[],
            |emit| emit(&[], builtin::IN_FLIGHT_COUNT.sum() as f64),
        );
        builtin::gauge_fn(
            builtin::CONNECTIONS,
            "Client connections open now",
            &[],
            |emit| emit(&[], builtin::CONNECTION_COUNT.sum() as f64),
        );
        builtin::gauge_fn(
            "luaproxy_shared_dict_bytes",
            "Shared dict memory: capacity and bytes used, by dict",
            &["dict", "kind"],
            |emit| {
                crate::shared::store::each_dict(|name, capacity, used| {
                    emit(&[name, "capacity"], capacity as f64);
                    emit(&[name, "used"], used as f64);
                })
            },
        );
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn floats_print_as_lua_prints_them() {
        for (n, want) in [
            (0.5, "0.5"),
            (1.0 / 3.0, "0.33333333333333"),
            (1e100, "1e+100"),
            (123456.789, "123456.789"),
            (-2.5e-7, "-2.5e-07"),
            (f64::INFINITY, "inf"),
            (100.0, "100"),
        ] {
            assert_eq!(super::lua_number(n), want, "{n}");
        }
    }
}
