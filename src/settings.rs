//! Server settings with nginx's directive names, units and defaults (`luaproxy.serve{...}` and
//! `--config`). Plain Rust: the listener turns the Lua table into `Value`s, so `cargo test`
//! covers every name, default and error message here.

use crate::accesslog::{Format, Target};
use crate::h1::rules::{Cidr, Limits, MAX_HEADERS_CAP};
use crate::units::{parse_duration, parse_size};
use std::time::Duration;

/// A setting's value as Lua gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Num(f64),
    Str(String),
    Bool(bool),
    List(Vec<String>),
}

/// Everything a server is told, past its address, handler or policy and workers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What every request carries (body limit, header limits, proxy defaults, ...).
    pub limits: Limits,
    /// From a connection's first byte of a head (or its accept) to the whole head.
    pub client_header_timeout: Duration,
    /// How long an idle keep-alive connection waits for its next request.
    pub keepalive_timeout: Duration,
    /// How long a response write may wait for the client to take bytes.
    pub send_timeout: Duration,
    /// Requests on one connection before `Connection: close` (0: no limit).
    pub keepalive_requests: usize,
    /// Open client connections in the whole server; at the cap, accepting pauses.
    pub max_connections: usize,
    /// How long Lua may run without yielding (per call, summed over its runs); 0: no limit.
    pub lua_budget: Duration,
    /// Bytes each worker's Lua VM may hold; 0: no limit.
    pub lua_memory_limit: u64,
    /// How long a stopping server waits for requests in flight (nginx's
    /// worker_shutdown_timeout).
    pub shutdown_timeout: Duration,
    /// Where access log lines go: off (the default), stdout, or a file.
    pub access_log: Target,
    /// The access log's line, parsed (nginx's `combined` by default).
    pub log_format: Format,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            limits: Limits::default(),
            client_header_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
            send_timeout: Duration::from_secs(60),
            keepalive_requests: 1000,
            max_connections: 10_000,
            lua_budget: Duration::from_secs(1),
            lua_memory_limit: 512 * 1024 * 1024,
            shutdown_timeout: Duration::from_secs(30),
            access_log: Target::Off,
            log_format: Format::default(),
        }
    }
}

/// Every setting name, with its older alias where there is one. The keys `luaproxy.serve`
/// takes besides these (`listen`, `handler`, `policy`, `workers`, `config`) are the
/// listener's.
pub const NAMES: &[&str] = &[
    "client_max_body_size",
    "client_header_timeout",
    "client_body_timeout",
    "send_timeout",
    "keepalive_timeout",
    "keepalive_requests",
    "large_client_header_buffers",
    "max_headers",
    "proxy_connect_timeout",
    "proxy_read_timeout",
    "proxy_send_timeout",
    "max_connections",
    "underscores_in_headers",
    "trusted_ips",
    "upstream_keepalive",
    "upstream_keepalive_timeout",
    "lua_budget",
    "lua_memory_limit",
    "shutdown_timeout",
    "access_log",
    "log_format",
    // Aliases kept from before the nginx names.
    "max_body_size",
    "header_timeout",
    "body_timeout",
];

fn duration(key: &str, v: &Value, allow_zero: bool) -> Result<Duration, String> {
    let d = match v {
        Value::Num(n) => crate::units::seconds(*n),
        Value::Str(s) => parse_duration(s),
        _ => None,
    };
    match d {
        Some(d) if allow_zero || !d.is_zero() => Ok(d),
        _ => Err(format!(
            "setting '{key}': bad duration {} (expected seconds > 0, or \"30s\", \"500ms\", \"2m\")",
            show(v)
        )),
    }
}

fn size(key: &str, v: &Value) -> Result<u64, String> {
    let n = match v {
        Value::Num(n) if n.fract() == 0.0 && *n >= 0.0 && *n < 9.0e15 => Some(*n as u64),
        Value::Str(s) => parse_size(s),
        _ => None,
    };
    n.ok_or_else(|| {
        format!(
            "setting '{key}': bad size {} (expected bytes, or \"512k\", \"1m\")",
            show(v)
        )
    })
}

fn count(key: &str, v: &Value, min: u64, max: u64) -> Result<u64, String> {
    match v {
        Value::Num(n) if n.fract() == 0.0 && *n >= min as f64 && *n <= max as f64 => Ok(*n as u64),
        _ => Err(format!(
            "setting '{key}': bad value {} (expected a whole number from {min} to {max})",
            show(v)
        )),
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Num(n) => format!("{n}"),
        Value::Str(s) => format!("'{s}'"),
        Value::Bool(b) => format!("{b}"),
        Value::List(_) => "(a list)".into(),
    }
}

impl Settings {
    /// Applies `key = value`; unknown keys and bad values are one-line errors naming the key.
    pub fn set(&mut self, key: &str, v: &Value) -> Result<(), String> {
        let l = &mut self.limits;
        match key {
            "client_max_body_size" | "max_body_size" => l.max_body = size(key, v)?,
            "client_header_timeout" | "header_timeout" => {
                self.client_header_timeout = duration(key, v, false)?
            }
            "client_body_timeout" | "body_timeout" => l.body_timeout = duration(key, v, false)?,
            "send_timeout" => self.send_timeout = duration(key, v, false)?,
            "keepalive_timeout" => self.keepalive_timeout = duration(key, v, true)?,
            "keepalive_requests" => {
                self.keepalive_requests = count(key, v, 0, u32::MAX as u64)? as usize
            }
            "large_client_header_buffers" => {
                // nginx's "4 8k": a request line or one header field may take one buffer
                // (414 / 431 past it), the whole head all of them (431).
                let bad = || {
                    format!(
                        "setting '{key}': bad value {} (expected \"<number> <size>\", as \"4 8k\")",
                        show(v)
                    )
                };
                let Value::Str(s) = v else { return Err(bad()) };
                let mut parts = s.split_whitespace();
                let (Some(n), Some(sz), None) = (parts.next(), parts.next(), parts.next()) else {
                    return Err(bad());
                };
                let n: usize = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(bad)?;
                let sz = parse_size(sz)
                    .filter(|s| (1024..=1024 * 1024).contains(s))
                    .ok_or_else(bad)? as usize;
                l.max_line = sz;
                l.max_head = sz * n;
            }
            "max_headers" => l.max_headers = count(key, v, 1, MAX_HEADERS_CAP as u64)? as usize,
            "proxy_connect_timeout" => l.proxy_connect_timeout = duration(key, v, false)?,
            "proxy_read_timeout" => l.proxy_read_timeout = duration(key, v, false)?,
            "proxy_send_timeout" => l.proxy_send_timeout = duration(key, v, false)?,
            "max_connections" => self.max_connections = count(key, v, 1, 10_000_000)? as usize,
            "underscores_in_headers" => match v {
                Value::Bool(b) => l.underscores_in_headers = *b,
                _ => {
                    return Err(format!(
                        "setting '{key}': bad value {} (expected true or false)",
                        show(v)
                    ))
                }
            },
            "trusted_ips" => {
                let list = match v {
                    Value::List(l) => l.clone(),
                    Value::Str(s) => vec![s.clone()],
                    _ => {
                        return Err(format!(
                            "setting '{key}': expected a list of addresses or blocks, as {{ \"10.0.0.0/8\" }}"
                        ))
                    }
                };
                l.trusted_ips = list
                    .iter()
                    .map(|s| {
                        Cidr::parse(s)
                            .ok_or_else(|| format!("setting '{key}': bad address or block '{s}'"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "upstream_keepalive" => l.upstream_keepalive = count(key, v, 0, 100_000)? as usize,
            "upstream_keepalive_timeout" => l.upstream_keepalive_timeout = duration(key, v, false)?,
            "lua_budget" => self.lua_budget = duration(key, v, true)?,
            "lua_memory_limit" => {
                let n = size(key, v)?;
                if n != 0 && n < 1024 * 1024 {
                    return Err(format!(
                        "setting '{key}': {} is too small for a Lua VM (at least \"1m\", or 0 for no limit)",
                        show(v)
                    ));
                }
                self.lua_memory_limit = n
            }
            "shutdown_timeout" => self.shutdown_timeout = duration(key, v, true)?,
            "access_log" | "log_format" => {
                let Value::Str(s) = v else {
                    let what = match key {
                        "access_log" => "a path, \"stdout\" or \"off\"",
                        _ => "nginx's log_format text, \"combined\" or \"router\"",
                    };
                    return Err(format!(
                        "setting '{key}': bad value {} (expected {what})",
                        show(v)
                    ));
                };
                let bad = |e: String| format!("setting '{key}': {e}");
                match key {
                    "access_log" => self.access_log = Target::parse(s).map_err(bad)?,
                    _ => self.log_format = Format::parse(s).map_err(bad)?,
                }
            }
            _ => return Err(format!("unknown setting '{key}'")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, Value)]) -> Result<Settings, String> {
        let mut s = Settings::default();
        for (k, v) in pairs {
            s.set(k, v)?;
        }
        Ok(s)
    }

    #[test]
    fn defaults_are_nginx_and_reference_ones() {
        let s = Settings::default();
        assert_eq!(s.limits.max_body, 1024 * 1024);
        assert_eq!(s.client_header_timeout, Duration::from_secs(30));
        assert_eq!(s.limits.body_timeout, Duration::from_secs(60));
        assert_eq!(s.send_timeout, Duration::from_secs(60));
        assert_eq!(s.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(s.keepalive_requests, 1000);
        assert_eq!((s.limits.max_line, s.limits.max_head), (8192, 32768));
        assert_eq!(s.limits.max_headers, 100);
        assert_eq!(s.limits.proxy_connect_timeout, Duration::from_secs(5));
        assert_eq!(s.limits.proxy_read_timeout, Duration::from_secs(60));
        assert_eq!(s.limits.proxy_send_timeout, Duration::from_secs(60));
        assert_eq!(s.max_connections, 10_000);
        assert!(!s.limits.underscores_in_headers);
        assert_eq!(s.limits.upstream_keepalive, 64);
        assert_eq!(s.limits.upstream_keepalive_timeout, Duration::from_secs(60));
        assert_eq!(s.lua_budget, Duration::from_secs(1));
        assert_eq!(s.lua_memory_limit, 512 * 1024 * 1024);
        assert_eq!(s.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(s.access_log, Target::Off);
        assert_eq!(s.log_format.source(), crate::accesslog::COMBINED);
    }

    #[test]
    fn access_log_settings() {
        let s = with(&[
            (
                "access_log",
                Value::Str("/var/log/luaproxy/access.log".into()),
            ),
            (
                "log_format",
                Value::Str("$remote_addr $ctx_api_key $status".into()),
            ),
        ])
        .unwrap();
        assert_eq!(
            s.access_log,
            Target::File("/var/log/luaproxy/access.log".into())
        );
        assert_eq!(s.log_format.ctx_names(), ["api_key"]);
        let s = with(&[
            ("access_log", Value::Str("stdout".into())),
            ("log_format", Value::Str("router".into())),
        ])
        .unwrap();
        assert_eq!(s.access_log, Target::Stdout);
        assert_eq!(s.log_format.source(), crate::accesslog::ROUTER);
        let e = |k: &str, v: Value| with(&[(k, v)]).unwrap_err();
        assert_eq!(
            e("log_format", Value::Str("$remote_addr $foo".into())),
            "setting 'log_format': unknown variable '$foo'"
        );
        assert_eq!(
            e("access_log", Value::Str("".into())),
            "setting 'access_log': expected a path, \"stdout\" or \"off\""
        );
        assert!(e("access_log", Value::Bool(false))
            .starts_with("setting 'access_log': bad value false"));
        assert!(e("log_format", Value::Num(1.0)).starts_with("setting 'log_format': bad value 1"));
    }

    #[test]
    fn fault_and_stop_settings_take_nginx_forms() {
        let s = with(&[
            ("lua_budget", Value::Str("250ms".into())),
            ("lua_memory_limit", Value::Str("64m".into())),
            ("shutdown_timeout", Value::Num(5.0)),
        ])
        .unwrap();
        assert_eq!(s.lua_budget, Duration::from_millis(250));
        assert_eq!(s.lua_memory_limit, 64 * 1024 * 1024);
        assert_eq!(s.shutdown_timeout, Duration::from_secs(5));
        let off = with(&[
            ("lua_budget", Value::Num(0.0)),
            ("lua_memory_limit", Value::Num(0.0)),
        ])
        .unwrap();
        assert!(off.lua_budget.is_zero() && off.lua_memory_limit == 0);
        let e = with(&[("lua_memory_limit", Value::Str("100k".into()))]).unwrap_err();
        assert!(e.contains("too small"), "{e}");
    }

    #[test]
    fn nginx_forms_and_aliases() {
        let s = with(&[
            ("client_max_body_size", Value::Str("512k".into())),
            ("client_header_timeout", Value::Str("10s".into())),
            ("body_timeout", Value::Num(2.5)),
            ("keepalive_timeout", Value::Str("2m".into())),
            ("large_client_header_buffers", Value::Str("2 16k".into())),
            ("proxy_read_timeout", Value::Str("500ms".into())),
            ("underscores_in_headers", Value::Bool(true)),
            (
                "trusted_ips",
                Value::List(vec!["10.0.0.0/8".into(), "::1".into()]),
            ),
        ])
        .unwrap();
        assert_eq!(s.limits.max_body, 512 * 1024);
        assert_eq!(s.client_header_timeout, Duration::from_secs(10));
        assert_eq!(s.limits.body_timeout, Duration::from_millis(2500));
        assert_eq!(s.keepalive_timeout, Duration::from_secs(120));
        assert_eq!((s.limits.max_line, s.limits.max_head), (16384, 32768));
        assert_eq!(s.limits.proxy_read_timeout, Duration::from_millis(500));
        assert!(s.limits.underscores_in_headers);
        assert_eq!(s.limits.trusted_ips.len(), 2);
        assert_eq!(
            with(&[("max_body_size", Value::Num(0.0))])
                .unwrap()
                .limits
                .max_body,
            0
        );
    }

    #[test]
    fn every_listed_name_is_a_setting() {
        // NAMES is what `--config` accepts (luaproxy.server_settings); `set` must know each.
        for name in NAMES {
            for v in [Value::Num(1.0), Value::Str("1".into()), Value::Bool(true)] {
                if let Err(e) = Settings::default().set(name, &v) {
                    assert!(!e.starts_with("unknown setting"), "{name}: {e}");
                }
            }
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = |k: &str, v: Value| with(&[(k, v)]).unwrap_err();
        assert_eq!(
            e("client_max_bdy_size", Value::Num(1.0)),
            "unknown setting 'client_max_bdy_size'"
        );
        assert!(e("client_max_body_size", Value::Str("1q".into()))
            .starts_with("setting 'client_max_body_size': bad size '1q'"));
        assert!(e("client_max_body_size", Value::Num(-1.0)).contains("bad size -1"));
        assert!(e("proxy_read_timeout", Value::Str("soon".into()))
            .starts_with("setting 'proxy_read_timeout': bad duration 'soon'"));
        assert!(e("send_timeout", Value::Num(0.0)).contains("bad duration 0"));
        assert!(
            e("keepalive_requests", Value::Num(1.5)).starts_with("setting 'keepalive_requests'")
        );
        assert!(e("large_client_header_buffers", Value::Str("8k".into()))
            .starts_with("setting 'large_client_header_buffers'"));
        assert!(e("max_headers", Value::Num(5000.0)).contains("from 1 to 1024"));
        assert!(e("underscores_in_headers", Value::Str("on".into())).contains("true or false"));
        assert!(e("trusted_ips", Value::List(vec!["10.0.0.0/99".into()])).contains("'10.0.0.0/99'"));
        assert!(e("max_connections", Value::Num(0.0)).starts_with("setting 'max_connections'"));
    }
}
