-- Recall by embeddings (factory.memory with a `local/embed` alias), on SQLite and
-- on the throwaway PostgreSQL server: a fact that shares no word with the query is
-- found by meaning; without the alias recall is by words alone; an embeddings
-- endpoint that fails leaves recall by words. The fake model's embeddings are a
-- small concept space (the test's own), so "nearest in meaning" is decidable.
local db = require "factory.db"
local memory = require "factory.memory"
local router = require "factory.router"
local pipeline = require "factory.pipeline"
local dsl = require "factory.dsl"
local json = require "factory.json"
local fs = require "factory.core.fs"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local fake_model = dofile(HERE .. "../../tools/fake_model.lua")
local backends = require "tests.tools.backends"

-- Concepts: money, time, storage. Each word belongs to at most one.
local CONCEPTS = {
  money = { "invoice", "invoices", "amount", "amounts", "cents", "billing", "price", "currency" },
  time = { "deadline", "due", "date", "dates", "overdue", "calendar" },
  storage = { "database", "table", "column", "migration", "schema" },
}
local AXIS = {}
for i, name in ipairs({ "money", "time", "storage" }) do
  for _, w in ipairs(CONCEPTS[name]) do AXIS[w] = i end
end

local function embed(text)
  local v = { 0, 0, 0, 0.01 }
  for w in text:lower():gmatch("%a+") do
    if AXIS[w] then v[AXIS[w]] = v[AXIS[w]] + 1 end
  end
  return v
end

local fake

local function configure(with_embed)
  local models = { ["factory/cheap"] = "cheap", ["factory/architect"] = "architect" }
  if with_embed then models["local/embed"] = "embed" end
  assert(router.configure(fake:router_config(models)))
end

before_each(function() fake = assert(fake_model.start{ embed = embed }) end)
after_each(function()
  fake:close()
  backends.cleanup()
end)

local FACTS = { "Invoices store every amount in cents", "The deadline of a task is a calendar day",
                "Schema changes go through a migration" }

local function contents(rows)
  local out = {}
  for i, r in ipairs(rows) do out[i] = r.content end
  return out
end

for _, b in ipairs(backends.LIST) do
  local backend, fresh = b[1], b[2]

  describe("memory recall by embeddings on " .. backend, function()
    it("finds a fact that shares no word with the query, by meaning", function()
      configure(true)
      local d = assert(db.open(fresh()))
      assert(d:migrate())
      local vectors = assert(memory.embed(FACTS))
      assert.equal(3, #vectors)
      assert(d:tx(function(tx) return memory.retain(tx, "backend", FACTS, { vectors = vectors }) end))
      local query = "billing precision for the price"
      assert.same({}, memory.recall(d, { "backend" }, query, 3))
      local q = assert(memory.embed({ query }))[1]
      assert.same({ FACTS[1] }, contents(memory.recall(d, { "backend" }, query, 3, q)))
      -- Words and meaning together: both kinds of match, each list's best first.
      local both = contents(memory.recall(d, { "backend" }, "schema for the price", 3,
                                          memory.embed({ "schema for the price" })[1]))
      assert.equal(2, #both)
      assert.contains(FACTS[3], table.concat(both, "|"))
      assert.contains(FACTS[1], table.concat(both, "|"))
      d:close()
    end)
  end)
end

describe("memory.embed", function()
  it("is nil without a local/embed alias, and recall then uses words", function()
    configure(false)
    assert.equal(nil, memory.embed({ "anything" }))
    assert.equal(0, fake:count())
  end)

  it("is nil when the embeddings call fails", function()
    fake:close()
    fake = assert(fake_model.start())
    configure(true)
    fake:script{ { status = 500, message = "embedder down" } }
    assert.equal(nil, memory.embed({ "anything" }))
  end)
end)

describe("pipeline memory with embeddings", function()
  it("a later objective recalls an earlier stage's fact by meaning", function()
    configure(true)
    local dir = os.tmpname()
    os.remove(dir)
    assert(fs.mkdir_p(dir .. "/teams"))
    assert(fs.mkdir_p(dir .. "/pipelines"))
    assert(fs.write(dir .. "/teams/finance_analysis.lua", [[
return team "finance_analysis" {
  description = "Finance questions.", model = "factory/architect",
  operative "analyst" { prompt = "Answer." },
}]]))
    assert(fs.write(dir .. "/pipelines/two.lua", [[
return pipeline "two" {
  stage "study" { team = "finance_analysis", objective = "Study the ledger." },
  stage "plan" { team = "finance_analysis", objective = "Plan the billing export." },
}]]))
    local project = dsl.project(dir)
    assert.same({}, project:load())
    local d = assert(db.open(backends.sqlite_url()))
    assert(d:migrate())
    local engine = pipeline.engine{ db = d, project = project }
    local function complete(facts)
      return { content = json.encode{ status = "COMPLETE", reasoning = "done", artifact = "ok", blockers = {},
                                      assumptions_made = {}, verified_facts = facts } }
    end
    fake:script{ complete({ FACTS[1] }), complete({}) }
    local run = assert(engine:submit{ pipeline = "two", title = "Export for finance", external_id = "e1" })
    assert.equal("succeeded", (engine:execute(run)))
    local stored = assert(d:query("SELECT embedding FROM memory_facts WHERE content = ?", { FACTS[1] }))
    assert.equal(2, #stored) -- the team's bank and shared-world
    assert.same(embed(FACTS[1]), stored[1].embedding)
    local last
    for _, r in ipairs(fake:requests()) do
      if r.path == "/v1/chat/completions" then last = r.body end
    end
    assert.contains("Recalled memory", last)
    assert.contains(FACTS[1], last)
    engine:close()
    d:close()
    assert(fs.remove(dir, { recursive = true }))
  end)
end)
