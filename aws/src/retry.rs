//! Bounded, full-jitter retries of the part of a batch call the service left unprocessed
//! (`UnprocessedItems`, `UnprocessedKeys`, failed `PutEvents` entries).

use std::future::Future;
use std::time::Duration;

use backon::BackoffBuilder;

/// Calls `send` with `items`, then again with whatever it returns as unprocessed, backing off
/// with full jitter between attempts, at most `attempts` times. Returns what is still
/// unprocessed at the end: the caller reports those as failures, never drops them.
pub async fn until_processed<T, F, Fut, E>(items: Vec<T>, attempts: u32, base: Duration, mut send: F) -> Result<Vec<T>, E>
where
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = Result<Vec<T>, E>>,
{
    let mut delays = catalog_pipeline::config::backoff(base, attempts).build();
    let mut pending = items;
    loop {
        if pending.is_empty() {
            return Ok(pending);
        }
        pending = send(pending).await?;
        if pending.is_empty() {
            return Ok(pending);
        }
        match delays.next() {
            Some(delay) => tokio::time::sleep(delay).await,
            None => return Ok(pending),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[tokio::test]
    async fn retries_only_the_unprocessed_part_until_done() {
        let calls = RefCell::new(Vec::new());
        let left = until_processed(vec![1, 2, 3, 4], 5, Duration::from_millis(1), |batch: Vec<i32>| {
            calls.borrow_mut().push(batch.clone());
            // The service processes one item per call, like a throttled BatchWriteItem.
            async move { Ok::<_, ()>(batch[1..].to_vec()) }
        })
        .await
        .unwrap();
        assert!(left.is_empty());
        assert_eq!(*calls.borrow(), vec![vec![1, 2, 3, 4], vec![2, 3, 4], vec![3, 4], vec![4]]);
    }

    #[tokio::test]
    async fn reports_leftovers_after_the_last_attempt() {
        let mut n = 0;
        let left = until_processed(vec!["a", "b"], 3, Duration::from_millis(1), |batch| {
            n += 1;
            async move { Ok::<_, ()>(batch) }
        })
        .await
        .unwrap();
        assert_eq!((left, n), (vec!["a", "b"], 3));
    }

    #[tokio::test]
    async fn a_hard_error_stops_at_once() {
        let result = until_processed(vec![1], 5, Duration::from_millis(1), |_| async { Err::<Vec<i32>, _>("boom") }).await;
        assert_eq!(result, Err("boom"));
    }
}
