//! The embedded invalidation bus: in-process fan-out over bounded channels, so a slow
//! subscriber slows the publisher down instead of missing an invalidation.

use std::sync::Mutex;

use tokio::sync::mpsc;

use crate::ports::{Invalidation, InvalidationBus, PublishError};

pub const DEFAULT_SUBSCRIBER_CAPACITY: usize = 64;

#[derive(Default)]
pub struct EmbeddedBus {
    subscribers: Mutex<Vec<mpsc::Sender<Invalidation>>>,
}

impl EmbeddedBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn subscribe(&self, capacity: usize) -> mpsc::Receiver<Invalidation> {
        let (tx, rx) = mpsc::channel(capacity);
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }
}

impl InvalidationBus for EmbeddedBus {
    async fn publish(&self, invalidation: Invalidation) -> Result<(), PublishError> {
        let subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for subscriber in &subscribers {
            // A closed subscriber has shut down; the others still get theirs.
            let _ = subscriber.send(invalidation.clone()).await;
        }
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner()).retain(|s| !s.is_closed());
        Ok(())
    }
}
