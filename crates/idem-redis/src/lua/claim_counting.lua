-- claim.lua, also counting starts in KEYS[2] (the message's start counter, kept
-- ARGV[5] ms). An acquisition adds one and reports the earlier count: {'a', n}. A
-- claim retried under its own token reports the count it saw the first time.
local r = redis.call('HMGET', KEYS[1], 's', 'o', 'c', 'f')
local s = r[1]
if not s then
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1], 'f', ARGV[4])
  else
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  -- A first start (no counter yet) costs one command.
  if redis.call('SET', KEYS[2], 1, 'PX', ARGV[5], 'NX') then
    return {'a', '0'}
  end
  local n = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  redis.call('SET', KEYS[2], n + 1, 'PX', ARGV[5])
  return {'a', tostring(n)}
end
if s == 'd' then
  local c = r[3] or 's'
  if r[4] then return {'d', c, '1', r[4]} end
  return {'d', c, '0', ''}
end
if r[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local n = tonumber(redis.call('GET', KEYS[2]) or '1') or 1
  return {'a', tostring(math.max(n - 1, 0))}
end
return {'b', tostring(redis.call('PTTL', KEYS[1]))}
