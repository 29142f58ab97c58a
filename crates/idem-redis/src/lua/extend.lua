-- Extend our own lease. ARGV: 1 owner token, 2 lease ms. 1 if extended, else 0.
local r = redis.call('HMGET', KEYS[1], 's', 'o')
if r[1] == 'p' and r[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
