//! The Lua scripts behind every state change, one `.lua` file per operation (in
//! `src/lua/`), and the batch script that runs them.
//!
//! Each operation touches only `KEYS[1]` (the record) and `KEYS[2]` (its start
//! counter), which share one hash tag, so every operation lives on one Redis Cluster
//! slot. The store does not send the operation scripts one by one: it sends one
//! `EVALSHA` of the batch script (`lua/batch.lua`) carrying one or more operations,
//! and the batch script runs each operation's file, unchanged, as a Lua function whose
//! `KEYS` and `ARGV` are that operation's own. A Redis script runs without any other
//! command in between, so each operation stays the atomic step it is on its own.

use redis::Script;

/// The operations the batch script knows, by the name sent in `ARGV`.
const OPERATIONS: [(&str, &str); 6] = [
    ("claim", include_str!("lua/claim.lua")),
    // One script for both claims: with a fifth argument (the counter's memory) it counts.
    ("claim_counting", include_str!("lua/claim.lua")),
    ("extend", include_str!("lua/extend.lua")),
    ("complete", include_str!("lua/complete.lua")),
    ("release", include_str!("lua/release.lua")),
    ("reopen", include_str!("lua/reopen.lua")),
];

/// The batch script: every operation as a function in the table `OPS`, then the loop
/// of `lua/batch.lua`. redis-rs sends `EVALSHA` and falls back to `EVAL` once per
/// server that has not seen it yet (e.g. a replica promoted after a failover).
pub(crate) fn batch() -> Script {
    let mut source = String::from("local OPS = {}\n");
    for (name, body) in OPERATIONS {
        source.push_str(&format!(
            "OPS['{name}'] = function(KEYS, ARGV)\n{body}\nend\n"
        ));
    }
    source.push_str(include_str!("lua/batch.lua"));
    Script::new(&source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_in_the_batch_script() {
        let script = batch();
        let _ = script.get_hash();
        for (name, _) in OPERATIONS {
            assert!(crate::store::OPERATION_NAMES.contains(&name), "{name}");
        }
    }
}
