//! `luaproxy.serve{...}`: the HTTP/1.1 server.
//!
//! With `handler = fn`, requests run on the calling thread's loop and VM. With `policy = file`,
//! `workers` OS threads each create their own Lua VM, load the policy once and accept on their
//! own `SO_REUSEPORT` socket bound to the same address (`workers.rs`); nothing Lua crosses
//! threads, only sockets and plain config data. `conn.rs` runs each connection, `respond.rs`
//! turns what a handler returns into a response.

mod conn;
pub mod kit;
mod logphase;
mod respond;
mod workers;

use conn::{Balance, ConnCap, Worker};
use workers::{accept_loop, worker_thread, Command, ThreadStart, WorkerSpec};

use crate::runtime::{self};
use crate::settings::{self, Settings};
use mlua::prelude::*;
use mlua::LuaSerdeExt;
use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, TcpListener as StdListener, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch, Notify};

/// A running server: `srv.addr`, `srv.port`, `srv:close()`, `srv:wait()`, `srv:reload()`.
pub struct Server {
    pub(super) addr: SocketAddr,
    pub(super) shutdown: watch::Sender<bool>,
    /// `srv:close(timeout)`'s timeout, when given: it replaces `shutdown_timeout`.
    hurry: watch::Sender<Option<Duration>>,
    cap: Arc<ConnCap>,
    /// One per policy worker (none in handler mode).
    commands: Vec<tokio::sync::mpsc::UnboundedSender<Command>>,
    /// What a reload starts from: the package paths the workers were given.
    base: Option<WorkerSpec>,
    reloading: Cell<bool>,
    pub(super) threads: RefCell<Vec<std::thread::JoinHandle<()>>>,
    pub(super) local_done: Rc<Notify>,
    pub(super) local_running: Rc<std::cell::Cell<bool>>,
    pub(super) exited: Arc<Notify>,
    /// The access log's shared destination (each worker writes through its own buffer);
    /// `None` when off.
    access: RefCell<Option<Arc<crate::accesslog::Writer>>>,
}

/// The access log of `settings`: the one already open when its destination is the same
/// (a reload keeps the file), else a new one; `None` when off.
fn open_access_log(
    settings: &settings::Settings,
    current: Option<&Arc<crate::accesslog::Writer>>,
) -> Result<Option<Arc<crate::accesslog::Writer>>, String> {
    use crate::accesslog::{Target, Writer};
    if settings.access_log == Target::Off {
        return Ok(None);
    }
    if let Some(w) = current.filter(|w| *w.target() == settings.access_log) {
        return Ok(Some(w.clone()));
    }
    Writer::open(&settings.access_log).map(|w| Some(Arc::new(w)))
}

impl LuaUserData for Server {
    fn add_fields<F: LuaUserDataFields<Self>>(f: &mut F) {
        f.add_field_method_get("addr", |_, this| Ok(this.addr.to_string()));
        f.add_field_method_get("port", |_, this| Ok(this.addr.port()));
    }

    fn add_methods<M: LuaUserDataMethods<Self>>(m: &mut M) {
        // srv:close([timeout]) -> true: stop accepting; idle connections close, requests in
        // flight finish (their responses say `Connection: close`) for up to
        // `shutdown_timeout` (or `timeout` seconds; 0: drop them now), timers fire with
        // premature = true. `srv:wait()` returns once it is all over.
        m.add_method("close", |_, this, timeout: Option<f64>| {
            if let Some(t) = timeout {
                let Some(d) = crate::units::seconds(t) else {
                    return Err(LuaError::runtime(
                        "srv:close: timeout must be a finite number >= 0",
                    ));
                };
                this.hurry.send_replace(Some(d));
            }
            this.cap
                .stopping
                .store(true, std::sync::atomic::Ordering::Relaxed);
            this.shutdown.send_replace(true);
            Ok(true)
        });
        // ok, err = srv:reload{ policy = FILE, config = {...}, <settings> }: every worker
        // builds the new policy (a fresh VM, init_worker run) beside the old one; when all
        // have, new requests go to it and the old one finishes what it holds. A failure
        // anywhere keeps the old policy everywhere: nil and why.
        m.add_async_method("reload", |lua, this, opts: LuaTable| async move {
            runtime::check_loop("srv:reload")?;
            reload(&lua, &this, opts).await
        });
        // ok, err = srv:reopen_logs(): the access log file is opened again (after logrotate
        // moved it; SIGUSR1 in main.lua), for every worker at once. true, or nil and why
        // (the old file stays in use).
        m.add_method("reopen_logs", |_, this, ()| {
            Ok(match this.access.borrow().as_ref().map(|w| w.reopen()) {
                None | Some(Ok(())) => (Some(true), None),
                Some(Err(e)) => (None, Some(e)),
            })
        });
        // srv:wait() -> true once every worker has stopped (after close, or never).
        m.add_async_method("wait", |_, this, ()| async move {
            runtime::check_loop("srv:wait")?;
            loop {
                let notified = this.exited.notified();
                let local_notified = this.local_done.notified();
                let threads_done = this.threads.borrow().iter().all(|t| t.is_finished());
                if threads_done && !this.local_running.get() {
                    break;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = local_notified => {}
                    // Belt and braces: a notify_waiters sent between the check and the await.
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            for t in this.threads.borrow_mut().drain(..) {
                let _ = t.join();
            }
            Ok(true)
        });
    }
}

pub(super) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s2 = if let Some(port) = s.strip_prefix("*:") {
        format!("0.0.0.0:{port}")
    } else if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() {
        format!("127.0.0.1:{s}")
    } else {
        s.to_string()
    };
    s2.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("bad listen address '{s}' (expected host:port)"))
}

/// Binds one listening socket. Workers each get their own socket on the same port
/// (SO_REUSEPORT): with one shared socket, whichever thread wakes first takes most connections
/// and one core saturates while the other idles (measured: 12k-18k req/s run to run, against
/// a steady figure with REUSEPORT). What the kernel's split leaves uneven, `Balance` evens.
pub(super) fn bind(addr: SocketAddr, reuse_port: bool) -> Result<StdListener, String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| e.to_string())?;
    sock.set_reuse_address(true).map_err(|e| e.to_string())?;
    if reuse_port {
        sock.set_reuse_port(true).map_err(|e| e.to_string())?;
    }
    sock.bind(&addr.into())
        .map_err(|e| format!("cannot listen on {addr}: {}", e.to_string().to_lowercase()))?;
    sock.listen(1024).map_err(|e| e.to_string())?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(sock.into())
}

/// The keys of `luaproxy.serve{...}` that are not settings.
pub(super) const SERVE_KEYS: &[&str] = &["listen", "handler", "log", "policy", "workers", "config"];

/// Reads the settings in `opts` (every key but `SERVE_KEYS`), in nginx's names and forms.
pub(super) fn settings_from(opts: &LuaTable) -> LuaResult<Settings> {
    let mut s = Settings::default();
    let err = |e: String| LuaError::runtime(format!("luaproxy.serve: {e}"));
    for pair in opts.pairs::<LuaValue, LuaValue>() {
        let (k, v) = pair?;
        let key = match &k {
            LuaValue::String(k) => k.to_str()?.to_string(),
            other => return Err(err(format!("bad option name ({})", other.type_name()))),
        };
        if SERVE_KEYS.contains(&key.as_str()) {
            continue;
        }
        let value = match v {
            LuaValue::Integer(n) => settings::Value::Num(n as f64),
            LuaValue::Number(n) => settings::Value::Num(n),
            LuaValue::String(s) => settings::Value::Str(s.to_str()?.to_string()),
            LuaValue::Boolean(b) => settings::Value::Bool(b),
            LuaValue::Table(t) => settings::Value::List(
                t.sequence_values::<String>()
                    .collect::<LuaResult<_>>()
                    .map_err(|_| err(format!("setting '{key}': expected a list of strings")))?,
            ),
            other => {
                return Err(err(format!(
                    "setting '{key}': bad value (a {})",
                    other.type_name()
                )))
            }
        };
        s.set(&key, &value).map_err(err)?;
    }
    Ok(s)
}

/// `srv, err = luaproxy.serve{ listen = "127.0.0.1:8080", handler = fn | policy = "file.lua",
/// workers = N, config = {...}, <settings> }`: the settings are `settings::NAMES`, with
/// nginx's names, units and defaults (docs/api.md). Returns once every worker is
/// listening; `nil, err` when the address is bad or taken, or the policy fails to load.
/// An unknown setting or a bad value raises an error naming it.
pub(super) async fn lua_serve(
    lua: Lua,
    opts: LuaTable,
) -> LuaResult<(Option<Server>, Option<String>)> {
    let listen: String = opts
        .get::<Option<String>>("listen")?
        .ok_or_else(|| LuaError::runtime("luaproxy.serve: 'listen' (host:port) is required"))?;
    let handler: Option<LuaFunction> = opts.get("handler")?;
    let policy: Option<String> = opts.get("policy")?;
    if handler.is_some() == policy.is_some() {
        return Err(LuaError::runtime(
            "luaproxy.serve: give exactly one of 'handler' (a function) or 'policy' (a file)",
        ));
    }
    let workers: usize = match opts.get::<Option<i64>>("workers")? {
        None => runtime::default_workers(),
        Some(n) if (1..=1024).contains(&n) => n as usize,
        Some(n) => {
            return Err(LuaError::runtime(format!(
                "luaproxy.serve: workers must be 1..1024, got {n}"
            )))
        }
    };
    let settings = settings_from(&opts)?;
    runtime::raise_nofile_limit();
    let config_value: LuaValue = opts.get("config")?;
    let config: serde_json::Value = if config_value.is_nil() {
        serde_json::Value::Object(Default::default())
    } else {
        lua.from_value(config_value).map_err(|e| {
            LuaError::runtime(format!("luaproxy.serve: config must be plain data: {e}"))
        })?
    };

    let addr = match parse_listen(&listen) {
        Ok(a) => a,
        Err(e) => return Ok((None, Some(e))),
    };
    let access = match open_access_log(&settings, None) {
        Ok(a) => a,
        Err(e) => return Ok((None, Some(e))),
    };
    logphase::register_metrics();
    let std_listener = match bind(addr, policy.is_some()) {
        Ok(l) => l,
        Err(e) => return Ok((None, Some(e))),
    };
    let addr = std_listener.local_addr().unwrap_or(addr);
    let (tx, rx) = watch::channel(false);
    let (hurry, hurry_rx) = watch::channel(None);
    let exited = Arc::new(Notify::new());
    let cap = ConnCap::new(settings.max_connections);
    let mut server = Server {
        addr,
        shutdown: tx,
        hurry,
        cap: cap.clone(),
        commands: Vec::new(),
        base: None,
        reloading: Cell::new(false),
        threads: RefCell::new(Vec::new()),
        local_done: Rc::new(Notify::new()),
        local_running: Rc::new(std::cell::Cell::new(false)),
        exited: exited.clone(),
        access: RefCell::new(access.clone()),
    };

    if let Some(handler) = handler {
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .map_err(|e| LuaError::runtime(format!("luaproxy.serve: {e}")))?;
        // The calling thread's VM serves: the budget bounds each handler call (not the
        // program's own code); the memory cap needs a VM of our own (policy workers).
        let (life, life_rx) = watch::channel(runtime::RUNNING);
        let budget = settings.lua_budget;
        let access = match access {
            Some(a) => Some(logphase::AccessLog::new(
                &lua,
                settings.log_format.clone(),
                &a,
                life_rx,
            )?),
            None => None,
        };
        let w = Rc::new(Worker {
            lua: lua.clone(),
            handler,
            limits: Rc::new(settings.limits.clone()),
            cap,
            settings,
            requests: Cell::new(0),
            req_meta: Cell::new(false),
            balance: None,
            life,
            log: logphase::LogPhase {
                log_fn: opts.get::<Option<LuaFunction>>("log")?,
                access,
                budget,
            },
        });
        let (done, running) = (server.local_done.clone(), server.local_running.clone());
        running.set(true);
        tokio::task::spawn_local(async move {
            accept_loop(Rc::new(RefCell::new(w)), listener, rx, None).await;
            running.set(false);
            done.notify_waiters();
        });
        return Ok((Some(server), None));
    }

    let package: LuaTable = lua.globals().get("package")?;
    let spec = WorkerSpec {
        policy: policy.unwrap_or_default(),
        config,
        package_path: package.get("path")?,
        package_cpath: package.get("cpath")?,
        settings,
        access,
    };
    server.base = Some(spec.clone());
    let mut readies = Vec::new();
    let mut sockets = vec![std_listener];
    for _ in 1..workers {
        match bind(addr, true) {
            Ok(l) => sockets.push(l),
            Err(e) => return Ok((None, Some(e))),
        }
    }
    let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..sockets.len())
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let balance = Arc::new(Balance {
        open: (0..sockets.len())
            .map(|_| std::sync::atomic::AtomicUsize::new(0))
            .collect(),
        handoff: senders,
    });
    for (id, l) in sockets.into_iter().enumerate() {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (cmd_tx, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
        server.commands.push(cmd_tx);
        let start = ThreadStart {
            id,
            listener: l,
            spec: spec.clone(),
            ready: ready_tx,
            shutdown: rx.clone(),
            hurry: hurry_rx.clone(),
            exited: exited.clone(),
            balance: (balance.clone(), receivers.remove(0)),
            cap: cap.clone(),
            commands: cmd_rx,
        };
        let t = std::thread::Builder::new()
            .name(format!("luaproxy-w{id}"))
            .spawn(move || worker_thread(start))
            .map_err(|e| LuaError::runtime(format!("luaproxy.serve: cannot start worker: {e}")))?;
        server.threads.borrow_mut().push(t);
        readies.push(ready_rx);
    }
    let mut first_err = None;
    for r in readies {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("worker exited during start-up".into());
            }
        }
    }
    if let Some(e) = first_err {
        let _ = server.shutdown.send_replace(true);
        for t in server.threads.borrow_mut().drain(..) {
            let _ = t.join();
        }
        return Ok((None, Some(e)));
    }
    Ok((Some(server), None))
}

/// `srv:reload{...}` (see its entry in `add_methods`).
async fn reload(
    lua: &Lua,
    srv: &Server,
    opts: LuaTable,
) -> LuaResult<(Option<bool>, Option<String>)> {
    let Some(base) = &srv.base else {
        return Err(LuaError::runtime(
            "srv:reload: only a server started with a policy file can reload",
        ));
    };
    for key in ["listen", "handler", "workers"] {
        if !opts.get::<LuaValue>(key)?.is_nil() {
            return Err(LuaError::runtime(format!(
                "srv:reload: '{key}' cannot change without a restart"
            )));
        }
    }
    if *srv.shutdown.borrow() {
        return Ok((None, Some("server is stopping".into())));
    }
    if srv.reloading.replace(true) {
        return Ok((None, Some("a reload is already under way".into())));
    }
    struct Done<'a>(&'a Cell<bool>);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }
    let _done = Done(&srv.reloading);
    let settings = settings_from(&opts)?;
    let access = match open_access_log(&settings, srv.access.borrow().as_ref()) {
        Ok(a) => a,
        Err(e) => return Ok((None, Some(e))),
    };
    let config_value: LuaValue = opts.get("config")?;
    let config = if config_value.is_nil() {
        base.config.clone()
    } else {
        lua.from_value(config_value)
            .map_err(|e| LuaError::runtime(format!("srv:reload: config must be plain data: {e}")))?
    };
    let spec = WorkerSpec {
        policy: opts
            .get::<Option<String>>("policy")?
            .unwrap_or_else(|| base.policy.clone()),
        config,
        package_path: base.package_path.clone(),
        package_cpath: base.package_cpath.clone(),
        settings,
        access: access.clone(),
    };
    let mut replies = Vec::new();
    for c in &srv.commands {
        let (tx, rx) = oneshot::channel();
        if c.send(Command::Prepare(Box::new(spec.clone()), tx))
            .is_err()
        {
            return Ok((None, Some("a worker has stopped".into())));
        }
        replies.push(rx);
    }
    let mut failed = None;
    for (i, r) in replies.into_iter().enumerate() {
        let r = r.await.unwrap_or_else(|_| Err("the worker stopped".into()));
        if let Err(e) = r {
            // One line: the message, not the traceback under it.
            let first = e.lines().next().unwrap_or_default();
            failed.get_or_insert(format!("worker {i}: {first}"));
        }
    }
    let verdict = if failed.is_some() {
        || Command::Abort
    } else {
        || Command::Commit
    };
    for c in &srv.commands {
        let _ = c.send(verdict());
    }
    if failed.is_none() {
        *srv.access.borrow_mut() = access;
    }
    Ok(match failed {
        Some(e) => (None, Some(e)),
        None => (Some(true), None),
    })
}

pub fn register(lua: &Lua, t: &LuaTable) -> LuaResult<()> {
    t.set(
        "serve",
        lua.create_async_function(|lua, opts: LuaTable| {
            let ok = runtime::check_loop("luaproxy.serve");
            async move {
                ok?;
                lua_serve(lua, opts).await
            }
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_connections_go_to_a_worker_holding_two_fewer() {
        let b = Balance {
            open: [5, 4, 3]
                .iter()
                .map(|&n| std::sync::atomic::AtomicUsize::new(n))
                .collect(),
            handoff: (0..3)
                .map(|_| tokio::sync::mpsc::unbounded_channel().0)
                .collect(),
        };
        assert_eq!(b.elsewhere(0), Some(2));
        assert_eq!(b.elsewhere(1), None);
        assert_eq!(b.elsewhere(2), None);
    }
}
