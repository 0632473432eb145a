-- bench/dict_policy.lua: luaproxy's side of bench/dict.sh. Each worker runs bench/dict_ops.lua
-- against luaproxy.shared.bench (and luaproxy.cache.bench_cache) from a timer.
local luaproxy = require "luaproxy"
package.path = "bench/?.lua;" .. package.path
local ops = require "dict_ops"

return {
    init_worker = function(config)
        luaproxy.timer.at(0, function()
            ops.run(luaproxy.shared.bench, luaproxy.shared.ctl, luaproxy.now, luaproxy.sleep,
                config.workers, config.seconds, luaproxy.cache.bench_cache)
        end)
    end,
    handler = function() return 404 end,
}
