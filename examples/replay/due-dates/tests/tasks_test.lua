package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../src/?.lua;" .. package.path
local tasks = require "tasks"
local t = tasks.add("write the demo")
assert(t.id == 1 and not t.done and t.due == nil)
assert(tasks.complete(1).done)
assert(#tasks.list() == 1)

-- due dates
assert(tasks.add("file the taxes", "2026-04-15").due == "2026-04-15")
assert(not pcall(tasks.add, "no such day", "2026-02-30"))
assert(not pcall(tasks.add, "not a date", "15/04/2026"))
assert(tasks.set_due(2, "2026-03-01").due == "2026-03-01")
assert(not pcall(tasks.set_due, 2, "2026-13-01"))
tasks.add("renew the passport", "2026-01-10")
tasks.add("water the plants")
assert(tasks.set_due(4, "2026-05-01").due == "2026-05-01")
assert(tasks.set_due(4, nil).due == nil)

-- overdue open tasks first, oldest first; the rest in id order
local order = {}
for _, task in ipairs(tasks.list("2026-03-15")) do order[#order + 1] = task.id end
assert(table.concat(order, ",") == "3,2,1,4", table.concat(order, ","))
-- without today, id order as before
order = {}
for _, task in ipairs(tasks.list()) do order[#order + 1] = task.id end
assert(table.concat(order, ",") == "1,2,3,4")
print("tasks: ok")
