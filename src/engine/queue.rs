//! The queue between the sources and the engine: at most `queue_transactions` batches
//! holding at most `queue_changes` changes. A gate task takes permits per change before a
//! batch enters; the engine hands them back once the batch is durable. A source blocks
//! while the queue is full, so the worker's memory is bounded by config, not by how far
//! behind the engine is.

use std::sync::Arc;
use tokio::sync::mpsc;
use viewkeeper_core::source::SourceBatch;

/// Permits of the queue: one per change; a batch larger than the whole bound takes all of
/// them (it passes alone).
#[derive(Clone)]
pub struct QueuePermits {
    sem: Arc<tokio::sync::Semaphore>,
    cap: usize,
}

impl QueuePermits {
    pub fn new(changes: usize) -> Self {
        let cap = changes.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        QueuePermits {
            sem: Arc::new(tokio::sync::Semaphore::new(cap)),
            cap,
        }
    }

    pub(crate) fn cost(&self, batches: &[SourceBatch]) -> usize {
        batches.iter().map(|b| b.changes.len().min(self.cap)).sum()
    }

    /// Waits until `b` fits; `false` when the queue is closed.
    pub async fn take(&self, b: &SourceBatch) -> bool {
        match self.sem.acquire_many(self.cost(std::slice::from_ref(b)) as u32).await {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn give_back(&self, n: usize) {
        self.sem.add_permits(n);
    }

    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

/// The queue: the sources' sender, the engine's receiver, and the permits the engine hands
/// back.
pub fn bounded(
    e: &crate::config::EngineConfig,
) -> (mpsc::Sender<SourceBatch>, mpsc::Receiver<SourceBatch>, QueuePermits) {
    let (tx, mut from_sources) = mpsc::channel::<SourceBatch>(1);
    let (to_engine, rx) = mpsc::channel(e.queue_transactions.max(1));
    let permits = QueuePermits::new(e.queue_changes);
    let gate = permits.clone();
    tokio::spawn(async move {
        while let Some(b) = from_sources.recv().await {
            if !gate.take(&b).await || to_engine.send(b).await.is_err() {
                return;
            }
        }
    });
    (tx, rx, permits)
}
