-- claim.lua, also counting starts in KEYS[2] (the message's start counter, kept
-- ARGV[5] ms). An acquisition adds one and reports the earlier count: {'a', n}. A
-- claim retried under its own token reports the count it saw the first time.
local s = redis.call('HGET', KEYS[1], 's')
if not s then
  redis.call('DEL', KEYS[1])
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1], 'f', ARGV[4])
  else
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local n = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  redis.call('SET', KEYS[2], n + 1, 'PX', ARGV[5])
  return {'a', tostring(n)}
end
if s == 'd' then
  local c = redis.call('HGET', KEYS[1], 'c') or 's'
  local f = redis.call('HGET', KEYS[1], 'f')
  if f then return {'d', c, '1', f} end
  return {'d', c, '0', ''}
end
if redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local n = tonumber(redis.call('GET', KEYS[2]) or '1') or 1
  return {'a', tostring(math.max(n - 1, 0))}
end
return {'b', tostring(redis.call('PTTL', KEYS[1]))}
