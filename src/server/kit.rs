//! The server side of `luaproxy.test` (src/kit): a policy loaded into the calling VM,
//! as `luaproxy.serve{ handler = }` does, whose requests arrive on in-memory pipes instead of
//! accepted sockets. Each request is a connection served by the production connection loop
//! (`conn::serve_conn`: head parsing and checks, the policy, the response writer, the log
//! phase); the spec's side writes the request's bytes and reads the response back with the
//! upstream client's parser.

use super::conn::{serve_conn, ConnCap, Current, OpenConn, Worker};
use super::logphase::{self, AccessLog, LogPhase};
use super::workers::{load_policy, WorkerSpec};
use crate::h1::stream::{pair, Stream};
use crate::h1::upstream::{self as wire, Conn, ResponseBody};
use crate::runtime;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::Method;
use mlua::prelude::*;
use mlua::LuaSerdeExt;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A loaded policy, ready for requests.
pub struct App {
    cur: Current,
    cap: Arc<ConnCap>,
    _shutdown: watch::Sender<bool>,
    shutdown_rx: watch::Receiver<bool>,
}

/// What a spec's request got back: the head's fields as sent (names as written), the body
/// decoded from its framing, and why the body stopped short if it did.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(Bytes, Bytes)>,
    pub body: Bytes,
    pub error: Option<String>,
}

/// How long the spec's side waits for more of a response body (virtual time, so only a policy
/// that never ends its body meets it).
const BODY_IDLE: Duration = Duration::from_secs(24 * 3600);

/// The policy's handler, `init_worker` and `log`: from a file (loaded as a worker loads it)
/// or a table `{ handler =, init_worker =, log = }`.
pub enum Source {
    File(String),
    Table(LuaTable),
}

/// Loads `source` with `config` (plain data, as `--config` gives it) and the server
/// `settings` (a table of `settings::NAMES` keys). `record(info, ctx)` sees every request's
/// log phase before the policy's own `log`. `Err`: the policy failed to load (its message).
pub async fn load(
    lua: &Lua,
    source: Source,
    config: LuaValue,
    settings: &LuaTable,
    record: LuaFunction,
) -> LuaResult<Result<App, String>> {
    let settings = super::settings_from(settings)?;
    let config: serde_json::Value = if config.is_nil() {
        serde_json::Value::Object(Default::default())
    } else {
        lua.from_value(config)
            .map_err(|e| LuaError::runtime(format!("config must be plain data: {e}")))?
    };
    logphase::register_metrics();
    let (handler, log) = match source {
        Source::File(path) => {
            let spec = WorkerSpec {
                policy: path,
                config,
                package_path: None,
                package_cpath: None,
                settings: settings.clone(),
                access: None,
            };
            match load_policy(lua, &spec).await {
                Ok(p) => (p.handler, p.log),
                Err(e) => return Ok(Err(e)),
            }
        }
        Source::Table(t) => {
            let Some(handler) = t.get::<Option<LuaFunction>>("handler")? else {
                return Err(LuaError::runtime(
                    "policy table needs a handler function (handler = function(req) ... end)",
                ));
            };
            let log = t.get::<Option<LuaFunction>>("log")?;
            if let Some(init) = t.get::<Option<LuaFunction>>("init_worker")? {
                let mut args = LuaMultiValue::new();
                args.push_back(lua.to_value(&config)?);
                if let Err(e) = runtime::call_protected(lua, init, args).await {
                    return Ok(Err(format!("policy init_worker failed: {e}")));
                }
            }
            (handler, log)
        }
    };
    let wrap: LuaFunction = lua
        .load(
            r#"
            local record, log = ...
            return function(info, ctx)
                record(info, ctx)
                if log then return log(info, ctx) end
            end
            "#,
        )
        .set_name("=luaproxy.test")
        .call((record, log))?;
    let (life, life_rx) = watch::channel(runtime::RUNNING);
    let access = match &settings.access_log {
        crate::accesslog::Target::Off => None,
        target => Some(AccessLog::new(
            lua,
            settings.log_format.clone(),
            &crate::accesslog::Writer::capture(target.clone()),
            life_rx,
        )?),
    };
    let cap = ConnCap::new(settings.max_connections);
    let (tx, rx) = watch::channel(false);
    let w = Worker {
        lua: lua.clone(),
        handler,
        limits: Rc::new(settings.limits.clone()),
        cap: cap.clone(),
        log: LogPhase {
            log_fn: Some(wrap),
            access,
            budget: settings.lua_budget,
        },
        settings,
        requests: Cell::new(0),
        req_meta: Cell::new(false),
        balance: None,
        life,
    };
    Ok(Ok(App {
        cur: Rc::new(RefCell::new(Rc::new(w))),
        cap,
        _shutdown: tx,
        shutdown_rx: rx,
    }))
}

impl App {
    /// The policy's `lua_budget`.
    pub fn budget(&self) -> Duration {
        self.cur.borrow().settings.lua_budget
    }

    /// Serves `raw` (a whole request: head and body) from `peer` on a connection of its
    /// own, and reads the response. `Err`: no response came (the connection closed first).
    pub async fn request(
        &self,
        raw: Bytes,
        method: &Method,
        peer: SocketAddr,
    ) -> Result<Answer, String> {
        let (client, server) = pair();
        let open = OpenConn::new(None, &self.cap);
        let serving = tokio::task::spawn_local(serve_conn(
            self.cur.clone(),
            Stream::Mem(server),
            peer,
            self.shutdown_rx.clone(),
            open,
        ));
        let _ = client.write(&[std::io::IoSlice::new(&raw)]);
        let answer = read_answer(Conn::new(Stream::Mem(client)), method).await;
        // The client end is closed by now: the connection's loop ends (after its log phase).
        let _ = serving.await;
        answer
    }
}

/// Reads one response (skipping interim ones) off `conn`.
async fn read_answer(mut conn: Conn, method: &Method) -> Result<Answer, String> {
    loop {
        if !conn.buf.is_empty() {
            let parsed = wire::parse_head(&conn.buf, method).map_err(|e| e.reason())?;
            if let Some((n, head)) = parsed {
                let raw = conn.buf.split_to(n).freeze();
                if head.status.is_informational() {
                    continue;
                }
                let status = head.status.as_u16();
                let headers = fields(&raw);
                let mut body = ResponseBody::new(conn, &head, BODY_IDLE, Box::new(drop));
                let mut got = BytesMut::new();
                let mut error = None;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => {
                            if let Some(d) = f.data_ref() {
                                got.extend_from_slice(d);
                            }
                        }
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                return Ok(Answer {
                    status,
                    headers,
                    body: got.freeze(),
                    error,
                });
            }
        }
        let n = std::future::poll_fn(|cx| conn.poll_fill(cx))
            .await
            .map_err(|e| crate::h1::io::io_reason(&e))?;
        if n == 0 {
            return Err("connection closed without a response".into());
        }
    }
}

/// Every field of a response head, in order, as written.
fn fields(raw: &Bytes) -> Vec<(Bytes, Bytes)> {
    let mut hdrs = [httparse::EMPTY_HEADER; 128];
    let mut res = httparse::Response::new(&mut hdrs);
    if res.parse(raw).is_err() {
        return Vec::new();
    }
    res.headers
        .iter()
        .map(|h| {
            (
                Bytes::copy_from_slice(h.name.as_bytes()),
                Bytes::copy_from_slice(h.value),
            )
        })
        .collect()
}
