//! Test-only crash points. Compiled with the `failpoints` feature only.
//!
//! `arm("relay-after-publish", 1)` makes the next relay round fail right after its
//! batch was published and confirmed, before the rows are marked: the situation of a
//! relay killed between publish and mark. Failpoints are process-global.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn table() -> &'static Mutex<HashMap<String, u32>> {
    static T: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Arms failpoint `name` to fire `times` times.
pub fn arm(name: &str, times: u32) {
    table()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.to_owned(), times);
}

/// Whether failpoint `name` fires now (consumes one firing).
pub(crate) fn hit(name: &str) -> bool {
    let mut t = table().lock().unwrap_or_else(|p| p.into_inner());
    match t.get_mut(name) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}
