-- bench/soak_wrk.lua: wrk script for bench/soak's good traffic: POST / with a 5120-byte body
-- (the good backends answer 5120 bytes), then one summary line that bench/soak parses.
-- wrk counts responses with status > 399 in errors.status.
wrk.method = "POST"
wrk.path = "/"
wrk.body = string.rep("0123456789abcdef", 320)
wrk.headers["Content-Type"] = "application/octet-stream"

function done(summary, latency, requests)
    local e = summary.errors
    local dur = summary.duration / 1e6
    io.write(string.format(
        "WRKRESULT requests=%d duration_s=%.1f rps=%.1f p50_ms=%.2f p99_ms=%.2f max_ms=%.1f non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
        summary.requests, dur, summary.requests / dur, latency:percentile(50) / 1000,
        latency:percentile(99) / 1000, latency.max / 1000,
        e.status, e.connect, e.read, e.write, e.timeout))
end
