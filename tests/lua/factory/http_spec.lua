-- factory.http without a server: the Server-Sent Events parser over fake readers.
local http = require "factory.http"

-- A reader that returns the given chunks, then nil (or nil, err).
local function reader(chunks, err)
  local i = 0
  return {
    read = function()
      i = i + 1
      if chunks[i] then return chunks[i] end
      if err then return nil, err, err:match("^(%u+)") end
      return nil
    end,
  }
end

local function parse(chunks, err)
  local events, got = http.sse(reader(chunks, err)), {}
  for ev in events do got[#got + 1] = ev end
  return got, events.err
end

local STREAM = table.concat({
  "\239\187\191: a comment\n",
  "data: first\n\n",
  "event: add\r\ndata: a\r\ndata:b\r\ndata\r\n\r\n",
  "id: 42\rdata:  two spaces\r\r",
  "retry: 3000\nretry: soon\nunknown: x\nevent: ignored\n\n",
  "data: after\n\n",
  "id\ndata: no id\n\n",
  "id: bad\0id\ndata: kept\n\n",
  "data: never finished\n",
}, "")

local EXPECTED = {
  { event = "message", data = "first" },
  { event = "add", data = "a\nb\n" },
  { event = "message", data = " two spaces", id = "42" },
  { event = "message", data = "after", id = "42", retry = 3000 },
  { event = "message", data = "no id", id = "", retry = 3000 },
  { event = "message", data = "kept", id = "", retry = 3000 },
}

describe("http.sse", function()
  it("parses fields, comments, ids, retry and the three line ends", function()
    local got, err = parse({ STREAM })
    assert.is_nil(err)
    assert.same(EXPECTED, got)
  end)

  it("gives the same events however the stream is split into chunks", function()
    local one = {}
    for i = 1, #STREAM do one[i] = STREAM:sub(i, i) end
    assert.same(EXPECTED, (parse(one)), "one byte per chunk")
    for cut = 1, #STREAM - 1 do
      assert.same(EXPECTED, (parse({ STREAM:sub(1, cut), "", STREAM:sub(cut + 1) })), "split at " .. cut)
    end
  end)

  it("treats a CR at the end of a chunk and an LF starting the next as one line end", function()
    local got = parse({ "data: x\r", "\ndata: y\r", "\n\r", "\n" })
    assert.same({ { event = "message", data = "x\ny" } }, got)
    got = parse({ "data: x\r", "\r" })
    assert.same({ { event = "message", data = "x" } }, got)
  end)

  it("strips a byte order mark only at the very start", function()
    local got = parse({ "", "\239\187\191data: a\n\n\239\187\191data: b\n\n" })
    assert.equal("a", got[1].data)
    assert.is_nil(got[2])   -- "\239\187\191data" is an unknown field name
  end)

  it("dispatches nothing for an event without data", function()
    assert.same({}, (parse({ "event: ping\n\n: keepalive\n\n\n\n" })))
    local got = parse({ "event: ping\n\ndata: d\n\n" })
    assert.same({ { event = "message", data = "d" } }, got)
  end)

  it("ends the loop on a read error and keeps it in events.err", function()
    local got, err = parse({ "data: ok\n\n", "data: lost" }, "ECONNRESET: connection dropped")
    assert.same({ { event = "message", data = "ok" } }, got)
    assert.equal("ECONNRESET: connection dropped", err)
  end)
end)
