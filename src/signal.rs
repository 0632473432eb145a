//! `luaproxy.signal.listen(...)`: Unix signals as values a Lua loop waits for, so `main.lua`
//! decides what HUP, TERM, QUIT and INT mean (reload, drain and stop), in plain Lua.

use mlua::prelude::*;
use std::cell::RefCell;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals a program may listen for, by their names without `SIG`.
type Kind = fn() -> SignalKind;
const NAMES: &[(&str, Kind)] = &[
    ("HUP", SignalKind::hangup),
    ("TERM", SignalKind::terminate),
    ("QUIT", SignalKind::quit),
    ("INT", SignalKind::interrupt),
    ("USR1", SignalKind::user_defined1),
    ("USR2", SignalKind::user_defined2),
];

/// Signals being listened for. From `listen` on, these signals no longer have their default
/// effect (ending the process): they are delivered here, and one that arrives while nobody
/// waits is kept for the next `wait`.
pub struct Listener {
    streams: RefCell<Vec<(&'static str, Signal)>>,
}

impl LuaUserData for Listener {
    fn add_methods<M: LuaUserDataMethods<Self>>(m: &mut M) {
        // name = sig:wait(): the name of the next signal received ("HUP", ...).
        m.add_async_method("wait", |_, this, ()| async move {
            crate::runtime::check_loop("sig:wait")?;
            // Out of the cell while waiting (no borrow across the await), back in however
            // the wait ends, so signals that come meanwhile still count.
            struct Back<'a>(&'a Listener, Vec<(&'static str, Signal)>);
            impl Drop for Back<'_> {
                fn drop(&mut self) {
                    *self.0.streams.borrow_mut() = std::mem::take(&mut self.1);
                }
            }
            let taken = std::mem::take(&mut *this.streams.borrow_mut());
            if taken.is_empty() {
                return Err(LuaError::runtime(
                    "sig:wait: another coroutine is already waiting on it",
                ));
            }
            let mut back = Back(&this, taken);
            let name = std::future::poll_fn(|cx| {
                for (name, s) in back.1.iter_mut() {
                    if s.poll_recv(cx).is_ready() {
                        return std::task::Poll::Ready(*name);
                    }
                }
                std::task::Poll::Pending
            })
            .await;
            Ok(name)
        });
    }
}

/// `sig = luaproxy.signal.listen("HUP", "TERM", ...)`: starts listening for those signals
/// (names as in `kill -l`, without `SIG`: HUP, TERM, QUIT, INT, USR1, USR2); `sig:wait()`
/// then returns each one's name as it arrives. Raises on an unknown name.
fn lua_listen(_: &Lua, names: LuaMultiValue) -> LuaResult<Listener> {
    crate::runtime::check_loop("luaproxy.signal.listen")?;
    let mut streams = Vec::new();
    for v in names {
        let n = match &v {
            LuaValue::String(s) => s.to_str()?.to_string(),
            other => {
                return Err(LuaError::runtime(format!(
                    "luaproxy.signal.listen: signal name expected, got {}",
                    other.type_name()
                )))
            }
        };
        let bare = n.strip_prefix("SIG").unwrap_or(&n);
        let Some((name, kind)) = NAMES.iter().find(|(k, _)| *k == bare) else {
            return Err(LuaError::runtime(format!(
                "luaproxy.signal.listen: unknown signal '{n}' (HUP, TERM, QUIT, INT, USR1, USR2)"
            )));
        };
        let s = signal(kind())
            .map_err(|e| LuaError::runtime(format!("luaproxy.signal.listen: {name}: {e}")))?;
        streams.push((*name, s));
    }
    if streams.is_empty() {
        return Err(LuaError::runtime(
            "luaproxy.signal.listen: name at least one signal",
        ));
    }
    Ok(Listener {
        streams: RefCell::new(streams),
    })
}

pub fn register(lua: &Lua) -> LuaResult<LuaTable> {
    let t = lua.create_table()?;
    t.set("listen", lua.create_function(lua_listen)?)?;
    Ok(t)
}
