-- wrk script: GETs of blobs chosen at random among many ids (no hot file).
--
--   wrk -t2 -c64 -d10s --latency -s bench/get.lua URL -- IDS PREFIX LAYOUT SEED
--
-- IDS is a file of ids, one a line (content ids: SHA-1 hex of the bytes).
-- Each request asks for one of them, chosen by math.random from a generator
-- seeded with SEED and the wrk thread's number, so two runs with the same
-- arguments ask for the same ids in the same order, whichever server answers.
-- The path is PREFIX followed by
--   LAYOUT "flat":    <id>                   (blob-server /blob/, sos /fetch/)
--   LAYOUT "sharded": <id[0:2]>/<id[2:4]>/<id>  (a web server on the store tree)
-- Requests are formatted once, in init, so the client's cost per request is
-- the same for every server.

local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("tid", threads)
end

function init(args)
   local ids_file = args[1]
   local prefix = args[2] or "/blob/"
   local sharded = args[3] == "sharded"
   local seed = tonumber(args[4] or "1")
   reqs = {}
   for id in io.lines(ids_file) do
      if #id > 0 then
         local path = prefix .. id
         if sharded then
            path = prefix .. id:sub(1, 2) .. "/" .. id:sub(3, 4) .. "/" .. id
         end
         reqs[#reqs + 1] = wrk.format("GET", path)
      end
   end
   if #reqs == 0 then
      error("no ids in " .. tostring(ids_file))
   end
   count = #reqs
   math.randomseed(seed * 1000 + tid)
end

function request()
   return reqs[math.random(count)]
end
