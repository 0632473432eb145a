//! Drives the `luaproxy` table from a vendored Lua VM: the loop, tasks, timers and a real
//! server/client round trip on 127.0.0.1. (The shipped module links no Lua of its own, so
//! only the `vendored` build can create a VM here.)

use mlua::prelude::*;

fn lua() -> Lua {
    let lua = Lua::new();
    let t = luaproxy::exports(&lua).unwrap();
    lua.register_module("luaproxy", t).unwrap();
    lua
}

#[test]
fn run_returns_values_and_spawned_tasks_run_concurrently() {
    let lua = lua();
    let (a, elapsed): (i64, f64) = lua
        .load(
            r#"
            local lp = require "luaproxy"
            return lp.run(function()
                local t0 = lp.now()
                local a = lp.spawn(function() lp.sleep(0.1) return 20 end)
                local b = lp.spawn(function() lp.sleep(0.1) return 22 end)
                local _, x = a:wait()
                local _, y = b:wait()
                return x + y, lp.now() - t0
            end)
            "#,
        )
        .eval()
        .unwrap();
    assert_eq!(a, 42);
    assert!(elapsed < 0.19, "tasks did not overlap: {elapsed}");
}

#[test]
fn async_binding_outside_the_loop_names_run() {
    let lua = lua();
    let err = lua
        .load(r#"require("luaproxy").sleep(0.01)"#)
        .exec()
        .unwrap_err()
        .to_string();
    assert!(err.contains("luaproxy.run"), "{err}");
}

#[test]
fn errors_in_run_propagate_with_traceback() {
    let lua = lua();
    let err = lua
        .load(r#"require("luaproxy").run(function() error("boom") end)"#)
        .exec()
        .unwrap_err()
        .to_string();
    assert!(err.contains("boom"), "{err}");
    assert!(err.contains("stack traceback"), "{err}");
}

#[test]
fn server_and_client_round_trip() {
    let lua = lua();
    let (status, body, hdr): (i64, String, String) = lua
        .load(
            r#"
            local lp = require "luaproxy"
            return lp.run(function()
                local srv = assert(lp.serve{ listen = "127.0.0.1:0", handler = function(req)
                    local body = req:read_body()
                    return 201, req:get_method() .. " " .. req:get_uri() .. " " .. body,
                        { ["x-seen"] = req:get_header("X-Test") }
                end })
                local res, err = lp.http.request_uri("http://" .. srv.addr .. "/p?q=1",
                    { method = "PUT", body = "abc", headers = { ["x-test"] = "yes" } })
                srv:close()
                assert(res, err)
                return res.status, res.body, res.headers["x-seen"]
            end)
            "#,
        )
        .eval()
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(body, "PUT /p?q=1 abc");
    assert_eq!(hdr, "yes");
}

#[test]
fn refused_connection_is_nil_err() {
    let lua = lua();
    let (ok, err): (bool, String) = lua
        .load(
            r#"
            local lp = require "luaproxy"
            return lp.run(function()
                -- bind, learn a free port, close it: nothing listens there any more
                local srv = assert(lp.serve{ listen = "127.0.0.1:0", handler = function() return 200 end })
                local addr = srv.addr
                srv:close(); srv:wait()
                local res, err = lp.http.request_uri("http://" .. addr .. "/")
                return res == nil, err
            end)
            "#,
        )
        .eval()
        .unwrap();
    assert!(ok);
    assert_eq!(err, "connection refused");
}

/// Runs `f()` as the loop would (a protected call under `budget`), with its time.
fn budgeted(lua: &Lua, f: &str, budget_ms: u64) -> (Result<Vec<String>, String>, f64) {
    let f: LuaFunction = lua.load(f).eval().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _loop = luaproxy::runtime::LoopGuard::enter();
    let local = tokio::task::LocalSet::new();
    let t0 = std::time::Instant::now();
    let budget = std::time::Duration::from_millis(budget_ms);
    let r = local.block_on(
        &rt,
        luaproxy::runtime::call_protected_budgeted(lua, f, LuaMultiValue::new(), budget),
    );
    let r = r.map(|vals| vals.iter().map(|v| format!("{v:?}")).collect());
    (r, t0.elapsed().as_secs_f64())
}

#[test]
fn the_budget_stops_lua_that_runs_too_long_however_it_loops() {
    let lua = lua();
    for (what, f) in [
        ("a bare loop", "return function() while true do end end"),
        (
            "a loop that catches errors",
            "return function() while true do pcall(function() while true do end end) end end",
        ),
        (
            "a loop in a comparator",
            "return function() table.sort({3, 1, 2}, function() while true do end end) end",
        ),
        (
            "a loop that yields now and then",
            "return function() local lp = require 'luaproxy'; local i = 0
             while true do i = i + 1; if i % 10000 == 0 then lp.sleep(0) end end end",
        ),
    ] {
        let (r, took) = budgeted(&lua, f, 150);
        let err = r.expect_err(what);
        assert!(err.contains("lua_budget exceeded"), "{what}: {err}");
        assert!(err.contains("stack traceback"), "{what}: {err}");
        assert!(
            (0.14..2.0).contains(&took),
            "{what}: stopped after {took} s"
        );
    }
    // The VM goes on.
    let (r, _) = budgeted(&lua, "return function() return 'fine' end", 150);
    assert_eq!(r.unwrap().len(), 1);
}

#[test]
fn the_budget_counts_running_not_waiting() {
    let lua = lua();
    let (r, took) = budgeted(
        &lua,
        "return function() local lp = require 'luaproxy'; for _ = 1, 4 do lp.sleep(0.1) end return 'waited' end",
        100,
    );
    assert!(r.is_ok(), "{r:?}");
    assert!(took >= 0.4, "{took}");
    // No budget: nothing is stopped.
    let (r, _) = budgeted(
        &lua,
        "return function() local x = 0 for i = 1, 3e6 do x = x + i end return x end",
        0,
    );
    assert!(r.is_ok(), "{r:?}");
}
