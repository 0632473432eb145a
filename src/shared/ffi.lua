-- Loaded by the LuaJIT build only (src/shared/ffi.rs): replaces the hot dict methods with
-- wrappers that call the store through LuaJIT's FFI, so loops calling them stay compiled.
-- Whatever the FFI path does not take (table values, number keys, bad arguments, a list, an
-- unknown dict) goes to the C API method, which gives ngx_lua's exact results and errors.
local methods, ptrs, ERRORS = ...
local has_ffi, ffi = pcall(require, "ffi")
if not has_ffi then
    return -- a VM opened without the ffi library keeps the C API methods
end

local type, ffi_string = type, ffi.string

ffi.cdef [[
typedef struct {
    double num;
    const char *str;
    size_t len;
    uint32_t flags;
    int32_t stale;
    int32_t forcible;
} luaproxy_dict_out;
]]

local get_c = ffi.cast("int (*)(uint32_t, const char *, size_t, int, luaproxy_dict_out *)", ptrs.get)
local store_c = ffi.cast("int (*)(uint32_t, const char *, size_t, int, const char *, size_t, "
    .. "double, double, uint32_t, int, int, luaproxy_dict_out *)", ptrs.store)
local incr_c = ffi.cast("int (*)(uint32_t, const char *, size_t, double, int, double, double, "
    .. "luaproxy_dict_out *)", ptrs.incr)
local delete_c = ffi.cast("int (*)(uint32_t, const char *, size_t)", ptrs.delete)

local out = ffi.new("luaproxy_dict_out")

local SET, ADD, REPLACE = 0, 1, 2

local function slot_of(self)
    return type(self) == "table" and self[1] or nil
end

local function value(rc)
    if rc == 1 then
        return ffi_string(out.str, out.len)
    elseif rc == 2 then
        return out.num
    else
        return out.num ~= 0
    end
end

local raw_get = methods.get
methods.get = function(self, key)
    local slot = slot_of(self)
    if slot and type(key) == "string" then
        local rc = get_c(slot, key, #key, 0, out)
        if rc == 0 then
            return nil
        elseif rc > 0 then
            local v = value(rc)
            if out.flags ~= 0 then
                return v, out.flags
            end
            return v
        end
    end
    return raw_get(self, key)
end

local raw_get_stale = methods.get_stale
methods.get_stale = function(self, key)
    local slot = slot_of(self)
    if slot and type(key) == "string" then
        local rc = get_c(slot, key, #key, 1, out)
        if rc == 0 then
            return nil
        elseif rc > 0 then
            local flags = out.flags
            return value(rc), flags ~= 0 and flags or nil, out.stale ~= 0
        end
    end
    return raw_get_stale(self, key)
end

local function vtype_of(v, mode)
    local t = type(v)
    if t == "string" then
        return 1, v, #v, 0
    elseif t == "number" then
        return 2, nil, 0, v
    elseif t == "boolean" then
        return 3, nil, 0, v and 1 or 0
    elseif v == nil and mode == SET then
        return 0, nil, 0, 0
    end
end

local function store_method(name, mode, force)
    local raw = methods[name]
    local force_c = force and 1 or 0
    methods[name] = function(self, key, v, exptime, flags)
        local slot = slot_of(self)
        if slot and type(key) == "string"
            and (exptime == nil or type(exptime) == "number")
            and (flags == nil or type(flags) == "number" and flags >= 0 and flags <= 4294967295) then
            local vtype, s, slen, num = vtype_of(v, mode)
            if vtype then
                local rc = store_c(slot, key, #key, vtype, s, slen, num, exptime or 0, flags or 0,
                    mode, force_c, out)
                if rc >= 0 then
                    if force then
                        if rc == 0 then return true, nil, out.forcible ~= 0 end
                        return false, ERRORS[rc], false
                    end
                    if rc == 0 then return true, nil end
                    return false, ERRORS[rc]
                end
            end
        end
        return raw(self, key, v, exptime, flags)
    end
end

store_method("set", SET, true)
store_method("add", ADD, true)
store_method("replace", REPLACE, true)
store_method("safe_set", SET, false)
store_method("safe_add", ADD, false)

local raw_incr = methods.incr
methods.incr = function(self, key, n, init, init_ttl)
    local slot = slot_of(self)
    if slot and type(key) == "string" and type(n) == "number"
        and (init == nil or type(init) == "number")
        and (init_ttl == nil or type(init_ttl) == "number") then
        local rc = incr_c(slot, key, #key, n, init and 1 or 0, init or 0, init_ttl or 0, out)
        if rc == 0 then
            return out.num, nil, out.forcible ~= 0
        elseif rc > 0 then
            return nil, ERRORS[rc], false
        end
    end
    return raw_incr(self, key, n, init, init_ttl)
end

local raw_delete = methods.delete
methods.delete = function(self, key)
    local slot = slot_of(self)
    if slot and type(key) == "string" and delete_c(slot, key, #key) == 0 then
        return true
    end
    return raw_delete(self, key)
end
