-- The HTTP server: factory.core.http_server, and the router factory.http_server.
-- Well-formed traffic comes from factory.http (libcurl); exact bytes, timing and
-- misbehaving clients from tests/tools/raw_http.py.
local core = require "factory.core.http_server"
local server = require "factory.http_server"
local http = require "factory.http"
local proc = require "factory.proc"
local fiber = require "factory.fiber"
local json = require "factory.json"
local log = require "factory.log"
local time = require "factory.core.time"

local TOOL = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../tools/raw_http.py"

local servers = {}

local function listen(opts)
  local srv = assert(core.listen(opts))
  servers[#servers + 1] = srv
  return srv
end

after_each(function()
  for _, srv in ipairs(servers) do srv:close() end
  servers = {}
end)

local function url(srv, path)
  return ("http://127.0.0.1:%d%s"):format(srv:port(), path)
end

local function get(path, extra)
  return "GET " .. path .. " HTTP/1.1\r\nHost: test\r\n" .. (extra or "") .. "\r\n"
end

-- Runs the raw client (steps as in tests/tools/raw_http.py); out.text is all it read.
local function raw(port, steps, opts)
  local spec = { port = port, steps = steps }
  for k, v in pairs(opts or {}) do spec[k] = v end
  local res = assert(proc.run{ argv = { "python3", TOOL, json.encode(spec) }, timeout = 30 })
  assert.equal(0, res.code, res.stderr)
  local out = assert(json.decode(res.stdout))
  if out.eof == json.null then out.eof = nil end
  if out.error == json.null then out.error = nil end
  local parts = {}
  for i, chunk in ipairs(out.chunks) do parts[i] = chunk[2] end
  out.text = table.concat(parts)
  return out
end

-- When the first chunk containing `text` arrived, in seconds since connecting.
local function arrival(out, text)
  for _, chunk in ipairs(out.chunks) do
    if chunk[2]:find(text, 1, true) then return chunk[1] end
  end
end

local function eventually(check, timeout)
  local deadline = time.monotonic() + (timeout or 5)
  while not check() do
    if time.monotonic() > deadline then error("condition not met in time", 2) end
    fiber.sleep(0.01)
  end
end

local function decode_error(body)
  local v = assert(json.decode(body))
  return v.error
end

describe("http server", function()
  it("hands the handler method, path, query, lowercase headers and body", function()
    local seen
    local srv = listen{ handler = function(req, res)
      seen = req
      res:status(201):header("X-Test", "yes"):header("Content-Type", "text/plain"):send("created")
    end }
    local r = assert(http.request{ method = "POST", url = url(srv, "/a/b?x=1&y=2"),
                                   headers = { ["X-Custom"] = "v" }, body = "payload" })
    assert.equal(201, r.status)
    assert.equal("created", r.body)
    assert.equal("yes", r.headers["x-test"])
    assert.equal("POST", seen.method)
    assert.equal("/a/b", seen.path)
    assert.equal("x=1&y=2", seen.query)
    assert.equal("v", seen.headers["x-custom"])
    assert.equal("payload", seen.body)
    r = assert(http.get(url(srv, "/plain")))
    assert.equal("", seen.query)
    assert.equal("", seen.body)
  end)

  it("keeps a connection alive and answers pipelined requests in order", function()
    local srv = listen{ handler = function(req, res)
      if req.path == "/slow" then fiber.sleep(0.2) end
      res:send("path=" .. req.path .. ";")
    end }
    local out = raw(srv:port(), {
      { send = get("/1") }, { read = 5, want = "path=/1;" },
      { send = get("/2") }, { read = 5, want = "path=/2;" },
      { send = get("/slow") .. get("/3") .. get("/4", "Connection: close\r\n") },
      { read = 5, want = "never sent" },
    })
    local order = {}
    for p in out.text:gmatch("path=(/%w+);") do order[#order + 1] = p end
    assert.same({ "/1", "/2", "/slow", "/3", "/4" }, order)
    local _, responses = out.text:gsub("HTTP/1.1 200 OK", "")
    assert.equal(5, responses)
    local _, closes = out.text:gsub("Connection: close", "")
    assert.equal(1, closes, "only the last response closes")
    assert.truthy(out.eof, "closed after Connection: close")
  end)

  it("streams a chunked response as it is written", function()
    local srv = listen{ handler = function(_, res)
      assert(res:start())
      for i = 1, 3 do
        assert(res:write("part" .. i))
        fiber.sleep(0.2)
      end
      assert(res:finish())
    end }
    local out = raw(srv:port(), { { send = get("/", "Connection: close\r\n") }, { read = 5 } })
    assert.contains("Transfer-Encoding: chunked\r\n", out.text)
    assert.contains("\r\n\r\n5\r\npart1\r\n5\r\npart2\r\n5\r\npart3\r\n0\r\n\r\n", out.text)
    local first, last = arrival(out, "part1"), arrival(out, "part3")
    assert.truthy(first < 0.15, "first chunk at once, got " .. first)
    assert.truthy(last - first > 0.3, "later chunks when written")
  end)

  it("sends Server-Sent Events as they happen", function()
    local srv = listen{ handler = function(_, res)
      res:sse{ event = "start", id = "1", data = "line one\nline two" }
      fiber.sleep(0.2)
      res:sse("plain")
      fiber.sleep(0.2)
      res:sse{ comment = "keep-alive", data = '{"n":3}', retry = 500 }
      res:finish()
    end }
    local r = assert(http.request{ url = url(srv, "/events"), stream = true })
    assert.equal("text/event-stream", r.headers["content-type"])
    local events, at = {}, {}
    local started = time.monotonic()
    local stream = http.sse(r)
    for ev in stream do
      events[#events + 1] = ev
      at[#at + 1] = time.monotonic() - started
    end
    assert.is_nil(stream.err)
    assert.same({
      { event = "start", id = "1", data = "line one\nline two" },
      { event = "message", id = "1", data = "plain" },
      { event = "message", id = "1", data = '{"n":3}', retry = 500 },
    }, events)
    assert.truthy(at[1] < 0.15 and at[3] - at[1] > 0.3, "events arrive as sent")
  end)

  it("serves 1,000 concurrent requests", function()
    local peak = 0
    local srv
    srv = listen{ handler = function(req, res)
      peak = math.max(peak, srv:stats().in_flight)
      fiber.sleep(0.05)
      res:send(req.path)
    end }
    local clients = {}
    for i = 1, 1000 do clients[i] = fiber.spawn(http.get, url(srv, "/" .. i)) end
    local _, outcomes = fiber.all(clients, 60)
    for i, o in ipairs(outcomes) do
      assert(o.ok and o[1], "request " .. i .. ": " .. tostring(o[2]))
      assert.equal(200, o[1].status)
      assert.equal("/" .. i, o[1].body)
    end
    assert.truthy(peak > 50, "handlers ran concurrently, peak " .. peak)
  end, { timeout = 60 })

  it("answers 431 to a head over max_header_bytes", function()
    local srv = listen{ max_header_bytes = 1024, handler = function(_, res) res:send("ok") end }
    local r = assert(http.get(url(srv, "/"), { headers = { ["X-Big"] = ("x"):rep(2000) } }))
    assert.equal(431, r.status)
    assert.equal("invalid_request_error", decode_error(r.body).type)
    r = assert(http.get(url(srv, "/"), { headers = { ["X-Small"] = ("x"):rep(500) } }))
    assert.equal(200, r.status)
  end)

  it("answers 413 to a body over max_body_bytes, by Content-Length or by chunks", function()
    local srv = listen{ max_body_bytes = 1000, handler = function(req, res) res:send(#req.body .. " bytes") end }
    local r = assert(http.post(url(srv, "/"), ("x"):rep(1000)))
    assert.equal("1000 bytes", r.body)
    r = assert(http.post(url(srv, "/"), ("x"):rep(1001)))
    assert.equal(413, r.status)
    assert.matches("too large", decode_error(r.body).message)
    local out = raw(srv:port(), {
      { send = "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" ..
               "258\r\n" .. ("y"):rep(600) .. "\r\n258\r\n" .. ("y"):rep(600) .. "\r\n0\r\n\r\n" },
      { read = 5 },
    })
    assert.matches("^HTTP/1.1 413 ", out.text)
    assert.truthy(out.eof)
  end)

  it("answers 400 to garbage and closes the connection", function()
    local srv = listen{ handler = function(_, res) res:send("ok") end }
    for _, bytes in ipairs{ "\1\2\3 garbage\r\n\r\n", "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
                            "POST / HTTP/1.1\r\nContent-Length: zz\r\n\r\n",
                            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" } do
      local out = raw(srv:port(), { { send = bytes }, { read = 5 } })
      assert.matches("^HTTP/1.1 400 ", out.text)
      assert.contains('"type":"invalid_request_error"', out.text)
      assert.truthy(out.eof, "closed")
    end
  end)

  it("answers Expect: 100-continue before the body is sent", function()
    local srv = listen{ handler = function(req, res) res:send("got " .. req.body) end }
    local out = raw(srv:port(), {
      { send = "PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n" },
      { read = 5, want = "\r\n\r\n" },
      { send = "hello" },
      { read = 5, want = "got hello" },
    })
    assert.matches("^HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK", out.text)
  end)

  it("closes a client slow to send its head at header_timeout", function()
    local srv = listen{ header_timeout = 0.3, handler = function(_, res) res:send("ok") end }
    local out = raw(srv:port(), { { send = "GET / HTTP/1.1\r\nHost: t\r\n" }, { read = 5 } })
    assert.matches("^HTTP/1.1 408 ", out.text)
    assert.near(0.3, out.eof, 0.25)
    out = raw(srv:port(), { { read = 5 } })
    assert.equal("", out.text, "a silent connection is closed without an answer")
    assert.near(0.3, out.eof, 0.25)
  end)

  it("closes idle keep-alive connections at idle_timeout", function()
    local srv = listen{ idle_timeout = 0.3, handler = function(_, res) res:send("ok") end }
    local out = raw(srv:port(), { { send = get("/") }, { read = 5 } })
    assert.matches("^HTTP/1.1 200 ", out.text)
    assert.near(0.3, out.eof, 0.25)
    eventually(function() return srv:stats().connections == 0 end)
  end)

  it("answers 500 when a handler raises or does not respond, logs it, and keeps serving", function()
    local captured = io.tmpfile()
    log.set_console(captured)
    local srv = listen{ handler = function(req, res)
      if req.path == "/boom" then error("kaboom: internal detail") end
      if req.path == "/silent" then return end
      res:send("fine")
    end }
    local r1 = http.get(url(srv, "/boom"))
    local r2 = http.get(url(srv, "/silent"))
    local r3 = http.get(url(srv, "/fine"))
    log.set_console(nil)
    captured:seek("set")
    local logged = captured:read("*a")
    captured:close()
    assert.equal(500, r1.status)
    assert.same({ error = { message = "internal server error", type = "server_error" } }, json.decode(r1.body))
    assert.equal(500, r2.status)
    assert.equal("fine", r3.body)
    assert.contains("kaboom", logged)
    assert.matches("http_server_spec%.lua:%d+: kaboom", logged)
    assert.contains("returned without responding", logged)
  end)

  it("cuts a stream short when its handler raises after starting it", function()
    local captured = io.tmpfile()
    log.set_console(captured)
    local srv = listen{ handler = function(_, res)
      res:write("partial")
      error("late failure")
    end }
    local out = raw(srv:port(), { { send = get("/") }, { read = 5 } })
    log.set_console(nil)
    captured:close()
    assert.contains("partial", out.text)
    assert.falsy(out.text:find("0\r\n\r\n", 1, true), "no end of stream")
    assert.truthy(out.eof)
  end)

  it("refuses to listen beyond loopback without a token, and checks the token", function()
    local srv, err, code = core.listen{ host = "0.0.0.0", handler = function() end }
    assert.is_nil(srv)
    assert.equal("EACCES", code)
    assert.matches("without a token", err)
    local loopback = listen{ host = "localhost", handler = function(_, res) res:send("local") end }
    assert.equal("127.0.0.1", loopback:host())
    srv = listen{ host = "0.0.0.0", token = "s3cret", handler = function(_, res) res:send("in") end }
    local r = assert(http.get(url(srv, "/")))
    assert.equal(401, r.status)
    assert.equal("authentication_error", decode_error(r.body).type)
    r = assert(http.get(url(srv, "/"), { headers = { Authorization = "Bearer wrong" } }))
    assert.equal(401, r.status)
    r = assert(http.get(url(srv, "/"), { headers = { Authorization = "Bearer s3cre" } }))
    assert.equal(401, r.status)
    r = assert(http.get(url(srv, "/"), { headers = { Authorization = "Bearer s3cret" } }))
    assert.equal(200, r.status)
    assert.equal("in", r.body)
  end)

  it("accepts any of a list of tokens beyond loopback, and only those", function()
    assert.error_matches(function() core.listen{ tokens = { "ok", "" }, handler = print } end, "non%-empty")
    assert.error_matches(function() core.listen{ tokens = "ok", handler = print } end, "list of strings")
    local srv, _, code = core.listen{ host = "0.0.0.0", tokens = {}, handler = print }
    assert.is_nil(srv)
    assert.equal("EACCES", code)
    srv = listen{ host = "0.0.0.0", token = "admin", tokens = { "team-a-key", "team-b-key" },
                  handler = function(req, res) res:send(req.headers.authorization) end }
    for _, case in ipairs{
      { key = "admin", status = 200 }, { key = "team-a-key", status = 200 }, { key = "team-b-key", status = 200 },
      { key = "team-a-ke", status = 401 }, { key = "team-a-keyy", status = 401 }, { key = "team-c-key", status = 401 },
      { status = 401 },
    } do
      local r = assert(http.get(url(srv, "/"), { headers = { Authorization = case.key and "Bearer " .. case.key } }))
      assert.equal(case.status, r.status, tostring(case.key))
      if case.status == 200 then assert.equal("Bearer " .. case.key, r.body) end
    end
  end)

  it("lets a request in flight finish on close(grace), then refuses connections", function()
    local srv = assert(core.listen{ handler = function(_, res)
      fiber.sleep(0.3)
      res:send("done")
    end })
    local client = fiber.spawn(http.get, url(srv, "/"))
    eventually(function() return srv:stats().in_flight == 1 end)
    local address = url(srv, "/")
    local started = time.monotonic()
    assert.equal(true, srv:close(5))
    assert.less(2, time.monotonic() - started)
    local ok, r = fiber.join(client)
    assert.truthy(ok and r, "client finished")
    assert.equal(200, r.status)
    assert.equal("done", r.body)
    local none, _, code = http.get(address)
    assert.is_nil(none)
    assert.equal("ECONNREFUSED", code)
    assert.error_matches(function() srv:port() end, "closed")
    assert.equal(true, srv:close())
  end)

  it("cancels the handlers that outlast the grace", function()
    local handler_fiber
    local srv = assert(core.listen{ handler = function(_, res)
      handler_fiber = fiber.current()
      fiber.sleep(30)
      res:send("too late")
    end })
    local client = fiber.spawn(http.get, url(srv, "/"))
    eventually(function() return srv:stats().in_flight == 1 end)
    local started = time.monotonic()
    srv:close(0.2)
    assert.near(0.2, time.monotonic() - started, 0.15)
    assert.equal("cancelled", handler_fiber:status())
    local ok, r, _, code = fiber.join(client)
    assert.truthy(ok and not r, "the client saw the connection go")
    assert.truthy(code, "with an error code")
  end)

  it("tells a streaming handler its client went away (ECONNRESET)", function()
    local result
    local srv = listen{ handler = function(_, res)
      for _ = 1, 1000 do
        local ok, err = res:write(("x"):rep(1000))
        if not ok then
          result = err
          return
        end
        fiber.sleep(0.005)
      end
      result = "never failed"
    end }
    raw(srv:port(), { { send = get("/") }, { read = 5, want = "xxx" }, { close = true } })
    eventually(function() return result ~= nil end)
    assert.matches("^ECONNRESET", result)
    eventually(function() return srv:stats().connections == 0 and srv:stats().in_flight == 0 end)
  end)

  it("cancels a handler that asked for it as soon as its client goes, and only such a handler", function()
    local fibers, finished = {}, {}
    local srv = listen{ handler = function(req, res)
      if req.path == "/watch" then res:cancel_on_disconnect() end
      fibers[req.path] = fiber.current()
      fiber.sleep(1)
      finished[req.path] = true
      res:send("late")
    end }
    for _, reset in ipairs({ false, true }) do
      fibers, finished = {}, {}
      local clients = {}
      for _, path in ipairs({ "/watch", "/plain" }) do
        clients[#clients + 1] = fiber.spawn(raw, srv:port(), { { send = get(path) }, { sleep = 0.1 },
                                                                { close = true, reset = reset } })
      end
      for _, c in ipairs(clients) do assert(fiber.join(c)) end
      eventually(function() return fibers["/watch"] and fibers["/watch"]:status() == "cancelled" end, 0.5)
      assert.is_nil(finished["/watch"])
      eventually(function() return finished["/plain"] end, 2)
      assert.is_nil(finished["/watch"])
      eventually(function() return srv:stats().connections == 0 and srv:stats().in_flight == 0 end)
    end
  end)

  it("makes a slow reader slow the writer down", function()
    local written, total, took = 0, 256, nil
    local srv = listen{ handler = function(_, res)
      local chunk, started = ("z"):rep(65536), time.monotonic()
      for _ = 1, total do
        assert(res:write(chunk))
        written = written + 1
      end
      assert(res:finish())
      took = time.monotonic() - started
    end }
    local client = fiber.spawn(raw, srv:port(), {
      { send = get("/", "Connection: close\r\n") }, { sleep = 0.5 }, { read = 20, quiet = true },
    }, { rcvbuf = 8192 })
    fiber.sleep(0.4)
    assert.less(total / 2, written, "chunks written while the client reads nothing")
    local ok, out = fiber.join(client)
    assert.truthy(ok, out)
    assert.less(65536 * total + 4096, out.bytes)
    assert.truthy(out.bytes > 65536 * total, "the whole body arrived")
    assert.truthy(took and took > 0.4, "the writer waited for the reader")
  end)

  it("gives up on a client that stops reading, after idle_timeout", function()
    local result
    local srv = listen{ idle_timeout = 0.3, handler = function(_, res)
      local chunk = ("s"):rep(65536)
      while true do
        local ok, err = res:write(chunk)
        if not ok then
          result = err
          return
        end
      end
    end }
    local client = fiber.spawn(raw, srv:port(), { { send = get("/") }, { sleep = 2 } }, { rcvbuf = 4096 })
    eventually(function() return result ~= nil end)
    assert.matches("^ETIMEDOUT", result)
    eventually(function() return srv:stats().connections == 0 end)
    fiber.join(client)
  end)

  it("speaks HTTP/1.0: no chunks, and keep-alive only when asked", function()
    local srv = listen{ handler = function(req, res)
      if req.path == "/stream" then
        res:write("a")
        res:write("b")
        return res:finish()
      end
      res:send("whole")
    end }
    local out = raw(srv:port(), { { send = "GET /stream HTTP/1.0\r\n\r\n" }, { read = 5 } })
    assert.falsy(out.text:find("chunked", 1, true))
    assert.contains("Connection: close\r\n", out.text)
    assert.matches("\r\n\r\nab$", out.text)
    assert.truthy(out.eof)
    out = raw(srv:port(), { { send = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" },
                            { read = 0.3, want = "never sent" } })
    assert.contains("Connection: keep-alive\r\n", out.text)
    assert.contains("Content-Length: 5\r\n", out.text)
    assert.is_nil(out.eof)
  end)

  it("closes the connection of a handler cancelled before responding", function()
    local handler_fiber
    local srv = listen{ handler = function(_, res)
      handler_fiber = fiber.current()
      fiber.sleep(30)
      res:send("too late")
    end }
    local client = fiber.spawn(http.get, url(srv, "/"))
    eventually(function() return handler_fiber ~= nil end)
    handler_fiber:cancel()
    -- Nothing runs in a cancelled fiber: its response is found abandoned when collected.
    collectgarbage()
    collectgarbage()
    local ok, r, _, code = fiber.join(client, 5)
    assert.truthy(ok and not r and code, "the client saw the connection go")
    assert.equal(0, srv:stats().in_flight)
  end)

  it("raises on misuse of a response", function()
    local errors = {}
    local srv = listen{ handler = function(_, res)
      errors.name = select(2, pcall(res.header, res, "Bad Name", "v"))
      errors.value = select(2, pcall(res.header, res, "X-Ok", "a\r\nInjected: 1"))
      errors.length = select(2, pcall(res.header, res, "Content-Length", "3"))
      res:send("x")
      errors.late_header = select(2, pcall(res.header, res, "X-Late", "v"))
      errors.late_write = select(2, pcall(res.write, res, "more"))
    end }
    assert.equal("x", assert(http.get(url(srv, "/"))).body)
    assert.matches("invalid character in header name", errors.name)
    assert.matches("CR, LF or NUL", errors.value)
    assert.matches("set by the server", errors.length)
    assert.matches("already sent", errors.late_header)
    assert.matches("finished", errors.late_write)
  end)

  it("closes a forgotten server when it is collected", function()
    local function forget()
      return assert(core.listen{ handler = function(_, res) res:send("x") end }):port()
    end
    local port = forget()
    collectgarbage()
    collectgarbage()
    local r, _, code = http.get(("http://127.0.0.1:%d/"):format(port))
    assert.is_nil(r)
    assert.equal("ECONNREFUSED", code)
  end)
end)

describe("http server router", function()
  it("routes by method and path, with params, JSON helpers and 404/405 errors", function()
    local srv = assert(server.new{})
    servers[#servers + 1] = srv
    srv:route("GET", "/v1/models", function(_, res) res:json(200, { data = { { id = "factory/coder" } } }) end)
       :route("GET", "/runs/:id", function(req, res) res:json(200, { id = req.params.id }) end)
       :route("POST", "/runs/:id/steps/:step", function(req, res)
         local body, err = req:json()
         if not body then return res:error(400, err) end
         res:json(201, { id = req.params.id, step = req.params.step, x = body.x })
       end)
       :route("GET", "/web/*path", function(req, res) res:send(req.params.path) end)
    assert.matches("^http://127%.0%.0%.1:%d+$", srv:url())
    local base = srv:url()

    local r = assert(http.get(base .. "/v1/models"))
    assert.equal(200, r.status)
    assert.equal("application/json", r.headers["content-type"])
    assert.equal("factory/coder", json.decode(r.body).data[1].id)

    r = assert(http.get(base .. "/runs/a%20b"))
    assert.equal("a b", json.decode(r.body).id)

    r = assert(http.post(base .. "/runs/7/steps/2", '{"x":5}'))
    assert.equal(201, r.status)
    assert.same({ id = "7", step = "2", x = 5 }, json.decode(r.body))

    r = assert(http.post(base .. "/runs/7/steps/2", "{not json"))
    assert.equal(400, r.status)
    assert.equal("invalid_request_error", decode_error(r.body).type)
    assert.matches("^EJSON", decode_error(r.body).message)

    r = assert(http.get(base .. "/web/css/site.css"))
    assert.equal("css/site.css", r.body)

    r = assert(http.get(base .. "/nope"))
    assert.equal(404, r.status)
    assert.same({ message = "no route for GET /nope", type = "not_found_error" }, decode_error(r.body))

    r = assert(http.request{ method = "DELETE", url = base .. "/v1/models" })
    assert.equal(405, r.status)
    assert.equal("GET", r.headers["allow"])
    assert.equal("invalid_request_error", decode_error(r.body).type)

    r = assert(http.request{ method = "HEAD", url = base .. "/v1/models" })
    assert.equal(200, r.status)
    assert.equal("", r.body)
  end)

  it("passes listen errors back", function()
    local srv, err, code = server.new{ host = "0.0.0.0" }
    assert.is_nil(srv)
    assert.equal("EACCES", code)
    assert.matches("token", err)
    srv = assert(server.new{})
    servers[#servers + 1] = srv
    assert.error_matches(function() srv:route("get", "/", print) end, "uppercase")
    assert.error_matches(function() srv:route("GET", "runs", print) end, "start with /")
  end)
end)
