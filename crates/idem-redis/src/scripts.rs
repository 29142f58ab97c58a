//! The Lua scripts behind every state change, one `.lua` file each (in `src/lua/`).
//! Each script touches only `KEYS[1]` (the record) and `KEYS[2]` (its start counter),
//! which share one hash tag, so every script runs on one Redis Cluster slot.

use redis::Script;

/// The compiled scripts (redis-rs sends `EVALSHA` and falls back to `EVAL` once per
/// server that has not seen a script yet, e.g. a replica promoted after a failover).
pub(crate) struct Scripts {
    pub(crate) claim: Script,
    pub(crate) claim_counting: Script,
    pub(crate) extend: Script,
    pub(crate) complete: Script,
    pub(crate) release: Script,
    pub(crate) reopen: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            claim: Script::new(include_str!("lua/claim.lua")),
            claim_counting: Script::new(include_str!("lua/claim_counting.lua")),
            extend: Script::new(include_str!("lua/extend.lua")),
            complete: Script::new(include_str!("lua/complete.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            reopen: Script::new(include_str!("lua/reopen.lua")),
        }
    }
}
