//! Unit tests of the key layout and slots.

use super::*;

#[test]
fn keys_are_unambiguous_and_one_slot() {
    let k = |c: &str, k: &str| record_key("idem", &ScopedKey::new(c, k));
    assert_ne!(k("a:b", "c"), k("a", "b:c"));
    assert_eq!(k("billing", "k1"), "idem:{7:billing:k1}");
    assert!(matches!(millis(Duration::ZERO), Arg::Int(1)));
}

#[test]
fn slots_follow_the_cluster_hash_tag_rule() {
    // Known slots (CLUSTER KEYSLOT).
    assert_eq!(slot("foo"), 12182);
    assert_eq!(slot("{user1000}.following"), slot("user1000"));
    assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}"));
    assert_ne!(slot("foo{}{bar}"), slot("bar"), "empty tag: the whole key");
    let record = record_key("idem", &ScopedKey::new("billing", "k1"));
    assert_eq!(slot(&record), slot(&starts_key(&record)));
}
