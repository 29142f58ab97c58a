-- done(poisoned) -> processing(owner, lease). ARGV: 1 owner token, 2 lease ms.
-- A retried reopen that finds its own claim succeeds.
local s = redis.call('HGET', KEYS[1], 's')
if s == 'd' and redis.call('HGET', KEYS[1], 'c') == 'p' then
  redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1])
  redis.call('HDEL', KEYS[1], 'c')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if s == 'p' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  return 1
end
return 0
