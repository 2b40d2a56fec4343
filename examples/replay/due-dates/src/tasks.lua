-- An in-memory task list: add, complete, due dates, list (overdue first).
local M = {}

local tasks, next_id = {}, 1

local DAYS_IN_MONTH = { 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 }

-- A due date is a calendar day "YYYY-MM-DD" (nil: none). ISO dates compare
-- correctly as strings, so they are kept as they are.
function M.validate_due(due)
  if due == nil then return true end
  local y, m, d = tostring(due):match("^(%d%d%d%d)%-(%d%d)%-(%d%d)$")
  m, d = tonumber(m), tonumber(d)
  return y ~= nil and m >= 1 and m <= 12 and d >= 1 and d <= DAYS_IN_MONTH[m]
end

function M.add(title, due)
  assert(type(title) == "string" and title ~= "", "a task needs a title")
  assert(M.validate_due(due), "a due date is a day YYYY-MM-DD")
  local t = { id = next_id, title = title, done = false, due = due }
  tasks[t.id], next_id = t, next_id + 1
  return t
end

function M.complete(id)
  local t = assert(tasks[id], "no such task")
  t.done = true
  return t
end

-- Sets the due date of a task, or clears it (nil).
function M.set_due(id, due)
  local t = assert(tasks[id], "no such task")
  assert(M.validate_due(due), "a due date is a day YYYY-MM-DD")
  t.due = due
  return t
end

-- With today ("YYYY-MM-DD"): open tasks past their due date first, the oldest due
-- date first, then the rest in id order. Without today: id order, as before.
function M.list(today)
  local overdue, rest = {}, {}
  for id = 1, next_id - 1 do
    local t = tasks[id]
    if today and not t.done and t.due and t.due < today then
      overdue[#overdue + 1] = t
    else
      rest[#rest + 1] = t
    end
  end
  table.sort(overdue, function(a, b)
    if a.due ~= b.due then return a.due < b.due end
    return a.id < b.id
  end)
  for _, t in ipairs(rest) do overdue[#overdue + 1] = t end
  return overdue
end

return M
