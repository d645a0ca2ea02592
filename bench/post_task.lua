-- wrk script: POST the benchmark's task body, then print one machine-readable
-- line (BENCH_RESULT {...}) that bench/http.py parses.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
    wrk.headers["Authorization"] = auth
end

done = function(summary, latency, requests)
    local errors = summary.errors.connect + summary.errors.read
        + summary.errors.write + summary.errors.timeout
    io.write(string.format(
        'BENCH_RESULT {"requests": %d, "duration_us": %d, "errors": %d, '
            .. '"non2xx": %d, "p50_us": %.1f, "p99_us": %.1f}\n',
        summary.requests, summary.duration, errors, summary.errors.status,
        latency:percentile(50), latency:percentile(99)))
end
