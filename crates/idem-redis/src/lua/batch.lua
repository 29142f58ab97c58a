-- Runs one or more operations (the functions in OPS, defined above from the other
-- .lua files). Operation i owns KEYS[2i-1] (its record) and KEYS[2i] (its start
-- counter). ARGV holds, per operation: its name, its argument count n, then its n
-- arguments. The reply has one entry per operation, in order: the operation's own
-- reply, or {'e', message} if that operation raised an error (a wrong key type, ...),
-- which fails that operation only.
local out = {}
local a = 1
for i = 1, #KEYS, 2 do
  local name = ARGV[a]
  local op = OPS[name]
  local n = tonumber(ARGV[a + 1])
  local args = {}
  for j = 1, n do
    args[j] = ARGV[a + 1 + j]
  end
  a = a + 2 + n
  if op == nil then
    out[#out + 1] = {'e', 'unknown operation ' .. tostring(name)}
  else
    local ok, reply = pcall(op, {KEYS[i], KEYS[i + 1]}, args)
    if ok then
      out[#out + 1] = reply
    elseif type(reply) == 'table' and reply.err then
      out[#out + 1] = {'e', reply.err}
    else
      out[#out + 1] = {'e', tostring(reply)}
    end
  end
end
return out
