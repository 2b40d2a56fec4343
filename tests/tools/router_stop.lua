-- router.stop in a process of its own (tests/core/router_spec.lua): it stops the
-- router for good, as the process ending after it does. Prints what it saw, one
-- "name value" line each, then returns as the process ends with calls still waiting.
local router = require "factory.router"
local fiber = require "factory.fiber"
local fake_model = dofile(arg[0]:match("^(.-)[^/]*$") .. "fake_model.lua")

io.stdout:setvbuf("line")
local fake = fake_model.start{ port = 0 }
assert(router.configure{
  providers = { a = { base_url = fake:url() .. "/v1", api_key = fake_model.API_KEY, max_concurrency = 1 } },
  models = { solo = { "a/gpt-test" }, queued = { "a/gpt-test" } },
  prices = { ["a/gpt-test"] = { input = 3, output = 15 } },
  budgets = { teams = { held = { usd_per_day = 1000 } } },
})
-- The ledger (factory.budgets) is slow to answer for team held: its call is stopped
-- while it waits there, and sending it afterwards wakes nobody.
router.use_ledger(function(ask)
  if ask.team == "held" then fiber.sleep(0.3) end
  return 1
end)
local seen = {}
router.on_call(function(r) seen[#seen + 1] = r end)
fake:script{ { fault = "hang" } }

local function chat()
  return router.chat({ model = "solo", messages = { { role = "user", content = ("hello "):rep(200) } } },
                     { team = "qa", run = "7" })
end
local first = fiber.spawn(chat)
while fake:count() < 1 do fiber.sleep(0.005) end
-- A second call waits for the provider's one place; a third for the ledger.
local queued = fiber.spawn(chat)
local pending = fiber.spawn(function()
  return router.chat({ model = "solo", messages = { { role = "user", content = "hi" } } }, { team = "held" })
end)
fiber.sleep(0.05)
print("stopped " .. router.stop("the process is ending"))
print("records " .. #seen)
table.sort(seen, function(a, b) return a.prompt_tokens > b.prompt_tokens end)
local r = seen[1]
print("record " .. table.concat({ r.status, r.code, r.error, r.team, r.run }, "|"))
print("charged " .. tostring(r.prompt_tokens > 0 and r.cost_usd > 0))
print("queued_charged " .. tostring(seen[2].cost_usd > 0) .. " " .. seen[2].status)
local later = fiber.spawn(chat)
fiber.sleep(0.5)
print("first_waits " .. tostring(first:status() ~= "dead" and queued:status() ~= "dead"))
print("pending_waits " .. tostring(pending:status() ~= "dead"))
print("later_waits " .. tostring(later:status() ~= "dead"))
print("upstream_requests " .. fake:count())
print("records_after " .. #seen)
fake:close()
