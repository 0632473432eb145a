//! `luaproxy.shared`: dictionaries shared by every Lua VM of the process (the main program
//! and every worker), in the shape of `ngx.shared.DICT`.
//!
//! This file is the store itself, plain Rust (tested by `cargo test`); `dict.rs` is the
//! Lua surface. Operations never yield, so they work anywhere, with or without a running loop.
//!
//! Eviction is exact LRU at the cost of one stamp per read: a read stamps the entry with a
//! tick from the store's clock; the ordered index of ticks only catches up when an eviction
//! walks it from the oldest end and moves any entry read since it was indexed to its real place
//! before judging it.
//!
//! size: the store's data structures and the invariants of its one lock (entries, the LRU
//! index, lists, the lock-free counters and their retirement) stay in one file so every path
//! that touches them can be read against them; about 230 of its lines are tests.

use crate::h1::headers::Headers;
use bytes::Bytes;
use std::cell::UnsafeCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    Resp(Arc<CachedResponse>),
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

/// Entries examined per lock hold by `get_keys` and `flush_expired`, so a big dict never holds
/// other workers up for long.
const SCAN_CHUNK: usize = 1024;

/// Live entries a `safe_*` write steps over while looking for expired ones to reclaim before it
/// gives up with "no memory".
const SAFE_SCAN: usize = 256;

enum Stored {
    Int(Arc<Counter>),
    Other(Val),
    List(std::collections::VecDeque<Val>),
}

/// An integer value. `incr` on a counter that never expires does not take the dict lock
/// after its first use on a thread: the thread keeps a handle to the counter (`HANDLES`) and
/// adds atomically. When the entry lets go of the counter (deleted, overwritten, evicted,
/// turned into a float, or about to leave the range the lock-free path works in) the value is
/// swapped for `DEAD`, so every add lands either before that (and is part of what the entry
/// had) or on `DEAD`, where its thread sees it and goes the locked way: none is lost or counted
/// twice. This is what two workers counting connections on one backend do.
pub struct Counter {
    value: AtomicI64,
    /// Last use through the lock-free path, for the LRU order (see `Entry::touched`).
    touched: AtomicU64,
}

/// A retired counter's value. Live counters stay within ±`LIVE_LIMIT` (the locked path moves
/// a value beyond it to a new counter), so a value below `DEAD_BELOW` can only be `DEAD` plus
/// the few adds that landed on it after retirement.
const DEAD: i64 = -(1 << 62);
const DEAD_BELOW: i64 = -(3 << 60);
const LIVE_LIMIT: u64 = 1 << 61;
/// Adds at least this large go the locked way.
const FAST_ADD_LIMIT: u64 = 1 << 32;

impl Counter {
    fn get(&self) -> i64 {
        self.value.load(Ordering::SeqCst)
    }
}

impl Stored {
    fn new(v: Val) -> Stored {
        match v {
            Val::Int(i) => Stored::Int(Arc::new(Counter {
                value: AtomicI64::new(i),
                touched: AtomicU64::new(0),
            })),
            v => Stored::Other(v),
        }
    }

    /// The scalar value; `None` for a list.
    fn load(&self) -> Option<Val> {
        match self {
            Stored::Int(c) => Some(Val::Int(c.get())),
            Stored::Other(v) => Some(v.clone()),
            Stored::List(_) => None,
        }
    }
}

impl Drop for Stored {
    fn drop(&mut self) {
        if let Stored::Int(c) = self {
            c.value.swap(DEAD, Ordering::SeqCst);
        }
    }
}

/// Per thread: the counters it incremented last, most recent first, by store address and key.
/// A short list scanned in order beats a hash map here: the hot counters are few (one per
/// backend) and the scan needs no hashing.
type Handles = Vec<(usize, Box<[u8]>, Arc<Counter>)>;

const MAX_HANDLES: usize = 16;

thread_local! {
    static HANDLES: std::cell::RefCell<Handles> = const { std::cell::RefCell::new(Vec::new()) };
}

struct Entry {
    val: Stored,
    flags: u32,
    expires: Option<Instant>,
    /// Bytes charged against capacity.
    cost: usize,
    /// This entry's key in `Inner::lru`.
    order: u64,
    /// Tick of the last access (>= `order`); bumped by reads.
    touched: AtomicU64,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }

    /// `live`, reading the clock only for an entry that can expire.
    fn live_at(&self, now: &Now) -> bool {
        self.expires.is_none_or(|e| e > now.get())
    }

    /// Writes a new value over this one (the caller has charged `cost`). The entry keeps its
    /// place in the LRU index, which catches up lazily: its tick says it is the newest.
    #[inline]
    fn overwrite(
        &mut self,
        val: New<'_>,
        flags: u32,
        expires: Option<Instant>,
        cost: usize,
        tick: u64,
    ) {
        match (val, &mut self.val) {
            // No allocation, and no free (inside the lock) of a buffer another worker may
            // have allocated: that made 2-worker `set` 0.7x nginx's (BENCHMARKS.md).
            (New::Str(s), Stored::Other(Val::Str(v))) if v.len() == s.len() => v.copy_from_slice(s),
            (val, slot) => *slot = val.into_stored(),
        }
        self.flags = flags;
        self.expires = expires;
        self.cost = cost;
        *self.touched.get_mut() = tick;
    }
}

/// A value on its way into the store: ready, or a string still in the caller's buffer.
enum New<'a> {
    Val(Stored),
    Str(&'a [u8]),
}

impl New<'_> {
    fn into_stored(self) -> Stored {
        match self {
            New::Val(v) => v,
            New::Str(s) => Stored::new(Val::Str(s.to_vec())),
        }
    }
}

/// The time, read on first use: most operations touch only entries that never expire, so most
/// never need the clock (a vDSO call).
#[derive(Default)]
struct Now(std::cell::Cell<Option<Instant>>);

impl Now {
    fn get(&self) -> Instant {
        match self.0.get() {
            Some(t) => t,
            None => {
                let t = crate::clock::now();
                self.0.set(Some(t));
                t
            }
        }
    }
}

/// Fixed per-entry overhead counted against capacity (map slot, index node, key header), so
/// capacity bounds real memory.
const ENTRY_OVERHEAD: usize = 64;
/// Per-element overhead of a list.
const LIST_ITEM_OVERHEAD: usize = 16;

#[derive(Default)]
struct Inner {
    map: HashMap<Arc<[u8]>, Entry, ahash::RandomState>,
    /// Entries by `order`, oldest first.
    lru: BTreeMap<u64, Arc<[u8]>>,
    used: usize,
}

impl Inner {
    fn remove(&mut self, key: &[u8]) -> Option<(Arc<[u8]>, Entry)> {
        let (k, e) = self.map.remove_entry(key)?;
        self.lru.remove(&e.order);
        self.used -= e.cost;
        Some((k, e))
    }

    /// Inserts an entry for a key that is not in the map (the caller removed it and made room).
    fn insert(
        &mut self,
        key: Arc<[u8]>,
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
        keep: &[u8],
        now: &Now,
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
            let mut touched = *e.touched.get_mut();
            if let Stored::Int(c) = &e.val {
                touched = touched.max(c.touched.load(Ordering::Relaxed));
            }
            if touched > order {
                // Read since it was indexed: move it to where it really belongs and go on.
                e.order = touched;
                self.lru.remove(&order);
                self.lru.insert(touched, key);
                continue;
            }
            let live = e.live_at(now);
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

/// A value seen in place by [`Store::peek`].
pub enum ValRef<'a> {
    Int(i64),
    Val(&'a Val),
}

impl ValRef<'_> {
    pub fn to_val(&self) -> Val {
        match self {
            ValRef::Int(i) => Val::Int(*i),
            ValRef::Val(v) => (*v).clone(),
        }
    }
}

/// The lock of a dict: exclusive, as nginx's shared dicts have. Taking it is one atomic swap
/// and releasing it one plain store, where a reader-writer lock costs two atomic operations
/// per read and its contended cache line is the same for two workers either way (what it
/// changed is in BENCHMARKS.md, shared dicts). Critical sections are short (no
/// I/O, no Lua, chunked walks); a waiter spins briefly, then yields its time slice. A panic
/// while it is held releases it; the dict then serves on, like a poisoned lock ignored.
pub struct SpinLock<T> {
    locked: CacheLine<AtomicBool>,
    value: UnsafeCell<T>,
}

/// Keeps the lock word on a cache line of its own, so waiters spinning on it do not steal the
/// line the holder is writing.
#[repr(align(64))]
struct CacheLine<T>(T);

impl<T> Deref for CacheLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

// SAFETY: the value is only reached through a guard, and one guard exists at a time.
unsafe impl<T: Send> Sync for SpinLock<T> {}

pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> SpinLock<T> {
    pub fn new(value: T) -> SpinLock<T> {
        SpinLock {
            locked: CacheLine(AtomicBool::new(false)),
            value: UnsafeCell::new(value),
        }
    }

    pub fn lock(&self) -> SpinGuard<'_, T> {
        loop {
            if !self.locked.swap(true, Ordering::Acquire) {
                return SpinGuard { lock: self };
            }
            // Back off exponentially between looks, as nginx's shmtx does: a waiter reading
            // the lock word on every pause keeps pulling the line away from the holder.
            let mut pause = 1u32;
            loop {
                for _ in 0..pause {
                    std::hint::spin_loop();
                }
                if !self.locked.load(Ordering::Relaxed) {
                    break;
                }
                if pause < 1024 {
                    pause <<= 1;
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard holds the lock, and `&mut self` makes this borrow unique.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// A named dictionary with a byte capacity.
pub struct Store {
    pub name: String,
    pub capacity: usize,
    /// Its index in `SLOTS` (`usize::MAX` for a store not registered as a dict).
    pub slot: usize,
    inner: SpinLock<Inner>,
    clock: AtomicU64,
}

#[derive(Debug, PartialEq, Clone, Copy)]
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
    /// Every error, in declaration order (the FFI path numbers them by position).
    pub const ALL: [SetErr; 7] = [
        SetErr::NoMemory,
        SetErr::Exists,
        SetErr::NotFound,
        SetErr::NotANumber,
        SetErr::NotAList,
        SetErr::IsList,
        SetErr::Changed,
    ];

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

fn cost(key: &[u8], v: &Val) -> usize {
    key.len() + v.size() + ENTRY_OVERHEAD
}

impl Store {
    pub fn new(name: &str, capacity: usize) -> Store {
        Store {
            name: name.to_string(),
            capacity,
            slot: usize::MAX,
            inner: SpinLock::new(Inner::default()),
            clock: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> SpinGuard<'_, Inner> {
        self.inner.lock()
    }

    /// The next tick (the lock-free `incr` path takes ticks too, so this is atomic).
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Marks a read. An entry that is already the most recently used one is left alone, so a
    /// hot key read over and over (a least-connection counter) costs no write to the clock.
    fn touch(&self, e: &Entry) {
        self.stamp(&e.touched);
    }

    fn stamp(&self, touched: &AtomicU64) {
        if touched.load(Ordering::Relaxed) + 1 < self.clock.load(Ordering::Relaxed) {
            touched.store(self.tick(), Ordering::Relaxed);
        }
    }

    /// Hands `f` the value at `key` without copying it (under the dict lock: `f` must not
    /// block or call into Lua), with its flags and, for an expired entry, how long ago it
    /// expired. Expired entries are only seen with `stale`. `Ok(None)` when missing; `Err` for
    /// a list. Every read goes through here.
    pub fn peek<R>(
        &self,
        key: &[u8],
        stale: bool,
        f: impl FnOnce(ValRef<'_>, u32, Option<Duration>) -> R,
    ) -> Result<Option<R>, SetErr> {
        let g = self.lock();
        let Some(e) = g.map.get(key) else {
            return Ok(None);
        };
        let expired_for = e
            .expires
            .and_then(|t| crate::clock::now().checked_duration_since(t));
        if expired_for.is_some() && !stale {
            return Ok(None);
        }
        self.touch(e);
        let v = match &e.val {
            Stored::Int(c) => ValRef::Int(c.get()),
            Stored::Other(v) => ValRef::Val(v),
            Stored::List(_) => return Err(SetErr::IsList),
        };
        Ok(Some(f(v, e.flags, expired_for)))
    }

    /// A copy of the live value at `key` and its flags.
    pub fn get(&self, key: &[u8]) -> Result<Option<(Val, u32)>, SetErr> {
        self.peek(key, false, |v, flags, _| (v.to_val(), flags))
    }

    /// Seconds left to live (0 = never expires); `Err(NotFound)` when missing or expired.
    pub fn ttl(&self, key: &[u8]) -> Result<f64, SetErr> {
        let now = crate::clock::now();
        let g = self.lock();
        match g.map.get(key).filter(|e| e.live(now)) {
            None => Err(SetErr::NotFound),
            Some(e) => Ok(e.expires.map(|t| (t - now).as_secs_f64()).unwrap_or(0.0)),
        }
    }

    /// Sets a new time to live on a live key (`None` = never expires).
    pub fn expire(&self, key: &[u8], ttl: Option<Duration>) -> Result<(), SetErr> {
        let now = crate::clock::now();
        let mut g = self.lock();
        match g.map.get_mut(key).filter(|e| e.live(now)) {
            None => Err(SetErr::NotFound),
            Some(e) => {
                e.expires = ttl.map(|t| now + t);
                if let (Stored::Int(c), Some(_)) = (&e.val, ttl) {
                    // Lock-free adds cannot see a time to live: move the value to a counter
                    // no thread has a handle to.
                    let v = c.value.swap(DEAD, Ordering::SeqCst);
                    e.val = Stored::new(Val::Int(v));
                }
                Ok(())
            }
        }
    }

    /// Hands `f` up to `SCAN_CHUNK` keys from index position `cursor` on, oldest first, with
    /// whether each is live, under one hold of the dict lock. `f` returns false to stop.
    /// Returns where the next chunk starts, or `None` when the walk is over.
    fn scan_chunk(&self, cursor: u64, mut f: impl FnMut(&Arc<[u8]>, bool) -> bool) -> Option<u64> {
        let now = crate::clock::now();
        let g = self.lock();
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
        let mut dead: Vec<Arc<[u8]>> = Vec::new();
        while let Some(c) = cursor {
            cursor = self.scan_chunk(c, |k, live| {
                if !live {
                    dead.push(k.clone());
                }
                removed + dead.len() < max
            });
            let now = crate::clock::now();
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
        key: &[u8],
        old: Option<&Val>,
        new: Val,
        ttl: Option<Duration>,
    ) -> Result<(), SetErr> {
        let now = Now::default();
        let mut g = self.lock();
        let cur = g
            .map
            .get(key)
            .filter(|e| e.live_at(&now))
            .map(|e| e.val.load());
        match (cur, old) {
            (None, None) => {}
            (Some(Some(c)), Some(o)) if c == *o => {}
            (Some(None), _) => return Err(SetErr::IsList),
            _ => return Err(SetErr::Changed),
        }
        self.put(
            &mut g,
            key,
            New::Val(Stored::new(new.clone())),
            cost(key, &new),
            0,
            ttl,
            &now,
            true,
        )?;
        Ok(())
    }

    /// Makes room for and writes one entry, replacing whatever `key` held; `Ok(forcible)`.
    /// A key overwritten with a value that fits (the common case) takes one lookup; this
    /// part is inlined into every caller, the rest is `put_evicting`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn put(
        &self,
        g: &mut Inner,
        key: &[u8],
        val: New<'_>,
        new_cost: usize,
        flags: u32,
        ttl: Option<Duration>,
        now: &Now,
        force: bool,
    ) -> Result<bool, SetErr> {
        let credit = {
            let Inner { map, used, .. } = &mut *g;
            match map.get_mut(key) {
                Some(e) if *used - e.cost + new_cost <= self.capacity => {
                    *used = *used - e.cost + new_cost;
                    e.overwrite(
                        val,
                        flags,
                        ttl.map(|t| now.get() + t),
                        new_cost,
                        self.tick(),
                    );
                    return Ok(false);
                }
                Some(e) => e.cost,
                None => 0,
            }
        };
        self.put_evicting(g, key, val, new_cost, credit, flags, ttl, now, force)
    }

    /// `put` for a new key or one whose new value does not fit without making room.
    #[allow(clippy::too_many_arguments)]
    fn put_evicting(
        &self,
        g: &mut Inner,
        key: &[u8],
        val: New<'_>,
        new_cost: usize,
        credit: usize,
        flags: u32,
        ttl: Option<Duration>,
        now: &Now,
        force: bool,
    ) -> Result<bool, SetErr> {
        let forcible = g.make_room(self.capacity, new_cost, credit, key, now, force)?;
        let tick = self.tick();
        let expires = ttl.map(|t| now.get() + t);
        let Inner { map, used, .. } = g;
        match map.get_mut(key) {
            Some(e) => {
                *used = *used - e.cost + new_cost;
                e.overwrite(val, flags, expires, new_cost, tick);
            }
            None => g.insert(
                Arc::from(key),
                val.into_stored(),
                flags,
                expires,
                new_cost,
                tick,
            ),
        }
        Ok(forcible)
    }

    /// Pushes onto the list at `key` (created if missing); returns the new length and forcible.
    pub fn push(&self, key: &[u8], v: Val, front: bool) -> Result<(usize, bool), SetErr> {
        let now = Now::default();
        let extra = v.size() + LIST_ITEM_OVERHEAD;
        let mut g = self.lock();
        let live = g.map.get(key).filter(|e| e.live_at(&now));
        let forcible = match live {
            Some(e) if !matches!(e.val, Stored::List(_)) => return Err(SetErr::NotAList),
            Some(_) => g.make_room(self.capacity, extra, 0, key, &now, true)?,
            None => {
                let base = key.len() + ENTRY_OVERHEAD;
                self.put(
                    &mut g,
                    key,
                    New::Val(Stored::List(Default::default())),
                    base,
                    0,
                    None,
                    &now,
                    true,
                )?;
                // Room for the first element too (the list itself is the newest entry).
                g.make_room(self.capacity, extra, 0, key, &now, true)
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
    pub fn pop(&self, key: &[u8], front: bool) -> Result<Option<Val>, SetErr> {
        let now = Now::default();
        let mut g = self.lock();
        let tick = self.tick();
        let Some(e) = g.map.get_mut(key).filter(|e| e.live_at(&now)) else {
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
    pub fn llen(&self, key: &[u8]) -> Result<usize, SetErr> {
        let now = Now::default();
        let g = self.lock();
        match g.map.get(key).filter(|e| e.live_at(&now)) {
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
        key: &[u8],
        val: Val,
        ttl: Option<Duration>,
        flags: u32,
        mode: Mode,
        force: bool,
    ) -> Result<bool, SetErr> {
        let new_cost = cost(key, &val);
        self.store_new(
            key,
            New::Val(Stored::new(val)),
            new_cost,
            ttl,
            flags,
            mode,
            force,
        )
    }

    /// `store` of a string still in the caller's buffer (a Lua string): over an entry holding
    /// a string of the same length it is copied into that entry's buffer, and nothing is
    /// allocated or freed.
    pub fn store_str(
        &self,
        key: &[u8],
        s: &[u8],
        ttl: Option<Duration>,
        flags: u32,
        mode: Mode,
        force: bool,
    ) -> Result<bool, SetErr> {
        let new_cost = key.len() + s.len() + ENTRY_OVERHEAD;
        self.store_new(key, New::Str(s), new_cost, ttl, flags, mode, force)
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn store_new(
        &self,
        key: &[u8],
        val: New<'_>,
        new_cost: usize,
        ttl: Option<Duration>,
        flags: u32,
        mode: Mode,
        force: bool,
    ) -> Result<bool, SetErr> {
        let now = Now::default();
        let mut g = self.lock();
        if !matches!(mode, Mode::Set) {
            let old = g.map.get(key).filter(|e| e.live_at(&now)).is_some();
            match mode {
                Mode::Add if old => return Err(SetErr::Exists),
                Mode::Replace if !old => return Err(SetErr::NotFound),
                _ => {}
            }
        }
        self.put(&mut g, key, val, new_cost, flags, ttl, &now, force)
    }

    pub fn delete(&self, key: &[u8]) {
        self.lock().remove(key);
    }

    /// Adds `n` to a number; a missing key starts from `init` when given. Returns the new
    /// value and whether live entries were evicted to create it.
    pub fn incr(
        &self,
        key: &[u8],
        n: f64,
        n_int: Option<i64>,
        init: Option<Val>,
        init_ttl: Option<Duration>,
    ) -> Result<(Val, bool), SetErr> {
        if let Some(b) = n_int.filter(|b| b.unsigned_abs() < FAST_ADD_LIMIT) {
            if let Some(v) = self.incr_unlocked(key, b) {
                return Ok((Val::Int(v), false));
            }
        }
        let now = Now::default();
        let mut g = self.lock();
        if let Some(b) = n_int {
            // An integer counter, changed in place (an add, as lock-free adds may race it).
            if let Some(e) = g.map.get(key).filter(|e| e.live_at(&now)) {
                if let Stored::Int(c) = &e.val {
                    // Values the lock-free path must not add to (see LIVE_LIMIT) get a new
                    // counter below instead.
                    let add = |v: i64| {
                        v.checked_add(b)
                            .filter(|s| v >= DEAD_BELOW && s.unsigned_abs() < LIVE_LIMIT)
                    };
                    if let Ok(prev) = c
                        .value
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, add)
                    {
                        self.touch(e);
                        if e.expires.is_none() {
                            self.remember(key, c);
                        }
                        return Ok((Val::Int(prev + b), false));
                    }
                }
            }
        }
        let live = g
            .map
            .get(key)
            .filter(|e| e.live_at(&now))
            .map(|e| e.val.load());
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
                New::Val(Stored::new(newval.clone())),
                c,
                0,
                init_ttl,
                &now,
                true,
            )?;
            return Ok((newval, forcible));
        }
        let tick = self.tick();
        let e = g.map.get_mut(key).expect("live above");
        // An integer becoming a float: its counter is retired first (swapped for DEAD, so a
        // lock-free add either made it into the value read here or goes the locked way).
        let newval = match (&e.val, n_int) {
            (Stored::Int(c), _) => match c.value.swap(DEAD, Ordering::SeqCst) {
                DEAD => newval,
                a => match n_int.and_then(|b| a.checked_add(b)) {
                    Some(s) => Val::Int(s),
                    None => Val::Num(a as f64 + n),
                },
            },
            _ => newval,
        };
        e.val = Stored::new(newval.clone());
        *e.touched.get_mut() = tick;
        Ok((newval, false))
    }

    /// `incr` by `b` without the lock, through this thread's handle to the counter; `None`
    /// when there is no usable handle (the caller takes the locked way).
    fn incr_unlocked(&self, key: &[u8], b: i64) -> Option<i64> {
        let me = self as *const Store as usize;
        HANDLES.with(|h| {
            let mut h = h.borrow_mut();
            let i = h.iter().position(|(s, k, _)| *s == me && **k == *key)?;
            let c = &h[i].2;
            // An add, not a compare-and-swap, and no look at the value first: under contention
            // either would cost the cache line twice. An add that lands on a retired counter
            // finds DEAD and goes the locked way; nobody reads a retired counter.
            let prev = c.value.fetch_add(b, Ordering::SeqCst);
            if prev >= DEAD_BELOW {
                self.stamp(&c.touched);
                if i > 0 {
                    h.swap(0, i);
                }
                return Some(prev + b);
            }
            h.remove(i);
            None
        })
    }

    /// Keeps a handle to `key`'s counter for this thread's next `incr`.
    fn remember(&self, key: &[u8], c: &Arc<Counter>) {
        let me = self as *const Store as usize;
        HANDLES.with(|h| {
            let mut h = h.borrow_mut();
            h.retain(|(s, k, _)| !(*s == me && **k == *key));
            h.truncate(MAX_HANDLES - 1);
            h.insert(0, (me, key.into(), c.clone()));
        })
    }

    /// Live keys, at most `max` (0 = all), least recently written first. Collected a chunk
    /// at a time so a big dict never holds other workers up for long; every key live for the
    /// whole walk is listed, keys written during it may or may not be.
    pub fn keys(&self, max: usize) -> Vec<Arc<[u8]>> {
        let max = if max == 0 { usize::MAX } else { max };
        let mut out = Vec::new();
        let mut seen: HashSet<Arc<[u8]>, ahash::RandomState> = HashSet::default();
        let mut cursor = Some(0);
        while let Some(c) = cursor {
            cursor = self.scan_chunk(c, |k, live| {
                // An entry rewritten between chunks moves forward and can come round twice.
                if live && seen.insert(k.clone()) {
                    out.push(k.clone());
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
        self.capacity.saturating_sub(self.lock().used)
    }
}

/// Named objects every VM of the process shares, made once with a capacity: dicts, caches.
pub struct Registry<T> {
    kind: &'static str,
    map: OnceLock<Mutex<HashMap<String, Arc<T>>>>,
}

impl<T> Registry<T> {
    pub const fn new(kind: &'static str) -> Registry<T> {
        Registry {
            kind,
            map: OnceLock::new(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<T>>> {
        self.map
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn find(&self, name: &str) -> Option<Arc<T>> {
        self.map().get(name).cloned()
    }

    /// `f(name, object)` for each object (under the registry's lock: keep `f` short).
    pub fn each(&self, mut f: impl FnMut(&str, &T)) {
        for (name, o) in self.map().iter() {
            f(name, o);
        }
    }

    /// The object called `name`, made by `make(number of objects so far)` if there is none; an
    /// existing one must have the same capacity.
    pub fn get_or_create(
        &self,
        name: &str,
        capacity: usize,
        capacity_of: impl Fn(&T) -> usize,
        make: impl FnOnce(usize) -> Result<Arc<T>, String>,
    ) -> Result<Arc<T>, String> {
        let mut r = self.map();
        if let Some(o) = r.get(name) {
            let had = capacity_of(o);
            if had == capacity {
                return Ok(o.clone());
            }
            return Err(format!("{} '{name}' exists with capacity {had}", self.kind));
        }
        let o = make(r.len())?;
        r.insert(name.to_string(), o.clone());
        Ok(o)
    }
}

static DICTS: Registry<Store> = Registry::new("dict");

pub fn find(name: &str) -> Option<Arc<Store>> {
    DICTS.find(name)
}

/// Empties every dict (`luaproxy.test`'s reset between specs).
pub fn flush_all_dicts() {
    DICTS.each(|_, d| d.flush_all());
}

/// `f(name, capacity, bytes used)` for every dict, for the metrics.
pub fn each_dict(mut f: impl FnMut(&str, usize, usize)) {
    DICTS.each(|name, d| f(name, d.capacity, d.capacity - d.free_space()));
}

/// Dicts by number, so a Lua dict object can name its store with a plain integer that is
/// checked on every call (a forged number finds nothing) and needs no lock to resolve.
/// Dicts are never destroyed, so a slot, once filled, stays valid for the process.
const MAX_DICTS: usize = 4096;
static SLOTS: [OnceLock<Arc<Store>>; MAX_DICTS] = [const { OnceLock::new() }; MAX_DICTS];

/// The dict in `slot`.
pub fn slot(i: usize) -> Option<&'static Store> {
    SLOTS.get(i)?.get().map(|s| &**s)
}

/// Creates a dict, or returns the existing one when the capacity matches.
pub fn create(name: &str, capacity: usize) -> Result<Arc<Store>, String> {
    DICTS.get_or_create(
        name,
        capacity,
        |d| d.capacity,
        |i| {
            if i >= MAX_DICTS {
                return Err(format!("too many dicts (at most {MAX_DICTS})"));
            }
            let mut d = Store::new(name, capacity);
            d.slot = i;
            let d = Arc::new(d);
            let _ = SLOTS[i].set(d.clone());
            Ok(d)
        },
    )
}

/// An upstream response kept in a dict or cache: status, headers and the whole body. Plain
/// data: the store holds it without knowing the cache or the Lua response object.
#[derive(Debug, PartialEq)]
pub struct CachedResponse {
    pub status: u16,
    pub headers: Headers,
    pub body: Bytes,
}

impl CachedResponse {
    pub fn size(&self) -> usize {
        64 + self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 32)
                .sum::<usize>()
    }
}

/// The longest key a dict takes (ngx.shared.DICT's limit).
pub const MAX_KEY_LEN: usize = 65535;

/// An exptime in seconds: `Ok(None)` for 0 (never expires), clamped like every number of
/// seconds (`units::seconds`).
pub fn ttl_secs(t: f64) -> Result<Option<Duration>, &'static str> {
    if t == 0.0 {
        // Most writes never expire: skip the float-to-Duration conversion.
        return Ok(None);
    }
    match crate::units::seconds(t) {
        Some(d) if d.is_zero() => Ok(None),
        Some(d) => Ok(Some(d)),
        None => Err("exptime must be a number of seconds >= 0"),
    }
}

/// Parses `1048576`, `"512k"`, `"10m"`, `"1g"` (`units::parse_size`, as a `usize`).
pub fn parse_size(s: &str) -> Option<usize> {
    crate::units::parse_size(s).and_then(|n| usize::try_from(n).ok())
}

/// Releases a least-connection lease: decrements the counter when the request ends.
pub struct Lease {
    /// Dicts live as long as the process (see `SLOTS`), so a plain reference does.
    pub store: &'static Store,
    pub key: Vec<u8>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Only decrement a key that still exists: a backend removed from the list while the
        // request was in flight must not come back as a stray counter.
        let _ = self.store.incr(&self.key, -1.0, Some(-1), None, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_err_all_is_in_declaration_order() {
        for (i, e) in SetErr::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i, "{e:?}");
        }
    }

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
            s.store(b"a", Val::Int(1), None, 0, Mode::Add, true),
            Ok(false)
        );
        assert_eq!(
            s.store(b"a", Val::Int(1), None, 0, Mode::Add, true),
            Err(SetErr::Exists)
        );
        assert_eq!(
            s.store(b"b", Val::Int(1), None, 0, Mode::Replace, true),
            Err(SetErr::NotFound)
        );
        assert_eq!(
            s.incr(b"a", 2.0, Some(2), None, None),
            Ok((Val::Int(3), false))
        );
        assert_eq!(
            s.incr(b"zz", 1.0, Some(1), None, None),
            Err(SetErr::NotFound)
        );
        let big = Val::Str(vec![0; 2000]);
        assert_eq!(
            s.store(b"c", big, None, 0, Mode::Set, true),
            Err(SetErr::NoMemory)
        );
        s.delete(b"a");
        assert_eq!(s.free_space(), 1000);
    }

    #[test]
    fn evicts_exactly_the_least_recently_used() {
        let s = Store::new("t", 10 * cost(b"k0", &Val::Int(0)));
        for i in 0..10 {
            s.store(
                format!("k{i}").as_bytes(),
                Val::Int(i),
                None,
                0,
                Mode::Set,
                true,
            )
            .unwrap();
        }
        for i in [3, 0, 7, 1, 9, 2, 8, 4, 6, 5] {
            s.get(format!("k{i}").as_bytes()).unwrap();
        }
        for j in 0..3 {
            let r = s.store(
                format!("n{j}").as_bytes(),
                Val::Int(j),
                None,
                0,
                Mode::Set,
                true,
            );
            assert_eq!(r, Ok(true));
        }
        let left: Vec<i64> = (0..10)
            .filter(|i| s.get(format!("k{i}").as_bytes()).unwrap().is_some())
            .collect();
        assert_eq!(left, vec![1, 2, 4, 5, 6, 8, 9]);
        assert_eq!(s.free_space(), 0);
    }

    #[test]
    fn overwrites_keep_exact_accounting_and_evict_only_when_needed() {
        let str_val = |n: usize| Val::Str(vec![b'v'; n]);
        let c = |n: usize| cost(b"a", &str_val(n));
        let s = Store::new("t", c(10) + c(10));
        let set = |k: &[u8], n, mode| s.store(k, str_val(n), None, 0, mode, true);
        assert_eq!(set(b"a", 10, Mode::Set), Ok(false));
        assert_eq!(set(b"b", 10, Mode::Set), Ok(false));
        assert_eq!(s.free_space(), 0);
        // In place (the one-lookup way): smaller, then the same size again.
        assert_eq!(set(b"a", 4, Mode::Set), Ok(false));
        assert_eq!(s.free_space(), 6);
        assert_eq!(set(b"a", 10, Mode::Replace), Ok(false));
        assert_eq!(s.free_space(), 0);
        assert_eq!(s.get(b"a").unwrap().map(|(v, _)| v), Some(str_val(10)));
        // Growing past capacity evicts the other key (forcible), never the one being set.
        assert_eq!(set(b"a", 12, Mode::Set), Ok(true));
        assert_eq!(s.get(b"b").unwrap(), None);
        assert_eq!(s.free_space(), c(10) + c(10) - c(12));
        assert_eq!(set(b"a", 1, Mode::Add), Err(SetErr::Exists));
        // A string of the same length is copied into the entry's buffer; anything else
        // gets a new one.
        let buf = |s: &Store| match &s.lock().map.get(&b"a"[..]).unwrap().val {
            Stored::Other(Val::Str(v)) => v.as_ptr() as usize,
            _ => 0,
        };
        let (free, before) = (s.free_space(), buf(&s));
        let str_set = |k: &[u8], n, mode| s.store_str(k, &vec![b'w'; n], None, 7, mode, true);
        assert_eq!(str_set(b"a", 12, Mode::Set), Ok(false));
        assert_eq!(buf(&s), before);
        assert_eq!(s.get(b"a").unwrap(), Some((Val::Str(vec![b'w'; 12]), 7)));
        assert_eq!(s.free_space(), free);
        assert_eq!(str_set(b"a", 11, Mode::Set), Ok(false));
        assert_ne!(buf(&s), 0);
        assert_eq!(s.get(b"a").unwrap(), Some((Val::Str(vec![b'w'; 11]), 7)));
        assert_eq!(s.free_space(), free + 1);
        assert_eq!(str_set(b"a", 11, Mode::Add), Err(SetErr::Exists));
        assert_eq!(str_set(b"zz", 12, Mode::Replace), Err(SetErr::NotFound));
        // An expired entry is not overwritten in place by replace.
        s.store(
            b"e",
            Val::Int(1),
            Some(Duration::from_millis(1)),
            0,
            Mode::Set,
            true,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            s.store(b"e", Val::Int(2), None, 0, Mode::Replace, true),
            Err(SetErr::NotFound)
        );
    }

    #[test]
    fn lease_decrements_on_drop_and_skips_deleted_keys() {
        let s = slot(create("lease_test", 10_000).unwrap().slot).unwrap();
        s.store(b"up", Val::Int(0), None, 0, Mode::Set, true)
            .unwrap();
        s.incr(b"up", 1.0, Some(1), None, None).unwrap();
        drop(Lease {
            store: s,
            key: b"up".to_vec(),
        });
        assert_eq!(s.get(b"up").unwrap().unwrap().0, Val::Int(0));
        s.delete(b"up");
        drop(Lease {
            store: s,
            key: b"up".to_vec(),
        });
        assert!(s.get(b"up").unwrap().is_none());
    }

    #[test]
    fn lock_free_incr_never_loses_or_doubles_an_add() {
        let s = Arc::new(Store::new("t", 10_000));
        s.store(b"n", Val::Int(0), None, 0, Mode::Set, true)
            .unwrap();
        // Midway, the counter becomes a float under the adders' feet: the switch waits until
        // every adder is past 10 % of its adds, and no adder passes 90 % before the switch,
        // so it always lands mid-stream (a fixed sleep let the adders finish first).
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
        const ADDS: usize = 20_000;
        let progress: Arc<Vec<AtomicUsize>> =
            Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect());
        let switched = Arc::new(AtomicBool::new(false));
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let (s, progress, switched) = (s.clone(), progress.clone(), switched.clone());
                std::thread::spawn(move || {
                    for k in 0..ADDS {
                        if k == ADDS * 9 / 10 {
                            while !switched.load(SeqCst) {
                                std::thread::yield_now();
                            }
                        }
                        s.incr(b"n", 1.0, Some(1), None, None).unwrap();
                        progress[i].store(k + 1, SeqCst);
                    }
                })
            })
            .collect();
        while progress.iter().any(|p| p.load(SeqCst) < ADDS / 10) {
            std::thread::yield_now();
        }
        let at: Vec<usize> = progress.iter().map(|p| p.load(SeqCst)).collect();
        s.incr(b"n", 0.5, None, None, None).unwrap();
        switched.store(true, SeqCst);
        for h in hs {
            h.join().unwrap();
        }
        assert!(
            at.iter().all(|k| (ADDS / 10..=ADDS * 9 / 10).contains(k)),
            "{at:?}"
        );
        assert_eq!(s.get(b"n").unwrap().unwrap().0, Val::Num(80_000.5));
        // A deleted counter is not brought back by a thread's handle to it.
        s.store(b"m", Val::Int(1), None, 0, Mode::Set, true)
            .unwrap();
        s.incr(b"m", 1.0, Some(1), None, None).unwrap();
        assert_eq!(
            s.incr(b"m", 1.0, Some(1), None, None),
            Ok((Val::Int(3), false))
        );
        s.delete(b"m");
        let r = s.incr(b"m", 1.0, Some(1), None, None);
        assert_eq!(r, Err(SetErr::NotFound));
        // Nor does an overwrite leave adds on the old counter.
        s.store(b"m", Val::Int(10), None, 0, Mode::Set, true)
            .unwrap();
        s.incr(b"m", 1.0, Some(1), None, None).unwrap();
        s.store(b"m", Val::Int(100), None, 0, Mode::Set, true)
            .unwrap();
        assert_eq!(
            s.incr(b"m", 1.0, Some(1), None, None),
            Ok((Val::Int(101), false))
        );
        // A time to live set on a counter a thread holds a handle to still applies.
        s.expire(b"m", Some(Duration::from_millis(30))).unwrap();
        let r = s.incr(b"m", 1.0, Some(1), None, None);
        assert_eq!(r, Ok((Val::Int(102), false)));
        std::thread::sleep(Duration::from_millis(40));
        let r = s.incr(b"m", 1.0, Some(1), None, None);
        assert_eq!(r, Err(SetErr::NotFound));
    }
}
