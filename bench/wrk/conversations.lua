-- Requests against random conversations of the seeded benchmark database.
-- Environment: BENCH_IDS (file of ids), BENCH_KEY (API key), BENCH_SUFFIX (path after the id),
-- BENCH_METHOD (GET or POST), BENCH_BODY (JSON body for POST).
local ids, headers, suffix, method, body

function init(args)
  ids = {}
  for line in io.lines(os.getenv("BENCH_IDS")) do ids[#ids + 1] = line end
  suffix = os.getenv("BENCH_SUFFIX") or ""
  method = os.getenv("BENCH_METHOD") or "GET"
  body = os.getenv("BENCH_BODY")
  headers = { ["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY") }
  if body then headers["Content-Type"] = "application/json" end
  math.randomseed(os.time() * 1000 + tonumber(tostring({}):sub(8), 16) % 1000)
end

function request()
  local id = ids[math.random(#ids)]
  return wrk.format(method, "/v1/conversations/" .. id .. suffix, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
