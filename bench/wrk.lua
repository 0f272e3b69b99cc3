-- wrk script for bench/run.py: POST the bytes of $BENCH_BODY_FILE with $BENCH_CTYPE (User-Agent
-- $BENCH_UA, Cookie $BENCH_COOKIE when set), and print one machine-readable line with the counts and
-- the latency percentiles (microseconds).
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CTYPE") or "application/json"
wrk.headers["User-Agent"] = os.getenv("BENCH_UA") or "estat-bench/1"
local cookie = os.getenv("BENCH_COOKIE")
if cookie and cookie ~= "" then
  wrk.headers["Cookie"] = cookie
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"tool":"wrk","requests":%d,"duration_us":%d,"non2xx":%d,"errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
