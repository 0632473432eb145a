-- `luarocks test` runs this file with the interpreter LuaRocks targets (the rockspec's
-- test.script): busted in-process, with .busted's settings for that interpreter (its `luajit`
-- run under LuaJIT) and no switch to .busted's `lua`, which would leave the interpreter the
-- rock was built for. Arguments pass through to busted: `luarocks test -- spec/cli_spec.lua`.
table.insert(arg, 1, "--ignore-lua")
if rawget(_G, "jit") then table.insert(arg, 1, "--run=luajit") end
require "busted.runner" { standalone = false }
