//! `luaproxy.shared`: dictionaries shared by every Lua VM of the process (the main program
//! and every worker), in the shape of `ngx.shared.DICT`.
//!
//! The store itself (`Store`) is plain Rust; this file adds the Lua surface. Operations never
//! yield, so they work anywhere, with or without a running loop.
//!
//! Eviction is exact LRU without making reads exclusive: a read stamps the entry with a tick
//! from the store's clock (an atomic store under the shared lock); the ordered index of ticks
//! only catches up under the write lock, when an eviction walks it from the oldest end and
//! moves any entry read since it was indexed to its real place before judging it.

use mlua::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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
    /// A buffered upstream response (only `luaproxy.cache` stores these); shared, not copied.
    Resp(Arc<crate::cache::CachedResponse>),
}

impl Val {
    pub fn size(&self) -> usize {
        match self {
            Val::Str(s) => s.len(),
            Val::Table(kv) => {
                16 + kv
                    .iter()
                    .map(|(k, v)| k.size() + v.size() + 16)
                    .sum::<usize>()
            }
            Val::Resp(r) => r.size(),
            _ => 8,
        }
    }
}

/// Nesting allowed in table values (deeper, or a cycle, is refused).
const MAX_TABLE_DEPTH: usize = 100;

/// Entries examined per lock hold by `get_keys` and `flush_expired`, so a big dict never holds
/// other workers up for long.
const SCAN_CHUNK: usize = 1024;

/// Live entries a `safe_*` write steps over while looking for expired ones to reclaim before it
/// gives up with "no memory".
const SAFE_SCAN: usize = 256;

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
}

struct Entry {
    val: Stored,
    flags: u32,
    expires: Option<Instant>,
    /// Bytes charged against capacity.
    cost: usize,
    /// This entry's key in `Inner::lru`.
    order: u64,
    /// Tick of the last access (>= `order`); bumped by reads under the shared lock.
    touched: AtomicU64,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// Fixed per-entry overhead counted against capacity (map slot, index node, key header), so
/// capacity bounds real memory.
const ENTRY_OVERHEAD: usize = 64;
/// Per-element overhead of a list.
const LIST_ITEM_OVERHEAD: usize = 16;

#[derive(Default)]
struct Inner {
    map: HashMap<Arc<str>, Entry, ahash::RandomState>,
    /// Entries by `order`, oldest first.
    lru: BTreeMap<u64, Arc<str>>,
    used: usize,
}

impl Inner {
    fn remove(&mut self, key: &str) -> Option<(Arc<str>, Entry)> {
        let (k, e) = self.map.remove_entry(key)?;
        self.lru.remove(&e.order);
        self.used -= e.cost;
        Some((k, e))
    }

    /// Inserts an entry for a key that is not in the map (the caller removed it and made room).
    fn insert(
        &mut self,
        key: Arc<str>,
        val: Stored,
        flags: u32,
        exp: Option<Instant>,
        cost: usize,
        tick: u64,
    ) {
        self.lru.insert(tick, key.clone());
        self.used += cost;
        self.map.insert(
            key,
            Entry {
                val,
                flags,
                expires: exp,
                cost,
                order: tick,
                touched: AtomicU64::new(tick),
            },
        );
    }

    /// Frees space, least recently used first, until `need` more bytes fit in `cap` once
    /// `credit` bytes (the entry being overwritten) are given back. `keep` is never evicted.
    /// With `force` live entries may go (then `Ok(true)`: ngx's `forcible`); without it only
    /// expired ones do, and "no memory" comes back when that is not enough.
    fn make_room(
        &mut self,
        cap: usize,
        need: usize,
        credit: usize,
        keep: &str,
        now: Instant,
        force: bool,
    ) -> Result<bool, SetErr> {
        if need > cap {
            return Err(SetErr::NoMemory);
        }
        let mut forcible = false;
        let mut cursor = 0u64;
        let mut stepped_over = 0;
        while self.used + need > cap + credit {
            let Some((&order, key)) = self.lru.range(cursor..).next() else {
                return Err(SetErr::NoMemory);
            };
            cursor = order + 1;
            if &**key == keep {
                continue;
            }
            let key = key.clone();
            let e = self.map.get_mut(&*key).expect("lru index and map agree");
            let touched = *e.touched.get_mut();
            if touched > order {
                // Read since it was indexed: move it to where it really belongs and go on.
                e.order = touched;
                self.lru.remove(&order);
                self.lru.insert(touched, key);
                continue;
            }
            let live = e.live(now);
            if live && !force {
                stepped_over += 1;
                if stepped_over >= SAFE_SCAN {
                    return Err(SetErr::NoMemory);
                }
                continue;
            }
            forcible |= live;
            self.remove(&key);
        }
        Ok(forcible)
    }
}

/// What a lookup found.
pub struct Found {
    pub val: Val,
    pub flags: u32,
    pub expires: Option<Instant>,
}

/// A named dictionary with a byte capacity.
pub struct Store {
    pub name: String,
    pub capacity: usize,
    inner: RwLock<Inner>,
    clock: AtomicU64,
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

impl Store {
    pub fn new(name: &str, capacity: usize) -> Store {
        Store {
            name: name.to_string(),
            capacity,
            inner: RwLock::new(Inner::default()),
            clock: AtomicU64::new(1),
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

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn touch(&self, e: &Entry) {
        e.touched.store(self.tick(), Ordering::Relaxed);
    }

    /// The entry at `key`, expired or not (`Ok(None)` when missing); `Err` for a list.
    pub fn lookup(&self, key: &str) -> Result<Option<Found>, SetErr> {
        let g = self.read();
        let Some(e) = g.map.get(key) else {
            return Ok(None);
        };
        self.touch(e);
        match e.val.load() {
            Some(val) => Ok(Some(Found {
                val,
                flags: e.flags,
                expires: e.expires,
            })),
            None => Err(SetErr::IsList),
        }
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
        self.touch(e);
        match e.val.load() {
            Some(v) => Ok(Some((v, e.flags))),
            None => Err(SetErr::IsList),
        }
    }

    /// Like `get`, but an expired entry not yet purged is returned too, with `stale = true`.
    pub fn get_stale(&self, key: &str) -> Result<Option<(Val, u32, bool)>, SetErr> {
        let now = Instant::now();
        Ok(self
            .lookup(key)?
            .map(|f| (f.val, f.flags, f.expires.is_some_and(|e| e <= now))))
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

    /// Hands `f` up to `SCAN_CHUNK` keys from index position `cursor` on, oldest first, with
    /// whether each is live, under one hold of the shared lock. `f` returns false to stop.
    /// Returns where the next chunk starts, or `None` when the walk is over.
    fn scan_chunk(&self, cursor: u64, mut f: impl FnMut(&Arc<str>, bool) -> bool) -> Option<u64> {
        let now = Instant::now();
        let g = self.read();
        let mut next = cursor;
        for (seen, (&order, k)) in g.lru.range(cursor..).enumerate() {
            if seen == SCAN_CHUNK {
                return Some(next);
            }
            next = order + 1;
            let live = g.map.get(&**k).is_some_and(|e| e.live(now));
            if !f(k, live) {
                return None;
            }
        }
        None
    }

    /// Removes expired entries, at most `max` of them (0 = all); returns how many. Works a
    /// chunk at a time so other workers are never held up for a whole-dict walk.
    pub fn flush_expired(&self, max: usize) -> usize {
        let max = if max == 0 { usize::MAX } else { max };
        let mut removed = 0;
        let mut cursor = Some(0);
        let mut dead: Vec<Arc<str>> = Vec::new();
        while let Some(c) = cursor {
            cursor = self.scan_chunk(c, |k, live| {
                if !live {
                    dead.push(k.clone());
                }
                removed + dead.len() < max
            });
            let now = Instant::now();
            let mut g = self.lock();
            for k in dead.drain(..) {
                // Checked again: it may have been rewritten since the walk saw it.
                if g.map.get(&*k).is_some_and(|e| !e.live(now)) {
                    g.remove(&k);
                    removed += 1;
                }
            }
        }
        removed
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
        self.put(
            &mut g,
            key,
            Stored::new(new.clone()),
            cost(key, &new),
            0,
            ttl,
            now,
            true,
        )?;
        Ok(())
    }

    /// Makes room for and writes one entry, replacing whatever `key` held; `Ok(forcible)`.
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        g: &mut Inner,
        key: &str,
        val: Stored,
        new_cost: usize,
        flags: u32,
        ttl: Option<Duration>,
        now: Instant,
        force: bool,
    ) -> Result<bool, SetErr> {
        let credit = g.map.get(key).map_or(0, |e| e.cost);
        let forcible = g.make_room(self.capacity, new_cost, credit, key, now, force)?;
        let k = match g.remove(key) {
            Some((k, _)) => k,
            None => Arc::from(key),
        };
        let tick = self.tick();
        g.insert(k, val, flags, ttl.map(|t| now + t), new_cost, tick);
        Ok(forcible)
    }

    /// Pushes onto the list at `key` (created if missing); returns the new length and forcible.
    pub fn push(&self, key: &str, v: Val, front: bool) -> Result<(usize, bool), SetErr> {
        let now = Instant::now();
        let extra = v.size() + LIST_ITEM_OVERHEAD;
        let mut g = self.lock();
        let live = g.map.get(key).filter(|e| e.live(now));
        let forcible = match live {
            Some(e) if !matches!(e.val, Stored::List(_)) => return Err(SetErr::NotAList),
            Some(_) => g.make_room(self.capacity, extra, 0, key, now, true)?,
            None => {
                let base = key.len() + ENTRY_OVERHEAD;
                self.put(
                    &mut g,
                    key,
                    Stored::List(Default::default()),
                    base,
                    0,
                    None,
                    now,
                    true,
                )?;
                // Room for the first element too (the list itself is the newest entry).
                g.make_room(self.capacity, extra, 0, key, now, true)
                    .inspect_err(|_| {
                        g.remove(key);
                    })?
            }
        };
        let tick = self.tick();
        let e = g.map.get_mut(key).expect("present above");
        let Stored::List(list) = &mut e.val else {
            unreachable!("checked above")
        };
        if front {
            list.push_front(v);
        } else {
            list.push_back(v);
        }
        let len = list.len();
        e.cost += extra;
        *e.touched.get_mut() = tick;
        g.used += extra;
        Ok((len, forcible))
    }

    /// Pops from the list at `key`; `Ok(None)` when missing or empty.
    pub fn pop(&self, key: &str, front: bool) -> Result<Option<Val>, SetErr> {
        let now = Instant::now();
        let tick = self.tick();
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
        let freed = v.as_ref().map_or(0, |v| v.size() + LIST_ITEM_OVERHEAD);
        e.cost -= freed;
        *e.touched.get_mut() = tick;
        g.used -= freed;
        if empty {
            g.remove(key);
        }
        Ok(v)
    }

    /// Length of the list at `key` (0 when missing).
    pub fn llen(&self, key: &str) -> Result<usize, SetErr> {
        let now = Instant::now();
        let g = self.read();
        match g.map.get(key).filter(|e| e.live(now)) {
            None => Ok(0),
            Some(e) => match &e.val {
                Stored::List(l) => Ok(l.len()),
                _ => Err(SetErr::NotAList),
            },
        }
    }

    /// Stores `val`; when the dict is full, least recently used entries are evicted and
    /// `Ok(true)` (forcible) says live ones went. `force = false` (`safe_*`) only reclaims
    /// expired entries and answers "no memory" instead.
    pub fn store(
        &self,
        key: &str,
        val: Val,
        ttl: Option<Duration>,
        flags: u32,
        mode: Mode,
        force: bool,
    ) -> Result<bool, SetErr> {
        let now = Instant::now();
        let new_cost = cost(key, &val);
        let mut g = self.lock();
        let old = g.map.get(key).filter(|e| e.live(now)).is_some();
        match mode {
            Mode::Add if old => return Err(SetErr::Exists),
            Mode::Replace if !old => return Err(SetErr::NotFound),
            _ => {}
        }
        self.put(
            &mut g,
            key,
            Stored::new(val),
            new_cost,
            flags,
            ttl,
            now,
            force,
        )
    }

    pub fn delete(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Adds `n` to a number; a missing key starts from `init` when given. Returns the new
    /// value and whether live entries were evicted to create it.
    pub fn incr(
        &self,
        key: &str,
        n: f64,
        n_int: Option<i64>,
        init: Option<Val>,
        init_ttl: Option<Duration>,
    ) -> Result<(Val, bool), SetErr> {
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
                            Ok(_) => {
                                self.touch(e);
                                return Ok((Val::Int(next), false));
                            }
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
        if fresh {
            let c = cost(key, &newval);
            let forcible = self.put(
                &mut g,
                key,
                Stored::new(newval.clone()),
                c,
                0,
                init_ttl,
                now,
                true,
            )?;
            return Ok((newval, forcible));
        }
        let tick = self.tick();
        let e = g.map.get_mut(key).expect("live above");
        e.val = Stored::new(newval.clone());
        *e.touched.get_mut() = tick;
        Ok((newval, false))
    }

    /// Live keys, at most `max` (0 = all), least recently written first. Collected a chunk
    /// at a time so a big dict never holds other workers up for long; every key live for the
    /// whole walk is listed, keys written during it may or may not be.
    pub fn keys(&self, max: usize) -> Vec<String> {
        let max = if max == 0 { usize::MAX } else { max };
        let mut out = Vec::new();
        let mut seen: HashSet<Arc<str>, ahash::RandomState> = HashSet::default();
        let mut cursor = Some(0);
        while let Some(c) = cursor {
            cursor = self.scan_chunk(c, |k, live| {
                // An entry rewritten between chunks moves forward and can come round twice.
                if live && seen.insert(k.clone()) {
                    out.push(k.to_string());
                }
                out.len() < max
            });
        }
        out
    }

    pub fn flush_all(&self) {
        let mut g = self.lock();
        g.map.clear();
        g.lru.clear();
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
pub fn with_key<R>(key: &LuaValue, f: impl FnOnce(&str) -> R) -> Result<R, &'static str> {
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

pub fn check_key(key: &LuaValue) -> Result<String, &'static str> {
    with_key(key, str::to_string)
}

pub fn to_val(v: &LuaValue) -> LuaResult<Val> {
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

pub fn from_val(lua: &Lua, v: Val) -> LuaResult<LuaValue> {
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
        Val::Resp(r) => crate::cache::response_to_lua(lua, &r)?,
    })
}

pub fn ttl_arg(t: Option<f64>) -> LuaResult<Option<Duration>> {
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
    force: bool,
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
        .store(&key, v, ttl_arg(exptime)?, flags.unwrap_or(0), mode, force)
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
                store_op(this, k, v, e, f, Mode::Set, true)
            },
        );
        // ok, err, forcible = dict:add(key, value, exptime?, flags?)  ("exists")
        m.add_method(
            "add",
            |_, this, (k, v, e, f): (LuaValue, LuaValue, Option<f64>, Option<u32>)| {
                store_op(this, k, v, e, f, Mode::Add, true)
            },
        );
        // ok, err, forcible = dict:replace(key, value, exptime?, flags?)  ("not found")
        m.add_method(
            "replace",
            |_, this, (k, v, e, f): (LuaValue, LuaValue, Option<f64>, Option<u32>)| {
                store_op(this, k, v, e, f, Mode::Replace, true)
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
                Ok((v, forcible)) => Ok((from_val(lua, v)?, None, forcible)),
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
        // ok, err = dict:safe_set(key, value, exptime?, flags?): never evicts a live entry;
        // false, "no memory" instead
        m.add_method(
            "safe_set",
            |_, this, (k, v, e, f): (LuaValue, LuaValue, Option<f64>, Option<u32>)| {
                store_op(this, k, v, e, f, Mode::Set, false).map(|(ok, err, _)| (ok, err))
            },
        );
        // ok, err = dict:safe_add(key, value, exptime?, flags?)
        m.add_method(
            "safe_add",
            |_, this, (k, v, e, f): (LuaValue, LuaValue, Option<f64>, Option<u32>)| {
                store_op(this, k, v, e, f, Mode::Add, false).map(|(ok, err, _)| (ok, err))
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
                    Ok(Ok((n, _))) => Ok((Some(n), None)),
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
                    Ok((v, _)) => {
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

pub fn capacity_arg(v: LuaValue) -> LuaResult<usize> {
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
        assert_eq!(
            s.store("a", Val::Int(1), None, 0, Mode::Add, true),
            Ok(false)
        );
        assert_eq!(
            s.store("a", Val::Int(1), None, 0, Mode::Add, true),
            Err(SetErr::Exists)
        );
        assert_eq!(
            s.store("b", Val::Int(1), None, 0, Mode::Replace, true),
            Err(SetErr::NotFound)
        );
        assert_eq!(
            s.incr("a", 2.0, Some(2), None, None),
            Ok((Val::Int(3), false))
        );
        assert_eq!(
            s.incr("zz", 1.0, Some(1), None, None),
            Err(SetErr::NotFound)
        );
        let big = Val::Str(vec![0; 2000]);
        assert_eq!(
            s.store("c", big, None, 0, Mode::Set, true),
            Err(SetErr::NoMemory)
        );
        s.delete("a");
        assert_eq!(s.free_space(), 1000);
    }

    #[test]
    fn evicts_exactly_the_least_recently_used() {
        let s = Store::new("t", 10 * cost("k0", &Val::Int(0)));
        for i in 0..10 {
            s.store(&format!("k{i}"), Val::Int(i), None, 0, Mode::Set, true)
                .unwrap();
        }
        for i in [3, 0, 7, 1, 9, 2, 8, 4, 6, 5] {
            s.get(&format!("k{i}")).unwrap();
        }
        for j in 0..3 {
            let r = s.store(&format!("n{j}"), Val::Int(j), None, 0, Mode::Set, true);
            assert_eq!(r, Ok(true));
        }
        let left: Vec<i64> = (0..10)
            .filter(|i| s.get(&format!("k{i}")).unwrap().is_some())
            .collect();
        assert_eq!(left, vec![1, 2, 4, 5, 6, 8, 9]);
        assert_eq!(s.free_space(), 0);
    }

    #[test]
    fn lease_decrements_on_drop_and_skips_deleted_keys() {
        let s = Arc::new(Store::new("t", 10_000));
        s.store("up", Val::Int(0), None, 0, Mode::Set, true)
            .unwrap();
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
        s.store("n", Val::Int(0), None, 0, Mode::Set, true).unwrap();
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
