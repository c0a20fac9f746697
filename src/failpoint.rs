//! Pause points for tests that must hold a process at one step while they act (a race
//! made deterministic: e.g. a change committed between `verify`'s last read and its
//! repair). Off unless `VIEWKEEPER_PAUSE_DIR` is set: then [`pause`] creates
//! `<dir>/<name>.paused` and waits until the test removes it. The `fail` crate's pause
//! works inside one process only; the tests drive the real binary.

use std::time::Duration;

/// Holds here while `<VIEWKEEPER_PAUSE_DIR>/<name>.paused` exists (see the module docs).
pub async fn pause(name: &str) {
    let Some(dir) = std::env::var_os("VIEWKEEPER_PAUSE_DIR") else {
        return;
    };
    let path = std::path::Path::new(&dir).join(format!("{name}.paused"));
    if std::fs::write(&path, b"").is_err() {
        return;
    }
    tracing::info!(point = name, file = %path.display(), "paused until the file is removed");
    while path.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
