-- processing(owner) -> done(completion), kept ARGV[3] ms; clears the start counter.
-- ARGV: 1 owner token, 2 completion ('s' succeeded, 'p' poisoned), 3 retention ms.
-- A retried completion that finds its own completion already written succeeds.
local r = redis.call('HMGET', KEYS[1], 's', 'o', 'c')
if r[2] ~= ARGV[1] then
  return 0
end
if r[1] == 'p' then
  redis.call('HSET', KEYS[1], 's', 'd', 'c', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
if r[1] == 'd' and r[3] == ARGV[2] then
  return 1
end
return 0
