-- factory.core.fs: file operations (on the thread pool inside a fiber, inline
-- outside one) and the directory watcher.
local fs = require "factory.core.fs"
local fiber = require "factory.fiber"
local time = require "factory.core.time"
local host = require "factory.core.host"

local root

local function tmpdir()
  local p = os.tmpname()
  os.remove(p)
  assert(fs.mkdir_p(p))
  return p
end

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"exit=$?\"")
  local out = p:read("*a")
  p:close()
  return out
end

-- Runs fn in a plain coroutine, which is not a fiber: every call must complete
-- inline, so the coroutine finishes in one resume.
local function inline(fn)
  local co = coroutine.create(fn)
  local ok, err = coroutine.resume(co)
  assert(ok, err)
  assert.equal("dead", coroutine.status(co), "coroutine status after one resume")
end

before_each(function() root = tmpdir() end)
after_each(function() assert(fs.remove(root, { recursive = true })) end)

describe("fs file operations", function()
  it("write then read round-trips binary data, large and empty", function()
    local big = ("\0\1\2binary\255"):rep(100000)
    assert.equal(true, fs.write(root .. "/big", big))
    assert.equal(big, fs.read(root .. "/big"))
    assert(fs.write(root .. "/empty", ""))
    assert.equal("", fs.read(root .. "/empty"))
    assert.equal(true, fs.append(root .. "/log", "one\n"))
    assert(fs.append(root .. "/log", "two\n"))
    assert.equal("one\ntwo\n", fs.read(root .. "/log"))
  end)

  it("every function also works outside a fiber, inline", function()
    inline(function()
      local d = root .. "/in/line"
      assert.equal(true, fs.mkdir_p(d))
      assert.equal(true, fs.write(d .. "/a", "alpha"))
      assert.equal(true, fs.append(d .. "/a", "+"))
      assert.equal("alpha+", fs.read(d .. "/a"))
      assert.same({ "a" }, fs.list(d))
      assert.equal("file", fs.stat(d .. "/a").type)
      assert.equal(6, fs.stat(d .. "/a").size)
      assert.equal(true, fs.exists(d .. "/a"))
      assert.equal(true, fs.rename(d .. "/a", d .. "/b"))
      assert.equal(false, fs.exists(d .. "/a"))
      assert.equal(fs.realpath(root) .. "/in/line/b", fs.realpath(d .. "/b"))
      local _, err, code = fs.read(d .. "/a")
      assert.equal("ENOENT", code)
      assert.equal("ENOENT: no such file or directory: " .. d .. "/a", err)
      assert.equal(true, fs.remove(root .. "/in", { recursive = true }))
      assert.equal(false, fs.exists(root .. "/in"))
    end)
  end)

  it("list returns sorted names without . and ..", function()
    for _, n in ipairs({ "b", "a", ".hidden", "c10", "c2" }) do assert(fs.write(root .. "/" .. n, n)) end
    assert(fs.mkdir_p(root .. "/dir"))
    assert.same({ ".hidden", "a", "b", "c10", "c2", "dir" }, fs.list(root))
    assert.same({}, fs.list(root .. "/dir"))
  end)

  it("list(path, true) also gives each entry's type, without following links", function()
    assert(fs.write(root .. "/b", "b"))
    assert(fs.mkdir_p(root .. "/a"))
    assert(sh(("ln -s %s/a %s/c && mkfifo %s/d"):format(root, root, root)):find("exit=0"))
    local function check()
      local names, types = fs.list(root, true)
      assert.same({ "a", "b", "c", "d" }, names)
      assert.same({ "directory", "file", "link", "other" }, types)
    end
    check()
    inline(check)
  end)

  it("read_many reads regular files up to a size, and false for anything else", function()
    assert(fs.write(root .. "/small", "tiny"))
    assert(fs.write(root .. "/big", ("x"):rep(100)))
    assert(fs.write(root .. "/empty", ""))
    assert(fs.mkdir_p(root .. "/dir"))
    assert(sh(("ln -s %s/small %s/link && mkfifo %s/fifo"):format(root, root, root)):find("exit=0"))
    local function check()
      local paths = {}
      for i, n in ipairs({ "small", "big", "empty", "dir", "link", "fifo", "missing" }) do paths[i] = root .. "/" .. n end
      assert.same({ "tiny", false, "", false, false, false, false }, fs.read_many(paths, 50))
      assert.same({}, fs.read_many({}, 50))
    end
    check()
    inline(check)
    assert.error_matches(function() fs.read_many({ root .. "/small", "" }, 10) end, "expected a list of paths")
  end)

  it("stat reports type, size, mtime and mode; follows links only when asked", function()
    local f = root .. "/f"
    assert(fs.write(f, "12345"))
    os.execute("chmod 640 " .. f)
    local st = fs.stat(f)
    assert.same({ type = "file", size = 5, mode = tonumber("640", 8), mtime = st.mtime }, st)
    assert.near(time.now(), st.mtime, 5, "mtime")
    assert.equal("directory", fs.stat(root).type)
    os.execute(("ln -s %s %s/link"):format(f, root))
    assert.equal("link", fs.stat(root .. "/link").type)
    assert.equal("file", fs.stat(root .. "/link", true).type)
    assert.equal(5, fs.stat(root .. "/link", true).size)
    assert.equal("other", fs.stat("/dev/null", true).type)
  end)

  it("exists sees any entry, including a dangling link", function()
    assert.equal(false, fs.exists(root .. "/nope"))
    assert.equal(false, fs.exists(root .. "/nope/deeper"))
    os.execute(("ln -s %s/nowhere %s/dangling"):format(root, root))
    assert.equal(true, fs.exists(root .. "/dangling"))
  end)

  it("mkdir_p creates every level, is idempotent and applies the mode", function()
    local d = root .. "/a/b/c/"
    assert.equal(true, fs.mkdir_p(d))
    assert.equal(true, fs.mkdir_p(d))
    assert.equal("directory", fs.stat(root .. "/a/b/c").type)
    assert(fs.mkdir_p(root .. "/private", tonumber("700", 8)))
    assert.equal(tonumber("700", 8), fs.stat(root .. "/private").mode)
    assert(fs.write(root .. "/file", "x"))
    local ok, err, code = fs.mkdir_p(root .. "/file/sub")
    assert.is_nil(ok)
    assert.equal("ENOTDIR", code)
    assert.contains(root .. "/file/sub", err)
    local _, err2, code2 = fs.mkdir_p(root .. "/file")
    assert.equal("ENOTDIR", code2)
    assert.contains(root .. "/file", err2)
  end)

  it("rename moves and replaces; realpath resolves links", function()
    assert(fs.write(root .. "/a", "new"))
    assert(fs.write(root .. "/b", "old"))
    assert.equal(true, fs.rename(root .. "/a", root .. "/b"))
    assert.equal("new", fs.read(root .. "/b"))
    local _, err, code = fs.rename(root .. "/a", root .. "/c")
    assert.equal("ENOENT", code)
    assert.equal(("ENOENT: no such file or directory: %s/a -> %s/c"):format(root, root), err)
    os.execute(("ln -s %s/b %s/l"):format(root, root))
    assert.equal(fs.realpath(root) .. "/b", fs.realpath(root .. "/l"))
    assert.equal("/", fs.realpath("/../.."))
    local _, _, rcode = fs.realpath(root .. "/missing")
    assert.equal("ENOENT", rcode)
  end)

  it("set_topdir marks an ext2/3/4 directory (lsattr shows T) and answers ENOTSUP on tmpfs", function()
    -- /tmp, and a directory next to the build (the disk the checkout is on): at least
    -- one is ext4 on the machines this runs on, and each is checked for what it is.
    local disk = "build/fs_spec_topdir." .. root:match("[^/]+$")
    assert(fs.mkdir_p(disk))
    local marked = 0
    for _, dir in ipairs({ root, disk }) do
      local kind = sh("stat -f -c %T " .. dir):match("^(%S+)")
      local ok, err, code = fs.set_topdir(dir)
      if kind == "ext2/ext3" then
        assert.equal(true, ok, err)
        assert.truthy(sh("lsattr -d " .. dir):match("^%S*T%S* "), "lsattr shows the T flag")
        assert.equal(true, fs.set_topdir(dir), "marking again is a no-op")
        marked = marked + 1
      else
        assert.truthy(ok or code == "ENOTSUP", ("on %s: %s"):format(kind, tostring(err)))
      end
    end
    assert(fs.remove(disk, { recursive = true }))
    assert.truthy(marked > 0 or sh("stat -f -c %T /tmp build"):find("ext") == nil, "an ext4 directory was marked")
    if fs.exists("/dev/shm") then
      local shm = "/dev/shm/fs_spec_topdir." .. root:match("[^/]+$")
      assert(fs.mkdir_p(shm))
      local ok, err, code = fs.set_topdir(shm)
      fs.remove(shm, { recursive = true })
      assert.equal(nil, ok)
      assert.equal("ENOTSUP", code)
      assert.contains(shm, err)
    end
    local _, _, code = fs.set_topdir(root .. "/missing")
    assert.equal("ENOENT", code)
  end)

  it("errors carry the errno code, its text and the path", function()
    local cases = {
      { function() return fs.read(root .. "/missing") end, "ENOENT", "no such file or directory", root .. "/missing" },
      { function() return fs.read(root) end, "EISDIR", "illegal operation on a directory", root },
      { function() return fs.list(root .. "/f") end, "ENOTDIR", "not a directory", root .. "/f" },
      { function() return fs.stat(root .. "/missing") end, "ENOENT", "no such file or directory", root .. "/missing" },
      { function() return fs.write(root .. "/no/dir/x", "x") end, "ENOENT", "no such file or directory", root .. "/no/dir/x" },
      { function() return fs.append(root .. "/no/x", "x") end, "ENOENT", "no such file or directory", root .. "/no/x" },
      { function() return fs.remove(root .. "/d") end, "ENOTEMPTY", "directory not empty", root .. "/d" },
      { function() return fs.remove(root .. "/missing") end, "ENOENT", "no such file or directory", root .. "/missing" },
      { function() return fs.remove(root .. "/missing", { recursive = true }) end, "ENOENT", "no such file or directory", root .. "/missing" },
    }
    assert(fs.write(root .. "/f", "x"))
    assert(fs.mkdir_p(root .. "/d"))
    assert(fs.write(root .. "/d/x", "x"))
    for i, c in ipairs(cases) do
      local v, err, code = c[1]()
      assert.is_nil(v, "case " .. i)
      assert.equal(c[2], code, "case " .. i)
      assert.equal(("%s: %s: %s"):format(c[2], c[3], c[4]), err, "case " .. i)
    end
  end)

  it("misuse raises", function()
    assert.error_matches(function() fs.read() end, "bad argument #1")
    assert.error_matches(function() fs.read("") end, "empty path")
    assert.error_matches(function() fs.read("a\0b") end, "NUL")
    assert.error_matches(function() fs.write(root .. "/x") end, "bad argument #2")
    assert.error_matches(function() fs.remove(root, "yes") end, "bad argument #2")
    assert.error_matches(function() fs.mkdir_p(root, -1) end, "mode")
    assert.error_matches(function() fs.watch(root, { debounce = -1 }) end, "debounce")
  end)
end)

describe("fs.write is atomic", function()
  it("leaves no temporary file and keeps the file's mode", function()
    local f = root .. "/conf.lua"
    assert(fs.write(f, "v1"))
    os.execute("chmod 600 " .. f)
    for i = 2, 20 do assert(fs.write(f, "v" .. i)) end
    assert.equal("v20", fs.read(f))
    assert.same({ "conf.lua" }, fs.list(root))
    assert.equal(tonumber("600", 8), fs.stat(f).mode)
    assert.is_nil(fs.write(root .. "/missing/x", "x"))
    assert.same({ "conf.lua" }, fs.list(root))
  end)

  it("a concurrent reader sees the old or the new content, never a mix", function()
    local f = root .. "/data"
    local a, b = ("a"):rep(512 * 1024), ("b"):rep(512 * 1024 + 7)
    assert(fs.write(f, a))
    local done, reads, bad = false, 0, nil
    local reader = fiber.spawn(function()
      while not done do
        local s, err = fs.read(f)
        reads = reads + 1
        if s ~= a and s ~= b then bad = err or ("a mix of %d bytes"):format(#s) end
      end
    end)
    for i = 1, 40 do assert(fs.write(f, i % 2 == 0 and a or b)) end
    done = true
    assert(fiber.join(reader, 10))
    assert.is_nil(bad, "torn read")
    assert.truthy(reads > 1, "reads")
    assert.same({ "data" }, fs.list(root))
  end)
end)

describe("fs.remove", function()
  it("recursive removal deletes links, never what they point to", function()
    local outside = tmpdir()
    assert(fs.write(outside .. "/keep", "precious"))
    assert(fs.mkdir_p(root .. "/tree/sub/deeper"))
    assert(fs.write(root .. "/tree/sub/deeper/f", "x"))
    assert(fs.write(root .. "/tree/.dot", "x"))
    os.execute(("ln -s %s %s/tree/dirlink"):format(outside, root))
    os.execute(("ln -s %s/keep %s/tree/sub/filelink"):format(outside, root))
    assert.equal(true, fs.remove(root .. "/tree", { recursive = true }))
    assert.equal(false, fs.exists(root .. "/tree"))
    assert.equal("precious", fs.read(outside .. "/keep"))
    assert.same({ "keep" }, fs.list(outside))
    -- A link given directly is removed as a link too.
    os.execute(("ln -s %s %s/top"):format(outside, root))
    assert(fs.remove(root .. "/top", { recursive = true }))
    assert.same({ "keep" }, fs.list(outside))
    assert(fs.remove(outside, { recursive = true }))
  end)

  it("removes a file or an empty directory without recursive", function()
    assert(fs.write(root .. "/f", "x"))
    assert(fs.mkdir_p(root .. "/d"))
    assert.equal(true, fs.remove(root .. "/f"))
    assert.equal(true, fs.remove(root .. "/d"))
    assert.same({}, fs.list(root))
  end)
end)

describe("fs jobs and fibers", function()
  it("a fiber cancelled while its job runs leaves the job to finish on its own", function()
    assert(fs.write(root .. "/big", ("x"):rep(4 * 1024 * 1024)))
    local fibers = {}
    for i = 1, 8 do fibers[i] = fiber.spawn(function() return fs.read(root .. "/big") end) end
    fiber.yield()
    for _, f in ipairs(fibers) do f:cancel("changed my mind") end
    -- The pool still delivers later jobs correctly.
    assert.equal(4 * 1024 * 1024, #fs.read(root .. "/big"))
    for _, f in ipairs(fibers) do assert.equal("cancelled", (f:status())) end
  end)

  it("many jobs run concurrently on the pool", function()
    local fibers = {}
    for i = 1, 50 do
      fibers[i] = fiber.spawn(function()
        assert(fs.write(("%s/f%02d"):format(root, i), tostring(i)))
        return fs.read(("%s/f%02d"):format(root, i))
      end)
    end
    local ok, outcomes = fiber.all(fibers, 10)
    assert.truthy(ok)
    for i = 1, 50 do assert.equal(tostring(i), outcomes[i][1]) end
    assert.equal(50, #fs.list(root))
  end)
end)

describe("fs.watch", function()
  it("batches changes until no event came for `debounce` seconds", function()
    local w = assert(fs.watch(root, { debounce = 0.1 }))
    local writer = fiber.spawn(function()
      for i = 1, 8 do
        assert(fs.write(root .. "/f" .. (i % 3), tostring(i)))
        fiber.sleep(0.03)
      end
    end)
    local t0 = time.monotonic()
    local changed = assert(w:next(5))
    local waited = time.monotonic() - t0
    assert(fiber.join(writer, 5))
    -- The writer kept producing events every 30 ms for ~240 ms: one batch, delivered
    -- only after it went quiet.
    assert.truthy(waited >= 0.3, ("returned after %.3f s, before the writes stopped"):format(waited))
    for _, n in ipairs({ "f0", "f1", "f2" }) do
      local found = false
      for _, c in ipairs(changed) do found = found or c == n end
      assert.truthy(found, n .. " in " .. table.concat(changed, ","))
    end
    local sorted = { unpack(changed) }
    table.sort(sorted)
    assert.same(sorted, changed)
    w:close()
  end)

  it("a file written without pause still yields a batch after a second", function()
    local w = assert(fs.watch(root, { debounce = 0.1 }))
    local writing = true
    local writer = fiber.spawn(function()
      while writing do
        assert(fs.append(root .. "/busy.log", "line\n"))
        fiber.sleep(0.02)
      end
    end)
    local t0 = time.monotonic()
    assert.same({ "busy.log" }, w:next(5))
    local waited = time.monotonic() - t0
    writing = false
    assert(fiber.join(writer, 5))
    assert.truthy(waited > 0.9 and waited < 1.4, ("batch after %.3f s"):format(waited))
    w:close()
  end)

  it("separate bursts are separate batches, kept until next() is called", function()
    local w = assert(fs.watch(root, { debounce = 0.02 }))
    assert(fs.append(root .. "/one", "1"))
    fiber.sleep(0.15)
    assert.same({ "one" }, w:next(2))
    assert(fs.append(root .. "/two", "2"))
    assert(fs.append(root .. "/two", "2"))
    local t0 = time.monotonic()
    assert.same({ "two" }, w:next(2))
    assert.truthy(time.monotonic() - t0 >= 0.015, "debounce respected")
    w:close()
  end)

  it("reports a file replaced by rename, as editors save", function()
    assert(fs.write(root .. "/conf.lua", "old"))
    local w = assert(fs.watch(root, { debounce = 0.02 }))
    local elsewhere = tmpdir()
    assert(fs.write(elsewhere .. "/conf.lua", "new"))
    assert(fs.rename(elsewhere .. "/conf.lua", root .. "/conf.lua"))
    assert.same({ "conf.lua" }, w:next(2))
    -- And with fs.write's own temp-file-and-rename in the same directory.
    assert(fs.write(root .. "/conf.lua", "newer"))
    local changed = assert(w:next(2))
    assert.equal("conf.lua", changed[#changed])
    assert.equal("newer", fs.read(root .. "/conf.lua"))
    w:close()
    assert(fs.remove(elsewhere, { recursive = true }))
  end)

  it("reports deleted files", function()
    assert(fs.write(root .. "/gone", "x"))
    local w = assert(fs.watch(root, { debounce = 0.01 }))
    assert(fs.remove(root .. "/gone"))
    assert.same({ "gone" }, w:next(2))
    w:close()
  end)

  it("next times out with ETIMEDOUT", function()
    local w = assert(fs.watch(root))
    local t0 = time.monotonic()
    local v, err, code = w:next(0.1)
    assert.is_nil(v)
    assert.equal("ETIMEDOUT", code)
    assert.matches("^ETIMEDOUT: ", err)
    assert.near(0.1, time.monotonic() - t0, 0.08)
    -- The watcher is still usable after a timeout.
    assert(fs.append(root .. "/x", "x"))
    assert.same({ "x" }, w:next(2))
    w:close()
  end)

  it("close is idempotent, wakes a waiting fiber and makes next raise", function()
    local w = assert(fs.watch(root))
    local waiter = fiber.spawn(function() return w:next() end)
    fiber.sleep(0.02)
    assert.error_matches(function() w:next(0.1) end, "already waiting")
    w:close()
    w:close()
    local ok, v, err, code = fiber.join(waiter, 2)
    assert.truthy(ok)
    assert.is_nil(v)
    assert.equal("ECANCELED", code)
    assert.matches("^ECANCELED: ", err)
    assert.error_matches(function() w:next() end, "closed")
    assert.equal("watcher (closed)", tostring(w))
  end)

  it("a cancelled waiter lets the watcher be used again", function()
    local w = assert(fs.watch(root, { debounce = 0.01 }))
    local waiter = fiber.spawn(function() return w:next() end)
    fiber.sleep(0.02)
    waiter:cancel()
    assert(fs.append(root .. "/after", "x"))
    assert.same({ "after" }, w:next(2))
    w:close()
  end)

  it("fails cleanly on a missing directory; next needs a fiber", function()
    local w, err, code = fs.watch(root .. "/missing")
    assert.is_nil(w)
    assert.equal("ENOENT", code)
    assert.equal("ENOENT: no such file or directory: " .. root .. "/missing", err)
    local w2 = assert(fs.watch(root))
    local co = coroutine.create(function() return w2:next(0.1) end)
    local ok, rerr = coroutine.resume(co)
    assert.falsy(ok)
    assert.contains("must be called from a fiber", rerr)
    w2:close()
  end)

  it("an unreferenced watcher is collected and closed", function()
    for _ = 1, 20 do assert(fs.watch(root)) end
    collectgarbage()
    collectgarbage()
    local w = assert(fs.watch(root, { debounce = 0 }))
    assert(fs.append(root .. "/x", "x"))
    assert.same({ "x" }, w:next(2))
    w:close()
  end)

  it("a forgotten watcher does not keep the process alive", function()
    local out = sh(("timeout 10 %s -e \"W = require('factory.core.fs').watch('%s'); print('started')\""):format(host.exe, root))
    assert.equal("started\nexit=0\n", out)
  end)
end)

describe("fs confined to a root (read_beneath, write_beneath)", function()
  local outside

  local function setup()
    outside = tmpdir()
    assert(fs.write(outside .. "/secret", "outside"))
    assert(fs.mkdir_p(root .. "/src"))
    assert(fs.write(root .. "/src/a.c", "int a;\n"))
    sh(("ln -s %s %s/out && ln -s %s/secret %s/src/leak && ln -s a.c %s/src/alias && ln -s ../.. %s/src/up"):format(
      outside, root, outside, root, root, root))
  end

  local function cleanup() assert(fs.remove(outside, { recursive = true })) end

  it("reads inside the root, also through a link that stays inside", function()
    setup()
    assert.equal("int a;\n", fs.read_beneath(root, "src/a.c"))
    assert.equal("int a;\n", fs.read_beneath(root, "src/alias"))
    assert.equal("int a;\n", fs.read_beneath(root, "src/../src/a.c"))
    local _, err, code = fs.read_beneath(root, "src")
    assert.equal("EISDIR", code)
    assert.matches("src$", err)
    cleanup()
  end)

  it("refuses every way out with EXDEV, in a fiber and inline", function()
    setup()
    local escapes = { "../x", "/etc/passwd", "out/secret", "src/leak", "src/up/etc/passwd", "src/../../x" }
    for _, rel in ipairs(escapes) do
      local v, err, code = fs.read_beneath(root, rel)
      assert.equal(nil, v)
      assert.equal("EXDEV", code, rel .. ": " .. tostring(err))
    end
    inline(function()
      local _, _, code = fs.read_beneath(root, "src/leak")
      assert.equal("EXDEV", code)
    end)
    cleanup()
  end)

  it("writes atomically inside the root, making parents when asked", function()
    setup()
    assert.equal(true, fs.write_beneath(root, "src/a.c", "int b;\n"))
    assert.equal("int b;\n", fs.read(root .. "/src/a.c"))
    local _, _, code = fs.write_beneath(root, "new/deep/f.txt", "x")
    assert.equal("ENOENT", code)
    assert.equal(true, fs.write_beneath(root, "new/deep/f.txt", "x", { parents = true }))
    assert.equal("x", fs.read(root .. "/new/deep/f.txt"))
    assert.same({ "a.c", "alias", "leak", "up" }, fs.list(root .. "/src"))
    cleanup()
  end)

  it("never writes outside: escaping paths, links as directories, links as the file", function()
    setup()
    for _, rel in ipairs({ "../x", "/tmp/x", "out/secret", "out/new", "src/up/x", "out/sub/f" }) do
      local v, err, code = fs.write_beneath(root, rel, "pwned", { parents = true })
      assert.equal(nil, v)
      assert.equal("EXDEV", code, rel .. ": " .. tostring(err))
    end
    assert.same({ "secret" }, fs.list(outside))
    assert.equal("outside", fs.read(outside .. "/secret"))
    -- A link named as the file is replaced by the file, its target untouched.
    assert.equal(true, fs.write_beneath(root, "src/leak", "replaced"))
    assert.equal("file", fs.stat(root .. "/src/leak").type)
    assert.equal("outside", fs.read(outside .. "/secret"))
    local _, _, code = fs.write_beneath(root, "src/..", "x")
    assert.equal("EISDIR", code)
    cleanup()
  end)
end)
