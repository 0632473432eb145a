#!/usr/bin/env python3
"""bench/all_report.py RESULT.tsv: the tables of bench/all.sh from the harness's run.sh rows.

Per workload (and connection count), per target: req/s median and min-max over the rounds,
requests per proxy CPU-second median, p50/p99 medians, errors, and the ratios to nginx+ngx_lua
(label nginx-lua) and HAProxy (label haproxy): median of the target over median of the peer,
both from the same run's rounds. Then issue #16's goals for every luaproxy target, and the
LuaJIT build against the Lua 5.4 build of the same policy. Markdown on stdout.

Run by bench/all.sh; by hand: python3 bench/all_report.py $BENCH_VAR/results/all-TS.tsv
"""
import statistics
import sys

NGX, HAP = "nginx-lua", "haproxy"
GOAL_NGX, GOAL_HAP = 1.25, 1.0  # issue #16: req/s and req/CPU-s against each peer


def num(s):
    try:
        return float(s)
    except ValueError:
        return None


def load(path):
    rows, failed = {}, {}
    order_labels, order_groups = [], []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        col = {name: i for i, name in enumerate(header)}
        for line in f:
            c = line.rstrip("\n").split("\t")
            if len(c) < 5:
                continue
            label, wl, conns, rnd = c[0], c[1], c[2], c[3]
            group = (wl, conns)
            if group not in order_groups:
                order_groups.append(group)
            if label not in order_labels:
                order_labels.append(label)
            if c[4] == "FAILED":
                failed[(group, label)] = failed.get((group, label), 0) + 1
                continue
            sock = [int(x) for x in c[col["sock_err(c/r/w/t)"]].split("/")]
            non2xx = int(c[col["non2xx"]])
            rows.setdefault((group, label), {})[int(rnd)] = {
                "rps": float(c[col["rps"]]),
                "p50": float(c[col["p50_ms"]]),
                "p99": float(c[col["p99_ms"]]),
                "rpc": num(c[col["req_per_cpu_s"]]),
                "cores": num(c[col["proxy_cpu_s"]]),
                "err": non2xx + sum(sock),
                "busy": num(c[col["box_busy_pct"]]),
            }
    return rows, failed, order_labels, order_groups


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summary(rounds):
    rs = list(rounds.values())
    return {
        "n": len(rs),
        "rps": med([r["rps"] for r in rs]),
        "lo": min(r["rps"] for r in rs),
        "hi": max(r["rps"] for r in rs),
        "rpc": med([r["rpc"] for r in rs]),
        "p50": med([r["p50"] for r in rs]),
        "p99": med([r["p99"] for r in rs]),
        "err": sum(r["err"] for r in rs),
    }


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def fmt_int(x):
    return "-" if x is None else f"{x:,.0f}"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: all_report.py RESULT.tsv")
    rows, failed, labels, groups = load(sys.argv[1])
    out = []
    w = out.append
    sums = {k: summary(v) for k, v in rows.items()}
    lp_labels = [lab for lab in labels if lab.startswith("luaproxy")]
    multi_conns = len({g[1] for g in groups}) > 1

    def gname(group):
        return f"{group[0]} c{group[1]}" if multi_conns else group[0]

    for group in groups:
        wl, conns = group
        w(f"### {wl}, {conns} connections")
        w("")
        w("| target | rounds | req/s median | req/s min-max | req/CPU-s median | p50 ms | p99 ms "
          "| req/s ÷ nginx+ngx_lua | req/CPU-s ÷ nginx+ngx_lua | req/s ÷ HAProxy | req/CPU-s ÷ HAProxy "
          "| errors |")
        w("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        ngx, hap = sums.get((group, NGX)), sums.get((group, HAP))
        for lab in labels:
            s = sums.get((group, lab))
            if s is None:
                if (group, lab) in failed:
                    w(f"| {lab} | 0 | FAILED | | | | | | | | | |")
                continue
            nf = failed.get((group, lab), 0)
            w("| {} | {}{} | {} | {}-{} | {} | {:.2f} | {:.2f} | {} | {} | {} | {} | {} |".format(
                lab, s["n"], f" (+{nf} failed)" if nf else "", fmt_int(s["rps"]),
                fmt_int(s["lo"]), fmt_int(s["hi"]), fmt_int(s["rpc"]), s["p50"], s["p99"],
                fmt_ratio(ratio(s["rps"], ngx and ngx["rps"])),
                fmt_ratio(ratio(s["rpc"], ngx and ngx["rpc"])),
                fmt_ratio(ratio(s["rps"], hap and hap["rps"])),
                fmt_ratio(ratio(s["rpc"], hap and hap["rpc"])), s["err"]))
        w("")

    if lp_labels:
        w(f"### Goals (#16): ≥ {GOAL_NGX}x nginx+ngx_lua, ≥ {GOAL_HAP}x HAProxy "
          "(req/s and req/CPU-s), p99 ≤ both")
        w("")
        w("Each ratio with ✓ when its goal is met, ✗ when not; per round: the same ratio in each round.")
        w("")
        w("| target | workload | req/s ÷ nginx+ngx_lua | per round | req/CPU-s ÷ nginx+ngx_lua "
          "| req/s ÷ HAProxy | per round | req/CPU-s ÷ HAProxy "
          "| p99 ms: luaproxy / nginx+ngx_lua / HAProxy | goals met |")
        w("|---|---|---:|---|---:|---:|---|---:|---|---:|")
        for lab in lp_labels:
            for group in groups:
                s = sums.get((group, lab))
                if s is None:
                    continue
                ngx, hap = sums.get((group, NGX)), sums.get((group, HAP))

                def per_round(peer):
                    peer_rounds = rows.get((group, peer), {})
                    mine = rows[(group, lab)]
                    return " / ".join(f"{mine[r]['rps'] / peer_rounds[r]['rps']:.2f}"
                                      for r in sorted(mine) if r in peer_rounds) or "-"

                marks = []

                def cell(x, goal):
                    if x is None:
                        return "-"
                    ok = x >= goal
                    marks.append(ok)
                    return f"{x:.2f} {'✓' if ok else '✗'}"

                c_rn = cell(ratio(s["rps"], ngx and ngx["rps"]), GOAL_NGX)
                c_cn = cell(ratio(s["rpc"], ngx and ngx["rpc"]), GOAL_NGX)
                c_rh = cell(ratio(s["rps"], hap and hap["rps"]), GOAL_HAP)
                c_ch = cell(ratio(s["rpc"], hap and hap["rpc"]), GOAL_HAP)
                p99s = [x["p99"] for x in (ngx, hap) if x]
                p99 = " / ".join([f"{s['p99']:.2f}"] + [f"{x['p99']:.2f}" if x else "-" for x in (ngx, hap)])
                if p99s:
                    ok = s["p99"] <= min(p99s)
                    marks.append(ok)
                    p99 += " ✓" if ok else " ✗"
                w(f"| {lab} | {gname(group)} | {c_rn} | {per_round(NGX)} | {c_cn} | {c_rh} | "
                  f"{per_round(HAP)} | {c_ch} | {p99} | {sum(marks)}/{len(marks)} |")
        w("")

    pairs = [(lab, lab[: -len("lua54")] + "luajit") for lab in lp_labels if lab.endswith("-lua54")]
    pairs = [(a, b) for a, b in pairs if b in lp_labels]
    if pairs:
        w("### LuaJIT build ÷ Lua 5.4 build (same policy, same run)")
        w("")
        w("| policy | workload | req/s | req/CPU-s | p99 (LuaJIT ÷ 5.4; below 1 is better) | "
          "req/s per round (LuaJIT ÷ 5.4) |")
        w("|---|---|---:|---:|---:|---|")
        for a, b in pairs:
            policy = a[len("luaproxy-"): -len("-lua54")]
            for group in groups:
                sa, sb = sums.get((group, a)), sums.get((group, b))
                if not sa or not sb:
                    continue
                ra, rb = rows[(group, a)], rows[(group, b)]
                per = " / ".join(f"{rb[r]['rps'] / ra[r]['rps']:.2f}" for r in sorted(rb) if r in ra)
                wl = gname(group)
                w(f"| {policy} | {wl} | {fmt_ratio(ratio(sb['rps'], sa['rps']))} | "
                  f"{fmt_ratio(ratio(sb['rpc'], sa['rpc']))} | {fmt_ratio(ratio(sb['p99'], sa['p99']))} | {per} |")
        w("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
