//! Worker threads (one current-thread runtime each, running one generation of the policy in
//! its own Lua VM at a time), their accept loops, reloads, and how they stop.
//!
//! A reload builds a new generation (a fresh VM, the policy loaded, `init_worker` run) beside
//! the serving one on every worker; only when all have built theirs does each switch, so a
//! policy that fails anywhere keeps the old one serving everywhere. The listening sockets never
//! close, so no connection waiting in a backlog is lost. A retired generation finishes the
//! requests it holds; its timers fire with `premature = true`, and what it still runs after
//! `shutdown_timeout` is dropped.

use crate::runtime::{self, call_protected, LoopGuard, VmLife, KILLED, RUNNING, STOPPING};
use crate::settings::Settings;
use mlua::prelude::*;
use mlua::LuaSerdeExt;
use std::cell::{Cell, RefCell};
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::conn::{serve_conn, Balance, ConnCap, Current, Handoff, OpenConn, Worker};
use super::logphase::{AccessLog, LogPhase};

pub(super) async fn accept_loop(
    cur: Current,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
    mut handed: Option<mpsc::UnboundedReceiver<Handoff>>,
) {
    let (cap, balance) = {
        let w = cur.borrow();
        (w.cap.clone(), w.balance.clone())
    };
    loop {
        // At max_connections only accepting waits: a connection another worker already
        // accepted (and counted) is still taken, and shutdown still ends the loop.
        let room = cap.has_room();
        tokio::select! {
            _ = cap.room(), if !room => {}
            r = listener.accept(), if room => match r {
                Ok((stream, peer)) => {
                    let open = match &balance {
                        Some((b, me)) => match b.elsewhere(*me) {
                            Some(j) => {
                                if let Ok(s) = stream.into_std() {
                                    let _ = b.handoff[j].send((s, peer, OpenConn::new(Some((b, j)), &cap)));
                                }
                                continue;
                            }
                            None => OpenConn::new(Some((b, *me)), &cap),
                        },
                        None => OpenConn::new(None, &cap),
                    };
                    tokio::task::spawn_local(serve_conn(cur.clone(), stream.into(), peer, shutdown.clone(), open));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning or dying.
                    crate::log!(ERR, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some((s, peer, open)) = async { match handed.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            } } => {
                if let Ok(stream) = tokio::net::TcpStream::from_std(s) {
                    tokio::task::spawn_local(serve_conn(cur.clone(), stream.into(), peer, shutdown.clone(), open));
                }
            }
            _ = shutdown.changed() => {
                // Idle connections wait for a head without watching the channel themselves.
                crate::h1::idle::wake_head_waiters();
                return;
            }
        }
    }
}

/// Settings that cross from the calling thread to the workers (plain data only).
#[derive(Clone)]
pub(super) struct WorkerSpec {
    pub(super) policy: String,
    pub(super) config: serde_json::Value,
    pub(super) package_path: Option<String>,
    pub(super) package_cpath: Option<String>,
    pub(super) settings: Settings,
    /// The access log's destination, shared by every worker (`None`: off).
    pub(super) access: Option<Arc<crate::accesslog::Writer>>,
}

/// What the server tells a running worker.
pub(super) enum Command {
    /// Build a new generation from this spec beside the serving one; answer whether it loaded.
    Prepare(Box<WorkerSpec>, oneshot::Sender<Result<(), String>>),
    /// Serve new requests with the prepared generation; the old one retires.
    Commit,
    /// Drop the prepared generation (another worker failed to build its own).
    Abort,
}

/// A policy as loaded: its handler and its log phase.
pub(super) struct Policy {
    pub(super) handler: LuaFunction,
    pub(super) log: Option<LuaFunction>,
}

/// Loads the policy into a fresh VM: the file must return a handler function or a table
/// with `handler` (and optionally `init_worker(config)` and `log(info, ctx)`).
pub(super) async fn load_policy(lua: &Lua, spec: &WorkerSpec) -> Result<Policy, String> {
    let package: LuaTable = lua.globals().get("package").map_err(|e| e.to_string())?;
    if let Some(p) = &spec.package_path {
        package.set("path", p.as_str()).map_err(|e| e.to_string())?;
    }
    if let Some(p) = &spec.package_cpath {
        package
            .set("cpath", p.as_str())
            .map_err(|e| e.to_string())?;
    }
    let code = std::fs::read(&spec.policy).map_err(|e| {
        format!(
            "cannot read policy file '{}': {}",
            spec.policy,
            e.to_string().to_lowercase()
        )
    })?;
    let chunk = lua
        .load(code)
        .set_name(format!("@{}", spec.policy))
        .into_function()
        .map_err(|e| match e {
            LuaError::SyntaxError { message, .. } => message,
            e => e.to_string(),
        })?;
    let config = lua.to_value(&spec.config).map_err(|e| e.to_string())?;
    let mut args = LuaMultiValue::new();
    args.push_back(config.clone());
    let mut ret = call_protected(lua, chunk, args).await?;
    let (handler, init, log) = match ret.pop_front() {
        Some(LuaValue::Function(f)) => (f, None, None),
        Some(LuaValue::Table(t)) => {
            let h: Option<LuaFunction> = t.get("handler").ok().flatten();
            let i: Option<LuaFunction> = t.get("init_worker").ok().flatten();
            let log = match t.get::<LuaValue>("log").map_err(|e| e.to_string())? {
                LuaValue::Nil => None,
                LuaValue::Function(f) => Some(f),
                other => {
                    return Err(format!(
                        "policy '{}': 'log' must be a function (got a {})",
                        spec.policy,
                        other.type_name()
                    ))
                }
            };
            match h {
                Some(h) => (h, i, log),
                None => {
                    return Err(format!(
                        "policy '{}' returned a table without a handler function",
                        spec.policy
                    ))
                }
            }
        }
        _ => {
            return Err(format!(
                "policy '{}' must return a handler function or a table with one",
                spec.policy
            ))
        }
    };
    if let Some(init) = init {
        let mut args = LuaMultiValue::new();
        args.push_back(config);
        call_protected(lua, init, args)
            .await
            .map_err(|e| format!("policy init_worker failed: {e}"))?;
    }
    Ok(Policy { handler, log })
}

#[cfg(feature = "luajit")]
pub(super) fn jit_libs() -> LuaStdLib {
    LuaStdLib::FFI | LuaStdLib::JIT
}

#[cfg(not(feature = "luajit"))]
pub(super) fn jit_libs() -> LuaStdLib {
    LuaStdLib::NONE
}

/// What stays with a worker thread across generations.
#[derive(Clone)]
pub(super) struct Site {
    pub(super) cap: Arc<ConnCap>,
    pub(super) balance: Option<(Arc<Balance>, usize)>,
}

/// Builds one generation: a fresh VM with the policy loaded and `init_worker` run.
async fn generation(spec: &WorkerSpec, site: &Site) -> Result<Worker, String> {
    // SAFETY: unsafe_new lets policies `require` C modules (lua-cjson, ...) exactly like the
    // main program can; the VM never leaves this thread. On LuaJIT the `ffi` library is
    // opened too: OpenResty-style policies use it, and so do the dict methods.
    let lua = unsafe {
        Lua::unsafe_new_with(
            LuaStdLib::ALL_SAFE | LuaStdLib::DEBUG | jit_libs(),
            LuaOptions::new().thread_pool_size(256),
        )
    };
    let limit = spec.settings.lua_memory_limit;
    if limit > 0 && lua.set_memory_limit(limit as usize).is_err() {
        crate::log!(
            DEBUG,
            "lua_memory_limit: this Lua (LuaJIT) keeps its own allocator; no limit set"
        );
    }
    let (life, life_rx) = watch::channel(RUNNING);
    lua.set_app_data(VmLife(life_rx));
    let t = crate::exports(&lua).map_err(|e| e.to_string())?;
    lua.register_module("luaproxy", t)
        .map_err(|e| e.to_string())?;
    let policy = match load_policy(&lua, spec).await {
        Ok(p) => p,
        Err(e) => {
            let _ = life.send_replace(KILLED);
            return Err(e);
        }
    };
    let access = match &spec.access {
        Some(a) => {
            match AccessLog::new(&lua, spec.settings.log_format.clone(), a, life.subscribe()) {
                Ok(a) => Some(a),
                Err(e) => {
                    let _ = life.send_replace(KILLED);
                    return Err(e.to_string());
                }
            }
        }
        None => None,
    };
    Ok(Worker {
        lua,
        handler: policy.handler,
        log: LogPhase {
            log_fn: policy.log,
            access,
            budget: spec.settings.lua_budget,
        },
        limits: Rc::new(spec.settings.limits.clone()),
        settings: spec.settings.clone(),
        cap: site.cap.clone(),
        requests: Cell::new(0),
        req_meta: Cell::new(false),
        balance: site.balance.clone(),
        life,
    })
}

/// Retires a generation: its timers fire with `premature = true` now; what it still runs
/// (timers, spawned tasks) after `shutdown_timeout` is dropped, or at once when the server
/// stops. Its requests in flight finish on it; its VM goes with the last of them.
fn retire(old: Rc<Worker>, mut shutdown: watch::Receiver<bool>) {
    let _ = old.life.send_replace(STOPPING);
    let grace = old.settings.shutdown_timeout;
    let life = old.life.clone();
    drop(old);
    tokio::task::spawn_local(async move {
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = shutdown.changed() => {}
        }
        let _ = life.send_replace(KILLED);
    });
}

/// Everything a worker thread is started with.
pub(super) struct ThreadStart {
    pub(super) id: usize,
    pub(super) listener: StdListener,
    pub(super) spec: WorkerSpec,
    pub(super) ready: oneshot::Sender<Result<(), String>>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// Set with `shutdown` when the server stops within another time than its
    /// `shutdown_timeout` (`srv:close(timeout)`; 0: at once).
    pub(super) hurry: watch::Receiver<Option<Duration>>,
    pub(super) exited: Arc<Notify>,
    pub(super) balance: (Arc<Balance>, mpsc::UnboundedReceiver<Handoff>),
    pub(super) cap: Arc<ConnCap>,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
}

pub(super) fn worker_thread(start: ThreadStart) {
    let ThreadStart {
        id,
        listener: std_listener,
        spec,
        ready,
        shutdown,
        mut hurry,
        exited,
        balance,
        cap,
        mut commands,
    } = start;
    runtime::set_worker_id(id);
    let (balance, handed) = balance;
    let rt = match runtime::new_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {id}: {e}")));
            return;
        }
    };
    let guard = LoopGuard::enter();
    let local = tokio::task::LocalSet::new();
    let site = Site {
        cap,
        balance: Some((balance, id)),
    };
    // Set when the server stops: from then on the worker has `grace` to finish.
    let stopping = Rc::new(runtime::Flag::default());
    let grace = Rc::new(Cell::new(spec.settings.shutdown_timeout));
    let (stopping2, grace2) = (stopping.clone(), grace.clone());
    let main = local.spawn_local(async move {
        crate::budget::set_thread_budget(spec.settings.lua_budget);
        let setup = async {
            let w = generation(&spec, &site).await?;
            let listener =
                tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
            Ok::<_, String>((w, listener))
        };
        let (w, listener) = match setup.await {
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
            Ok(x) => x,
        };
        let _ = ready.send(Ok(()));
        let cur: Current = Rc::new(RefCell::new(Rc::new(w)));
        let accepting = tokio::task::spawn_local(accept_loop(
            cur.clone(),
            listener,
            shutdown.clone(),
            Some(handed),
        ));
        let mut prepared: Option<Worker> = None;
        let mut shut = shutdown.clone();
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::Prepare(spec, reply)) => {
                        if let Some(w) = prepared.take() {
                            let _ = w.life.send_replace(KILLED);
                        }
                        let built = generation(&spec, &site).await;
                        let _ = reply.send(built.as_ref().map(|_| ()).map_err(|e| e.clone()));
                        prepared = built.ok();
                    }
                    Some(Command::Commit) => {
                        if let Some(w) = prepared.take() {
                            crate::budget::set_thread_budget(w.settings.lua_budget);
                            site.cap.set_max(w.settings.max_connections);
                            grace2.set(w.settings.shutdown_timeout);
                            let old = cur.replace(Rc::new(w));
                            retire(old, shutdown.clone());
                        }
                    }
                    Some(Command::Abort) => {
                        if let Some(w) = prepared.take() {
                            let _ = w.life.send_replace(KILLED);
                        }
                    }
                    None => std::future::pending::<()>().await,
                },
                _ = shut.changed() => break,
            }
        }
        if let Some(w) = prepared.take() {
            let _ = w.life.send_replace(KILLED);
        }
        let _ = accepting.await;
        // Timers fire with premature = true; connections finish what they hold.
        let _ = cur.borrow().life.send_replace(STOPPING);
        stopping2.raise();
    });
    // The loop runs until every task has ended (connections closed, timers and tasks done),
    // or `grace` after the server began to stop (a later `srv:close(timeout)` shortens it).
    let deadline = async move {
        stopping.wait().await;
        let began = tokio::time::Instant::now();
        loop {
            let limit = (*hurry.borrow_and_update()).unwrap_or(grace.get());
            tokio::select! {
                _ = tokio::time::sleep_until(began + limit) => return,
                changed = hurry.changed() => if changed.is_err() {
                    // The server object is gone: no new limit can come.
                    tokio::time::sleep_until(began + limit).await;
                    return;
                },
            }
        }
    };
    runtime::drive(&rt, local, main, &guard.0, deadline);
    drop(guard);
    exited.notify_waiters();
}
