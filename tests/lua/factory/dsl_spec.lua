-- The team and pipeline DSL (factory.dsl) through `factory check` (acceptance 4):
-- the shipped definitions pass; each of the broken ones is reported with file:line.
local defs = require "factory.defs"
local dsl = require "factory.dsl"
local host = require "factory.core.host"

local HERE = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$")
local ROOT = HERE .. "../../../"
local BROKEN = HERE .. "fixtures/broken_defs"

-- One per mistake: file, line, message.
local EXPECTED = {
  { "teams/asks_itself.lua", 2, 'team "asks_itself": may_ask names the team itself' },
  { "teams/bad_limit.lua", 6, 'operative "second": max_iterations must be a positive integer, got "ten"' },
  { "teams/cli_agent_no_command.lua", 5, 'operative "worker" agent: cli "gemini" is not a preset (claude, codex, '
    .. 'aider): give its command = { ... }' },
  { "teams/cli_agent_typo.lua", 5, "operative \"worker\" agent: unknown field 'heartbeat_timout'" },
  { "teams/duplicate_operative.lua", 6, 'team "duplicate_operative": operative "worker" is defined twice' },
  { "teams/may_ask_nobody.lua", 2, 'team "may_ask_nobody": may_ask names no team: "astrology"' },
  { "teams/misnamed.lua", 2, 'team "renamed" must be defined in renamed.lua' },
  { "teams/misspelt_field.lua", 5, "operative \"worker\": unknown field 'promt'" },
  { "teams/no_operative.lua", 3, 'team "no_operative" has no operative (operative "name" { prompt = ... })' },
  { "teams/no_prompt.lua", 5, 'operative "worker" of team "no_prompt" has no prompt (prompt = [[...]])' },
  { "teams/short_command_timeout.lua", 5, 'operative "worker": command_timeout must be a number 1 or more, got 0' },
  { "teams/syntax_error.lua", 4, "unexpected symbol near '='" },
  { "teams/unknown_alias.lua", 2, 'team "unknown_alias": unknown model alias "factory/genius" (known: '
    .. "factory/architect, factory/cheap, factory/coder, factory/fast, local/embed; or add it to models {} in factory.lua)" },
  { "teams/unknown_tool.lua", 5, 'operative "worker": unknown tool "teleport"' },
  { "teams/wrong_dsl.lua", 2, "undefined global 'stage'" },
  { "pipelines/bad_limits.lua", 2, "pipeline \"bad_limits\": unknown limit 'max_retries'" },
  { "pipelines/later_input.lua", 4, 'stage "build": inputs names no earlier stage: "verify"' },
  { "pipelines/returns_nothing.lua", 1, "must return a pipeline definition (it returned nothing)" },
  { "pipelines/string_budget.lua", 2, 'pipeline "string_budget" limits: budget_usd must be a number 0 or more, got "5"' },
  { "pipelines/unknown_team.lua", 4, 'stage "build": unknown team "wizards"' },
}

describe("factory check", function()
  it("passes the shipped teams and pipelines", function()
    assert.same({}, defs.check(ROOT))
    local p = dsl.project(ROOT)
    assert.same({}, p:load())
    assert.equal(17, #p.teams:names())
    assert.same({ "bugfix", "feature", "full" }, p.pipelines:names())
    assert.equal(5, #p.pipelines:get("feature").stages)
    assert.equal(17, #p.pipelines:get("full").stages)
  end)

  it("reports each broken definition with file:line", function()
    local want = {}
    for i, e in ipairs(EXPECTED) do want[i] = ("%s/%s:%d: %s"):format(BROKEN, e[1], e[2], e[3]) end
    assert.truthy(#want >= 15)
    assert.same(want, defs.check(BROKEN))
  end)

  it("checks model aliases against factory.lua when there is one", function()
    local p = dsl.project(ROOT, { aliases = dsl.aliases_of{ providers = { ollama = {} }, models = { ["factory/fast"] = {} } } })
    local problems = p:load()
    assert.matches('teams/api_design%.lua:1: team "api_design": unknown model alias "factory/architect" %(known: factory/fast; or add it to models {} in factory.lua%)$',
                   problems[1])
    p = dsl.project(ROOT, { aliases = dsl.aliases_of{ providers = { ollama = {} }, models = {} } })
    problems = p:load()
    assert.matches('teams/api_design%.lua:1: team "api_design": unknown model alias "factory/architect" '
      .. '%(factory%.lua declares no model aliases: add it to its models {}%)$', problems[1])
  end)

  it("runs as `factory check` and exits 1 on problems", function()
    local p = io.popen(("%s check %s 2>&1; echo \"exit=$?\""):format(host.exe, BROKEN))
    local out = p:read("*a")
    p:close()
    assert.contains("broken_defs/teams/no_prompt.lua:5: ", out)
    assert.matches("exit=1\n$", out)
  end)
end)
