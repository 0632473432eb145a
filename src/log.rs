//! `luaproxy.log(level, ...)`: one line per message on stderr, nginx error.log style.
//!
//! Plain Rust callers use [`log`]; the level threshold is process-wide so every worker agrees.

use mlua::prelude::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::UNIX_EPOCH;

pub const EMERG: u8 = 1;
pub const ALERT: u8 = 2;
pub const CRIT: u8 = 3;
pub const ERR: u8 = 4;
pub const WARN: u8 = 5;
pub const NOTICE: u8 = 6;
pub const INFO: u8 = 7;
pub const DEBUG: u8 = 8;

static LEVEL: AtomicU8 = AtomicU8::new(NOTICE);

/// Panics so far in this process (the hook counts them; a connection that saw one closes).
static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Panics seen so far in this process.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// Routes panic messages into the log (one line with where it happened) instead of Rust's
/// default print, once per process. What the panic ends is logged where it is caught.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            PANICS.fetch_add(1, Ordering::Relaxed);
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            log(ALERT, &format!("panic at {at}: {msg}"));
        }));
    });
}

thread_local! {
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The server worker index of this thread (`None` on the thread that runs `main.lua`): named
/// in every log line.
pub fn worker_id() -> Option<usize> {
    WORKER.with(|w| w.get())
}

pub fn set_worker_id(id: usize) {
    WORKER.with(|w| w.set(Some(id)));
}

/// Sets or clears (`None`: the main program's thread) which worker this thread is.
pub fn set_worker(id: Option<usize>) {
    WORKER.with(|w| w.set(id));
}

/// A line `luaproxy.test` kept instead of writing it: `kind` is "error" (the error log, with
/// its level name) or "access" (an access log line).
pub struct Captured {
    pub kind: &'static str,
    pub level: &'static str,
    pub message: String,
    pub line: String,
}

/// Set once any thread captures (a load per line written, for every other thread).
static CAPTURING: AtomicBool = AtomicBool::new(false);

/// This thread's capture: whether it is on, and the lines kept and not yet taken.
#[derive(Default)]
struct Capture {
    on: bool,
    kept: Vec<Captured>,
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Capture> = std::cell::RefCell::new(Capture::default());
}

/// Keeps this thread's log lines (and its access log lines) for [`take_captured`] instead of
/// writing them (`luaproxy.test`, while it runs a policy), or stops keeping them (what was
/// kept stays until taken).
pub fn set_capture(on: bool) {
    if on {
        CAPTURING.store(true, Ordering::Relaxed);
    }
    CAPTURE.with(|c| c.borrow_mut().on = on);
}

/// The lines kept since the last call.
pub fn take_captured() -> Vec<Captured> {
    CAPTURE.with(|c| std::mem::take(&mut c.borrow_mut().kept))
}

fn capture(entry: Captured) -> Option<Captured> {
    CAPTURE.with(|c| {
        let mut c = c.borrow_mut();
        if !c.on {
            return Some(entry);
        }
        c.kept.push(entry);
        None
    })
}

/// Keeps an access log line if this thread captures; false if it does not.
pub fn capture_access(line: &str) -> bool {
    CAPTURING.load(Ordering::Relaxed)
        && capture(Captured {
            kind: "access",
            level: "",
            message: line.to_string(),
            line: line.to_string(),
        })
        .is_none()
}

fn level_name(level: u8) -> &'static str {
    match level {
        0 | 1 => "emerg",
        2 => "alert",
        3 => "crit",
        4 => "error",
        5 => "warn",
        6 => "notice",
        7 => "info",
        _ => "debug",
    }
}

/// The level threshold in force.
pub fn level() -> u8 {
    LEVEL.load(Ordering::Relaxed)
}

/// Sets the level threshold (`luaproxy.set_log_level`).
pub fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

/// True when a message at `level` would be written.
pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

/// Formats a UTC timestamp as `YYYY/MM/DD HH:MM:SS` without a date crate.
pub fn timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}/{m:02}/{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `log!(LEVEL, "format", args...)`: one log line at `crate::log::LEVEL`, formatted only if
/// that level passes the threshold (a message that is not written costs no formatting).
#[macro_export]
macro_rules! log {
    ($level:ident, $($arg:tt)+) => {
        if $crate::log::enabled($crate::log::$level) {
            $crate::log::log($crate::log::$level, &format!($($arg)+));
        }
    };
}

/// Writes one log line if `level` passes the threshold.
pub fn log(level: u8, msg: &str) {
    log_as(level, worker_id(), msg)
}

/// [`log`] on behalf of worker `who` (from a thread that is not that worker: the watchdog).
pub fn log_as(level: u8, who: Option<usize>, msg: &str) {
    if !enabled(level) {
        return;
    }
    let secs = crate::clock::system_now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let who = who
        .map(|w| format!("w{w}"))
        .unwrap_or_else(|| "main".into());
    let line = format!(
        "{} [{}] {}#{}: {}\n",
        timestamp(secs),
        level_name(level),
        std::process::id(),
        who,
        msg
    );
    let line = if CAPTURING.load(Ordering::Relaxed) {
        let kept = capture(Captured {
            kind: "error",
            level: level_name(level),
            message: msg.trim_end_matches('\n').to_string(),
            line: line.trim_end_matches('\n').to_string(),
        });
        match kept {
            Some(c) => c.line + "\n",
            None => return,
        }
    } else {
        line
    };
    // One write call per line so lines from different workers do not interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn parse_level(v: &LuaValue) -> LuaResult<u8> {
    match v {
        LuaValue::Integer(n) if (0..=8).contains(n) => Ok(*n as u8),
        LuaValue::String(s) => match &*s.to_str()? {
            "emerg" => Ok(EMERG),
            "alert" => Ok(ALERT),
            "crit" => Ok(CRIT),
            "err" | "error" => Ok(ERR),
            "warn" => Ok(WARN),
            "notice" => Ok(NOTICE),
            "info" => Ok(INFO),
            "debug" => Ok(DEBUG),
            other => Err(LuaError::runtime(format!("unknown log level '{other}'"))),
        },
        _ => Err(LuaError::runtime(
            "bad argument #1 (log level expected: luaproxy.CRIT, ERR, WARN, NOTICE, INFO or DEBUG)",
        )),
    }
}

/// `luaproxy.log(level, ...)` -> `true`. Arguments go through `tostring` and are concatenated.
fn lua_log(lua: &Lua, (level, rest): (LuaValue, LuaMultiValue)) -> LuaResult<bool> {
    let level = parse_level(&level)?;
    if enabled(level) {
        let tostring: LuaFunction = lua.globals().get("tostring")?;
        let mut msg = String::new();
        for v in rest {
            let s: LuaString = tostring.call(v)?;
            msg.push_str(&s.to_string_lossy());
        }
        log(level, &msg);
    }
    Ok(true)
}

/// `luaproxy.log(level, ...)` for a level the log leaves out: `true` at once, before any
/// argument is converted (a policy's per-request `log(INFO, ...)` costs a call and a compare
/// at the default level); anything else goes to `lua_log` (upvalue 1).
unsafe extern "C-unwind" fn raw_log(l: *mut mlua::ffi::lua_State) -> std::os::raw::c_int {
    // SAFETY: this function's contract (the raw-code rules of capi.rs for C functions Lua
    // calls) is what every operation below relies on.
    unsafe {
        use mlua::ffi;
        if ffi::lua_type(l, 1) == ffi::LUA_TNUMBER {
            let mut isint = 0;
            let level = ffi::lua_tointegerx(l, 1, &mut isint);
            if isint != 0
                && (1..=DEBUG as ffi::lua_Integer).contains(&level)
                && !enabled(level as u8)
            {
                ffi::lua_pushboolean(l, 1);
                return 1;
            }
        }
        crate::capi::fallback(l)
    }
}

/// `luaproxy.set_log_level(level)` -> `true`. `level` is a name ("debug") or `luaproxy.DEBUG`.
fn lua_set_log_level(_: &Lua, level: LuaValue) -> LuaResult<bool> {
    LEVEL.store(parse_level(&level)?, Ordering::Relaxed);
    Ok(true)
}

pub fn register(lua: &Lua, t: &LuaTable) -> LuaResult<()> {
    t.set("EMERG", EMERG)?;
    t.set("ALERT", ALERT)?;
    t.set("CRIT", CRIT)?;
    t.set("ERR", ERR)?;
    t.set("WARN", WARN)?;
    t.set("NOTICE", NOTICE)?;
    t.set("INFO", INFO)?;
    t.set("DEBUG", DEBUG)?;
    let slow = lua.create_function(lua_log)?;
    // SAFETY: exec_raw hands over its own stack with the mlua function on it; the closure
    // made from it is what the function leaves.
    let log: LuaFunction =
        unsafe { lua.exec_raw(slow, |l| mlua::ffi::lua_pushcclosure(l, raw_log, 1))? };
    t.set("log", log)?;
    t.set("set_log_level", lua.create_function(lua_set_log_level)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_formats_known_dates() {
        assert_eq!(timestamp(0), "1970/01/01 00:00:00");
        assert_eq!(timestamp(951_782_400), "2000/02/29 00:00:00");
        assert_eq!(timestamp(1_795_359_600), "2026/11/22 15:00:00");
    }
}
