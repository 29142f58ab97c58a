-- Claim a message's record (KEYS[1]).
-- ARGV: 1 owner token, 2 lease ms, 3 '1' if a fingerprint is given, 4 fingerprint.
-- absent -> processing(owner, lease): {'a'}
-- done -> {'d', completion, has fingerprint, fingerprint}
-- processing under our own token (a retried claim whose first reply was lost) -> {'a'}
-- processing under another token -> {'b', remaining lease ms}
-- One HMGET reads every field; a record has no fields only when it is absent (every
-- write sets 's'), so the HSET needs no DEL before it.
local r = redis.call('HMGET', KEYS[1], 's', 'o', 'c', 'f')
local s = r[1]
if not s then
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1], 'f', ARGV[4])
  else
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'a'}
end
if s == 'd' then
  local c = r[3] or 's'
  if r[4] then return {'d', c, '1', r[4]} end
  return {'d', c, '0', ''}
end
if r[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'a'}
end
return {'b', tostring(redis.call('PTTL', KEYS[1]))}
