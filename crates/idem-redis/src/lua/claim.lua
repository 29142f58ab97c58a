-- Claim a message's record (KEYS[1]); as `claim_counting` (ARGV[5] given), also count
-- its starts in KEYS[2] (the message's start counter, kept ARGV[5] ms).
-- ARGV: 1 owner token, 2 lease ms, 3 '1' if a fingerprint is given, 4 fingerprint,
-- 5 (counting only) start counter memory ms.
-- absent -> processing(owner, lease): {'a'}; counting, the earlier starts: {'a', n}
-- done -> {'d', completion, has fingerprint, fingerprint}
-- processing under our own token (a retried claim whose first reply was lost) -> {'a'};
--   counting, the count it saw the first time: {'a', n}
-- processing under another token -> {'b', remaining lease ms}
-- One HMGET reads every field; a record has no fields only when it is absent (every
-- write sets 's'), so the HSET needs no DEL before it.
local counting = ARGV[5] ~= nil
local r = redis.call('HMGET', KEYS[1], 's', 'o', 'c', 'f')
local s = r[1]
if not s then
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1], 'f', ARGV[4])
  else
    redis.call('HSET', KEYS[1], 's', 'p', 'o', ARGV[1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  if not counting then return {'a'} end
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
  if not counting then return {'a'} end
  local n = tonumber(redis.call('GET', KEYS[2]) or '1') or 1
  return {'a', tostring(math.max(n - 1, 0))}
end
return {'b', tostring(redis.call('PTTL', KEYS[1]))}
