-- Extend our own lease. ARGV: 1 owner token, 2 lease ms. 1 if extended, else 0.
if redis.call('HGET', KEYS[1], 's') == 'p' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
