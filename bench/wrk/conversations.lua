-- Requests against random conversations of the seeded benchmark database.
-- Environment: BENCH_IDS (file of ids), BENCH_KEY (API key), BENCH_SUFFIX (path after the id),
-- BENCH_METHOD (GET or POST), BENCH_BODY (JSON body for POST); BENCH_MIX=1 instead mixes
-- 70% get_conversation, 20% list_messages and 10% create_message (the soak's load).
local ids, headers, post_headers, suffix, method, body, mix

function init(args)
  ids = {}
  for line in io.lines(os.getenv("BENCH_IDS")) do ids[#ids + 1] = line end
  suffix = os.getenv("BENCH_SUFFIX") or ""
  method = os.getenv("BENCH_METHOD") or "GET"
  body = os.getenv("BENCH_BODY")
  mix = os.getenv("BENCH_MIX") == "1"
  headers = { ["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY") }
  post_headers = { ["Authorization"] = headers["Authorization"], ["Content-Type"] = "application/json" }
  if body then headers["Content-Type"] = "application/json" end
  math.randomseed(os.time() * 1000 + tonumber(tostring({}):sub(8), 16) % 1000)
end

function request()
  local id = ids[math.random(#ids)]
  if mix then
    local pick = math.random(100)
    if pick <= 70 then
      return wrk.format("GET", "/v1/conversations/" .. id, headers)
    elseif pick <= 90 then
      return wrk.format("GET", "/v1/conversations/" .. id .. "/messages?limit=20", headers)
    end
    return wrk.format("POST", "/v1/conversations/" .. id .. "/messages", post_headers,
      '{"role": "user", "content": "soak"}')
  end
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
