#!/usr/bin/env bash
# Packs luaproxy-scm-1.src.rock at the repository root (`make rock`): what `luarocks install
# luaproxy-scm-1.src.rock` builds from, with no network (cargo only).
#
# The archive the rockspec's source.url names (target/rock/luaproxy-scm-1.tar.gz) holds:
#   - the tracked files as the working tree has them (`git stash create` commits them without
#     touching the tree, the index or the stash; untracked files stay out);
#   - vendor/: every crate Cargo.lock names (`cargo vendor`, from cargo's cache when `cargo
#     fetch --locked` has filled it), less the sources the rock's build never compiles:
#     windows-* (Windows only) and lua-src/luajit-src (the `vendored` feature of `cargo test`;
#     the rock links no Lua). Their manifests stay, for cargo's resolver, with a checksum file
#     listing no files, as cargo-vendor-filterer does; that saves 28 of 84 MB, and LuaRocks
#     unpacks the rock in Lua, about a second per 3 MB here;
#   - .cargo/config.toml, which points cargo at vendor/.
# `luarocks pack` then packs it with the rockspec. LuaRocks fetches a relative file:// url from
# a temporary directory, so the pack gets a copy whose url is absolute; the rock then gets the
# rockspec as it is in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=luaproxy-scm-1
STAGE=target/rock
rm -rf "$STAGE/luaproxy" "$NAME.src.rock"
mkdir -p "$STAGE/luaproxy"

tree=$(git stash create)
git archive --format=tar "${tree:-HEAD}" | tar -x -C "$STAGE/luaproxy"

(cd "$STAGE/luaproxy" && cargo vendor --locked --quiet vendor >/dev/null)
for crate in "$STAGE"/luaproxy/vendor/{windows-,lua-src,luajit-src}*; do
    [ -d "$crate" ] || continue
    find "$crate" -mindepth 1 -maxdepth 1 ! -name Cargo.toml ! -name .cargo-checksum.json -exec rm -rf {} +
    mkdir -p "$crate/src"
    echo "// emptied by rockspec/pack.sh: not compiled for the rock" > "$crate/src/lib.rs"
    sed -i -E 's/"files":\{[^}]*\}/"files":{}/' "$crate/.cargo-checksum.json"
done
mkdir -p "$STAGE/luaproxy/.cargo"
cat > "$STAGE/luaproxy/.cargo/config.toml" <<'EOF'
# Written by rockspec/pack.sh: build from the crates in vendor/, not from crates.io.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
EOF

tar -czf "$STAGE/$NAME.tar.gz" -C "$STAGE" --sort=name --owner=0 --group=0 --numeric-owner luaproxy
sed "s|file://$STAGE/|file://$PWD/$STAGE/|" "rockspec/$NAME.rockspec" > "$STAGE/$NAME.rockspec"
luarocks --lua-version 5.4 pack "$STAGE/$NAME.rockspec"
(cd rockspec && zip -q "../$NAME.src.rock" "$NAME.rockspec")
echo "$NAME.src.rock: $(du -h "$NAME.src.rock" | cut -f1)"
