-- factory.core.http_client (through factory.http) against a real local server,
-- tests/tools/http_server.py, started for each test.
local http = require "factory.http"
local proc = require "factory.proc"
local fiber = require "factory.fiber"
local json = require "factory.json"
local time = require "factory.core.time"

local server, base

before_each(function()
  server = assert(proc.spawn{
    argv = { "python3", "tests/tools/http_server.py" },
    env = { PATH = os.getenv("PATH"), HOME = os.getenv("HOME") },
    stderr = "inherit",
  })
  local port = assert(server:read_line("stdout"))
  base = "http://127.0.0.1:" .. port
end)

after_each(function()
  server:kill()
  server:wait()
  server:close()
end)

-- Every transfer has ended and every request struct is freed.
local function assert_idle()
  local s = http.stats()
  assert.equal(0, s.active, "active transfers")
  assert.equal(0, s.requests, "live requests")
  assert.equal(0, s.buffered, "buffered stream bytes")
end

local function elapsed(fn)
  local t0 = time.monotonic()
  local a, b, c = fn()
  return time.monotonic() - t0, a, b, c
end

describe("http request", function()
  it("GETs a body with its status and lowercase headers", function()
    local res, err = http.get(base .. "/bytes/100")
    assert(res, err)
    assert.equal(200, res.status)
    assert.equal(("x"):rep(100), res.body)
    assert.equal("100", res.headers["content-length"])
    assert.equal("text/plain", res.headers["content-type"])
    assert_idle()
  end)

  it("POSTs a body with the caller's headers, and no invented content type", function()
    local res = assert(http.post(base .. "/echo", "hello\0world",
                                 { headers = { ["X-Token"] = "abc", ["X-Num"] = 42 } }))
    local doc = assert(json.decode(res.body))
    assert.equal("POST", doc.method)
    assert.equal("hello\0world", doc.body)
    assert.equal("abc", doc.headers["x-token"])
    assert.equal("42", doc.headers["x-num"])
    assert.is_nil(doc.headers["content-type"])
    assert.is_nil(doc.headers["expect"])
    assert.matches("^factory/", doc.headers["user-agent"])
    res = assert(http.post(base .. "/echo", "{}", { headers = { ["Content-Type"] = "application/json" } }))
    assert.equal("application/json", json.decode(res.body).headers["content-type"])
  end)

  it("sends other methods, with and without a body", function()
    local cases = {
      { method = "PUT", body = "data", want_body = "data" },
      { method = "PATCH", body = "p", want_body = "p" },
      { method = "DELETE", want_body = "" },
      { method = "PUT", want_body = "", want_length = "0" },
      { method = "GET", want_body = "" },
    }
    for _, c in ipairs(cases) do
      local res = assert(http.request{ method = c.method, url = base .. "/echo", body = c.body })
      local doc = json.decode(res.body)
      assert.equal(c.method, doc.method)
      assert.equal(c.want_body, doc.body, c.method)
      if c.want_length then assert.equal(c.want_length, doc.headers["content-length"]) end
    end
    local res = assert(http.request{ method = "HEAD", url = base .. "/bytes/50" })
    assert.equal(200, res.status)
    assert.equal("", res.body)
    assert.equal("50", res.headers["content-length"])
  end)

  it("round-trips a 1 MiB body", function()
    local big = ("0123456789abcdef"):rep(65536)
    local res = assert(http.post(base .. "/echo", big))
    assert.equal(big, json.decode(res.body).body)
  end)

  it("returns HTTP error statuses as responses", function()
    for _, code in ipairs({ 201, 204, 404, 500, 503 }) do
      local res, err = http.get(base .. "/status/" .. code)
      assert(res, err)
      assert.equal(code, res.status)
      assert.equal(code == 204 and "" or ("status " .. code), res.body)
    end
  end)

  it("joins repeated response headers", function()
    local res = assert(http.get(base .. "/headers"))
    assert.equal("a, b", res.headers["x-multi"])
  end)

  it("follows redirects only when asked", function()
    local res = assert(http.get(base .. "/redirect"))
    assert.equal(302, res.status)
    assert.equal("/echo", res.headers.location)
    assert.equal("moved", res.body)
    res = assert(http.get(base .. "/redirect", { follow = true }))
    assert.equal(200, res.status)
    assert.equal("GET", json.decode(res.body).method)
    assert.is_nil(res.headers.location)
  end)

  it("completes 1,000 concurrent GETs in one process", function()
    local fibers = {}
    for i = 1, 1000 do
      fibers[i] = fiber.spawn(function()
        local res, err = http.get(base .. "/bytes/" .. (i % 50))
        if not res then error(err) end
        assert.equal(("x"):rep(i % 50), res.body)
        return res.status
      end)
    end
    local ok, outcomes = fiber.all(fibers, 60)
    assert(ok, outcomes and tostring(outcomes[1] and outcomes[1][1]))
    for i = 1, 1000 do assert.equal(200, outcomes[i][1]) end
    assert_idle()
  end, { timeout = 90 })

  it("enforces max_body with and without a Content-Length", function()
    local res, err, code = http.get(base .. "/bytes/1000", { max_body = 100 })
    assert.is_nil(res)
    assert.equal("EHTTP", code)
    assert.contains("max_body", err)
    res, err, code = http.get(base .. "/stream/3/0", { max_body = 10 })
    assert.is_nil(res)
    assert.equal("EHTTP", code)
    assert.contains("max_body", err)
    assert(http.get(base .. "/bytes/1000", { max_body = 1000 }))
    assert_idle()
  end)

  it("reports a body cut short as ECONNRESET", function()
    local res, err, code = http.get(base .. "/truncated")
    assert.is_nil(res)
    assert.equal("ECONNRESET", code)
    assert.matches("^ECONNRESET: ", err)
    assert_idle()
  end)

  it("raises on misuse", function()
    assert.error_matches(function() http.request{} end, "'url' is required")
    assert.error_matches(function() http.request{ url = base, method = "GET /x" } end, "method")
    assert.error_matches(function()
      http.get(base, { headers = { ["X-A"] = "a\r\nInjected: 1" } })
    end, "CR, LF")
    assert.error_matches(function() http.get(base, { timeout = "1" }) end, "timeout")
    assert_idle()
  end)

  it("lists the library versions", function()
    local v = http.versions()
    assert.matches("^libcurl/%d+%.%d+", v[1])
    assert(#v >= 2, "expected the TLS library too")
  end)
end)

describe("http errors and timeouts", function()
  it("times out a slow response (total timeout) with ETIMEDOUT", function()
    local secs, res, err, code = elapsed(function() return http.get(base .. "/slow/3", { timeout = 0.3 }) end)
    assert.is_nil(res)
    assert.equal("ETIMEDOUT", code)
    assert.matches("^ETIMEDOUT: ", err)
    assert.less(1.5, secs)
    assert_idle()
  end)

  it("times out a connection that is never accepted (connect_timeout)", function()
    local port = assert(http.get(base .. "/blackhole")).body
    local secs, res, _, code = elapsed(function()
      return http.get("http://127.0.0.1:" .. port .. "/", { connect_timeout = 0.3 })
    end)
    assert.is_nil(res)
    assert.equal("ETIMEDOUT", code)
    assert.less(1.5, secs)
  end)

  it("gives ECONNREFUSED quickly for a closed port", function()
    -- the server's port once it is gone: nothing listens there any more
    server:kill()
    server:wait()
    local secs, res, err, code = elapsed(function() return http.get(base .. "/", { connect_timeout = 5 }) end)
    assert.is_nil(res)
    assert.equal("ECONNREFUSED", code)
    assert.contains("127.0.0.1", err)
    assert.less(1, secs)
  end)

  it("gives EHOST for a name that does not resolve", function()
    local res, _, code = http.get("http://name.invalid/", { timeout = 10 })
    assert.is_nil(res)
    assert.equal("EHOST", code)
  end)

  it("refuses other protocols", function()
    local res, _, code = http.get("file:///etc/passwd")
    assert.is_nil(res)
    assert.equal("EHTTP", code)
  end)

  it("frees a request whose fiber is cancelled mid-request", function()
    local f = fiber.spawn(function() return http.get(base .. "/slow/2") end)
    fiber.sleep(0.1)
    assert.equal(1, http.stats().active)
    assert(f:cancel("no longer needed"))
    assert.equal("cancelled", f:status())
    assert_idle()
    -- the server still answers, and nothing resumes the dead fiber meanwhile
    fiber.sleep(0.2)
    assert(http.get(base .. "/bytes/1"))
  end)

  it("frees a request abandoned by with_timeout", function()
    local ok, err = fiber.with_timeout(0.2, function() return http.get(base .. "/slow/2") end)
    assert.is_nil(ok)
    assert.contains("ETIMEDOUT", err)
    assert_idle()
  end)
end)

describe("http streaming", function()
  it("returns at the headers and reads chunks as they arrive", function()
    -- the server sends the headers, then a chunk every 0.25 s
    local t0 = time.monotonic()
    local res = assert(http.request{ url = base .. "/stream/4/0.25", stream = true })
    assert.equal(200, res.status)
    assert.equal("text/plain", res.headers["content-type"])
    assert.less(0.2, time.monotonic() - t0)
    local chunks, arrival = {}, {}
    while true do
      local chunk, err = res:read()
      assert.is_nil(err)
      if not chunk then break end
      chunks[#chunks + 1] = chunk
      arrival[#arrival + 1] = time.monotonic() - t0
    end
    assert.equal("chunk 1\nchunk 2\nchunk 3\nchunk 4\n", table.concat(chunks))
    assert(#chunks >= 3, "chunks should arrive separately, got " .. #chunks)
    assert(arrival[#arrival] - arrival[1] > 0.5, "chunks should arrive as they are sent")
    assert.is_nil(res:read())
    res:close()
    assert_idle()
  end)

  it("pauses a transfer the reader does not keep up with", function()
    local size = 8 * 1024 * 1024
    local res = assert(http.request{ url = base .. "/bytes/" .. size, stream = true })
    fiber.sleep(0.3)
    local buffered = http.stats().buffered
    assert(buffered > 0, "some data should be buffered")
    assert.less(1024 * 1024, buffered)
    local total = 0
    while true do
      local chunk, err = res:read(5)
      assert(chunk or not err, err)
      if not chunk then break end
      total = total + #chunk
    end
    assert.equal(size, total)
    res:close()
    assert_idle()
  end)

  it("parses Server-Sent Events from a live stream", function()
    local res = assert(http.request{ url = base .. "/sse", stream = true })
    assert.equal("text/event-stream", res.headers["content-type"])
    local events = http.sse(res)
    local got = {}
    for ev in events do got[#got + 1] = ev end
    assert.is_nil(events.err)
    assert.same({
      { event = "message", data = "one" },
      { event = "update", data = "line 1\nline 2", id = "7" },
      { event = "message", data = "split", id = "7", retry = 1500 },
      { event = "message", data = "last", id = "7", retry = 1500 },
    }, got)
    res:close()
  end)

  it("reports a stream cut short from read", function()
    local res = assert(http.request{ url = base .. "/truncated", stream = true })
    assert.equal(200, res.status)
    local total, err, code = 0, nil, nil
    while true do
      local chunk, e, c = res:read()
      if not chunk then err, code = e, c break end
      total = total + #chunk
    end
    assert.equal(100, total)
    assert.equal("ECONNRESET", code)
    assert.matches("^ECONNRESET", err)
    res:close()
    assert_idle()
  end)

  it("times out a read without ending the stream", function()
    local res = assert(http.request{ url = base .. "/stream/2/0.5", stream = true })
    local chunk, _, code = res:read(0.1)
    assert.is_nil(chunk)
    assert.equal("ETIMEDOUT", code)
    assert.equal("chunk 1\n", res:read(2))
    res:close()
    assert_idle()
  end)

  it("close aborts the transfer and wakes a blocked reader", function()
    local res = assert(http.request{ url = base .. "/stream/5/1", stream = true })
    local reader = fiber.spawn(function() return res:read() end)
    fiber.sleep(0.05)
    res:close()
    local ok, chunk, err, code = fiber.join(reader)
    assert(ok)
    assert.is_nil(chunk)
    assert.equal("ECANCELED", code)
    assert.contains("closed", err)
    assert.error_matches(function() res:read() end, "closed")
    assert.equal(200, res.status)
    res:close()
    assert_idle()
  end)

  it("lets an unclosed stream be collected", function()
    local function open()
      assert(http.request{ url = base .. "/stream/5/1", stream = true })
    end
    open()
    assert.equal(1, http.stats().requests)
    collectgarbage()
    collectgarbage()
    assert_idle()
  end)
end)

describe("https", function()
  local tls, files

  after_each(function()
    if tls then
      tls:kill()
      tls:wait()
      tls:close()
      tls = nil
    end
    for _, f in ipairs(files or {}) do os.remove(f) end
  end)

  it("verifies certificates: ETLS for an unknown issuer, success with ca_file", function()
    local base_name = os.tmpname()
    local cert, key = base_name .. ".crt", base_name .. ".key"
    files = { base_name, cert, key }
    local env = { PATH = os.getenv("PATH"), HOME = os.getenv("HOME") }
    local made = assert(proc.run{
      argv = { "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
               "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
               "-addext", "subjectAltName=IP:127.0.0.1" },
      env = env,
    })
    assert.equal(0, made.code, made.stderr)
    tls = assert(proc.spawn{ argv = { "python3", "tests/tools/http_server.py", "--tls", cert, key },
                             env = env, stderr = "inherit" })
    local url = "https://127.0.0.1:" .. assert(tls:read_line("stdout")) .. "/bytes/5"
    local res, err, code = http.get(url)
    assert.is_nil(res)
    assert.equal("ETLS", code)
    assert.matches("^ETLS: ", err)
    res = assert(http.get(url, { ca_file = cert }))
    assert.equal(200, res.status)
    assert.equal("xxxxx", res.body)
    assert_idle()
  end)
end)
