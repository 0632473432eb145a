//! Worker threads (one Lua VM and one current-thread runtime each, the policy loaded once),
//! their accept loops, and how connections are spread and capped across them.

use crate::runtime::{self, call_protected, LoopGuard};
use crate::settings::Settings;
use mlua::prelude::*;
use mlua::LuaSerdeExt;
use std::cell::Cell;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch, Notify};

use super::conn::{serve_conn, Balance, ConnCap, Handoff, OpenConn, Worker};

pub(super) async fn accept_loop(
    w: Rc<Worker>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
    mut handed: Option<tokio::sync::mpsc::UnboundedReceiver<Handoff>>,
) {
    loop {
        // At max_connections only accepting waits: a connection another worker already
        // accepted (and counted) is still taken, and shutdown still ends the loop.
        let room = w.cap.has_room();
        tokio::select! {
            _ = w.cap.room(), if !room => {}
            r = listener.accept(), if room => match r {
                Ok((stream, peer)) => {
                    let open = match &w.balance {
                        Some((b, me)) => match b.elsewhere(*me) {
                            Some(j) => {
                                if let Ok(s) = stream.into_std() {
                                    let _ = b.handoff[j].send((s, peer, OpenConn::new(Some((b, j)), &w.cap)));
                                }
                                continue;
                            }
                            None => OpenConn::new(Some((b, *me)), &w.cap),
                        },
                        None => OpenConn::new(None, &w.cap),
                    };
                    tokio::task::spawn_local(serve_conn(w.clone(), stream, peer, shutdown.clone(), open));
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
                    tokio::task::spawn_local(serve_conn(w.clone(), stream, peer, shutdown.clone(), open));
                }
            }
            _ = shutdown.changed() => return,
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
    pub(super) cap: Arc<ConnCap>,
}

/// Loads the policy into a fresh VM: the file must return a handler function or a table
/// with `handler` (and optionally `init_worker(config)`).
pub(super) async fn load_policy(lua: &Lua, spec: &WorkerSpec) -> Result<LuaFunction, String> {
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
    let (handler, init) = match ret.pop_front() {
        Some(LuaValue::Function(f)) => (f, None),
        Some(LuaValue::Table(t)) => {
            let h: Option<LuaFunction> = t.get("handler").ok().flatten();
            let i: Option<LuaFunction> = t.get("init_worker").ok().flatten();
            match h {
                Some(h) => (h, i),
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
    Ok(handler)
}

#[cfg(feature = "luajit")]
pub(super) fn jit_libs() -> LuaStdLib {
    LuaStdLib::FFI | LuaStdLib::JIT
}

#[cfg(not(feature = "luajit"))]
pub(super) fn jit_libs() -> LuaStdLib {
    LuaStdLib::NONE
}

pub(super) fn worker_thread(
    id: usize,
    std_listener: StdListener,
    spec: WorkerSpec,
    ready: oneshot::Sender<Result<(), String>>,
    shutdown: watch::Receiver<bool>,
    exited: Arc<Notify>,
    balance: (Arc<Balance>, tokio::sync::mpsc::UnboundedReceiver<Handoff>),
) {
    runtime::set_worker_id(id);
    let (balance, handed) = balance;
    let rt = match runtime::new_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("worker {id}: {e}")));
            return;
        }
    };
    // SAFETY: unsafe_new lets policies `require` C modules (lua-cjson, ...) exactly like the
    // main program can; the VM never leaves this thread. On LuaJIT the `ffi` library is
    // opened too: OpenResty-style policies use it, and so do the dict methods.
    let lua = unsafe {
        Lua::unsafe_new_with(
            LuaStdLib::ALL_SAFE | LuaStdLib::DEBUG | jit_libs(),
            LuaOptions::new().thread_pool_size(256),
        )
    };
    let guard = LoopGuard::enter();
    let local = tokio::task::LocalSet::new();
    let main = local.spawn_local(async move {
        let setup = async {
            let t = crate::exports(&lua).map_err(|e| e.to_string())?;
            lua.register_module("luaproxy", t)
                .map_err(|e| e.to_string())?;
            let handler = load_policy(&lua, &spec).await?;
            let listener =
                tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
            Ok::<_, String>((handler, listener))
        };
        match setup.await {
            Err(e) => {
                let _ = ready.send(Err(e));
            }
            Ok((handler, listener)) => {
                let _ = ready.send(Ok(()));
                let w = Rc::new(Worker {
                    lua: lua.clone(),
                    handler,
                    limits: Rc::new(spec.settings.limits.clone()),
                    settings: spec.settings.clone(),
                    cap: spec.cap.clone(),
                    requests: Cell::new(0),
                    req_meta: Cell::new(false),
                    balance: Some((balance, id)),
                });
                accept_loop(w, listener, shutdown, Some(handed)).await;
            }
        }
    });
    runtime::drive(&rt, local, main, &guard.0);
    drop(guard);
    exited.notify_waiters();
}
