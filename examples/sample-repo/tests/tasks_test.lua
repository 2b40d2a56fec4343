package.path = debug.getinfo(1, "S").source:match("^@(.-)[^/]*$") .. "../src/?.lua;" .. package.path
local tasks = require "tasks"
local t = tasks.add("write the demo")
assert(t.id == 1 and not t.done)
assert(tasks.complete(1).done)
assert(#tasks.list() == 1)
print("tasks: ok")
