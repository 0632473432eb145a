#!/usr/bin/env bash
# Installs luaproxy-scm-1.src.rock (`make rock`) as a user does and tests it (`make rock-test`,
# part of `make test`), for Lua 5.4 and for LuaJIT:
#   - `luarocks install` into a tree of its own (not the system's), with cargo cut off from the
#     network and from its cache (an empty CARGO_HOME, CARGO_NET_OFFLINE): the rock's vendored
#     crates must be all it needs;
#   - `require "luaproxy"` (and a helper module) from that tree, outside the checkout;
#   - `luarocks test`: the whole busted suite, on that install (LUAPROXY_SPEC_TREE, read by
#     spec/support/paths.lua), under that interpreter (spec/run.lua).
# Usage: rockspec/test.sh [5.4|luajit]... (default both). RT=DIR keeps the trees in DIR;
# otherwise they go in a temporary directory, removed when done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROCK=luaproxy-scm-1.src.rock
[ -f "$ROCK" ] || { echo "no $ROCK: make rock" >&2; exit 1; }
if [ -n "${RT:-}" ]; then
    t=$RT
else
    t=$(mktemp -d /tmp/luaproxy-rock.XXXXXX)
    trap 'rm -rf "$t"' EXIT
fi
mkdir -p "$t/cargo-home"

summary=()
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(5.4 luajit)
for lua in "${targets[@]}"; do
    case $lua in
        5.4) rocks=(luarocks --lua-version 5.4); bin=lua ;;
        luajit) rocks=(env "LUAROCKS_CONFIG_5_1=$PWD/rockspec/luajit.lua" luarocks --lua-version 5.1); bin=luajit ;;
        *) echo "unknown interpreter $lua: 5.4 or luajit" >&2; exit 2 ;;
    esac
    tree=$t/$lua
    echo "== $ROCK for $lua, into $tree"
    start=$SECONDS
    CARGO_HOME=$t/cargo-home CARGO_NET_OFFLINE=true "${rocks[@]}" --tree "$tree" install "$ROCK"
    installed=$((SECONDS - start))
    # the paths as `luarocks path` gives them (this tree first, then the user's and the system's)
    (cd / && eval "$("${rocks[@]}" --tree "$tree" path)" && TREE=$tree "$bin" -e '
        require "luaproxy"; require "luaproxy.balancer"
        local file, tree = package.searchpath("luaproxy", package.cpath), os.getenv("TREE")
        assert(file:sub(1, #tree) == tree, "loaded from outside the tree: " .. file)
        print("require \"luaproxy\" on " .. (jit and jit.version or _VERSION) .. ": " .. file)')
    out=$(mktemp)
    start=$SECONDS
    rc=0
    LUAPROXY_SPEC_TREE=$tree timeout 900 "${rocks[@]}" --tree "$tree" test rockspec/luaproxy-scm-1.rockspec \
        -- -o utfTerminal 2>&1 | tee "$out" || rc=$?
    line=$(grep -aoE '[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' "$out" | tail -1 || true)
    rm -f "$out"
    summary+=("$lua: installed in ${installed}s; busted ${line:-did not finish} ($((SECONDS - start))s)")
    [ "$rc" = 0 ] || { printf '%s\n' "${summary[@]}"; exit "$rc"; }
done
printf '%s\n' "${summary[@]}"
