-- luaproxy.chash: a consistent-hash ring (Ketama-style) mapping keys to nodes ("host:port").
--
-- Each node puts vnodes * weight points on a 32-bit circle, at hash(node .. "#" .. i) for
-- i = 0 .. vnodes * weight - 1; a key belongs to the node of the first point at or after
-- hash(key), wrapping past the top. The points depend only on the nodes' names and weights
-- and on vnodes (two nodes on one point: the smaller name first), so every process and every
-- VM (Lua 5.4 or LuaJIT: the hashes are integers below 2^32, exact in both) holding the same
-- nodes maps every key the same way, whatever order the nodes were added in. Adding a node
-- moves only the keys it takes; removing one moves only the keys it had; raising a node's
-- weight keeps its points and adds more.
--
-- The ring is two arrays, points[i] (ascending) and owners[i], ending in a point past every
-- hash, and an index of where each 1/nb of the circle starts in them (nb about twice the
-- points): find() hashes the key, looks its slice up and steps past the few points before
-- it in that slice (none or one, mostly), with no binary search and no wrap-around test.

local luaproxy = require "luaproxy"

local type, pairs, error, tostring, setmetatable = type, pairs, error, tostring, setmetatable
local floor = math.floor
local sort = table.sort

local _M = { _VERSION = "0.1.0" }
local mt = { __index = _M }

local DEFAULT_VNODES = 160
local MAX_VNODES = 10000
-- Points one node may hold (vnodes * weight): bounds memory and build time per node.
local MAX_NODE_POINTS = 65536
-- 2^32: past every hash, so the search always stops on a point.
local PAST_END = 4294967296
-- Slices of the circle in the bucket index: a power of two from 2 per point (about 0.5
-- points per slice) up to MAX_BUCKETS.
local MIN_BUCKETS = 16
local MAX_BUCKETS = 65536

local function is_count(v, max)
    return type(v) == "number" and v >= 1 and v <= max and floor(v) == v
end

local function check_node(node, where)
    if type(node) ~= "string" or node == "" then
        error(("chash.%s: node must be a non-empty string, got %s"):format(where,
            type(node) == "string" and "an empty string" or type(node)), 3)
    end
end

local function check_weight(self, node, w, where)
    if not is_count(w, MAX_NODE_POINTS) or w * self.vnodes > MAX_NODE_POINTS then
        error(("chash.%s: node '%s': weight must be an integer from 1 to %d (vnodes * weight at most %d), got %s")
            :format(where, node, floor(MAX_NODE_POINTS / self.vnodes), MAX_NODE_POINTS, tostring(w)), 3)
    end
    return floor(w) -- an integer on 5.4, so "#" .. i never reads "#1.0"
end

-- The sorted points of one node (`level`: where a bad hash result is blamed, as for error()).
local function node_points(self, node, weight, level)
    local hash, pts = self.hash, {}
    for i = 0, self.vnodes * weight - 1 do
        local p = hash(node .. "#" .. i)
        if type(p) ~= "number" or p < 0 or p >= PAST_END or floor(p) ~= p then
            error("chash: opts.hash must return an integer from 0 to 2^32-1, got " .. tostring(p), level)
        end
        pts[i + 1] = p
    end
    sort(pts)
    return pts
end

-- Closes the ring over its first n entries: one point past the end, owned by the first node
-- (that is the wrap-around), and the bucket index: first[b] is the first point at or after
-- the start of the b-th of nb equal slices of the circle, so find() starts a step or two from
-- its answer.
local function seal(self, points, owners, n)
    points[n + 1], owners[n + 1] = PAST_END, owners[1]
    local nb = MIN_BUCKETS
    while nb < 2 * n and nb < MAX_BUCKETS do nb = nb * 2 end
    local width = floor(PAST_END / nb)
    local first, i = {}, 1
    for b = 1, nb do
        local start = (b - 1) * width
        while points[i] < start do i = i + 1 end
        first[b] = i
    end
    self.points, self.owners, self.n, self.first, self.width = points, owners, n, first, width
end

-- Merges `node`'s sorted points `new` into the ring, keeping the (point, node) order.
local function insert(self, node, new)
    local old_p, old_o, n, m = self.points, self.owners, self.n, #new
    local points, owners = {}, {}
    local i, j, k = 1, 1, 1
    while i <= n or j <= m do
        local take_new
        if j > m then
            take_new = false
        elseif i > n then
            take_new = true
        else
            local p, q = old_p[i], new[j]
            take_new = q < p or (q == p and node < old_o[i])
        end
        if take_new then
            points[k], owners[k] = new[j], node
            j = j + 1
        else
            points[k], owners[k] = old_p[i], old_o[i]
            i = i + 1
        end
        k = k + 1
    end
    seal(self, points, owners, n + m)
end

-- Drops `node`'s points from the ring.
local function delete(self, node)
    local old_p, old_o = self.points, self.owners
    local points, owners, k = {}, {}, 0
    for i = 1, self.n do
        if old_o[i] ~= node then
            k = k + 1
            points[k], owners[k] = old_p[i], old_o[i]
        end
    end
    seal(self, points, owners, k)
end

local function by_point_then_node(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
end

--- ring = chash.new(nodes?, opts?): nodes a list { "host:port", ... } or a map
-- { ["host:port"] = weight }; opts.vnodes (160) points per unit of weight; opts.hash (default
-- luaproxy.hash32) a function(string) -> integer 0..2^32-1 for points and keys.
function _M.new(nodes, opts)
    opts = opts or {}
    if type(opts) ~= "table" then
        error("chash.new: opts must be a table, got " .. type(opts), 2)
    end
    local vnodes = opts.vnodes or DEFAULT_VNODES
    if not is_count(vnodes, MAX_VNODES) then
        error(("chash.new: vnodes must be an integer from 1 to %d, got %s"):format(MAX_VNODES, tostring(vnodes)), 2)
    end
    local hash = opts.hash or luaproxy.hash32
    if type(hash) ~= "function" then
        error("chash.new: opts.hash must be a function, got " .. type(hash), 2)
    end
    local self = setmetatable({ vnodes = floor(vnodes), hash = hash, weights = {} }, mt)
    if nodes ~= nil and type(nodes) ~= "table" then
        error("chash.new: nodes must be a table, got " .. type(nodes), 2)
    end
    local weights = self.weights
    for k, v in pairs(nodes or {}) do
        local node, w = v, 1 -- a list entry
        if type(k) ~= "number" then node, w = k, v end
        check_node(node, "new")
        w = check_weight(self, node, w, "new")
        if weights[node] and weights[node] ~= w then
            error(("chash.new: node '%s' given twice with different weights"):format(node), 2)
        end
        weights[node] = w
    end
    local all = {}
    for node, w in pairs(weights) do
        local pts = node_points(self, node, w, 3)
        for i = 1, #pts do
            all[#all + 1] = { pts[i], node }
        end
    end
    sort(all, by_point_then_node)
    local points, owners = {}, {}
    for i = 1, #all do
        points[i], owners[i] = all[i][1], all[i][2]
    end
    seal(self, points, owners, #all)
    return self
end

--- node, err = ring:find(key): the node owning the string `key`; nil, "no nodes" when empty
function _M.find(self, key)
    if type(key) ~= "string" then
        error("chash: find: key must be a string, got " .. type(key), 2)
    end
    if self.n == 0 then return nil, "no nodes" end
    local h = self.hash(key)
    local width, points = self.width, self.points
    -- the slice h is in, without // or math.floor (5.1 operators only; a float key such as
    -- 37.0 finds the entry 37 on Lua 5.4)
    local i = self.first[(h - h % width) / width + 1]
    while points[i] < h do i = i + 1 end
    return self.owners[i]
end

--- ok = ring:add(node, weight?): adds `node` (weight 1 by default), or changes its weight
function _M.add(self, node, weight)
    check_node(node, "add")
    local w = check_weight(self, node, weight or 1, "add")
    local had = self.weights[node]
    if had == w then return true end
    local pts = node_points(self, node, w, 3) -- may raise: before anything changes
    if had then delete(self, node) end
    self.weights[node] = w
    insert(self, node, pts)
    return true
end

--- ok, err = ring:remove(node): true, or nil, "not found"
function _M.remove(self, node)
    check_node(node, "remove")
    if not self.weights[node] then return nil, "not found" end
    self.weights[node] = nil
    delete(self, node)
    return true
end

--- list, weights = ring:nodes(): the nodes, sorted, and { [node] = weight }
function _M.nodes(self)
    local list, weights = {}, {}
    for node, w in pairs(self.weights) do
        list[#list + 1] = node
        weights[node] = w
    end
    sort(list)
    return list, weights
end

return _M
