-- Give up our own claim: deletes the record and its start counter. ARGV: 1 owner token.
if redis.call('HGET', KEYS[1], 's') == 'p' and redis.call('HGET', KEYS[1], 'o') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
