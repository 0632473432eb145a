-- luaproxy.apikey: a request's API key as TextRazor's 2013 router took it, for the policies
-- that key on it (examples/api_router.lua, examples/router_tier.lua).
--
--   local apikey = require "luaproxy.apikey"
--   local key, err = apikey.get(req, "X-Api-Key")
--   if not key then return apikey.error_status(err) end   -- 400 with the original's text
--
-- The key is the `apiKey` field of an application/x-www-form-urlencoded body, else the
-- `apiKey` query argument, else the header (the first source that gives a non-empty value
-- wins; names and values are %-decoded, as nginx decodes arguments, among the first 100
-- fields; a repeated field counts with its first value). Reading the form keeps the body in
-- memory: req:proxy then sends those same bytes with the same Content-Length, and
-- luaproxy.balancer may send them again to another backend. Other bodies are not read.

local type, find, lower, sub = type, string.find, string.lower, string.sub

local _M = { _VERSION = "0.1.0" }

local FORM = "application/x-www-form-urlencoded"
local FIELD = "apiKey"
local DEFAULT_HEADER = "X-Api-Key"

--- apikey.MAX_LEN: longer keys are refused ("too long")
_M.MAX_LEN = 256

local MISSING_ERR, TOO_LONG_ERR = "missing", "too long"
local BODY_ERR = "cannot read request body: "

-- The original's text for a request without a key, and ours for the other refusals.
local MISSING = "Request is missing apiKey param.\n"
local TOO_LONG = "apiKey param is too long.\n"

-- A value from get_post_args/get_uri_args: a string, true (a bare name), or a list of them.
local function first_string(v)
    if type(v) == "table" then v = v[1] end
    if type(v) == "string" and v ~= "" then return v end
    return nil
end

local FORM_LEN = #FORM

local function is_form(ct)
    if #ct < FORM_LEN then return false end -- most other types: no search, no copy
    if find(ct, FORM, 1, true) == 1 then return true end -- the usual spelling: no copy
    return lower(sub(ct, 1, FORM_LEN)) == FORM
end

local function find_key(req, header)
    local ct = req:get_header("content-type")
    if ct and is_form(ct) then
        local args, err = req:get_post_args()
        if not args then return nil, BODY_ERR .. err end
        local v = first_string(args[FIELD])
        if v then return v end
    end
    local q = req:get_query()
    -- a name that decodes to apiKey holds it literally or a %-escape: skip parsing otherwise
    if q and (find(q, FIELD, 1, true) or find(q, "%", 1, true)) then
        local v = first_string(req:get_uri_args()[FIELD])
        if v then return v end
    end
    local h = req:get_header(header)
    if h and h ~= "" then return h end
    return nil, MISSING_ERR
end

--- key, err = apikey.get(req, header?): the request's API key (header: "X-Api-Key"), or
-- nil, "missing" / "too long" (over apikey.MAX_LEN bytes) / "cannot read request body: <why>"
function _M.get(req, header)
    if header == nil then
        header = DEFAULT_HEADER
    elseif type(header) ~= "string" then
        error("apikey.get: header must be a string", 2)
    end
    local key, err = find_key(req, header)
    if not key then return nil, err end
    if #key > _M.MAX_LEN then return nil, TOO_LONG_ERR end
    return key
end

--- status, body = apikey.error_status(err): the answer to a request apikey.get refused: 400
-- with "Request is missing apiKey param.\n" (the original's text), "apiKey param is too
-- long.\n", or the body's error. (For a body that could not be read the server has already
-- chosen the status, 413/408/400, whatever the policy returns.)
function _M.error_status(err)
    if err == MISSING_ERR then return 400, MISSING end
    if err == TOO_LONG_ERR then return 400, TOO_LONG end
    if type(err) ~= "string" then
        error("apikey.error_status: err must be a string from apikey.get", 2)
    end
    return 400, err .. "\n"
end

return _M
