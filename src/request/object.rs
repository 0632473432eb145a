//! The request object a handler receives: a light userdata naming a live request, its
//! methods (the hot ones as C functions over their mlua versions), and the list of live
//! requests.

use super::{BodyState, ReqInner};
use crate::capi::{fallback, push_bytes};
use crate::h1::rules::{self};
use crate::headers_lua::{args_table, header_joined, header_name, headers_table, set_header};
use hyper::{Method, Uri, Version};
use mlua::ffi;
use mlua::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::raw::c_int;
use std::rc::Rc;

/// A request as the method bodies see it (the state behind a live request object).
pub struct Request(pub Rc<ReqInner>);

// ---------------------------------------------------------------------------------------
// The request object
//
// What a handler receives is a light userdata whose value is the request's id: making it
// allocates nothing, and Lua's collector has nothing to finalize (a full userdata cost an
// mlua type lookup to make and a finalizer run per request; a table `{ id }` cost as much to
// make through mlua's protected calls). Light userdata share one metatable per Lua state;
// luaproxy sets it (`__index` = the request methods) when a state first handles a request.
// Requests being handled are listed here by id (ids are never reused): a method called on a
// request that has ended returns `nil, "request has ended"`. The hot methods are plain C
// functions that read the id off the stack; anything they do not handle goes to the mlua
// function kept as their upvalue, which keeps every error message and edge case in one place.

thread_local! {
    static LIVE: RefCell<HashMap<i64, Rc<ReqInner>, ahash::RandomState>> =
        RefCell::new(HashMap::with_hasher(ahash::RandomState::new()));
    static NEXT_ID: Cell<i64> = const { Cell::new(1) };
}

/// Makes the Lua object of a request being handled; `clear_live(id)` ends it. Call
/// `install_metatable` once per Lua state first.
pub fn request_object(inner: &Rc<ReqInner>) -> (LuaValue, i64) {
    let id = NEXT_ID.with(|n| {
        let id = n.get();
        n.set(id + 1);
        id
    });
    LIVE.with(|m| m.borrow_mut().insert(id, inner.clone()));
    (
        LuaValue::LightUserData(LuaLightUserData(id as usize as *mut std::ffi::c_void)),
        id,
    )
}

/// Takes a request off the list when its handling ends.
pub fn clear_live(id: i64) {
    LIVE.with(|m| m.borrow_mut().remove(&id));
}

/// What a Lua value passed as a request stands for: `Err` when it is not a request object,
/// `Ok(None)` when the request has ended.
pub fn request_of(v: &LuaValue) -> Result<Option<Rc<ReqInner>>, NotARequest> {
    let LuaValue::LightUserData(p) = v else {
        return Err(NotARequest);
    };
    let id = p.0 as usize as i64;
    if id <= 0 || id >= NEXT_ID.with(Cell::get) {
        return Err(NotARequest);
    }
    Ok(LIVE.with(|m| m.borrow().get(&id).cloned()))
}

/// A value given where a request object belongs is something else.
#[derive(Debug)]
pub struct NotARequest;

/// The live request at stack index `idx`, if it is one.
///
/// # Safety
/// `l` must be a valid Lua state of this thread.
pub unsafe fn live_at(l: *mut ffi::lua_State, idx: c_int) -> Option<Rc<ReqInner>> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        if ffi::lua_type(l, idx) != ffi::LUA_TLIGHTUSERDATA {
            return None;
        }
        let id = ffi::lua_touserdata(l, idx) as usize as i64;
        LIVE.with(|m| m.borrow().get(&id).cloned())
    }
}

pub const ENDED: &str = "request has ended";

/// Registers request methods on a table with mlua's `add_method` shapes, so the method bodies
/// read as they would on a userdata.
pub struct Methods<'a> {
    pub lua: &'a Lua,
    /// The methods table.
    pub t: LuaTable,
    err: Option<LuaError>,
}

fn not_a_request(name: &str) -> LuaError {
    LuaError::runtime(format!(
        "req:{name}: not a request (call it as req:{name}(...))"
    ))
}

impl Methods<'_> {
    fn add_method<A, R, F>(&mut self, name: &'static str, f: F)
    where
        A: FromLuaMulti,
        R: IntoLuaMulti,
        F: Fn(&Lua, &Request, A) -> LuaResult<R> + 'static,
    {
        let r = self
            .lua
            .create_function(
                move |lua, (this, args): (LuaValue, A)| match request_of(&this) {
                    Err(NotARequest) => Err(not_a_request(name)),
                    Ok(None) => (LuaValue::Nil, ENDED).into_lua_multi(lua),
                    Ok(Some(inner)) => f(lua, &Request(inner), args)?.into_lua_multi(lua),
                },
            );
        self.set(name, r);
    }

    pub fn add_async_method<A, R, F, Fut>(&mut self, name: &'static str, f: F)
    where
        A: FromLuaMulti + 'static,
        R: IntoLuaMulti,
        F: Fn(Lua, Request, A) -> Fut + 'static,
        Fut: std::future::Future<Output = LuaResult<R>> + 'static,
    {
        let f = Rc::new(f);
        let r = self
            .lua
            .create_async_function(move |lua, (this, args): (LuaValue, A)| {
                let f = f.clone();
                async move {
                    match request_of(&this) {
                        Err(NotARequest) => Err(not_a_request(name)),
                        Ok(None) => (LuaValue::Nil, ENDED).into_lua_multi(&lua),
                        Ok(Some(inner)) => {
                            let l2 = lua.clone();
                            f(lua, Request(inner), args).await?.into_lua_multi(&l2)
                        }
                    }
                }
            });
        self.set(name, r);
    }

    fn set(&mut self, name: &str, f: LuaResult<LuaFunction>) {
        if self.err.is_some() {
            return;
        }
        if let Err(e) = f.and_then(|f| self.t.raw_set(name, f)) {
            self.err = Some(e);
        }
    }
}

/// Sets this Lua state's light userdata metatable to the request one: `__index` = the
/// methods, the hot ones as C functions over their mlua versions.
/// `more` adds the methods of the layers above (`req:proxy`) to the table.
pub fn install_metatable(
    lua: &Lua,
    more: impl FnOnce(&mut Methods) -> LuaResult<()>,
) -> LuaResult<()> {
    let mut m = Methods {
        lua,
        t: lua.create_table()?,
        err: None,
    };
    add_methods(&mut m);
    more(&mut m)?;
    if let Some(e) = m.err {
        return Err(e);
    }
    let methods = m.t;
    let mt = lua.create_table()?;
    mt.raw_set("__index", &methods)?;
    mt.raw_set("__name", "luaproxy.request")?;
    let fns: [(&std::ffi::CStr, ffi::lua_CFunction); 5] = [
        (c"get_header", raw_get_header),
        (c"get_path", raw_get_path),
        (c"get_method", raw_get_method),
        (c"get_query", raw_get_query),
        (c"ctx", raw_ctx),
    ];
    // SAFETY: plain stack work on tables made above; only memory errors can raise, and
    // exec_raw turns those into a Rust error.
    unsafe {
        lua.exec_raw::<()>((&methods, &mt), |l| {
            for (name, f) in fns {
                ffi::lua_getfield(l, -2, name.as_ptr());
                ffi::lua_pushcclosure(l, f, 1);
                ffi::lua_setfield(l, -3, name.as_ptr());
            }
            ffi::lua_pushlightuserdata(l, std::ptr::null_mut());
            ffi::lua_pushvalue(l, -2);
            ffi::lua_setmetatable(l, -2);
            ffi::lua_pop(l, 1);
        })?;
    }
    Ok(())
}

/// `req:get_header(name)`
unsafe extern "C-unwind" fn raw_get_header(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        if ffi::lua_gettop(l) != 2 || ffi::lua_type(l, 2) != ffi::LUA_TSTRING {
            return fallback(l);
        }
        let Some(inner) = live_at(l, 1) else {
            return fallback(l);
        };
        let mut len = 0;
        let p = ffi::lua_tolstring(l, 2, &mut len);
        let name = std::slice::from_raw_parts(p as *const u8, len);
        let Ok(headers) = inner.headers.try_borrow() else {
            drop(inner);
            return fallback(l);
        };
        // One value goes straight from the header fields into a Lua string (the copy Lua makes
        // cannot raise except on memory exhaustion, which leaks two refcounts at worst); none is
        // nil; repeats are joined by the fallback.
        let found = {
            let mut it = headers.get_all(name);
            match (it.next(), it.next()) {
                (None, _) => 0,
                (Some(v), None) => {
                    push_bytes(l, v);
                    1
                }
                _ => 2,
            }
        };
        drop(headers);
        drop(inner);
        match found {
            0 => {
                ffi::lua_pushnil(l);
                1
            }
            1 => 1,
            _ => fallback(l),
        }
    }
}

/// `req:get_path()`
unsafe extern "C-unwind" fn raw_get_path(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        if ffi::lua_gettop(l) != 1 {
            return fallback(l);
        }
        let Some(inner) = live_at(l, 1) else {
            return fallback(l);
        };
        let (Ok(uri), Ok(path)) = (inner.uri.try_borrow(), inner.path.try_borrow()) else {
            drop(inner);
            return fallback(l);
        };
        push_bytes(l, path.as_deref().unwrap_or(uri.path().as_bytes()));
        drop((uri, path));
        drop(inner);
        1
    }
}

/// `req:get_query()`
unsafe extern "C-unwind" fn raw_get_query(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        if ffi::lua_gettop(l) != 1 {
            return fallback(l);
        }
        let Some(inner) = live_at(l, 1) else {
            return fallback(l);
        };
        let Ok(uri) = inner.uri.try_borrow() else {
            drop(inner);
            return fallback(l);
        };
        match uri.query() {
            Some(q) => push_bytes(l, q.as_bytes()),
            None => ffi::lua_pushnil(l),
        }
        drop(uri);
        drop(inner);
        1
    }
}

/// `req:ctx()`: the table's registry reference pushed, or a new table referenced first.
unsafe extern "C-unwind" fn raw_ctx(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on. The
    // request stays on the live list for this whole call (only its end takes it off), so
    // looking it up again after the raising calls finds the same one.
    unsafe {
        if ffi::lua_gettop(l) != 1 {
            return fallback(l);
        }
        let Some(inner) = live_at(l, 1) else {
            return fallback(l);
        };
        let r = inner.ctx_ref.get();
        drop(inner);
        if r != 0 {
            ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, r as _);
            return 1;
        }
        ffi::lua_createtable(l, 0, 4);
        ffi::lua_pushvalue(l, -1);
        let r = ffi::luaL_ref(l, ffi::LUA_REGISTRYINDEX);
        match live_at(l, 1) {
            Some(inner) => inner.ctx_ref.set(r),
            None => ffi::luaL_unref(l, ffi::LUA_REGISTRYINDEX, r),
        }
        1
    }
}

/// `req:get_method()`
unsafe extern "C-unwind" fn raw_get_method(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        if ffi::lua_gettop(l) != 1 {
            return fallback(l);
        }
        let Some(inner) = live_at(l, 1) else {
            return fallback(l);
        };
        let Ok(m) = inner.method.try_borrow() else {
            drop(inner);
            return fallback(l);
        };
        push_bytes(l, m.as_str().as_bytes());
        drop(m);
        drop(inner);
        1
    }
}

fn set_uri(inner: &ReqInner, new_path: Option<&str>, query: Option<Option<&str>>) -> LuaResult<()> {
    let path = new_path;
    let cur = inner.uri.borrow().clone();
    let path = path.unwrap_or(cur.path());
    let query = match query {
        Some(q) => q,
        None => cur.query(),
    };
    let s = match query {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_string(),
    };
    let uri: Uri = s
        .parse()
        .map_err(|_| LuaError::runtime(format!("invalid request target '{s}'")))?;
    if new_path.is_some() {
        *inner.path.borrow_mut() = None;
    }
    *inner.uri.borrow_mut() = uri;
    Ok(())
}

fn add_methods(m: &mut Methods) {
    {
        // req:get_method() -> "GET"
        m.add_method("get_method", |_, this, ()| {
            Ok(this.0.method.borrow().as_str().to_string())
        });
        // req:set_method(method) -> true (for the upstream request)
        m.add_method("set_method", |_, this, method: String| {
            let m = Method::from_bytes(method.as_bytes())
                .map_err(|_| LuaError::runtime(format!("invalid method '{method}'")))?;
            *this.0.method.borrow_mut() = m;
            Ok(true)
        });
        // req:get_path() -> "/a/b": normalized like nginx's $uri (decoded, dot segments
        // resolved, slashes merged), no query string
        m.add_method("get_path", |lua, this, ()| match &*this.0.path.borrow() {
            Some(p) => lua.create_string(p),
            None => lua.create_string(this.0.uri.borrow().path()),
        });
        // req:set_path(path) -> true
        m.add_method("set_path", |_, this, path: String| {
            if !path.starts_with('/') {
                return Err(LuaError::runtime("req:set_path: path must start with '/'"));
            }
            set_uri(&this.0, Some(&path), None)?;
            Ok(true)
        });
        // req:get_uri() -> "/a/b?x=1" (ngx.var.request_uri)
        m.add_method("get_uri", |_, this, ()| {
            let u = this.0.uri.borrow();
            Ok(u.path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()))
        });
        // req:get_query() -> "x=1" or nil (ngx.var.args)
        m.add_method("get_query", |_, this, ()| {
            Ok(this.0.uri.borrow().query().map(str::to_string))
        });
        // req:set_query(q) -> true; nil or "" removes it
        m.add_method("set_query", |_, this, q: Option<String>| {
            set_uri(&this.0, None, Some(q.as_deref()))?;
            Ok(true)
        });
        // req:get_uri_args(max?) -> { key = value | true | {values} } (ngx.req.get_uri_args)
        m.add_method("get_uri_args", |lua, this, max: Option<usize>| {
            let q = this
                .0
                .uri
                .borrow()
                .query()
                .unwrap_or("")
                .as_bytes()
                .to_vec();
            args_table(lua, rules::parse_query(&q), max.unwrap_or(100))
        });
        // req:get_header(name) -> value or nil; case-insensitive; repeats joined with ", "
        m.add_method(
            "get_header",
            |lua, this, name: LuaString| match header_joined(
                &this.0.headers.borrow(),
                &name.as_bytes(),
            ) {
                Some(v) => Ok(Some(lua.create_string(&v)?)),
                None => Ok(None),
            },
        );
        // req:get_headers() -> { lowercase-name = value | {values} } (ngx.req.get_headers)
        m.add_method("get_headers", |lua, this, ()| {
            headers_table(lua, &this.0.headers.borrow())
        });
        // req:set_header(name, value | {values} | nil) -> true
        m.add_method(
            "set_header",
            |_, this, (name, value): (String, LuaValue)| {
                set_header(this.0.headers.borrow_mut().map_mut(), &name, &value)?;
                Ok(true)
            },
        );
        // req:clear_header(name) -> true
        m.add_method("clear_header", |_, this, name: String| {
            header_name(&name)?;
            this.0.headers.borrow_mut().remove(name.as_bytes());
            Ok(true)
        });
        // req:get_remote_addr() -> "127.0.0.1" (ngx.var.remote_addr)
        m.add_method("get_remote_addr", |_, this, ()| {
            Ok(this.0.client_ip().to_string())
        });
        // req:get_remote_port() -> 54321
        m.add_method("get_remote_port", |_, this, ()| Ok(this.0.peer.port()));
        // req:get_http_version() -> 1.1
        m.add_method("get_http_version", |_, this, ()| {
            Ok(match this.0.version {
                Version::HTTP_10 => 1.0,
                Version::HTTP_09 => 0.9,
                _ => 1.1,
            })
        });
        // req:get_request_id() -> 32 hex digits naming this request (nginx's $request_id): the
        // same id the error log and a 500's X-Request-Id give
        m.add_method("get_request_id", |_, this, ()| Ok(this.0.request_id()));
        // req:ctx() -> a table for this request only, the same one on every call (ngx.ctx):
        // what one part of a policy leaves for another (a checked API key, timings)
        m.add_method("ctx", |lua, this, ()| this.0.ctx_or_new(lua));
        // req:elapsed() -> seconds since the request head arrived
        m.add_method("elapsed", |_, this, ()| {
            Ok(crate::clock::now()
                .saturating_duration_since(this.0.start)
                .as_secs_f64())
        });
        // req:get_upstream() -> "host:port" the request was proxied to, or nil
        m.add_method("get_upstream", |_, this, ()| {
            Ok(this.0.attempts.borrow().last().map(|a| a.addr.to_string()))
        });
        // body, err = req:read_body(): the whole body as a string ("" when there is none)
        m.add_async_method("read_body", |lua, this, ()| async move {
            crate::runtime::check_loop("req:read_body")?;
            match this.0.read_body().await {
                Ok(b) => Ok((Some(lua.create_string(&b)?), None)),
                Err(e) => Ok((None, Some(e))),
            }
        });
        // req:get_body_data() -> the body if read_body() already ran, else nil
        m.add_method("get_body_data", |lua, this, ()| {
            match &*this.0.body.borrow() {
                BodyState::Buffered(b) => Ok(Some(lua.create_string(b)?)),
                _ => Ok(None),
            }
        });
        // args, err = req:get_post_args(max?): form fields of an
        // application/x-www-form-urlencoded body ({} for other content types)
        m.add_async_method(
            "get_post_args",
            |lua, this, max: Option<usize>| async move {
                crate::runtime::check_loop("req:get_post_args")?;
                let is_form = this
                    .0
                    .headers
                    .borrow()
                    .get(b"content-type")
                    .map(|v| {
                        v.get(..33).is_some_and(|p| {
                            p.eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
                        })
                    })
                    .unwrap_or(false);
                let body = match this.0.read_body().await {
                    Ok(b) => b,
                    Err(e) => return Ok((None, Some(e))),
                };
                let pairs = if is_form {
                    rules::parse_query(&body)
                } else {
                    Vec::new()
                };
                Ok((Some(args_table(&lua, pairs, max.unwrap_or(100))?), None))
            },
        );
    }
}
