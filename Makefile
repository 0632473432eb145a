# luaproxy set-up and checks. On a fresh Debian 12 machine:
#   make run    install what is missing, build and install the rock, run `lua main.lua`
#   make test   the same set-up, then every test: cargo test, clippy, fmt, and the rock packed,
#               installed and tested (`luarocks test`: the busted suite) on Lua 5.4 and LuaJIT
#   make rock   luaproxy-scm-1.src.rock, installable offline (crates vendored)
SHELL := /bin/bash
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_PACKAGES := lua5.4 liblua5.4-dev luarocks lua-busted lua-cjson luajit2 libluajit2-5.1-dev curl build-essential pkg-config nginx python3 python3-prometheus-client git zip unzip
RUST_FEATURES := --no-default-features --features lua54,vendored
ARGS ?=
ROCK := luaproxy-scm-1.src.rock
# LuaRocks for LuaJIT: its Lua 5.1, pointed at luajit and its headers (rockspec/luajit.lua)
LUAROCKS_JIT := LUAROCKS_CONFIG_5_1=$(CURDIR)/rockspec/luajit.lua luarocks --lua-version 5.1

.PHONY: deps install run test cargo-test lint busted luajit busted-luajit rock rock-test bench clean

deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@# lua-busted pulls in Lua 5.1 and points `lua` at it; luaproxy.so is built for 5.4.
	@$(SUDO) update-alternatives --set lua-interpreter /usr/bin/lua5.4 >/dev/null
	@$(SUDO) update-alternatives --set lua-compiler /usr/bin/luac5.4 >/dev/null
	@lua -v | grep -q "Lua 5.4" || { echo "lua is not Lua 5.4"; exit 1; }
	@command -v cargo >/dev/null || { echo "cargo (rustup) is required"; exit 1; }

install: deps
	cargo fetch --locked
	$(SUDO) luarocks --lua-version 5.4 make rockspec/luaproxy-scm-1.rockspec
	@cd / && lua -e 'require "luaproxy"; require "luaproxy.balancer"' && echo "luaproxy installed for $$(lua -v)"

run: install
	exec lua main.lua $(ARGS)

cargo-test:
	timeout 900 cargo test --locked $(RUST_FEATURES)

lint:
	cargo fmt --check
	cargo clippy --locked $(RUST_FEATURES) --all-targets -- -D warnings
	cargo clippy --locked --no-default-features --features luajit,module --lib --target-dir target/luajit -- -D warnings

busted:
	@set -o pipefail; out=$$(mktemp); \
	timeout 900 busted -o utfTerminal 2>&1 | tee $$out; rc=$${PIPESTATUS[0]}; \
	line=$$(grep -aoE '[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' $$out | tail -1); \
	ok=$$(echo "$$line" | awk '{print $$1}'); bad=$$(echo "$$line" | awk '{print $$4 + $$7}'); \
	rm -f $$out; echo "busted: $${ok:-0} passed, $${bad:-0} failed"; exit $$rc

# The LuaJIT build of this checkout, through LuaRocks (rockspec/luajit.lua points its 5.1 at
# LuaJIT): the rockspec leaves it in target/luajit/lib beside the 5.4 ./luaproxy.so and
# installs it in the tree target/luajit/tree. `busted --run=luajit` tests it: every spec, and
# spec_luajit/ (the FFI fast path of the dict methods).
luajit:
	cargo fetch --locked
	$(LUAROCKS_JIT) --tree target/luajit/tree make rockspec/luaproxy-scm-1.rockspec

busted-luajit: luajit
	timeout 900 busted --run=luajit -o utfTerminal

# The source rock, crates vendored: rockspec/pack.sh says what goes in it.
rock:
	rockspec/pack.sh

# The rock installed as a user does, offline, into trees of its own, and tested there
# (`luarocks test`: the whole busted suite) on Lua 5.4 and LuaJIT: rockspec/test.sh.
rock-test: rock
	rockspec/test.sh

# The busted suite runs on the rock as `make rock-test` installs it, for Lua 5.4 and LuaJIT;
# `make busted` / `make busted-luajit` run it on this checkout's builds.
test: install cargo-test lint rock-test

bench: install
	bench/all.sh

clean:
	cargo clean
	rm -f luaproxy.so $(ROCK)
