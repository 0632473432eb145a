#!/usr/bin/env python3
"""bench/soak_report.py: the report and verdict of bench/soak (which runs it; not for use alone).

usage: soak_report.py OUT_DIR DIED_AT EXIT_STATUS RELOADS_SENT

Reads OUT_DIR's samples.csv, reloads.csv, wrk.out, clients.json, hostile.json and proxy.log,
prints a markdown report (resources, good path, clients, hostile upstream, reloads, log lines,
checks) and exits 1 if a check failed. Settings come from bench/soak's SOAK_* variables.
"""
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter

OUT, DIED_AT, EXIT_STATUS, RELOADS_SENT = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ENV = {k: os.environ.get(k, "") for k in (
    "SOAK_SECONDS", "SOAK_RELOAD", "SOAK_FAULTS", "SOAK_GRACEFUL", "SOAK_SAMPLE", "SOAK_RELOAD_EVERY",
    "SOAK_MAX_RSS_GROWTH", "SOAK_MAX_FD_GROWTH", "SOAK_MAX_WRK_ERRORS")}
SECONDS = float(ENV["SOAK_SECONDS"])
# The comparison windows: minutes in a long run, a quarter of a short one.
WINDOW = 60.0 if SECONDS >= 240 else SECONDS / 4
GOOD_SCENARIOS = ("good_get", "read_post", "read_chunked", "pipelined")

checks = []  # (ok, text)


def check(ok, text):
    checks.append((bool(ok), text))


def read(name, default=""):
    try:
        with open(os.path.join(OUT, name), errors="replace") as f:
            return f.read()
    except OSError:
        return default


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt(x, nd=1):
    return "-" if x != x else f"{x:.{nd}f}"


def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return "?"


out = []
p = out.append
cpu = "?"
try:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
except OSError:
    pass
p(f"## Soak {time.strftime('%Y-%m-%d %H:%M')}: {int(SECONDS)} s, reload={ENV['SOAK_RELOAD']} "
  f"faults={ENV['SOAK_FAULTS']}")
p("")
dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
p(f"Commit `{git('rev-parse', '--short', 'HEAD')}`{dirty}; {os.cpu_count()} CPUs ({cpu}); 2 workers; "
  f"samples every {ENV['SOAK_SAMPLE']} s; windows of {fmt(WINDOW, 0)} s; files in `{OUT}`.")
p("")

# ---- resources ----------------------------------------------------------------------------
rows = list(csv.DictReader(read("samples.csv").splitlines()))
traffic = [r for r in rows if r["phase"] == "traffic"]
idle = [r for r in rows if r["phase"] == "idle"]
before = [r for r in rows if r["phase"] == "before"]


def series(rs, key):
    return [(float(r["t_s"]), float(r[key])) for r in rs]


def window(s, lo, hi):
    return [v for t, v in s if lo <= t < hi]


stats = {}
# Means per window are shown. The growth check compares RSS floors (each window's lowest
# sample): a sample taken while /alloc holds its memory (up to lua_memory_limit per worker)
# says nothing about a leak, and medians of a few samples still caught such spikes (session 6:
# +55 % by medians, -18 % by means, the floor +4 MB). fds use medians.
p("| metric | before traffic | start | min | max | end | idle after | 1st window mean | 2nd window mean | last window mean "
  "| 2nd→last (means) | 2nd→last (medians) | 2nd→last (floors) |")
p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
end_t = max((float(r["t_s"]) for r in traffic), default=0.0)
for key, label, scale in (("rss_kb", "RSS MiB", 1 / 1024), ("fds", "open fds", 1), ("threads", "threads", 1)):
    s = [(t, v * scale) for t, v in series(traffic, key)]
    if not s:
        continue
    vals = [v for _, v in s]
    w1 = mean(window(s, 0, WINDOW))
    w2 = mean(window(s, WINDOW, 2 * WINDOW))
    wl = mean(window(s, end_t - WINDOW, end_t + 1))
    m2 = median(window(s, WINDOW, 2 * WINDOW))
    ml = median(window(s, end_t - WINDOW, end_t + 1))
    f2 = min(window(s, WINDOW, 2 * WINDOW), default=float("nan"))
    fl = min(window(s, end_t - WINDOW, end_t + 1), default=float("nan"))
    stats[key] = (f2, fl) if key == "rss_kb" else (m2, ml)

    def growth(a, b):
        return f"{(b - a) / a * 100:+.1f} %" if key == "rss_kb" else f"{b - a:+.1f}"
    idle_v = fmt(float(idle[-1][key]) * scale) if idle else "-"
    before_v = fmt(float(before[0][key]) * scale) if before else "-"
    p(f"| {label} | {before_v} | {fmt(vals[0])} | {fmt(min(vals))} | {fmt(max(vals))} | {fmt(vals[-1])} | {idle_v} "
      f"| {fmt(w1)} | {fmt(w2)} | {fmt(wl)} | {growth(w2, wl)} | {growth(m2, ml)} | {growth(f2, fl)} |")
if traffic:
    cpu_s = float(traffic[-1]["cpu_s"]) - float(traffic[0]["cpu_s"])
    p("")
    p(f"Proxy CPU during traffic: {cpu_s:.0f} s over {end_t:.0f} s ({cpu_s / max(end_t, 1) * 100:.0f} % of one core).")
p("")

# ---- good path: wrk --------------------------------------------------------------------------
m = re.search(r"^WRKRESULT (.*)$", read("wrk.out"), re.MULTILINE)
wrk = dict(kv.split("=", 1) for kv in m.group(1).split()) if m else None
if wrk:
    sock_errors = sum(int(wrk[k]) for k in ("connect", "read", "write", "timeout"))
    p(f"Good path (wrk -t2 -c{os.environ.get('SOAK_CONNECTIONS', '50')}, POST 5 KB, 5 KB back): "
      f"{int(wrk['requests'])} requests, **{float(wrk['rps']):.0f} req/s**, p50 {wrk['p50_ms']} ms, "
      f"p99 {wrk['p99_ms']} ms, max {wrk['max_ms']} ms; non-2xx **{wrk['non2xx']}**, socket errors "
      f"**{sock_errors}** (connect {wrk['connect']}, read {wrk['read']}, write {wrk['write']}, "
      f"timeout {wrk['timeout']}).")
    wrk_errors = int(wrk["non2xx"]) + sock_errors
    check(wrk_errors <= int(ENV["SOAK_MAX_WRK_ERRORS"] or 0),
          f"good path (wrk): {wrk_errors} errors (allowed {ENV['SOAK_MAX_WRK_ERRORS']})")
else:
    p("Good path: no wrk summary (see wrk.out).")
    check(False, "good path (wrk): no summary")
p("")

# ---- clients ----------------------------------------------------------------------------------
clients = json.loads(read("clients.json", "null") or "null")
if clients:
    outcomes, expected = clients["outcomes"], clients["expected"]
    total = sum(sum(o.values()) for o in outcomes.values())
    p(f"Misbehaving clients: {total} exchanges, {clients['unexpected']} with an outcome outside the expected set.")
    p("")
    p("| scenario | n | outcomes | expected | unexpected |")
    p("|---|---:|---|---|---:|")
    for name, outs in outcomes.items():
        n = sum(outs.values())
        shown = ", ".join(f"{o} ×{c}" for o, c in sorted(outs.items(), key=lambda kv: -kv[1]))
        bad = sum(c for o, c in outs.items() if o not in expected[name])
        p(f"| {name} | {n} | {shown} | {' / '.join(expected[name])} | {bad or ''} |")
    good_bad = sum(c for name in GOOD_SCENARIOS for o, c in outcomes.get(name, {}).items() if o not in expected[name])
    check(good_bad == 0, f"good requests from the clients (GET, POST /read, chunked, pipelined): {good_bad} unexpected")
else:
    p("Misbehaving clients: no summary (see clients.err).")
    check(False, "clients: no summary")
p("")

hostile = json.loads(read("hostile.json", "null") or "null")
if hostile:
    p("Hostile upstream, requests per mode: " + ", ".join(f"{k} {v}" for k, v in hostile.items()) + ".")
    p("")

# ---- reloads ------------------------------------------------------------------------------------
if ENV["SOAK_RELOAD"] == "1":
    rl = list(csv.DictReader(read("reloads.csv").splitlines()))
    confirmed = sum(1 for r in rl if r["confirmed"] == "1")
    both = sum(1 for r in rl if int(r["workers_seen"]) >= 2)
    p(f"Reloads: {RELOADS_SENT} SIGHUPs, {confirmed} answered with a new load stamp within 10 s "
      f"(both workers seen: {both}; slowest {max((float(r['after_s']) for r in rl), default=0):.1f} s).")
    check(confirmed == RELOADS_SENT, f"reloads: {confirmed} of {RELOADS_SENT} took effect")
else:
    p("Reloads: off (SOAK_RELOAD=0).")
p("")

# ---- the proxy's log ----------------------------------------------------------------------------
LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\w+)\] [^:]*: (.*)$")


def kind(msg):
    """A message with its variable parts (addresses, numbers, quoted text, paths) folded."""
    msg = re.sub(r"request_id: [0-9a-f]{32}", "request_id: ID", msg)
    msg = re.sub(r"\d+\.\d+\.\d+\.\d+(:\d+)?", "ADDR", msg)
    msg = re.sub(r'"[^"]*"', '"…"', msg)
    msg = re.sub(r"(GET|POST|HEAD|PUT|DELETE) \S+", r"\1 PATH", msg)
    msg = re.sub(r"\d+", "N", msg)
    return msg[:110]


log_text = read("proxy.log")
panics = len(re.findall("panic", log_text, re.IGNORECASE)) + len(re.findall("panic", read("proxy.out"), re.IGNORECASE))
kinds, levels, other = Counter(), Counter(), 0
for line in log_text.splitlines():
    m = LINE.match(line)
    if m:
        levels[m.group(1)] += 1
        kinds[f"[{m.group(1)}] {kind(m.group(2))}"] += 1
    else:
        other += 1
p(f"Proxy log: {sum(levels.values())} lines ({', '.join(f'{k} {v}' for k, v in levels.most_common())}), "
  f"{other} other lines (tracebacks), **{panics} × \"panic\"**.")
p("")
if kinds:
    p("| log lines | kind |")
    p("|---:|---|")
    for k, n in kinds.most_common(20):
        p(f"| {n} | `{k.replace('|', '¦')}` |")
    if len(kinds) > 20:
        p(f"| {sum(kinds.values()) - sum(n for _, n in kinds.most_common(20))} | ({len(kinds) - 20} more kinds) |")
    p("")
check(panics == 0, f'"panic" in the log: {panics}')

# ---- checks ----------------------------------------------------------------------------------------
check(not DIED_AT, "the proxy lived to the end" + (f" (died at {DIED_AT} s)" if DIED_AT else ""))
if "rss_kb" in stats:
    w2, wl = stats["rss_kb"]
    growth = (wl - w2) / w2 * 100
    check(growth <= float(ENV["SOAK_MAX_RSS_GROWTH"]),
          f"RSS 2nd→last window (floors) {growth:+.1f} % (allowed +{ENV['SOAK_MAX_RSS_GROWTH']} %)")
    w2, wl = stats["fds"]
    check(wl - w2 <= float(ENV["SOAK_MAX_FD_GROWTH"]),
          f"fds 2nd→last window (medians) {wl - w2:+.1f} (allowed +{ENV['SOAK_MAX_FD_GROWTH']})")
else:
    check(False, "no samples")
stop = f"exit status after SIGTERM: {EXIT_STATUS}"
if ENV["SOAK_GRACEFUL"] == "1":
    check(EXIT_STATUS == "0", stop)
else:
    check(True, stop + " (not checked: SOAK_GRACEFUL=0)")

p("Checks:")
p("")
for ok, text in checks:
    p(f"- {'PASS' if ok else '**FAIL**'}: {text}")
failed = [t for ok, t in checks if not ok]
p("")
p(f"**{'FAIL' if failed else 'PASS'}**")
print("\n".join(out))
sys.exit(1 if failed else 0)
