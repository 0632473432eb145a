-- wrk script for bench/timeline.sh: GET /timeline/u1 .. /timeline/u$USERS in turn (each
-- thread starts at its own offset), so every request is a cache hit for one of USERS users.
-- Prints the shared harness's WRKRESULT line (TIMELINE_REPORT = ../shared/bench/wrk/report.lua).
local users = tonumber(os.getenv("USERS") or "100")
local reqs, n = {}, 0
local counter = 0

function setup(thread)
    counter = counter + 1
    thread:set("offset", counter * 37)
end

function init()
    for i = 1, users do
        reqs[i] = wrk.format("GET", "/timeline/u" .. i)
    end
    n = tonumber(offset) or 0
end

function request()
    n = n + 1
    return reqs[n % users + 1]
end

dofile(os.getenv("TIMELINE_REPORT"))
