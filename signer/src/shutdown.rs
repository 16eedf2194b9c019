//! The appliance's shutdown signal: one `watch` channel whose value turns `true` once, when `signet serve` is asked
//! to stop. Every background loop (renewal, replication, federation, the listeners) holds a receiver and ends at
//! its next await point once the signal is given.

use tokio::sync::watch;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn until_shutdown(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}
