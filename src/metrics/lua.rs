//! `luaproxy.metrics`: the Lua surface of the process's metrics (`registry.rs`), in the shape
//! of nginx-lua-prometheus: `counter`, `gauge` and `histogram` register (or find) a metric
//! and return its object; `render` gives the exposition of every metric, whichever worker
//! made it.
//!
//! A metric object is a table `{ [1] = id }` with one metatable per kind and Lua state (as
//! dict objects are). The update methods (`c:inc`, `g:set`, `g:inc`, `h:observe`) are plain C
//! functions: they read the value and the label values off the stack into a per-thread key
//! buffer, find the series in a per-thread cache (metric id -> label values -> series
//! handle; no lock, no shared write but the update itself) and update its atomics. A series
//! this thread has not used yet is found or made in the registry once. `del`/`reset` bump the
//! metric's epoch, which makes every thread's cache of it start again.
//!
//! The raw functions keep capi.rs's rules: every Lua call that can raise (only
//! `lua_tolstring` on a number label, by a memory error) comes before any borrow is taken,
//! and errors are raised after every Rust value is dropped (`raise`).

use crate::capi::{raise, RawResult};
use crate::metrics::registry::{self, registry, Kind, Metric, Series, SeriesCache};
use mlua::ffi;
use mlua::prelude::*;
use std::cell::{Cell, RefCell};
use std::os::raw::c_int;
use std::sync::Arc;

const METATABLE_KEYS: [&str; 3] = [
    "luaproxy.metrics.counter",
    "luaproxy.metrics.gauge",
    "luaproxy.metrics.histogram",
];

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Counter => 0,
        Kind::Gauge => 1,
        Kind::Histogram => 2,
    }
}

thread_local! {
    /// Indexed by metric id.
    static LOCAL: RefCell<Vec<Option<SeriesCache>>> = const { RefCell::new(Vec::new()) };
    /// The label values of the call being made, each as a 4-byte length and its bytes. Taken
    /// out while in use: a memory error while it is out loses the buffer, nothing else.
    static KEY: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on this thread's entry for metric `id`, made on first use. `None` when no metric
/// has that id.
fn with_local<R>(id: usize, f: impl FnOnce(&mut SeriesCache) -> R) -> Option<R> {
    LOCAL.with(|c| {
        let mut c = c.borrow_mut();
        if c.get(id).is_none_or(|l| l.is_none()) {
            let metric = registry().get(id)?;
            if c.len() <= id {
                c.resize_with(id + 1, || None);
            }
            c[id] = Some(SeriesCache::new(metric));
        }
        c[id].as_mut().map(f)
    })
}

// ---------------------------------------------------------------------------------------
// The raw C functions

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Inc,
    Set,
    Observe,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Inc => "inc",
            Op::Set => "set",
            Op::Observe => "observe",
        }
    }
}

#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

/// The metric id in `self` (argument 1), if it is a metric object.
unsafe fn self_id(l: *mut ffi::lua_State) -> Option<usize> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        if ffi::lua_type(l, 1) != ffi::LUA_TTABLE {
            return None;
        }
        ffi::lua_rawgeti(l, 1, 1);
        let mut isnum = 0;
        let i = ffi::lua_tointegerx(l, -1, &mut isnum);
        ffi::lua_pop(l, 1);
        (isnum != 0 && i >= 0).then_some(i as usize)
    }
}

/// Appends the label values of the table at `idx` to `key` (strings as they are, numbers as
/// Lua prints them); their count, or the error.
unsafe fn read_labels(
    l: *mut ffi::lua_State,
    idx: c_int,
    key: &mut Vec<u8>,
) -> Result<usize, String> {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let n = ffi::lua_rawlen(l, idx);
        if n > registry::MAX_LABELS {
            return Ok(n);
        }
        for i in 1..=n {
            ffi::lua_rawgeti(l, idx, i as ffi::lua_Integer);
            match ffi::lua_type(l, -1) {
                ffi::LUA_TSTRING | ffi::LUA_TNUMBER => {
                    // A number becomes a string in place: that copy on the stack, not the
                    // table's value (this may raise a memory error; `key` is then lost).
                    let mut len = 0;
                    let p = ffi::lua_tolstring(l, -1, &mut len);
                    registry::push_key(key, std::slice::from_raw_parts(p as *const u8, len));
                    ffi::lua_pop(l, 1);
                }
                t => {
                    let name = std::ffi::CStr::from_ptr(ffi::lua_typename(l, t))
                        .to_string_lossy()
                        .into_owned();
                    ffi::lua_pop(l, 1);
                    return Err(format!(
                        "label value #{i} is a {name} (strings or numbers only)"
                    ));
                }
            }
        }
        Ok(n)
    }
}

/// `c:inc(value?, label_values?)`, `g:set(value, label_values?)`, `g:inc(value?,
/// label_values?)`, `h:observe(value, label_values?)`.
unsafe fn update(l: *mut ffi::lua_State, kind: Kind, op: Op) -> RawResult {
    // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
    // of capi.rs for C functions Lua calls) is what every operation below relies on.
    unsafe {
        let what = || format!("{}:{}", kind.as_str(), op.name());
        let not_a = || {
            format!(
                "{0}: not a {1} (call it as {1}:{2}(...))",
                what(),
                kind.as_str(),
                op.name()
            )
        };
        let id = self_id(l).ok_or_else(not_a)?;
        let v = match ffi::lua_type(l, 2) {
            ffi::LUA_TNIL | ffi::LUA_TNONE if op == Op::Inc => Num::Int(1),
            ffi::LUA_TNUMBER if ffi::lua_isinteger(l, 2) != 0 => {
                Num::Int(ffi::lua_tointegerx(l, 2, std::ptr::null_mut()))
            }
            ffi::LUA_TNUMBER => Num::Float(ffi::lua_tonumberx(l, 2, std::ptr::null_mut())),
            _ => return Err(format!("{}: value must be a number", what())),
        };
        let bad_value = match (kind, v) {
            (Kind::Counter, Num::Int(i)) => i < 0,
            (Kind::Counter, Num::Float(f)) => !(f >= 0.0 && f.is_finite()),
            (Kind::Histogram, Num::Float(f)) => f.is_nan(),
            _ => false,
        };
        if bad_value {
            return Err(match kind {
                Kind::Counter => format!("{}: value must be a finite number >= 0", what()),
                _ => format!("{}: value must not be NaN", what()),
            });
        }
        let mut key = KEY.take();
        key.clear();
        let given = match ffi::lua_type(l, 3) {
            ffi::LUA_TNIL | ffi::LUA_TNONE => Ok(0),
            ffi::LUA_TTABLE => read_labels(l, 3, &mut key),
            _ => Err("label values must be a table".to_string()),
        };
        // From here on, no Lua call: the borrow of this thread's cache is safe to hold.
        let r = given.and_then(|n| {
            with_local(id, |cache| {
                if cache.metric().kind() != kind {
                    return Err(not_a());
                }
                cache.with_encoded(&key, n, |s| apply(s, kind, op, v))
            })
            .unwrap_or_else(|| Err(not_a()))
        });
        KEY.set(key);
        r.map(|()| 0).map_err(|e| {
            if e.starts_with(&what()) {
                e
            } else {
                format!("{}: {e}", what())
            }
        })
    }
}

fn apply(s: &Series, kind: Kind, op: Op, v: Num) {
    match (op, v) {
        (Op::Inc, Num::Int(i)) if kind == Kind::Counter => s.inc_by(i as u64),
        (Op::Inc, Num::Int(i)) => s.inc(i as f64),
        (Op::Inc, Num::Float(f)) => s.inc(f),
        (Op::Set, Num::Int(i)) => s.set(i as f64),
        (Op::Set, Num::Float(f)) => s.set(f),
        (Op::Observe, Num::Int(i)) => s.observe(i as f64),
        (Op::Observe, Num::Float(f)) => s.observe(f),
    }
}

macro_rules! raw_fn {
    ($(#[$doc:meta])* $name:ident, $kind:expr, $op:expr) => {
        $(#[$doc])*
        unsafe extern "C-unwind" fn $name(l: *mut ffi::lua_State) -> c_int {
            // SAFETY: this function's contract (its `# Safety` section, or the raw-code rules
            // of capi.rs for C functions Lua calls) is what every operation below relies on.
            unsafe {
                match update(l, $kind, $op) {
                    Ok(n) => n,
                    Err(msg) => raise(l, msg),
                }
            }
        }
    };
}

raw_fn!(
    /// `c:inc(value?, label_values?)`: adds `value` (default 1, a finite number >= 0) to the
    /// counter's series for `label_values`. Returns nothing; misuse raises.
    raw_counter_inc,
    Kind::Counter,
    Op::Inc
);
raw_fn!(
    /// `g:set(value, label_values?)`: sets the gauge's series. Returns nothing; misuse raises.
    raw_gauge_set,
    Kind::Gauge,
    Op::Set
);
raw_fn!(
    /// `g:inc(value?, label_values?)`: adds `value` (default 1, may be negative) to the
    /// gauge's series. Returns nothing; misuse raises.
    raw_gauge_inc,
    Kind::Gauge,
    Op::Inc
);
raw_fn!(
    /// `h:observe(value, label_values?)`: counts `value` (not NaN) in its bucket of the
    /// histogram's series and adds it to the sum. Returns nothing; misuse raises.
    raw_histogram_observe,
    Kind::Histogram,
    Op::Observe
);

// ---------------------------------------------------------------------------------------
// Through mlua

/// The name Lua's `type()` gives (mlua says "integer" for an integer).
fn type_name(v: &LuaValue) -> &'static str {
    match v {
        LuaValue::Integer(_) | LuaValue::Number(_) => "number",
        v => v.type_name(),
    }
}

/// A list of strings (label names), from a table; `nil` is the empty list.
fn string_list(v: LuaValue, what: &str) -> Result<Vec<String>, String> {
    let t = match v {
        LuaValue::Nil => return Ok(Vec::new()),
        LuaValue::Table(t) => t,
        other => {
            return Err(format!(
                "{what} must be a table of strings, not a {}",
                type_name(&other)
            ))
        }
    };
    let n = t.raw_len();
    let mut out = Vec::with_capacity(n);
    for i in 1..=n {
        match t.raw_get::<LuaValue>(i).map_err(|e| e.to_string())? {
            LuaValue::String(s) => match s.to_str() {
                Ok(s) => out.push(s.to_string()),
                Err(_) => return Err(format!("{what}: #{i} is not UTF-8")),
            },
            other => {
                return Err(format!(
                    "{what}: #{i} is a {} (strings only)",
                    type_name(&other)
                ))
            }
        }
    }
    Ok(out)
}

/// Label values as the raw functions read them (strings, or numbers as Lua prints them).
fn label_values(lua: &Lua, v: LuaValue) -> Result<Vec<String>, String> {
    let t = match v {
        LuaValue::Nil => return Ok(Vec::new()),
        LuaValue::Table(t) => t,
        _ => return Err("label values must be a table".into()),
    };
    let n = t.raw_len();
    let mut out = Vec::with_capacity(n);
    for i in 1..=n {
        let v: LuaValue = t.raw_get(i).map_err(|e| e.to_string())?;
        match &v {
            LuaValue::String(_) | LuaValue::Integer(_) | LuaValue::Number(_) => {
                let s = lua.coerce_string(v).map_err(|e| e.to_string())?;
                let s = s.map(|s| String::from_utf8_lossy(&s.as_bytes()).into_owned());
                out.push(s.unwrap_or_default());
            }
            other => {
                return Err(format!(
                    "label value #{i} is a {} (strings or numbers only)",
                    type_name(other)
                ))
            }
        }
    }
    Ok(out)
}

/// The metric behind a metric object of `kind` (argument 1 of a method).
fn metric_of(this: &LuaValue, kind: Kind, method: &str) -> LuaResult<Arc<Metric>> {
    if let LuaValue::Table(t) = this {
        if let Ok(i) = t.raw_get::<i64>(1) {
            if let Some(m) = registry().get(i as usize).filter(|m| m.kind() == kind) {
                return Ok(m);
            }
        }
    }
    Err(LuaError::runtime(format!(
        "{0}:{method}: not a {0} (call it as {0}:{method}(...))",
        kind.as_str()
    )))
}

/// The per-state metatable of `kind`'s objects.
fn metatable(lua: &Lua, kind: Kind) -> LuaResult<LuaTable> {
    let key = METATABLE_KEYS[kind_index(kind)];
    if let Ok(mt) = lua.named_registry_value::<LuaTable>(key) {
        return Ok(mt);
    }
    let methods = lua.create_table()?;
    let raw: &[(&str, ffi::lua_CFunction)] = match kind {
        Kind::Counter => &[("inc", raw_counter_inc)],
        Kind::Gauge => &[("set", raw_gauge_set), ("inc", raw_gauge_inc)],
        Kind::Histogram => &[("observe", raw_histogram_observe)],
    };
    for (name, f) in raw {
        // SAFETY: the functions above keep to the rules in this file's header.
        methods.raw_set(*name, unsafe { lua.create_c_function(*f)? })?;
    }
    methods.raw_set(
        "del",
        lua.create_function(move |lua, (this, values): (LuaValue, LuaValue)| {
            del(lua, kind, this, values)
        })?,
    )?;
    methods.raw_set(
        "reset",
        lua.create_function(move |_, this: LuaValue| reset(kind, this))?,
    )?;
    let mt = lua.create_table()?;
    mt.raw_set("__index", methods)?;
    mt.raw_set("__name", key)?;
    mt.raw_set(
        "__tostring",
        lua.create_function(move |_, this: LuaValue| {
            let m = metric_of(&this, kind, "tostring")?;
            Ok(format!("{} {}", kind.as_str(), m.name()))
        })?,
    )?;
    lua.set_named_registry_value(key, &mt)?;
    Ok(mt)
}

/// `ok = m:del(label_values?)`: removes the series for these label values from every
/// worker's view (a metric without labels is zeroed). Returns `true` if it existed.
/// Raises on a wrong number of label values.
fn del(lua: &Lua, kind: Kind, this: LuaValue, values: LuaValue) -> LuaResult<bool> {
    let m = metric_of(&this, kind, "del")?;
    let fail = |e: String| LuaError::runtime(format!("{}:del: {e}", kind.as_str()));
    let values = label_values(lua, values).map_err(fail)?;
    m.remove(&values).map_err(fail)
}

/// `m:reset()`: removes every series of the metric (a metric without labels is zeroed).
/// Returns `true`.
fn reset(kind: Kind, this: LuaValue) -> LuaResult<bool> {
    metric_of(&this, kind, "reset")?.reset();
    Ok(true)
}

/// The Lua object of a metric: `{ [1] = id }` with its kind's metatable.
fn object(lua: &Lua, m: &Metric) -> LuaResult<LuaTable> {
    let t = lua.create_table_with_capacity(1, 0)?;
    t.raw_set(1, m.id)?;
    t.set_metatable(Some(metatable(lua, m.kind())?))?;
    Ok(t)
}

fn name_help(fname: &str, name: LuaValue, help: LuaValue) -> LuaResult<(String, String)> {
    let name = match name {
        LuaValue::String(s) => s.to_str()?.to_string(),
        other => {
            return Err(LuaError::runtime(format!(
                "luaproxy.metrics.{fname}: name must be a string, not a {}",
                type_name(&other)
            )))
        }
    };
    let help = match help {
        LuaValue::Nil => String::new(),
        LuaValue::String(s) => s.to_str()?.to_string(),
        other => {
            return Err(LuaError::runtime(format!(
                "luaproxy.metrics.{fname}: help must be a string, not a {}",
                type_name(&other)
            )))
        }
    };
    Ok((name, help))
}

/// `counter(name, help, label_names?)` and `gauge(...)`.
fn register_simple(
    lua: &Lua,
    kind: Kind,
    args: (LuaValue, LuaValue, LuaValue),
) -> LuaResult<LuaTable> {
    let fname = kind.as_str();
    let (name, help) = name_help(fname, args.0, args.1)?;
    let labels = string_list(args.2, "label_names")
        .map_err(|e| LuaError::runtime(format!("luaproxy.metrics.{fname}: {e}")))?;
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let m = match kind {
        Kind::Counter => registry().counter(&name, &help, &labels),
        _ => registry().gauge(&name, &help, &labels),
    }
    .map_err(|e| LuaError::runtime(format!("luaproxy.metrics.{fname}: {e}")))?;
    object(lua, &m)
}

/// `c = luaproxy.metrics.counter(name, help, label_names?)`: the counter `name` (a new one,
/// or the one any worker registered before with the same label names), for every worker.
/// Returns the counter object. Raises on a bad name or label name, or when `name` is taken
/// by another kind of metric or other label names.
fn counter(lua: &Lua, args: (LuaValue, LuaValue, LuaValue)) -> LuaResult<LuaTable> {
    register_simple(lua, Kind::Counter, args)
}

/// `g = luaproxy.metrics.gauge(name, help, label_names?)`: as `counter`, for a gauge.
fn gauge(lua: &Lua, args: (LuaValue, LuaValue, LuaValue)) -> LuaResult<LuaTable> {
    register_simple(lua, Kind::Gauge, args)
}

/// `h = luaproxy.metrics.histogram(name, help, label_names?, buckets?)`: as `counter`, for
/// a histogram; `buckets` are the finite upper bounds, increasing (default 0.005 .. 10 s,
/// nginx-lua-prometheus's). Re-registering needs the same buckets too.
fn histogram(
    lua: &Lua,
    (name, help, labels, buckets): (LuaValue, LuaValue, LuaValue, LuaValue),
) -> LuaResult<LuaTable> {
    let fail = |e: String| LuaError::runtime(format!("luaproxy.metrics.histogram: {e}"));
    let (name, help) = name_help("histogram", name, help)?;
    let labels = string_list(labels, "label_names").map_err(fail)?;
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let buckets = match buckets {
        LuaValue::Nil => None,
        LuaValue::Table(t) => {
            let n = t.raw_len();
            let mut v = Vec::with_capacity(n);
            for i in 1..=n {
                match t.raw_get::<LuaValue>(i)? {
                    LuaValue::Integer(x) => v.push(x as f64),
                    LuaValue::Number(x) => v.push(x),
                    other => {
                        return Err(fail(format!(
                            "buckets: #{i} is a {} (numbers only)",
                            type_name(&other)
                        )))
                    }
                }
            }
            Some(v)
        }
        other => {
            return Err(fail(format!(
                "buckets must be a table of numbers, not a {}",
                type_name(&other)
            )))
        }
    };
    let m = registry()
        .histogram(&name, &help, &labels, buckets.as_deref())
        .map_err(fail)?;
    object(lua, &m)
}

/// `text = luaproxy.metrics.render()`: the Prometheus text exposition (format 0.0.4) of
/// every metric of the process (policies' and luaproxy's own), sorted by name. Returns a
/// string; serve it with `Content-Type: luaproxy.metrics.content_type`.
fn render(_: &Lua, _: ()) -> LuaResult<String> {
    Ok(registry().render())
}

/// Builds `luaproxy.metrics`.
pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.raw_set("counter", lua.create_function(counter)?)?;
    t.raw_set("gauge", lua.create_function(gauge)?)?;
    t.raw_set("histogram", lua.create_function(histogram)?)?;
    t.raw_set("render", lua.create_function(render)?)?;
    t.raw_set("content_type", registry::CONTENT_TYPE)?;
    Ok(t)
}
