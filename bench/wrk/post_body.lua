-- wrk script for bench/service.py: POST one fixed body, read once from a file, to every request.
--
-- Environment (set by bench/service.py):
--   BODY_FILE      path of the request body (written once by bench/service.py; JSON in Lua is slow)
--   CONTENT_TYPE   content-type header (default application/json)
--   WRK_HEADERS    extra headers, "Name: value" pairs separated by "|" (optional), e.g.
--                  "Inference-Header-Content-Length: 171" for the KServe v2 binary extension
--
-- done() prints one line "WRK_JSON {...}" with exact percentiles (microseconds) and error counts,
-- which bench/service.py parses instead of wrk's rounded text report.

local path = os.getenv("BODY_FILE")
if path == nil or path == "" then
  error("BODY_FILE is not set")
end
local f = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/json"

local extra = os.getenv("WRK_HEADERS") or ""
for pair in string.gmatch(extra, "[^|]+") do
  local name, value = string.match(pair, "^%s*([^:]+):%s*(.-)%s*$")
  if name ~= nil then
    wrk.headers[name] = value
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_min_us":%d,"lat_mean_us":%.1f,"lat_stdev_us":%.1f,"lat_max_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"body_bytes":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    string.len(wrk.body)))
end
