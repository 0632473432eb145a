# luaproxy set-up and checks. On a fresh Debian 12 machine:
#   make run    install what is missing, build and install the rock, run `lua main.lua`
#   make test   the same set-up, then every test (cargo test, clippy, fmt, busted)
SHELL := /bin/bash
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEB_PACKAGES := lua5.4 liblua5.4-dev luarocks lua-busted lua-cjson luajit2 curl build-essential pkg-config nginx python3 python3-prometheus-client
RUST_FEATURES := --no-default-features --features lua54,vendored
ARGS ?=

.PHONY: deps install run test cargo-test lint busted luajit busted-luajit bench clean

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

# The LuaJIT build (the rockspec makes it for a LuaJIT LuaRocks; here it sits beside the 5.4
# one), and its specs: the FFI fast path of the dict methods.
luajit:
	cargo build --release --locked --no-default-features --features luajit,module --target-dir target/luajit
	mkdir -p target/luajit/lib
	cp target/luajit/release/libluaproxy.so target/luajit/lib/luaproxy.so

busted-luajit: luajit
	timeout 300 busted --run=luajit -o utfTerminal

test: install cargo-test lint busted busted-luajit

bench: install
	bench/peers.sh

clean:
	cargo clean
	rm -f luaproxy.so
