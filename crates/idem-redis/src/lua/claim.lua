-- Claim a message's record (KEYS[1]).
-- ARGV: 1 owner token, 2 lease ms, 3 '1' if a fingerprint is given, 4 fingerprint.
-- absent -> processing(owner, lease): {'a'}
-- done -> {'d', completion, has fingerprint, fingerprint}
-- processing under our own token (a retried claim whose first reply was lost) -> {'a'}
-- processing under another token -> {'b', remaining lease ms}
local s = redis.call('HGET', KEYS[1], 's')
if not s then
  redis.call('DEL', KEYS[1])
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1], 'f', ARGV[4])
  else
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'a'}
end
if s == 'd' then
  local c = redis.call('HGET', KEYS[1], 'c') or 's'
  local f = redis.call('HGET', KEYS[1], 'f')
  if f then return {'d', c, '1', f} end
  return {'d', c, '0', ''}
end
if redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'a'}
end
return {'b', tostring(redis.call('PTTL', KEYS[1]))}
