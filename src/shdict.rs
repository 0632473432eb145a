//! `luaproxy.shared`: dictionaries shared by every Lua VM of the process (the main program
//! and every worker), in the shape of `ngx.shared.DICT`.
//!
//! The store itself (`Store`) is plain Rust; this file adds the Lua surface. Operations never
//! yield, so they work anywhere, with or without a running loop.

use mlua::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Str(Vec<u8>),
    Int(i64),
    Num(f64),
    Bool(bool),
    /// A Lua table copied in (keys and values are themselves `Val`s); copied out on read.
    Table(Vec<(Val, Val)>),
}

impl Val {
    fn size(&self) -> usize {
        match self {
            Val::Str(s) => s.len(),
            Val::Table(kv) => {
                16 + kv
                    .iter()
                    .map(|(k, v)| k.size() + v.size() + 16)
                    .sum::<usize>()
            }
            _ => 8,
        }
    }
}

/// Nesting allowed in table values (deeper, or a cycle, is refused).
const MAX_TABLE_DEPTH: usize = 100;

/// Integers are stored as atomics so `incr` and `get` (what least-connection counting does on
/// every request, from every worker) only need the shared read lock.
enum Stored {
    Int(AtomicI64),
    Other(Val),
    List(std::collections::VecDeque<Val>),
}

impl Stored {
    fn new(v: Val) -> Stored {
        match v {
            Val::Int(i) => Stored::Int(AtomicI64::new(i)),
            v => Stored::Other(v),
        }
    }

    /// The scalar value; `None` for a list.
    fn load(&self) -> Option<Val> {
        match self {
            Stored::Int(a) => Some(Val::Int(a.load(Ordering::Relaxed))),
            Stored::Other(v) => Some(v.clone()),
            Stored::List(_) => None,
        }
    }

    fn size(&self) -> usize {
        match self {
            Stored::Int(_) => 8,
            Stored::Other(v) => v.size(),
            Stored::List(l) => l.iter().map(|v| v.size() + 16).sum(),
        }
    }
}

struct Entry {
    val: Stored,
    flags: u32,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// Fixed per-entry overhead counted against capacity, so capacity bounds real memory.
const ENTRY_OVERHEAD: usize = 64;

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry, ahash::RandomState>,
    used: usize,
}

/// A named dictionary with a byte capacity.
pub struct Store {
    pub name: String,
    pub capacity: usize,
    inner: RwLock<Inner>,
}

#[derive(Debug, PartialEq)]
pub enum SetErr {
    NoMemory,
    Exists,
    NotFound,
    NotANumber,
    NotAList,
    IsList,
    Changed,
}

impl SetErr {
    pub fn as_str(&self) -> &'static str {
        match self {
            SetErr::NoMemory => "no memory",
            SetErr::Exists => "exists",
            SetErr::NotFound => "not found",
            SetErr::NotANumber => "not a number",
            SetErr::NotAList => "value not a list",
            SetErr::IsList => "value is a list",
            SetErr::Changed => "changed",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    Set,
    Add,
    Replace,
}

fn cost(key: &str, v: &Val) -> usize {
    key.len() + v.size() + ENTRY_OVERHEAD
}

fn stored_cost(key: &str, v: &Stored) -> usize {
    key.len() + v.size() + ENTRY_OVERHEAD
}

impl Store {
    pub fn new(name: &str, capacity: usize) -> Store {
        Store {
            name: name.to_string(),
            capacity,
            inner: RwLock::new(Inner::default()),
        }
    }

    // A panic while holding the lock cannot leave the map half-written in a way that matters
    // more than losing the whole dict, so poisoning is ignored and serving goes on.
    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// `Ok(None)` when missing or expired; `Err` for a list.
    pub fn get(&self, key: &str) -> Result<Option<(Val, u32)>, SetErr> {
        let g = self.read();
        let Some(e) = g.map.get(key) else {
            return Ok(None);
        };
        if e.expires.is_some() && !e.live(Instant::now()) {
            return Ok(None);
        }
        match e.val.load() {
            Some(v) => Ok(Some((v, e.flags))),
            None => Err(SetErr::IsList),
        }
    }

    /// Like `get`, but an expired entry not yet purged is returned too, with `stale = true`.
    pub fn get_stale(&self, key: &str) -> Result<Option<(Val, u32, bool)>, SetErr> {
        let g = self.read();
        let Some(e) = g.map.get(key) else {
            return Ok(None);
        };
        match e.val.load() {
            Some(v) => Ok(Some((v, e.flags, !e.live(Instant::now())))),
            None => Err(SetErr::IsList),
        }
    }

    /// Seconds left to live (0 = never expires); `Err(NotFound)` when missing or expired.
    pub fn ttl(&self, key: &str) -> Result<f64, SetErr> {
        let now = Instant::now();
        let g = self.read();
        match g.map.get(key).filter(|e| e.live(now)) {
            None => Err(SetErr::NotFound),
            Some(e) => Ok(e.expires.map(|t| (t - now).as_secs_f64()).unwrap_or(0.0)),
        }
    }

    /// Sets a new time to live on a live key (`None` = never expires).
    pub fn expire(&self, key: &str, ttl: Option<Duration>) -> Result<(), SetErr> {
        let now = Instant::now();
        let mut g = self.lock();
        match g.map.get_mut(key).filter(|e| e.live(now)) {
            None => Err(SetErr::NotFound),
            Some(e) => {
                e.expires = ttl.map(|t| now + t);
                Ok(())
            }
        }
    }

    /// Removes expired entries, at most `max` of them (0 = all); returns how many.
    pub fn flush_expired(&self, max: usize) -> usize {
        let now = Instant::now();
        let mut g = self.lock();
        let dead: Vec<String> = g
            .map
            .iter()
            .filter(|(_, e)| !e.live(now))
            .map(|(k, _)| k.clone())
            .take(if max == 0 { usize::MAX } else { max })
            .collect();
        for k in &dead {
            if let Some(e) = g.map.remove(k) {
                g.used -= stored_cost(k, &e.val);
            }
        }
        dead.len()
    }

    /// Sets `key` to `new` only if its current value equals `old` (`None` = absent).
    pub fn cas(
        &self,
        key: &str,
        old: Option<&Val>,
        new: Val,
        ttl: Option<Duration>,
    ) -> Result<(), SetErr> {
        let now = Instant::now();
        let mut g = self.lock();
        let cur = g.map.get(key).filter(|e| e.live(now)).map(|e| e.val.load());
        match (cur, old) {
            (None, None) => {}
            (Some(Some(c)), Some(o)) if c == *o => {}
            (Some(None), _) => return Err(SetErr::IsList),
            _ => return Err(SetErr::Changed),
        }
        let new_cost = cost(key, &new);
        let old_cost = g
            .map
            .get(key)
            .map(|e| stored_cost(key, &e.val))
            .unwrap_or(0);
        if g.used - old_cost + new_cost > self.capacity {
            return Err(SetErr::NoMemory);
        }
        if let Some(prev) = g.map.insert(
            key.to_string(),
            Entry {
                val: Stored::new(new),
                flags: 0,
                expires: ttl.map(|t| now + t),
            },
        ) {
            g.used -= stored_cost(key, &prev.val);
        }
        g.used += new_cost;
        Ok(())
    }

    /// Pushes onto the list at `key` (created if missing); returns the new length.
    pub fn push(&self, key: &str, v: Val, front: bool) -> Result<usize, SetErr> {
        let now = Instant::now();
        let mut g = self.lock();
        let extra = v.size() + 16;
        let fresh = !g.map.get(key).is_some_and(|e| e.live(now));
        let base = if fresh { key.len() + ENTRY_OVERHEAD } else { 0 };
        let old_cost = if fresh {
            g.map
                .get(key)
                .map(|e| stored_cost(key, &e.val))
                .unwrap_or(0)
        } else {
            0
        };
        if g.used - old_cost + base + extra > self.capacity {
            return Err(SetErr::NoMemory);
        }
        if fresh {
            if let Some(prev) = g.map.insert(
                key.to_string(),
                Entry {
                    val: Stored::List(Default::default()),
                    flags: 0,
                    expires: None,
                },
            ) {
                g.used -= stored_cost(key, &prev.val);
            }
            g.used += base;
        }
        let e = g.map.get_mut(key).expect("inserted above");
        let Stored::List(list) = &mut e.val else {
            return Err(SetErr::NotAList);
        };
        if front {
            list.push_front(v);
        } else {
            list.push_back(v);
        }
        let len = list.len();
        g.used += extra;
        Ok(len)
    }

    /// Pops from the list at `key`; `Ok(None)` when missing or empty.
    pub fn pop(&self, key: &str, front: bool) -> Result<Option<Val>, SetErr> {
        let now = Instant::now();
        let mut g = self.lock();
        let Some(e) = g.map.get_mut(key).filter(|e| e.live(now)) else {
            return Ok(None);
        };
        let Stored::List(list) = &mut e.val else {
            return Err(SetErr::NotAList);
        };
        let v = if front {
            list.pop_front()
        } else {
            list.pop_back()
        };
        let empty = list.is_empty();
        if let Some(v) = &v {
            g.used -= v.size() + 16;
        }
        if empty {
            if let Some(prev) = g.map.remove(key) {
                g.used -= stored_cost(key, &prev.val);
            }
        }
        Ok(v)
    }

    /// Length of the list at `key` (0 when missing).
    pub fn llen(&self, key: &str) -> Result<usize, SetErr> {
        let now = Instant::now();
        let g = self.read();
        match g.map.get(key).filter(|e| e.live(now)) {
            None => Ok(0),
            Some(Entry {
                val: Stored::List(l),
                ..
            }) => Ok(l.len()),
            Some(_) => Err(SetErr::NotAList),
        }
    }

    /// Stores `val`; `Ok(forcible)` is always false for now: nothing is evicted, a full dict
    /// answers "no memory".
    pub fn store(
        &self,
        key: &str,
        val: Val,
        ttl: Option<Duration>,
        flags: u32,
        mode: Mode,
    ) -> Result<bool, SetErr> {
        let now = Instant::now();
        let mut g = self.lock();
        let old = g.map.get(key).filter(|e| e.live(now)).is_some();
        match mode {
            Mode::Add if old => return Err(SetErr::Exists),
            Mode::Replace if !old => return Err(SetErr::NotFound),
            _ => {}
        }
        let new_cost = cost(key, &val);
        let old_cost = g
            .map
            .get(key)
            .map(|e| stored_cost(key, &e.val))
            .unwrap_or(0);
        if g.used - old_cost + new_cost > self.capacity {
            self.purge_expired(&mut g, now);
            let old_cost = g
                .map
                .get(key)
                .map(|e| stored_cost(key, &e.val))
                .unwrap_or(0);
            if g.used - old_cost + new_cost > self.capacity {
                return Err(SetErr::NoMemory);
            }
        }
        let entry = Entry {
            val: Stored::new(val),
            flags,
            expires: ttl.map(|t| now + t),
        };
        if let Some(prev) = g.map.insert(key.to_string(), entry) {
            g.used -= stored_cost(key, &prev.val);
        }
        g.used += new_cost;
        Ok(false)
    }

    fn purge_expired(&self, g: &mut Inner, now: Instant) {
        let mut freed = 0;
        g.map.retain(|k, e| {
            let keep = e.live(now);
            if !keep {
                freed += stored_cost(k, &e.val);
            }
            keep
        });
        g.used -= freed;
    }

    pub fn delete(&self, key: &str) {
        let mut g = self.lock();
        if let Some(prev) = g.map.remove(key) {
            g.used -= stored_cost(key, &prev.val);
        }
    }

    /// Adds `n` to a number; a missing key starts from `init` when given.
    pub fn incr(
        &self,
        key: &str,
        n: f64,
        n_int: Option<i64>,
        init: Option<Val>,
        init_ttl: Option<Duration>,
    ) -> Result<Val, SetErr> {
        let now = Instant::now();
        if let Some(b) = n_int {
            // Fast path: a live integer under the read lock.
            let g = self.read();
            if let Some(e) = g.map.get(key).filter(|e| e.live(now)) {
                if let Stored::Int(a) = &e.val {
                    let mut cur = a.load(Ordering::Relaxed);
                    while let Some(next) = cur.checked_add(b) {
                        match a.compare_exchange_weak(
                            cur,
                            next,
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        ) {
                            Ok(_) => return Ok(Val::Int(next)),
                            Err(seen) => cur = seen,
                        }
                    }
                }
            }
        }
        let mut g = self.lock();
        let live = g.map.get(key).filter(|e| e.live(now)).map(|e| e.val.load());
        let (base, fresh) = match live {
            Some(Some(v)) => (v, false),
            Some(None) => return Err(SetErr::NotANumber),
            None => match init {
                Some(v) => (v, true),
                None => return Err(SetErr::NotFound),
            },
        };
        let newval = match (base, n_int) {
            (Val::Int(a), Some(b)) => match a.checked_add(b) {
                Some(s) => Val::Int(s),
                None => Val::Num(a as f64 + b as f64),
            },
            (Val::Int(a), None) => Val::Num(a as f64 + n),
            (Val::Num(a), _) => Val::Num(a + n),
            _ => return Err(SetErr::NotANumber),
        };
        match g.map.get_mut(key) {
            Some(e) if !fresh => e.val = Stored::new(newval.clone()),
            _ => {
                let c = cost(key, &newval);
                if let Some(prev) = g.map.remove(key) {
                    g.used -= stored_cost(key, &prev.val);
                }
                if g.used + c > self.capacity {
                    return Err(SetErr::NoMemory);
                }
                g.used += c;
                g.map.insert(
                    key.to_string(),
                    Entry {
                        val: Stored::new(newval.clone()),
                        flags: 0,
                        expires: init_ttl.map(|t| now + t),
                    },
                );
            }
        }
        Ok(newval)
    }

    /// Live keys, at most `max` (0 = all).
    pub fn keys(&self, max: usize) -> Vec<String> {
        let now = Instant::now();
        let g = self.lock();
        let it = g
            .map
            .iter()
            .filter(|(_, e)| e.live(now))
            .map(|(k, _)| k.clone());
        if max == 0 {
            it.collect()
        } else {
            it.take(max).collect()
        }
    }

    pub fn flush_all(&self) {
        let mut g = self.lock();
        g.map.clear();
        g.used = 0;
    }

    pub fn free_space(&self) -> usize {
        self.capacity.saturating_sub(self.read().used)
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Store>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<Store>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

pub fn find(name: &str) -> Option<Arc<Store>> {
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned()
}

/// Creates a dict, or returns the existing one when the capacity matches.
pub fn create(name: &str, capacity: usize) -> Result<Arc<Store>, String> {
    let mut r = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = r.get(name) {
        if d.capacity == capacity {
            return Ok(d.clone());
        }
        return Err(format!("dict '{name}' exists with capacity {}", d.capacity));
    }
    let d = Arc::new(Store::new(name, capacity));
    r.insert(name.to_string(), d.clone());
    Ok(d)
}

/// Parses `1048576`, `"512k"`, `"10m"`, `"1g"`.
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1024),
        (i, 'm' | 'M') => (&s[..i], 1024 * 1024),
        (i, 'g' | 'G') => (&s[..i], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    num.trim().parse::<usize>().ok()?.checked_mul(mult)
}

/// Releases a least-connection lease: decrements the counter when the request ends.
pub struct Lease {
    store: Arc<Store>,
    key: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Only decrement a key that still exists: a backend removed from the list while the
        // request was in flight must not come back as a stray counter.
        let _ = self.store.incr(&self.key, -1.0, Some(-1), None, None);
    }
}

/// The Lua handle of one dict.
#[derive(Clone)]
pub struct Dict(pub Arc<Store>);

/// Validates a key and hands it to `f` without copying it (every dict call goes through here).
fn with_key<R>(key: &LuaValue, f: impl FnOnce(&str) -> R) -> Result<R, &'static str> {
    match key {
        LuaValue::String(s) => {
            let b = s.as_bytes();
            if b.is_empty() {
                Err("empty key")
            } else if b.len() > 65535 {
                Err("key too long")
            } else {
                match std::str::from_utf8(&b) {
                    Ok(k) => Ok(f(k)),
                    Err(_) => Ok(f(&String::from_utf8_lossy(&b))),
                }
            }
        }
        LuaValue::Integer(i) => Ok(f(&i.to_string())),
        LuaValue::Number(n) => Ok(f(&n.to_string())),
        LuaValue::Nil => Err("nil key"),
        _ => Err("bad key type"),
    }
}

fn check_key(key: &LuaValue) -> Result<String, &'static str> {
    with_key(key, str::to_string)
}

fn to_val(v: &LuaValue) -> LuaResult<Val> {
    to_val_depth(v, 0)
}

fn to_val_depth(v: &LuaValue, depth: usize) -> LuaResult<Val> {
    Ok(match v {
        LuaValue::String(s) => Val::Str(s.as_bytes().to_vec()),
        LuaValue::Integer(i) => Val::Int(*i),
        LuaValue::Number(n) => Val::Num(*n),
        LuaValue::Boolean(b) => Val::Bool(*b),
        LuaValue::Table(t) => {
            if depth >= MAX_TABLE_DEPTH {
                return Err(LuaError::runtime(
                    "bad value: table nested deeper than 100 (or a cycle)",
                ));
            }
            let mut kv = Vec::new();
            for pair in t.pairs::<LuaValue, LuaValue>() {
                let (k, v) = pair?;
                let k = match k {
                    LuaValue::Table(_) => {
                        return Err(LuaError::runtime(
                            "bad value: table keys must be strings, numbers or booleans",
                        ))
                    }
                    k => to_val_depth(&k, depth + 1)?,
                };
                kv.push((k, to_val_depth(&v, depth + 1)?));
            }
            Val::Table(kv)
        }
        other => {
            return Err(LuaError::runtime(format!(
                "bad value type: {} (strings, numbers, booleans and tables of them only)",
                other.type_name()
            )))
        }
    })
}

fn from_val(lua: &Lua, v: Val) -> LuaResult<LuaValue> {
    Ok(match v {
        Val::Str(s) => LuaValue::String(lua.create_string(&s)?),
        Val::Int(i) => LuaValue::Integer(i),
        Val::Num(n) => LuaValue::Number(n),
        Val::Bool(b) => LuaValue::Boolean(b),
        Val::Table(kv) => {
            let t = lua.create_table_with_capacity(0, kv.len())?;
            for (k, v) in kv {
                t.raw_set(from_val(lua, k)?, from_val(lua, v)?)?;
            }
            LuaValue::Table(t)
        }
    })
}

fn ttl_arg(t: Option<f64>) -> LuaResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(0.0) => Ok(None),
        Some(t) if t.is_finite() && t > 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(_) => Err(LuaError::runtime(
            "exptime must be a number of seconds >= 0",
        )),
    }
}

type SetResult = (bool, Option<&'static str>, bool);

fn store_op(
    this: &Dict,
    key: LuaValue,
    val: LuaValue,
    exptime: Option<f64>,
    flags: Option<u32>,
    mode: Mode,
) -> LuaResult<SetResult> {
    let key = match check_key(&key) {
        Ok(k) => k,
        Err(e) => return Ok((false, Some(e), false)),
    };
    if val.is_nil() && mode == Mode::Set {
        this.0.delete(&key);
        return Ok((true, None, false));
    }
    let v = to_val(&val)?;
    match this
        .0
        .store(&key, v, ttl_arg(exptime)?, flags.unwrap_or(0), mode)
    {
        Ok(forcible) => Ok((true, None, forcible)),
        Err(e) => Ok((false, Some(e.as_str()), false)),
    }
}

impl LuaUserData for Dict {
    fn add_methods<M: LuaUserDataMethods<Self>>(m: &mut M) {
        // value, flags = dict:get(key)
        m.add_method("get", |lua, this, key: LuaValue| {
            let found = match with_key(&key, |k| this.0.get(k)) {
                Ok(found) => found,
                Err(e) => return Ok((LuaValue::Nil, LuaValue::String(lua.create_string(e)?))),
            };
            match found {
                Ok(Some((v, flags))) => Ok((
                    from_val(lua, v)?,
                    if flags == 0 {
                        LuaValue::Nil
                    } else {
                        LuaValue::Integer(flags as i64)
                    },
                )),
                Ok(None) => Ok((LuaValue::Nil, LuaValue::Nil)),
                Err(e) => Ok((
                    LuaValue::Nil,
                    LuaValue::String(lua.create_string(e.as_str())?),
                )),
            }
        });
        // ok, err, forcible = dict:set(key, value, exptime?, flags?)
        m.add_method(
            "set",
            |_, this, (k, v, e, f): (LuaValue, LuaValue, Option<f64>, Option<u32>)| {
                store_op(this, k, v, e, f, Mode::Set)
            },
        );
        // ok, err, forcible = dict:add(key, value, exptime?, flags?)  ("exists")
        m.add_method(
            "add",
            |_, this, (k, v, e, f): (LuaValue, LuaValue, Option<f64>, Option<u32>)| {
                store_op(this, k, v, e, f, Mode::Add)
            },
        );
        // ok, err, forcible = dict:replace(key, value, exptime?, flags?)  ("not found")
        m.add_method(
            "replace",
            |_, this, (k, v, e, f): (LuaValue, LuaValue, Option<f64>, Option<u32>)| {
                store_op(this, k, v, e, f, Mode::Replace)
            },
        );
        // ok = dict:delete(key)
        m.add_method("delete", |_, this, key: LuaValue| {
            if let Ok(k) = check_key(&key) {
                this.0.delete(&k);
            }
            Ok(true)
        });
        // newval, err, forcible = dict:incr(key, n, init?, init_ttl?)
        m.add_method("incr", |lua, this, (key, n, init, init_ttl): (LuaValue, LuaValue, Option<LuaValue>, Option<f64>)| {
            let key = match check_key(&key) {
                Ok(k) => k,
                Err(e) => return Ok((LuaValue::Nil, Some(e), false)),
            };
            let (nf, ni) = match n {
                LuaValue::Integer(i) => (i as f64, Some(i)),
                LuaValue::Number(f) => (f, None),
                _ => return Err(LuaError::runtime("dict:incr: n must be a number")),
            };
            let init = match init {
                None | Some(LuaValue::Nil) => None,
                Some(LuaValue::Integer(i)) => Some(Val::Int(i)),
                Some(LuaValue::Number(f)) => Some(Val::Num(f)),
                Some(_) => return Err(LuaError::runtime("dict:incr: init must be a number")),
            };
            match this.0.incr(&key, nf, ni, init, ttl_arg(init_ttl)?) {
                Ok(v) => Ok((from_val(lua, v)?, None, false)),
                Err(e) => Ok((LuaValue::Nil, Some(e.as_str()), false)),
            }
        });
        // keys = dict:get_keys(max?)  (default 1024, 0 = all)
        m.add_method("get_keys", |_, this, max: Option<usize>| {
            Ok(this.0.keys(max.unwrap_or(1024)))
        });
        // ok = dict:flush_all()
        m.add_method("flush_all", |_, this, ()| {
            this.0.flush_all();
            Ok(true)
        });
        // bytes = dict:capacity()
        m.add_method("capacity", |_, this, ()| Ok(this.0.capacity));
        // bytes = dict:free_space()
        m.add_method("free_space", |_, this, ()| Ok(this.0.free_space()));
        // ok, err, forcible = dict:safe_set(key, value, exptime?, flags?): never evicts
        // (nothing is evicted yet at all; a full dict answers "no memory")
        m.add_method(
            "safe_set",
            |_, this, (k, v, e, f): (LuaValue, LuaValue, Option<f64>, Option<u32>)| {
                store_op(this, k, v, e, f, Mode::Set)
            },
        );
        // ok, err, forcible = dict:safe_add(key, value, exptime?, flags?)
        m.add_method(
            "safe_add",
            |_, this, (k, v, e, f): (LuaValue, LuaValue, Option<f64>, Option<u32>)| {
                store_op(this, k, v, e, f, Mode::Add)
            },
        );
        // value, flags, stale = dict:get_stale(key): expired values not yet purged too
        m.add_method("get_stale", |lua, this, key: LuaValue| {
            let found = match with_key(&key, |k| this.0.get_stale(k)) {
                Ok(f) => f,
                Err(e) => {
                    return Ok((
                        LuaValue::Nil,
                        LuaValue::String(lua.create_string(e)?),
                        LuaValue::Nil,
                    ))
                }
            };
            match found {
                Ok(Some((v, flags, stale))) => Ok((
                    from_val(lua, v)?,
                    if flags == 0 {
                        LuaValue::Nil
                    } else {
                        LuaValue::Integer(flags as i64)
                    },
                    LuaValue::Boolean(stale),
                )),
                Ok(None) => Ok((LuaValue::Nil, LuaValue::Nil, LuaValue::Nil)),
                Err(e) => Ok((
                    LuaValue::Nil,
                    LuaValue::String(lua.create_string(e.as_str())?),
                    LuaValue::Nil,
                )),
            }
        });
        // ttl, err = dict:ttl(key): seconds left (0 = never expires); nil, "not found"
        m.add_method("ttl", |_, this, key: LuaValue| {
            match with_key(&key, |k| this.0.ttl(k)) {
                Ok(Ok(t)) => Ok((Some(t), None)),
                Ok(Err(e)) => Ok((None, Some(e.as_str()))),
                Err(e) => Ok((None, Some(e))),
            }
        });
        // ok, err = dict:expire(key, exptime): 0 = never expires; nil, "not found"
        m.add_method("expire", |_, this, (key, exptime): (LuaValue, f64)| {
            let ttl = ttl_arg(Some(exptime))?;
            match with_key(&key, |k| this.0.expire(k, ttl)) {
                Ok(Ok(())) => Ok((Some(true), None)),
                Ok(Err(e)) => Ok((None, Some(e.as_str()))),
                Err(e) => Ok((None, Some(e))),
            }
        });
        // n = dict:flush_expired(max?): removes expired entries (0 or nil = all), returns the count
        m.add_method("flush_expired", |_, this, max: Option<usize>| {
            Ok(this.0.flush_expired(max.unwrap_or(0)))
        });
        // ok, err = dict:cas(key, old, new, exptime?): set `new` only if the value is still
        // `old` (nil = absent); false, "changed" otherwise
        m.add_method(
            "cas",
            |_, this, (key, old, new, exptime): (LuaValue, LuaValue, LuaValue, Option<f64>)| {
                let old = if old.is_nil() {
                    None
                } else {
                    Some(to_val(&old)?)
                };
                let new = to_val(&new)?;
                let ttl = ttl_arg(exptime)?;
                match with_key(&key, |k| this.0.cas(k, old.as_ref(), new, ttl)) {
                    Ok(Ok(())) => Ok((true, None)),
                    Ok(Err(e)) => Ok((false, Some(e.as_str()))),
                    Err(e) => Ok((false, Some(e))),
                }
            },
        );
        // len, err = dict:lpush(key, value) / dict:rpush(key, value)
        for (name, front) in [("lpush", true), ("rpush", false)] {
            m.add_method(name, move |_, this, (key, v): (LuaValue, LuaValue)| {
                let v = to_val(&v)?;
                match with_key(&key, |k| this.0.push(k, v, front)) {
                    Ok(Ok(n)) => Ok((Some(n), None)),
                    Ok(Err(e)) => Ok((None, Some(e.as_str()))),
                    Err(e) => Ok((None, Some(e))),
                }
            });
        }
        // value, err = dict:lpop(key) / dict:rpop(key): nil when the list is empty or missing
        for (name, front) in [("lpop", true), ("rpop", false)] {
            m.add_method(name, move |lua, this, key: LuaValue| {
                match with_key(&key, |k| this.0.pop(k, front)) {
                    Ok(Ok(Some(v))) => Ok((from_val(lua, v)?, None)),
                    Ok(Ok(None)) => Ok((LuaValue::Nil, None)),
                    Ok(Err(e)) => Ok((LuaValue::Nil, Some(e.as_str()))),
                    Err(e) => Ok((LuaValue::Nil, Some(e))),
                }
            });
        }
        // len, err = dict:llen(key): 0 when missing
        m.add_method("llen", |_, this, key: LuaValue| {
            match with_key(&key, |k| this.0.llen(k)) {
                Ok(Ok(n)) => Ok((Some(n), None)),
                Ok(Err(e)) => Ok((None, Some(e.as_str()))),
                Err(e) => Ok((None, Some(e))),
            }
        });
        // newval, err = dict:lease(key, req): incr(key, 1) now, and -1 automatically when
        // the request ends however it ends (response sent, error, client abort).
        m.add_method(
            "lease",
            |lua, this, (key, req): (LuaValue, LuaAnyUserData)| {
                let key = match check_key(&key) {
                    Ok(k) => k,
                    Err(e) => return Ok((LuaValue::Nil, Some(e))),
                };
                let req = req
                    .borrow::<crate::request::Request>()
                    .map_err(|_| LuaError::runtime("dict:lease: argument #2 must be a request"))?;
                match this.0.incr(&key, 1.0, Some(1), None, None) {
                    Ok(v) => {
                        req.0.guards.borrow_mut().push(Box::new(Lease {
                            store: this.0.clone(),
                            key,
                        }));
                        Ok((from_val(lua, v)?, None))
                    }
                    Err(e) => Ok((LuaValue::Nil, Some(e.as_str()))),
                }
            },
        );
    }
}

fn capacity_arg(v: LuaValue) -> LuaResult<usize> {
    match v {
        LuaValue::Integer(n) if n > 0 => Ok(n as usize),
        LuaValue::Number(n) if n > 0.0 => Ok(n as usize),
        LuaValue::String(s) => parse_size(&s.to_str()?).filter(|n| *n > 0).ok_or_else(|| {
            LuaError::runtime(format!(
                "bad capacity '{}' (bytes, or like \"512k\" / \"10m\")",
                s.to_string_lossy()
            ))
        }),
        _ => Err(LuaError::runtime(
            "capacity must be bytes or a size like \"10m\"",
        )),
    }
}

/// `dict = luaproxy.shared.new(name, capacity)`; then `luaproxy.shared[name]` in every VM.
fn lua_new(
    _: &Lua,
    (name, capacity): (String, LuaValue),
) -> LuaResult<(Option<Dict>, Option<String>)> {
    if name.is_empty() {
        return Err(LuaError::runtime(
            "luaproxy.shared.new: name must not be empty",
        ));
    }
    match create(&name, capacity_arg(capacity)?) {
        Ok(d) => Ok((Some(Dict(d)), None)),
        Err(e) => Ok((None, Some(e))),
    }
}

pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.raw_set("new", lua.create_function(lua_new)?)?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|_, (_t, name): (LuaTable, String)| Ok(find(&name).map(Dict)))?,
    )?;
    t.set_metatable(Some(mt))?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10m"), Some(10 * 1024 * 1024));
        assert_eq!(parse_size("512k"), Some(512 * 1024));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn add_replace_incr_and_capacity() {
        let s = Store::new("t", 1000);
        assert_eq!(s.store("a", Val::Int(1), None, 0, Mode::Add), Ok(false));
        assert_eq!(
            s.store("a", Val::Int(1), None, 0, Mode::Add),
            Err(SetErr::Exists)
        );
        assert_eq!(
            s.store("b", Val::Int(1), None, 0, Mode::Replace),
            Err(SetErr::NotFound)
        );
        assert_eq!(s.incr("a", 2.0, Some(2), None, None), Ok(Val::Int(3)));
        assert_eq!(
            s.incr("zz", 1.0, Some(1), None, None),
            Err(SetErr::NotFound)
        );
        let big = Val::Str(vec![0; 2000]);
        assert_eq!(s.store("c", big, None, 0, Mode::Set), Err(SetErr::NoMemory));
        s.delete("a");
        assert_eq!(s.free_space(), 1000);
    }

    #[test]
    fn lease_decrements_on_drop_and_skips_deleted_keys() {
        let s = Arc::new(Store::new("t", 10_000));
        s.store("up", Val::Int(0), None, 0, Mode::Set).unwrap();
        s.incr("up", 1.0, Some(1), None, None).unwrap();
        drop(Lease {
            store: s.clone(),
            key: "up".into(),
        });
        assert_eq!(s.get("up").unwrap().unwrap().0, Val::Int(0));
        s.delete("up");
        drop(Lease {
            store: s.clone(),
            key: "up".into(),
        });
        assert!(s.get("up").unwrap().is_none());
    }

    #[test]
    fn concurrent_incr_is_exact() {
        let s = Arc::new(Store::new("t", 10_000));
        s.store("n", Val::Int(0), None, 0, Mode::Set).unwrap();
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        s.incr("n", 1.0, Some(1), None, None).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(s.get("n").unwrap().unwrap().0, Val::Int(40_000));
    }
}
