-- wrk script: uploads of unique bodies of a fixed size.
--
--   wrk -t2 -c64 -d10s -s bench/upload.lua URL -- METHOD SIZE RUN [suffix]
--
-- Every request carries a body nobody sent before: "<run>-<thread>-<n>-"
-- padded with "x" to SIZE bytes, so a content-addressed store (sos-server,
-- whose ids are SHA-1 of the body) can't answer from a copy it already has.
-- With "suffix", that tag is also appended to the URL's path, so a plain web
-- server (nginx's WebDAV PUT) writes a new file per request too.

local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("tid", threads)
end

function init(args)
   method = args[1] or "POST"
   size = tonumber(args[2] or "4096")
   run = args[3] or "0"
   suffix = args[4] == "suffix"
   pad = string.rep("x", size)
   n = 0
end

function request()
   n = n + 1
   local tag = run .. "-" .. tid .. "-" .. n .. "-"
   local body = tag .. pad:sub(#tag + 1)
   local path = wrk.path
   if suffix then
      path = path .. tag
   end
   return wrk.format(method, path, {["Content-Type"] = "application/octet-stream"},
                     body)
end
