//! `luaproxy.cache`: LRU/TTL caches shared by every worker, with single-flight fetches and
//! stale-while-revalidate.
//!
//! A cache is a [`Store`] (the shared dict's exact-LRU, byte-accounted store) plus a table of
//! fetches in flight. A fetch is owned by the coroutine that claimed its key; everyone else,
//! on any worker, waits on a `watch` channel for its outcome. If the owner vanishes (its
//! request was aborted), the channel closes and a waiter claims the key in its place.

use crate::shared::dict;
use crate::shared::store::{self, Mode, Store, Val, ValRef};
use mlua::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

/// Entry flag of a remembered failure (`opts.neg_ttl`): the value is the error string.
const NEGATIVE: u32 = 1;

/// How long a caller waits for another coroutine's fetch before giving up, by default.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

type FetchOutcome = Option<Result<Val, String>>;

pub struct Cache {
    pub store: Store,
    flights: Mutex<HashMap<Vec<u8>, watch::Receiver<FetchOutcome>, ahash::RandomState>>,
}

/// What a lookup means for `get` and `get_or_fetch`.
#[derive(Debug, PartialEq)]
pub enum Hit {
    Fresh(Val),
    /// Expired `age` ago and not yet evicted.
    Stale(Val, Duration),
    /// A remembered failure, still within its `neg_ttl`.
    Failed(String),
    Miss,
}

/// The right to fetch one key; dropping it (owner aborted) lets a waiter take over.
pub struct Flight {
    cache: Arc<Cache>,
    key: Vec<u8>,
    tx: watch::Sender<FetchOutcome>,
}

impl Flight {
    pub fn finish(self, outcome: Result<Val, String>) {
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.cache.flights().remove(&self.key);
    }
}

pub enum Claim {
    Owner(Flight),
    Waiter(watch::Receiver<FetchOutcome>),
}

impl Cache {
    pub fn new(name: &str, capacity: usize) -> Cache {
        Cache {
            store: Store::new(name, capacity),
            flights: Mutex::default(),
        }
    }

    fn flights(
        &self,
    ) -> MutexGuard<'_, HashMap<Vec<u8>, watch::Receiver<FetchOutcome>, ahash::RandomState>> {
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lookup(&self, key: &[u8]) -> Hit {
        let found = self.store.peek(key, true, |v, flags, expired_for| {
            match (flags == NEGATIVE, expired_for, v) {
                (true, None, ValRef::Val(Val::Str(e))) => {
                    Hit::Failed(String::from_utf8_lossy(e).into_owned())
                }
                (true, _, _) => Hit::Miss,
                (false, None, v) => Hit::Fresh(v.to_val()),
                (false, Some(age), v) => Hit::Stale(v.to_val(), age),
            }
        });
        found.ok().flatten().unwrap_or(Hit::Miss)
    }

    pub fn set(&self, key: &[u8], v: Val, ttl: Option<Duration>) -> Result<(), store::SetErr> {
        self.store
            .store(key, v, ttl, 0, Mode::Set, true)
            .map(|_| ())
    }

    /// Remembers a failure for `ttl`, so callers get it back without fetching.
    pub fn set_failed(&self, key: &[u8], err: &str, ttl: Duration) {
        let v = Val::Str(err.as_bytes().to_vec());
        let _ = self
            .store
            .store(key, v, Some(ttl), NEGATIVE, Mode::Set, true);
    }

    /// Becomes the one fetcher of `key`, or gets a receiver for the fetch already running.
    pub fn claim(self: &Arc<Self>, key: &[u8]) -> Claim {
        let mut f = self.flights();
        if let Some(rx) = f.get(key) {
            return Claim::Waiter(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        f.insert(key.to_vec(), rx);
        Claim::Owner(Flight {
            cache: self.clone(),
            key: key.to_vec(),
            tx,
        })
    }
}

/// Waits for another fetch's outcome: `Some(outcome)`, or `None` when its owner went away
/// without one (the caller should try to claim the key itself).
pub async fn wait(mut rx: watch::Receiver<FetchOutcome>) -> Option<Result<Val, String>> {
    let _ = rx.wait_for(Option::is_some).await;
    let got = rx.borrow().clone();
    got
}

static CACHES: store::Registry<Cache> = store::Registry::new("cache");

/// Empties every cache (`luaproxy.test`'s reset between specs).
pub fn flush_all_caches() {
    CACHES.each(|_, c| c.store.flush_all());
}

pub fn find(name: &str) -> Option<Arc<Cache>> {
    CACHES.find(name)
}

/// Creates a cache, or returns the existing one when the capacity matches.
pub fn create(name: &str, capacity: usize) -> Result<Arc<Cache>, String> {
    CACHES.get_or_create(
        name,
        capacity,
        |c| c.store.capacity,
        |_| Ok(Arc::new(Cache::new(name, capacity))),
    )
}

// ---------------------------------------------------------------------------------------
// Lua surface

/// The Lua handle of one cache.
#[derive(Clone)]
pub struct CacheHandle(pub Arc<Cache>);

/// A value a cache accepts: what a dict accepts, plus an upstream response whose body was read.
fn to_val(v: &LuaValue) -> LuaResult<Val> {
    if let LuaValue::UserData(ud) = v {
        if let Ok(res) = ud.borrow::<crate::upstream::Response>() {
            return res
                .to_cached()
                .map(|c| Val::Resp(Arc::new(c)))
                .map_err(LuaError::runtime);
        }
    }
    dict::to_val(v)
}

fn key_arg(lua: &Lua, name: &str, key: &LuaValue) -> LuaResult<Vec<u8>> {
    dict::key_bytes(lua, key)?.map_err(|e| LuaError::runtime(format!("cache:{name}: {e}")))
}

/// A time to live from Lua (nil or 0: none), through the store's one reading of exptimes.
fn ttl_of(name: &str, v: Option<f64>) -> LuaResult<Option<Duration>> {
    dict::ttl_arg(v)
        .map_err(|_| LuaError::runtime(format!("cache:{name}: seconds must be a number >= 0")))
}

struct FetchOpts {
    stale: Option<Duration>,
    neg_ttl: Option<Duration>,
    wait: Duration,
}

impl FetchOpts {
    fn from_lua(t: Option<LuaTable>) -> LuaResult<FetchOpts> {
        let Some(t) = t else {
            return Ok(FetchOpts {
                stale: None,
                neg_ttl: None,
                wait: DEFAULT_WAIT,
            });
        };
        // 0 means "not at all" for each: no stale serving, no remembered failure, no waiting.
        let wait = match t.get::<Option<f64>>("timeout")? {
            None => DEFAULT_WAIT,
            Some(v) => crate::units::seconds(v).ok_or_else(|| {
                LuaError::runtime("cache:get_or_fetch: seconds must be a number >= 0")
            })?,
        };
        Ok(FetchOpts {
            stale: ttl_of("get_or_fetch", t.get("stale")?)?,
            neg_ttl: ttl_of("get_or_fetch", t.get("neg_ttl")?)?,
            wait,
        })
    }
}

/// Runs `fetch_fn(key)` and stores what it returns: `value, nil, ttl?` is cached for `ttl`
/// (or the returned ttl); `nil, err` (or a Lua error) is cached only with `neg_ttl`.
async fn run_fetch(
    lua: &Lua,
    cache: &Cache,
    f: LuaFunction,
    key: &[u8],
    ttl: Option<Duration>,
    neg_ttl: Option<Duration>,
) -> Result<Val, String> {
    let args = LuaMultiValue::from_iter([LuaValue::String(
        lua.create_string(key).map_err(|e| e.to_string())?,
    )]);
    let out = match crate::runtime::call_protected(lua, f, args).await {
        Ok(mut vals) => {
            let v = vals.pop_front().unwrap_or(LuaValue::Nil);
            let err = vals.pop_front().unwrap_or(LuaValue::Nil);
            let ttl_override = match vals.pop_front() {
                Some(LuaValue::Integer(i)) => store::ttl_secs(i as f64).ok(),
                Some(LuaValue::Number(n)) => store::ttl_secs(n).ok(),
                _ => None,
            };
            if v.is_nil() {
                Err(match err {
                    LuaValue::String(s) => s.to_string_lossy(),
                    LuaValue::Nil => "fetch returned nil".to_string(),
                    other => other.to_string().unwrap_or_else(|_| "fetch failed".into()),
                })
            } else {
                match to_val(&v) {
                    Ok(val) => {
                        if let Err(e) = cache.set(key, val.clone(), ttl_override.unwrap_or(ttl)) {
                            crate::log!(
                                WARN,
                                "cache '{}': not caching '{}': {}",
                                cache.store.name,
                                String::from_utf8_lossy(key),
                                e.as_str(),
                            );
                        }
                        Ok(val)
                    }
                    Err(e) => Err(format!("fetch returned a value the cache cannot hold: {e}")),
                }
            }
        }
        Err(msg) => {
            crate::log!(
                ERR,
                "cache '{}': fetch for '{}' failed: {msg}",
                cache.store.name,
                String::from_utf8_lossy(key),
            );
            Err(msg.lines().next().unwrap_or("fetch failed").to_string())
        }
    };
    if let (Err(e), Some(neg)) = (&out, neg_ttl) {
        cache.set_failed(key, e, neg);
    }
    out
}

/// `value, err, how = cache:get_or_fetch(key, ttl, fetch_fn, opts?)`
async fn get_or_fetch(
    lua: Lua,
    cache: Arc<Cache>,
    key: Vec<u8>,
    ttl: Option<Duration>,
    f: LuaFunction,
    opts: FetchOpts,
) -> LuaResult<(LuaValue, Option<String>, Option<&'static str>)> {
    let done = |v: Val, how| -> LuaResult<_> { Ok((dict::from_val(&lua, v)?, None, Some(how))) };
    loop {
        match cache.lookup(&key) {
            Hit::Fresh(v) => return done(v, "hit"),
            Hit::Failed(e) => return Ok((LuaValue::Nil, Some(e), None)),
            Hit::Stale(v, age) if opts.stale.is_some_and(|s| age <= s) => {
                if let Claim::Owner(flight) = cache.claim(&key) {
                    let (lua2, cache2, key2, f2) =
                        (lua.clone(), cache.clone(), key.clone(), f.clone());
                    tokio::task::spawn_local(async move {
                        // No neg_ttl here: a remembered failure would replace the stale value
                        // this refresh is meant to keep serving.
                        let r = run_fetch(&lua2, &cache2, f2, &key2, ttl, None).await;
                        if let Err(e) = &r {
                            crate::log!(WARN, "cache '{}': refresh of '{}' failed, still serving the stale value: {e}",
                                    cache2.store.name,
                                    String::from_utf8_lossy(&key2),
                            );
                        }
                        flight.finish(r);
                    });
                }
                return done(v, "stale");
            }
            _ => {}
        }
        match cache.claim(&key) {
            Claim::Owner(flight) => {
                // Another fetch may have finished between the lookup and the claim.
                if let Hit::Fresh(v) = cache.lookup(&key) {
                    flight.finish(Ok(v.clone()));
                    return done(v, "hit");
                }
                let r = run_fetch(&lua, &cache, f.clone(), &key, ttl, opts.neg_ttl).await;
                flight.finish(r.clone());
                return match r {
                    Ok(v) => done(v, "miss"),
                    Err(e) => Ok((LuaValue::Nil, Some(e), None)),
                };
            }
            Claim::Waiter(rx) => match crate::clock::timeout(opts.wait, wait(rx)).await {
                Err(_) => return Ok((LuaValue::Nil, Some("timeout".into()), None)),
                Ok(Some(Ok(v))) => return done(v, "shared"),
                Ok(Some(Err(e))) => return Ok((LuaValue::Nil, Some(e), None)),
                // The fetcher was aborted without an outcome: try again, perhaps as the owner.
                Ok(None) => continue,
            },
        }
    }
}

impl LuaUserData for CacheHandle {
    fn add_methods<M: LuaUserDataMethods<Self>>(m: &mut M) {
        // value, stale_value = cache:get(key): `value` while fresh; after expiry `nil, stale`
        // until the entry is evicted; `nil` when missing.
        m.add_method("get", |lua, this, key: LuaValue| {
            let key = key_arg(lua, "get", &key)?;
            Ok(match this.0.lookup(&key) {
                Hit::Fresh(v) => (dict::from_val(lua, v)?, LuaValue::Nil),
                Hit::Stale(v, _) => (LuaValue::Nil, dict::from_val(lua, v)?),
                Hit::Failed(_) | Hit::Miss => (LuaValue::Nil, LuaValue::Nil),
            })
        });
        // ok, err = cache:set(key, value, ttl?): ttl in seconds (nil or 0 = no expiry); evicts
        // least recently used entries to make room; nil, "no memory" if it can never fit.
        m.add_method(
            "set",
            |lua, this, (key, v, ttl): (LuaValue, LuaValue, Option<f64>)| {
                let key = key_arg(lua, "set", &key)?;
                let ttl = ttl_of("set", ttl)?;
                if v.is_nil() {
                    this.0.store.delete(&key);
                    return Ok((Some(true), None));
                }
                match this.0.set(&key, to_val(&v)?, ttl) {
                    Ok(()) => Ok((Some(true), None)),
                    Err(e) => Ok((None, Some(e.as_str()))),
                }
            },
        );
        // ok = cache:delete(key)
        m.add_method("delete", |lua, this, key: LuaValue| {
            this.0.store.delete(&key_arg(lua, "delete", &key)?);
            Ok(true)
        });
        // ok = cache:flush_all()
        m.add_method("flush_all", |_, this, ()| {
            this.0.store.flush_all();
            Ok(true)
        });
        // bytes = cache:capacity()
        m.add_method("capacity", |_, this, ()| Ok(this.0.store.capacity));
        // bytes = cache:free_space()
        m.add_method("free_space", |_, this, ()| Ok(this.0.store.free_space()));
        // value, err, how = cache:get_or_fetch(key, ttl, fetch_fn, opts?)
        m.add_async_method(
            "get_or_fetch",
            |lua, this, (key, ttl, f, opts): (LuaValue, Option<f64>, LuaFunction, Option<LuaTable>)| async move {
                crate::runtime::check_loop("cache:get_or_fetch")?;
                let key = key_arg(&lua, "get_or_fetch", &key)?;
                let ttl = ttl_of("get_or_fetch", ttl)?;
                let opts = FetchOpts::from_lua(opts)?;
                get_or_fetch(lua, this.0.clone(), key, ttl, f, opts).await
            },
        );
    }
}

/// `cache = luaproxy.cache.new(name, { capacity = "64m" })`; then `luaproxy.cache[name]`.
fn lua_new(
    _: &Lua,
    (name, opts): (String, Option<LuaTable>),
) -> LuaResult<(Option<CacheHandle>, Option<String>)> {
    if name.is_empty() {
        return Err(LuaError::runtime(
            "luaproxy.cache.new: name must not be empty",
        ));
    }
    let cap = match opts.map(|t| t.get::<LuaValue>("capacity")).transpose()? {
        None | Some(LuaValue::Nil) => 64 * 1024 * 1024,
        Some(v) => dict::capacity_arg(v)?,
    };
    match create(&name, cap) {
        Ok(c) => Ok((Some(CacheHandle(c)), None)),
        Err(e) => Ok((None, Some(e))),
    }
}

pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.raw_set("new", lua.create_function(lua_new)?)?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|_, (_t, name): (LuaTable, String)| Ok(find(&name).map(CacheHandle)))?,
    )?;
    t.set_metatable(Some(mt))?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_stale_failed_and_miss() {
        let c = Cache::new("t", 10_000);
        assert_eq!(c.lookup(b"k"), Hit::Miss);
        c.set(b"k", Val::Int(1), Some(Duration::from_millis(20)))
            .unwrap();
        assert_eq!(c.lookup(b"k"), Hit::Fresh(Val::Int(1)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(matches!(c.lookup(b"k"), Hit::Stale(Val::Int(1), _)));
        c.set_failed(b"f", "boom", Duration::from_millis(20));
        assert_eq!(c.lookup(b"f"), Hit::Failed("boom".into()));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.lookup(b"f"), Hit::Miss);
    }

    #[test]
    fn one_owner_per_key_until_it_finishes_or_vanishes() {
        let c = Arc::new(Cache::new("t", 10_000));
        let Claim::Owner(owner) = c.claim(b"k") else {
            panic!("first claim owns")
        };
        let Claim::Waiter(rx) = c.claim(b"k") else {
            panic!("second claim waits")
        };
        assert!(matches!(c.claim(b"other"), Claim::Owner(_)));
        owner.finish(Ok(Val::Int(7)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(wait(rx)), Some(Ok(Val::Int(7))));
        // Finished: the next claim owns again. Dropped without an outcome: waiters get None.
        let Claim::Owner(owner) = c.claim(b"k") else {
            panic!("claim after finish owns")
        };
        let Claim::Waiter(rx) = c.claim(b"k") else {
            panic!("waits")
        };
        drop(owner);
        assert_eq!(rt.block_on(wait(rx)), None);
    }
}
