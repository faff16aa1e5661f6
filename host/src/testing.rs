//! Helpers the unit tests share.

use std::time::Duration;

/// Whether `done` holds within 10 s, asked every 10 ms: for what a background task or thread
/// brings about.
pub async fn soon(done: impl Fn() -> bool) -> bool {
    for _ in 0..1_000 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}
