-- luaproxy.apikey against real requests: a handler server on 127.0.0.1 in this spec's loop
-- answers with the key apikey.get found (or apikey.error_status's answer), and luaproxy.http
-- sends it requests. examples/api_router.lua's spec covers the same rules through main.lua.
local luaproxy = require "luaproxy"
local apikey = require "luaproxy.apikey"
local util = require "support.util"

local MISSING = "Request is missing apiKey param.\n"
local FORM = "application/x-www-form-urlencoded"

-- fn(get) with a server whose handler runs apikey.get(req, header); get(path, opts) returns
-- the status, the body (the key when found) and the err apikey.get returned (or nil);
-- get.url is the server's, get.last_err() what the last request's apikey.get returned.
local function with_server(header, fn, serve_opts)
    util.run(function()
        local last_err
        local opts = { listen = "127.0.0.1:0", handler = function(req)
            local key, err = apikey.get(req, header)
            last_err = err
            if not key then return apikey.error_status(err) end
            return 200, key
        end }
        for k, v in pairs(serve_opts or {}) do opts[k] = v end
        local srv = assert(luaproxy.serve(opts))
        local get = setmetatable({ url = "http://" .. srv.addr, last_err = function() return last_err end },
            { __call = function(_, path, ropts)
                last_err = nil
                local res, rerr = luaproxy.http.request_uri("http://" .. srv.addr .. path, ropts)
                if not res then return nil, rerr end
                return res.status, res.body, last_err
            end })
        local ok, err = pcall(fn, get)
        util.shut(srv)
        assert(ok, err)
    end)
end

local form = util.form

describe("luaproxy.apikey", function()
    it("takes the key from a form body, else the query, else the header", function()
        with_server(nil, function(get)
            local hdr = { ["x-api-key"] = "from-header" }
            for _, c in ipairs({
                { "from-body", "/?apiKey=from-query", form("a=1&apiKey=from-body", { ["x-api-key"] = "h" }) },
                { "from-query", "/?apiKey=from-query", form("a=1", { ["x-api-key"] = "h" }) },
                { "from-header", "/", { headers = hdr } },
                { "from-header", "/?apiKey=", { headers = hdr } },
                { "from-header", "/", form("apiKey=", hdr) },
                { "esc aped", "/?x=1&api%4Bey=esc%20aped" },
                { "first one", "/", form("apiKey=first+one&apiKey=second") },
                { "caps", "/", form("apiKey=caps", { ["content-type"] = "Application/X-WWW-Form-URLEncoded; charset=UTF-8" }) },
                { "q&k=1", "/?apiKey=q%26k%3D1" },
                { ("k"):rep(256), "/?apiKey=" .. ("k"):rep(256) },
            }) do
                local status, body, err = get(c[2], c[3])
                assert.are.same({ 200, c[1] }, { status, body }, c[2])
                assert.is_nil(err)
            end
        end)
    end)

    it("nil, \"missing\" without one (400 with the original's text), \"too long\" past MAX_LEN", function()
        with_server(nil, function(get)
            for _, c in ipairs({
                { "/" }, { "/?apikey=lower" }, { "/?apiKey" }, { "/", { headers = { ["x-api-key"] = "" } } },
                { "/", form("a=1") },
                { "/", { method = "POST", body = "apiKey=k", headers = { ["content-type"] = "text/plain" } } },
            }) do
                assert.are.same({ 400, MISSING, "missing" }, { get(c[1], c[2]) }, c[1])
            end
            assert.are.same({ 400, "apiKey param is too long.\n", "too long" },
                { get("/?apiKey=" .. ("k"):rep(apikey.MAX_LEN + 1)) })
        end)
    end)

    it("reads another header when asked; a header that is not a string raises", function()
        with_server("X-Tenant", function(get)
            assert.are.same({ 200, "t1" }, { get("/", { headers = { ["x-tenant"] = "t1" } }) })
            assert.are.same({ 400, MISSING, "missing" }, { get("/", { headers = { ["x-api-key"] = "k" } }) })
        end)
        with_server(42, function(get)
            assert.are.equal(500, (get("/?apiKey=k")))
        end)
    end)

    it("a form body that cannot be read: nil, \"cannot read request body: ...\"", function()
        with_server(nil, function(get)
            -- chunked, so the limit is met while the handler reads (curl, in the background)
            local file = util.write_temp("form.txt", "apiKey=k&x=" .. ("a"):rep(2000))
            local base = util.write_temp("curl", "")
            local pid = util.start(("curl -s -m 5 -o /dev/null -w '%%{http_code}' -H 'Transfer-Encoding: chunked' "
                .. "-H 'Content-Type: %s' --data-binary @%s '%s/'"):format(FORM, file, get.url), 10, base .. ".status")
            assert.is_true(util.wait_for(function() return not util.alive(pid) end, 10), "curl did not finish")
            assert.are.equal("413", util.read_file(base .. ".status"))
            assert.matches("^cannot read request body: ", get.last_err())
            assert.are.equal(200, (get("/", form("apiKey=k&x=1"))))
        end, { client_max_body_size = "1k" })
    end)

    it("error_status: 400 and the text for each error; anything but a string raises", function()
        assert.are.same({ 400, MISSING }, { apikey.error_status("missing") })
        assert.are.same({ 400, "apiKey param is too long.\n" }, { apikey.error_status("too long") })
        assert.are.same({ 400, "cannot read request body: timeout\n" },
            { apikey.error_status("cannot read request body: timeout") })
        assert.has_error(function() apikey.error_status(nil) end)
        assert.has_error(function() apikey.error_status(400) end)
    end)
end)
