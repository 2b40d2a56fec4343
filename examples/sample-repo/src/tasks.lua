-- An in-memory task list: add, complete, list.
local M = {}

local tasks, next_id = {}, 1

function M.add(title)
  assert(type(title) == "string" and title ~= "", "a task needs a title")
  local t = { id = next_id, title = title, done = false }
  tasks[t.id], next_id = t, next_id + 1
  return t
end

function M.complete(id)
  local t = assert(tasks[id], "no such task")
  t.done = true
  return t
end

function M.list()
  local out = {}
  for id = 1, next_id - 1 do out[#out + 1] = tasks[id] end
  return out
end

return M
