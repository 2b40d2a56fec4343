-- Specs for factory.memory on SQLite and on the throwaway PostgreSQL server:
-- learnings stored with team, repo and source objective, found by full-text recall
-- (best first, the newest when nothing matches), and the migration from schema 1
-- indexing the learnings already there; facts recalled ranked only when more match
-- than are asked for.
local db = require "factory.db"
local memory = require "factory.memory"
local migrations = require "factory.db.migrations"
local schema = require "factory.db.schema"
local proc = require "factory.proc"
local host = require "factory.core.host"

local backends = require "tests.tools.backends"
after_each(backends.cleanup)

local function factory_learnings(...)
  local res = assert(proc.run { argv = { host.exe, "learnings", ... }, timeout = 30 })
  return res.stdout, res.stderr, res.code
end

local function texts(rows)
  local out = {}
  for i, r in ipairs(rows) do out[i] = type(r) == "table" and r.text or r end
  return out
end

for _, b in ipairs(backends.LIST) do
  local backend, fresh = b[1], b[2]

  local function open()
    local d = assert(db.open(fresh()))
    assert(d:migrate())
    return d
  end

  describe("learnings on " .. backend, function()
    it("are stored with team, repo and objective, once per team and repo", function()
      local d = open()
      assert.equal(2, memory.learn(d, "backend", nil, { "Migrations live in db/migrate", "  " ,
        "The API server reads PORT from the environment" }, { repo = "acme/api", objective = "Add the health check" }))
      assert.equal(0, memory.learn(d, "backend", nil, { "migrations  live in DB/migrate" }, { repo = "acme/api" }))
      assert.equal(1, memory.learn(d, "backend", nil, { "Migrations live in db/migrate" }, { repo = "acme/web" }))
      -- The old four-argument call still works.
      assert.equal(1, memory.learn(d, "frontend", nil, { "Components are in src/ui" }))
      local rows = memory.search_learnings(d, nil, {})
      assert.equal(4, #rows)
      assert.equal("Components are in src/ui", rows[1].text)
      assert.equal("frontend", rows[1].team)
      assert.is_nil(rows[1].repo)
      assert.equal("acme/web", rows[2].repo)
      assert.equal("The API server reads PORT from the environment", rows[3].text)
      assert.equal("acme/api", rows[3].repo)
      assert.equal("Add the health check", rows[3].objective)
      assert.truthy(rows[3].created_at > 0)
      assert.same({ "The API server reads PORT from the environment", "Migrations live in db/migrate" },
                  texts(memory.search_learnings(d, "", { team = "backend", repo = "acme/api" })))
      d:close()
    end)

    it("full-text recall finds the most relevant first, with stemming", function()
      local d = open()
      memory.learn(d, "backend", nil, {
        "Dates are stored in UTC and converted at the edge",
        "The test suite needs a running PostgreSQL; start it with tests/tools/pg.sh",
        "Deployments go through the staging cluster first",
        "Run the tests with make test; the database tests need PostgreSQL",
      }, { repo = "acme/api" })
      memory.learn(d, "frontend", nil, { "The UI tests run in a headless browser" }, { repo = "acme/web" })
      -- "converting" finds "converted" (stemming); other teams are not searched.
      assert.same({ "Dates are stored in UTC and converted at the edge" },
                  memory.learnings(d, "backend", 5, "when converting timestamps"))
      local got = memory.learnings(d, "backend", 5, "how do I run the database tests?")
      assert.equal(2, #got)
      assert.equal("Run the tests with make test; the database tests need PostgreSQL", got[1])
      -- Nothing matches: the newest instead; no query: the newest.
      assert.same({ "Run the tests with make test; the database tests need PostgreSQL",
                    "Deployments go through the staging cluster first" },
                  memory.learnings(d, "backend", 2, "kubernetes helm charts"))
      assert.same(memory.learnings(d, "backend", 2, "kubernetes helm charts"), memory.learnings(d, "backend", 2))
      -- search_learnings: across teams unless told; an explicit search that finds nothing is empty.
      assert.same({ "Run the tests with make test; the database tests need PostgreSQL",
                    "The UI tests run in a headless browser",
                    "The test suite needs a running PostgreSQL; start it with tests/tools/pg.sh" },
                  (function()
                    local t = texts(memory.search_learnings(d, "tests", {}))
                    table.sort(t)
                    return t
                  end)())
      assert.same({ "The UI tests run in a headless browser" },
                  texts(memory.search_learnings(d, "tests", { repo = "acme/web" })))
      assert.equal(1, #memory.search_learnings(d, "tests", { team = "backend", limit = 1 }))
      assert.same({}, memory.search_learnings(d, "kubernetes", {}))
      -- Query syntax in user text is only words.
      assert.same({}, memory.search_learnings(d, 'NEAR(" OR * -x) & !:', {}))
      d:close()
    end)

    it("the migration indexes learnings recorded under schema 1", function()
      local d = assert(db.open(fresh()))
      assert(migrations.migrate(d, { schema[1] }))
      assert(d:exec("INSERT INTO learnings (team, text, created_at) VALUES (?, ?, ?)",
        { "backend", "Caching lives in the redis adapter", 1 }))
      assert(d:migrate())
      local rows = memory.search_learnings(d, "cache", { team = "backend" })
      assert.equal(1, #rows)
      assert.equal("Caching lives in the redis adapter", rows[1].text)
      assert.is_nil(rows[1].repo)
      -- Updates and deletes keep the index in step.
      assert(d:exec("UPDATE learnings SET text = ? WHERE id = ?", { "Sessions live in the redis adapter", rows[1].id }))
      assert.same({}, memory.search_learnings(d, "cache", {}))
      assert.equal(1, #memory.search_learnings(d, "sessions", {}))
      assert(d:exec("DELETE FROM learnings WHERE id = ?", { rows[1].id }))
      assert.same({}, memory.search_learnings(d, "sessions", {}))
      d:close()
    end)

    it("factory learnings lists the newest or searches, by team and repo", function()
      local url = fresh()
      local d = assert(db.open(url))
      assert(d:migrate())
      local out, err, code = factory_learnings("--db", url)
      assert.equal(0, code, err)
      assert.equal("no learnings\n", out)
      memory.learn(d, "backend", nil, { "Migrations live in db/migrate" },
        { repo = "acme/api", objective = "Add the health check\n\n- GET /health returns 200" })
      memory.learn(d, "frontend", nil, { "The UI tests run in a headless browser" }, { repo = "acme/web" })
      d:close()
      out, err, code = factory_learnings("--db", url)
      assert.equal(0, code, err)
      assert.matches("^#2  %S+  team frontend  repo acme/web\n    The UI tests run in a headless browser\n"
        .. "#1  %S+  team backend  repo acme/api\n    Migrations live in db/migrate\n    from: Add the health check\n$", out)
      out, err, code = factory_learnings("search", "where are the migrations", "--db=" .. url)
      assert.equal(0, code, err)
      assert.matches("^#1 [^\n]*\n    Migrations live in db/migrate\n    from: Add the health check\n$", out)
      out = factory_learnings("--team", "backend", "--db", url)
      assert.matches("^#1 ", out)
      out = factory_learnings("--repo", "acme/web", "--limit", "5", "--db", url)
      assert.matches("^#2 [^\n]*\n[^\n]*\n$", out)
      out, err, code = factory_learnings("search", "kubernetes", "--db", url)
      assert.equal(0, code, err)
      assert.equal("no matching learnings\n", out)
      for _, c in ipairs({
        { { "search" }, "search needs a TEXT" },
        { { "frobnicate" }, "unknown subcommand 'frobnicate' (search TEXT, or none to list)" },
        { { "--verbose" }, "unknown flag '--verbose'" },
        { { "--team" }, "--team needs a value" },
        { { "--limit", "0" }, "--limit needs a positive whole number" },
      }) do
        out, err, code = factory_learnings(unpack(c[1]))
        assert.equal(2, code, c[2])
        assert.equal("", out)
        assert.equal("factory learnings: " .. c[2] .. " (see 'factory learnings --help')\n", err)
      end
      out, err, code = factory_learnings("--help")
      assert.equal(0, code, err)
      assert.matches("^usage: factory learnings", out)
    end)
  end)

  describe("memory facts on " .. backend, function()
    it("recall ranks best first only when more facts match than are asked for, else gives all, newest first",
      function()
      local d = open()
      local facts = { "Dates are stored in UTC", "Release dates are set by the product team",
                      "Queues are drained by the worker" }
      assert(d:tx(function(tx) return memory.retain(tx, "backend", facts) end))
      local function contents(rows)
        local out = {}
        for i, r in ipairs(rows) do out[i] = r.content end
        return out
      end
      local query = "when are dates in utc?"
      -- Two facts match: asked for one, the one holding both words; for two or more, both.
      assert.same({ facts[1] }, contents(memory.recall(d, { "backend" }, query, 1)))
      assert.same({ facts[2], facts[1] }, contents(memory.recall(d, { "backend" }, query, 2)))
      assert.same({ facts[2], facts[1] }, contents(memory.recall(d, { "backend" }, query, 8)))
      -- memory.context reads the same way, in one round trip with the learnings.
      assert.same({ facts[1] }, contents((memory.context(d, { "backend" }, "backend", query, 1))))
      assert.same({ facts[2], facts[1] }, contents((memory.context(d, { "backend", "shared-world" }, "backend", query))))
      assert.same({}, memory.recall(d, { "frontend" }, query, 1))
      assert.same({}, memory.recall(d, { "backend" }, "kubernetes", 1))
      d:close()
    end)
  end)
end
