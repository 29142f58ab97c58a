-- processing(owner) -> done(completion), kept ARGV[3] ms; clears the start counter.
-- ARGV: 1 owner token, 2 completion ('s' succeeded, 'p' poisoned), 3 retention ms.
-- A retried completion that finds its own completion already written succeeds.
local s = redis.call('HGET', KEYS[1], 's')
if s == 'p' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('HSET', KEYS[1], 's', 'd', 'c', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
if s == 'd' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] and redis.call('HGET', KEYS[1], 'c') == ARGV[2] then
  return 1
end
return 0
