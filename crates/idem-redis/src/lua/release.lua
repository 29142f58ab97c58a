-- Give up our own claim: deletes the record and its start counter. ARGV: 1 owner token.
local r = redis.call('HMGET', KEYS[1], 's', 'o')
if r[1] == 'p' and r[2] == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
