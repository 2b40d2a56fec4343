-- Specs for factory.audit and `factory audit`, on SQLite and on the throwaway
-- PostgreSQL server: the hash chain, tamper detection, concurrent appends, search.
local db = require "factory.db"
local audit = require "factory.audit"
local hash = require "factory.core.hash"
local fiber = require "factory.fiber"
local proc = require "factory.proc"
local host = require "factory.core.host"

local backends = require "tests.tools.backends"
after_each(backends.cleanup)

local function factory_audit(...)
  local res = assert(proc.run { argv = { host.exe, "audit", ... } })
  return res.stdout, res.stderr, res.code
end

it("sha256 comes from libcrypto", function()
  assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", hash.sha256("abc"))
  assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", hash.sha256(""))
end)

for _, b in ipairs(backends.LIST) do
  local backend, fresh = b[1], b[2]

  local function open()
    local url = fresh()
    local d = assert(db.open(url))
    assert(d:migrate())
    return d, url
  end

  describe("audit on " .. backend, function()
    it("links each record to the previous one's hash and verifies", function()
      local d = open()
      assert.same({ true, 0 }, { audit.verify(d) })
      local first = assert(audit.append(d, { kind = "run.start", actor = "lead", run_id = 7, payload = { x = 1 } }))
      local second = assert(audit.append(d, { kind = "run.end", payload = "plain text" }))
      assert.equal(1, first.seq)
      assert.equal(2, second.seq)
      local rows = assert(d:query("SELECT seq, prev_hash, hash, payload FROM audit ORDER BY seq"))
      assert.equal(("0"):rep(64), rows[1].prev_hash)
      assert.equal(first.hash, rows[2].prev_hash)
      assert.equal('{"x":1}', rows[1].payload)
      assert.same({ true, 2 }, { audit.verify(d) })
      d:close()
    end)

    it("appends inside the caller's transaction and rolls back with it", function()
      local d = open()
      local ok = d:tx(function(tx)
        assert(audit.append(tx, { kind = "doomed" }))
        error("EBOOM: abandon")
      end)
      assert.is_nil(ok)
      assert.equal(0, d:query("SELECT COUNT(*) AS n FROM audit")[1].n)
      assert(d:tx(function(tx) return audit.append(tx, { kind = "kept" }) end))
      assert.same({ true, 1 }, { audit.verify(d) })
      d:close()
    end)

    it("concurrent appends from two connections never fork the chain", function()
      local d, url = open()
      local other = assert(db.open(url))
      local fibers = {}
      for i = 1, 8 do
        local conn = i % 2 == 0 and d or other
        fibers[i] = fiber.spawn(function()
          for k = 1, 10 do assert(audit.append(conn, { kind = "c", payload = { i = i, k = k } })) end
        end)
      end
      assert.truthy(fiber.all(fibers, 30))
      assert.same({ true, 80 }, { audit.verify(d) })
      other:close()
      d:close()
    end)

    it("an edited, re-linked or deleted record is the first broken link", function()
      local d = open()
      for i = 1, 5 do assert(audit.append(d, { kind = "k", payload = "record " .. i })) end
      assert(d:exec("UPDATE audit SET payload = ? WHERE seq = ?", { "forged", 3 }))
      local ok, err, code = audit.verify(d)
      assert.is_nil(ok)
      assert.equal("EBROKEN", code)
      assert.equal("EBROKEN: first broken link at seq 3: the record does not match its hash", err)
      assert(d:exec("UPDATE audit SET payload = ? WHERE seq = ?", { "record 3", 3 }))
      assert.truthy(audit.verify(d))
      -- A forger who rehashes the edited record still breaks the next link.
      local row = assert(d:query("SELECT hash FROM audit WHERE seq = ?", { 2 }))[1]
      assert(d:exec("UPDATE audit SET actor = ?, hash = ? WHERE seq = ?", { "mallory", ("f"):rep(64), 2 }))
      assert.matches("^EBROKEN: first broken link at seq 2: ", select(2, audit.verify(d)))
      assert(d:exec("UPDATE audit SET actor = NULL, hash = ? WHERE seq = ?", { row.hash, 2 }))
      assert(d:exec("DELETE FROM audit WHERE seq = ?", { 4 }))
      assert.equal("EBROKEN: first broken link at seq 4: the record is missing (the next is seq 5)",
        select(2, audit.verify(d)))
      d:close()
    end)

    it("search finds records by kind, actor or payload text", function()
      local d = open()
      assert(audit.append(d, { kind = "merge", actor = "alice", payload = { pr = 12, note = "Fixed 100% of it" } }))
      assert(audit.append(d, { kind = "deploy", actor = "bob", payload = "shipped build_7" }))
      local function seqs(text)
        local out = {}
        for i, r in ipairs(assert(audit.search(d, text))) do out[i] = r.seq end
        return out
      end
      assert.same({ 1 }, seqs("ALICE"))
      assert.same({ 2 }, seqs("deploy"))
      assert.same({ 1 }, seqs("100%"))
      assert.same({ 2 }, seqs("build_7"))
      assert.same({}, seqs("build%7"))
      assert.same({ 2, 1 }, seqs(""))
      d:close()
    end)

    it("factory audit verify|search on the command line", function()
      local d, url = open()
      assert(audit.append(d, { kind = "merge", actor = "alice", payload = "pr 12" }))
      assert(audit.append(d, { kind = "merge", actor = "bob", payload = "pr 13" }))
      local out, err, code = factory_audit("verify", "--db", url)
      assert.equal(0, code, err)
      assert.equal("audit: 2 record(s), chain intact\n", out)
      out, err, code = factory_audit("search", "pr 13", "--db", url)
      assert.equal(0, code, err)
      assert.matches("^2 %S+ merge bob pr 13\n$", out)
      assert(d:exec("UPDATE audit SET kind = ? WHERE seq = ?", { "forged", 1 }))
      out, err, code = factory_audit("verify", "--db", url)
      assert.equal(1, code)
      assert.equal("", out)
      assert.equal("factory audit: EBROKEN: first broken link at seq 1: the record does not match its hash\n", err)
      _, err, code = factory_audit("search", "--db", url)
      assert.equal(2, code)
      assert.equal("factory audit: search needs a TEXT (see 'factory audit --help')\n", err)
      _, err, code = factory_audit("frobnicate")
      assert.equal(2, code)
      assert.matches("unknown subcommand 'frobnicate'", err)
      d:close()
    end)
  end)
end
