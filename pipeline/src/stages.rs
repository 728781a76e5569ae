//! The pipeline's stages and the one function that wires them:
//! ingest → validate → batch → write → publish → ack.
//!
//! Each stage is a task reading one bounded channel and writing the next, so a slow store
//! slows ingest down instead of filling memory. Shutdown stops ingest only; every later
//! stage ends when its input closes, which drains in-flight batches in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::Retryable;
use catalog_domain::CatalogEvent;
use opentelemetry::trace::SpanContext;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::breaker::{Breaker, BreakerState, Outcome};
use crate::config::PipelineConfig;
use crate::error::chain;
use crate::error::{BackendError, FailureClass};
use crate::metrics::{CodeLabel, PipelineMetrics};
use crate::ports::{DeadLetter, EventSource, Invalidation, InvalidationBus, Origin, ProductStore, Received, SequencedEvent};
use crate::trace::SPAN_TARGET;

/// A valid event still tied to the message that carried it.
struct Accepted<R> {
    receipt: R,
    redelivered: bool,
    event: SequencedEvent,
}

/// A batch whose effects are durable, waiting for its invalidations and its ack.
struct Written<R> {
    receipts: Vec<R>,
    invalidation: Invalidation,
    traces: Vec<SpanContext>,
}

/// Messages to acknowledge, with the traces they carried.
struct Published<R> {
    receipts: Vec<R>,
    traces: Vec<SpanContext>,
}

/// A span for one stage's work on one batch, continuing the traces its messages carried.
fn stage_span<'a>(stage: &'static str, events: usize, traces: impl IntoIterator<Item = &'a SpanContext>) -> tracing::Span {
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "pipeline stage",
        otel.name = stage,
        otel.kind = "consumer",
        messaging.operation.type = "process",
        messaging.batch.message_count = events,
        catalog.stage = stage,
    );
    crate::trace::follow(&span, traces);
    span
}

/// Runs the pipeline until `shutdown` fires and everything received has been drained.
pub async fn run<S, St, B>(
    source: Arc<S>,
    store: Arc<St>,
    bus: Arc<B>,
    config: PipelineConfig,
    metrics: PipelineMetrics,
    breaker: Arc<Breaker>,
    shutdown: CancellationToken,
) where
    S: EventSource,
    St: ProductStore,
    B: InvalidationBus,
{
    let cap = config.channel_capacity.max(1);
    let (received_tx, received_rx) = mpsc::channel(cap);
    let (accepted_tx, accepted_rx) = mpsc::channel(cap);
    let (batch_tx, batch_rx) = mpsc::channel(cap);
    let (written_tx, written_rx) = mpsc::channel(cap);
    let (published_tx, published_rx) = mpsc::channel(cap);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.pollers.max(1) {
        tasks.spawn(ingest(
            source.clone(),
            config.receive_batch,
            received_tx.clone(),
            metrics.clone(),
            breaker.clone(),
            shutdown.clone(),
        ));
    }
    drop(received_tx);
    tasks.spawn(validate(source.clone(), config.parse_limits, received_rx, accepted_tx, metrics.clone()));
    tasks.spawn(batch(accepted_rx, config.write_batch, config.write_batch_timeout, batch_tx));
    tasks.spawn(write(
        source.clone(),
        store,
        batch_rx,
        written_tx,
        metrics.clone(),
        WriteGuard {
            breaker,
            retry_base: config.retry_base,
            budget: crate::budget::Budget::per_second(config.store_max_writes_per_sec),
            shutdown: shutdown.clone(),
        },
    ));
    tasks.spawn(publish(source.clone(), bus, config.clone(), written_rx, published_tx, metrics.clone()));
    tasks.spawn(ack(source, published_rx, metrics.clone()));
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            tracing::error!(error = %e, "pipeline stage panicked");
        }
    }
}

/// Long-polls the source until shutdown.
async fn ingest<S: EventSource>(
    source: Arc<S>,
    max: usize,
    out: mpsc::Sender<Vec<Received<S::Receipt>>>,
    metrics: PipelineMetrics,
    breaker: Arc<Breaker>,
    shutdown: CancellationToken,
) {
    loop {
        if let Err(until) = breaker.admits_receive() {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(until) => continue,
            }
        }
        let batch = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            batch = source.receive(max) => batch,
        };
        match batch {
            Ok(batch) if batch.is_empty() => {}
            Ok(batch) => {
                metrics.received.inc_by(batch.len() as u64);
                metrics.in_flight.inc_by(batch.len() as i64);
                if out.send(batch).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %chain(&e), "receive failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

/// Parses every message; invalid ones go to the DLQ with their reason at once.
async fn validate<S: EventSource>(
    source: Arc<S>,
    limits: catalog_domain::ParseLimits,
    mut input: mpsc::Receiver<Vec<Received<S::Receipt>>>,
    out: mpsc::Sender<Vec<Accepted<S::Receipt>>>,
    metrics: PipelineMetrics,
) {
    let timer = metrics.stage("validate");
    while let Some(batch) = input.recv().await {
        let started = Instant::now();
        let span = stage_span("validate", batch.len(), batch.iter().filter_map(|m| m.trace.as_ref()));
        // Inside the span: a dead letter's log line carries its trace, and an event that came
        // with none joins the batch's, so its later stages and its view stay in one trace.
        let (accepted, letters) = span.in_scope(|| sort_messages(batch, limits, crate::trace::current(), &metrics));
        metrics.validated.inc_by(accepted.len() as u64);
        if !letters.is_empty() {
            let n = letters.len() as i64;
            match source.dead_letter(letters).instrument(span).await {
                Ok(()) => {
                    metrics.in_flight.dec_by(n);
                }
                // Not acked either: the source hands them out again and we retry the move.
                Err(e) => tracing::error!(error = %chain(&e), "moving invalid messages to the DLQ failed"),
            }
        }
        timer.observe(started.elapsed().as_secs_f64());
        if !accepted.is_empty() && out.send(accepted).await.is_err() {
            return;
        }
    }
}

/// Parses each message of a batch: valid events to write, invalid ones to dead-letter.
fn sort_messages<R>(
    batch: Vec<Received<R>>,
    limits: catalog_domain::ParseLimits,
    batch_trace: Option<SpanContext>,
    metrics: &PipelineMetrics,
) -> (Vec<Accepted<R>>, Vec<DeadLetter<R>>) {
    let mut letters = Vec::new();
    let mut accepted = Vec::with_capacity(batch.len());
    for message in batch {
        match CatalogEvent::parse(&message.body, message.accepted_at, limits) {
            Ok(event) => accepted.push(Accepted {
                receipt: message.receipt,
                redelivered: message.receive_count > 1,
                event: SequencedEvent {
                    sequence: message.sequence,
                    position: message.position,
                    event,
                    trace: message.trace.or_else(|| batch_trace.clone()),
                    accepted_at: message.accepted_at,
                },
            }),
            Err(e) => {
                // The one line per dead letter, whichever source keeps it.
                tracing::warn!(message_id = %message.message_id, code = e.code(), error = %e, stage = "validate", "message dead-lettered");
                metrics.dead_lettered.get_or_create(&CodeLabel { code: e.code().to_owned() }).inc();
                letters.push(DeadLetter {
                    receipt: message.receipt,
                    message_id: message.message_id,
                    body: message.body,
                    code: e.code().to_owned(),
                    message: e.to_string(),
                    stage: "validate",
                });
            }
        }
    }
    (accepted, letters)
}

/// Regroups valid events into write batches of at most `size`, whatever receive batches they
/// came in. Whatever is already queued joins a batch at once, so batches fill up by themselves
/// while the writer is busy and an idle pipeline adds no wait; `linger` (zero by default
/// embedded) lets a partial batch wait that long for more, for stores that bill per call.
async fn batch<R: Send + 'static>(
    mut input: mpsc::Receiver<Vec<Accepted<R>>>,
    size: usize,
    linger: Duration,
    out: mpsc::Sender<Vec<Accepted<R>>>,
) {
    let size = size.max(1);
    let mut pending: Vec<Accepted<R>> = Vec::new();
    loop {
        if pending.is_empty() {
            match input.recv().await {
                Some(more) => pending = more,
                None => return,
            }
        }
        let deadline = tokio::time::Instant::now() + linger;
        while pending.len() < size {
            match input.try_recv() {
                Ok(more) => pending.extend(more),
                Err(mpsc::error::TryRecvError::Empty) if !linger.is_zero() => {
                    match tokio::time::timeout_at(deadline, input.recv()).await {
                        Ok(Some(more)) => pending.extend(more),
                        Ok(None) | Err(_) => break,
                    }
                }
                Err(_) => break,
            }
        }
        let rest = if pending.len() > size { pending.split_off(size) } else { Vec::new() };
        if out.send(std::mem::replace(&mut pending, rest)).await.is_err() {
            return;
        }
    }
}

/// What decides when the write stage may write: the breaker, the retry schedule while it is
/// closed, and shutdown.
struct WriteGuard {
    breaker: Arc<Breaker>,
    retry_base: Duration,
    /// Events per second the store is written at most.
    budget: crate::budget::Budget,
    shutdown: CancellationToken,
}

/// Writes each batch to the store; events it could not write are released for another try.
///
/// When the store is down or throttling, the events that failed are held here instead (the
/// source's heartbeat keeps their messages invisible) and written again with backoff, or as
/// the breaker's trial batch once it has opened: an outage or a throttle, however long, costs
/// each message no more than the one delivery it was received with, so none is dead-lettered
/// by it. Refused writes are released, and reach the DLQ after the source's receive limit.
async fn write<S: EventSource, St: ProductStore>(
    source: Arc<S>,
    store: Arc<St>,
    mut input: mpsc::Receiver<Vec<Accepted<S::Receipt>>>,
    out: mpsc::Sender<Written<S::Receipt>>,
    metrics: PipelineMetrics,
    guard: WriteGuard,
) {
    let WriteGuard { breaker, retry_base, budget, shutdown } = guard;
    let timer = metrics.stage("write");
    while let Some(batch) = input.recv().await {
        let redelivered = batch.iter().any(|a| a.redelivered);
        let span = stage_span("write", batch.len(), batch.iter().filter_map(|a| a.event.trace.as_ref()));
        let (receipts, events): (Vec<_>, Vec<_>) = batch.into_iter().map(|a| (a.receipt, a.event)).unzip();
        let Some(trial) = breaker.try_acquire() else {
            // Not a failure of these messages: they come back after the cool-down, and where the
            // source can, this delivery does not count towards the DLQ.
            let n = receipts.len() as u64;
            match source.defer(receipts, breaker.retry_after()).await {
                Ok(()) => {
                    metrics.deferred.inc_by(n);
                    metrics.in_flight.dec_by(n as i64);
                }
                Err(e) => {
                    tracing::error!(error = %chain(&e), "deferring messages failed; they return after their visibility timeout")
                }
            };
            continue;
        };
        let (mut receipts, mut events, mut trial) = (receipts, events, trial);
        // While the breaker stays closed, held events are retried on the usual schedule.
        let mut backoff = backon::BackoffBuilder::build(crate::config::backoff(retry_base, u32::MAX));
        let mut attempt = 0u32;
        loop {
            budget.take(events.len()).await;
            if attempt > 0 {
                metrics.write_retries.inc();
            }
            attempt += 1;
            metrics.batch_size.observe(events.len() as f64);
            let started = Instant::now();
            let result = store.write_batch(&events).instrument(span.clone()).await;
            timer.observe(started.elapsed().as_secs_f64());
            let failure = match &result {
                Ok(outcome) => outcome.failure.as_ref().map(BackendError::class),
                Err(e) => Some(e.class()),
            };
            breaker.record(trial, failure.map_or(Outcome::Success, Outcome::Failure));
            // The store being down or slowing us down is nobody's message's fault: hold, never
            // spend a delivery on it.
            let hold = matches!(failure, Some(FailureClass::Unavailable | FailureClass::Throttled));
            let outcome = match result {
                Ok(outcome) => outcome,
                Err(e) => {
                    metrics.write_failures.inc_by(events.len() as u64);
                    if !hold {
                        tracing::error!(error = %chain(&e), events = events.len(), "store write failed; releasing the batch");
                        release(&*source, receipts, &chain(&e), &metrics).await;
                        break;
                    }
                    tracing::warn!(error = %chain(&e), events = events.len(), "store unavailable or throttling; holding the batch to write it again");
                    match hold_until_trial(&breaker, &shutdown, backoff.next()).await {
                        Some(next) => trial = next,
                        None => return defer_held(&*source, receipts, &breaker, &metrics).await,
                    }
                    continue;
                }
            };
            metrics.write_batches.inc();
            let failed = outcome.failed.len();
            metrics.applied.inc_by((events.len() - outcome.unchanged - failed) as u64);
            metrics.unchanged.inc_by(outcome.unchanged as u64);
            let mut written = Vec::with_capacity(receipts.len());
            let (mut retry, mut retry_events) = (Vec::new(), Vec::new());
            let mut failed_idx = outcome.failed.iter().copied().peekable();
            for (i, (receipt, event)) in receipts.into_iter().zip(std::mem::take(&mut events)).enumerate() {
                if failed_idx.peek() == Some(&i) {
                    failed_idx.next();
                    retry.push(receipt);
                    retry_events.push(event);
                } else {
                    written.push(receipt);
                    events.push(event);
                }
            }
            if !retry.is_empty() {
                metrics.write_failures.inc_by(retry.len() as u64);
                if !hold {
                    let reason =
                        outcome.failure.as_ref().map_or_else(|| "the store did not accept these events".to_owned(), |e| chain(e));
                    release(&*source, std::mem::take(&mut retry), &reason, &metrics).await;
                }
            }
            let mut products = outcome.changed;
            if redelivered {
                // A redelivery may follow a crash between write and publish: announce again.
                products.extend(outcome.unchanged_products);
            }
            let log_sequence = events.iter().filter_map(|e| e.sequence).max();
            let origins = origins(&events, &products);
            let traces = events.iter().filter_map(|e| e.trace.clone()).collect();
            let invalidation = Invalidation { products, log_sequence, origins };
            let anything = !written.is_empty() || invalidation.log_sequence.is_some() || !invalidation.products.is_empty();
            if anything && out.send(Written { receipts: written, invalidation, traces }).await.is_err() {
                return;
            }
            if retry.is_empty() {
                break;
            }
            tracing::warn!(
                events = retry.len(),
                "store unavailable or throttling; holding the events it did not take to write them again"
            );
            match hold_until_trial(&breaker, &shutdown, backoff.next()).await {
                Some(next) => trial = next,
                None => return defer_held(&*source, retry, &breaker, &metrics).await,
            }
            (receipts, events) = (retry, retry_events);
        }
        breaker.set_holding(false);
    }
}

/// Waits, holding a batch, until it may be written again: after `backoff` while the breaker
/// is closed, as its trial once the cool-down is over while it is open. `None` on shutdown.
async fn hold_until_trial(
    breaker: &Breaker,
    shutdown: &CancellationToken,
    backoff: Option<Duration>,
) -> Option<crate::breaker::Trial> {
    breaker.set_holding(true);
    let mut wait = match breaker.state() {
        BreakerState::Closed => backoff.unwrap_or(crate::config::MAX_RETRY_DELAY),
        _ => breaker.retry_after(),
    };
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(wait) => {}
        }
        if let Some(trial) = breaker.try_acquire() {
            return Some(trial);
        }
        wait = breaker.retry_after();
    }
}

/// Shutting down while holding a batch: give it back untried, as the breaker's turned-away
/// batches are, so the stop costs no delivery either.
async fn defer_held<S: EventSource>(source: &S, receipts: Vec<S::Receipt>, breaker: &Breaker, metrics: &PipelineMetrics) {
    breaker.set_holding(false);
    let n = receipts.len() as u64;
    match source.defer(receipts, Duration::ZERO).await {
        Ok(()) => {
            metrics.deferred.inc_by(n);
            metrics.in_flight.dec_by(n as i64);
        }
        Err(e) => {
            tracing::error!(error = %chain(&e), "giving back held messages failed; they return after their visibility timeout")
        }
    }
}

/// Announces changed products, retrying with backoff; if the bus stays down the batch's
/// messages are released, so nothing is acked before read models can learn of it.
async fn publish<S: EventSource, B: InvalidationBus>(
    source: Arc<S>,
    bus: Arc<B>,
    config: PipelineConfig,
    mut input: mpsc::Receiver<Written<S::Receipt>>,
    out: mpsc::Sender<Published<S::Receipt>>,
    metrics: PipelineMetrics,
) {
    let backoff = crate::config::backoff(config.retry_base, config.publish_attempts);
    let timer = metrics.stage("publish");
    while let Some(written) = input.recv().await {
        let count = written.invalidation.products.len() as u64;
        if count > 0 || written.invalidation.log_sequence.is_some() {
            let started = Instant::now();
            let span = stage_span("publish", written.receipts.len(), &written.traces);
            let attempt = || bus.publish(written.invalidation.clone()).instrument(span.clone());
            let result = attempt
                .retry(backoff)
                .notify(|e, _| {
                    metrics.publish_failures.inc();
                    tracing::warn!(error = %chain(e), "publishing invalidations failed; retrying");
                })
                .await;
            timer.observe(started.elapsed().as_secs_f64());
            if let Err(e) = result {
                release(&*source, written.receipts, &chain(&e), &metrics).await;
                continue;
            }
            metrics.invalidations.inc_by(count);
        }
        if out.send(Published { receipts: written.receipts, traces: written.traces }).await.is_err() {
            return;
        }
    }
}

/// Acknowledges messages whose effects are durable and announced.
async fn ack<S: EventSource>(source: Arc<S>, mut input: mpsc::Receiver<Published<S::Receipt>>, metrics: PipelineMetrics) {
    let timer = metrics.stage("ack");
    while let Some(Published { receipts, traces }) = input.recv().await {
        let n = receipts.len() as u64;
        let started = Instant::now();
        let span = stage_span("ack", receipts.len(), &traces);
        let result = source.ack(receipts).instrument(span).await;
        timer.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                metrics.acked.inc_by(n);
                metrics.in_flight.dec_by(n as i64);
            }
            // They come back after their visibility timeout; every write is idempotent.
            Err(e) => tracing::error!(error = %chain(&e), "ack failed; messages will be redelivered"),
        }
    }
}

async fn release<S: EventSource>(source: &S, receipts: Vec<S::Receipt>, reason: &str, metrics: &PipelineMetrics) {
    let n = receipts.len() as u64;
    match source.release(receipts, reason).await {
        Ok(()) => {
            metrics.released.inc_by(n);
            metrics.in_flight.dec_by(n as i64);
        }
        Err(e) => tracing::error!(error = %chain(&e), "release failed; messages return after their visibility timeout"),
    }
}

/// The newest event of each changed product in a written batch (events are in log order).
fn origins(events: &[SequencedEvent], changed: &[crate::ports::ProductChanged]) -> Vec<Origin> {
    let mut newest: std::collections::HashMap<&str, &SequencedEvent> = std::collections::HashMap::with_capacity(changed.len());
    for e in events {
        newest.insert(e.event.product_id.as_str(), e);
    }
    changed
        .iter()
        .filter_map(|c| newest.get(c.product_id.as_str()))
        .map(|e| Origin { product_id: e.event.product_id.clone(), accepted_at: e.accepted_at, trace: e.trace.clone() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn accepted(n: u64) -> Accepted<u64> {
        let body = format!(r#"{{"productId":"P{n}","quantity":{n}}}"#);
        let event = CatalogEvent::parse(body.as_bytes(), SystemTime::UNIX_EPOCH, catalog_domain::ParseLimits::default()).unwrap();
        let event =
            SequencedEvent { sequence: Some(n), position: Some(n), event, trace: None, accepted_at: SystemTime::UNIX_EPOCH };
        Accepted { receipt: n, redelivered: false, event }
    }

    fn receipts(batch: &[Accepted<u64>]) -> Vec<u64> {
        batch.iter().map(|a| a.receipt).collect()
    }

    #[tokio::test]
    async fn without_linger_queued_batches_merge_up_to_the_size_and_split_the_rest() {
        let (tx, rx) = mpsc::channel(8);
        let (out_tx, mut out) = mpsc::channel(8);
        tx.send((1..=3).map(accepted).collect()).await.unwrap();
        tx.send((4..=6).map(accepted).collect()).await.unwrap();
        drop(tx);
        batch(rx, 4, Duration::ZERO, out_tx).await;
        assert_eq!(receipts(&out.recv().await.unwrap()), [1, 2, 3, 4]);
        assert_eq!(receipts(&out.recv().await.unwrap()), [5, 6], "the remainder is not lost when the input closes");
        assert!(out.recv().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_goes_at_once_without_linger_and_waits_with_it() {
        for (linger, expected) in [(Duration::ZERO, vec![vec![1], vec![2]]), (Duration::from_millis(5), vec![vec![1, 2]])] {
            let (tx, rx) = mpsc::channel(8);
            let (out_tx, mut out) = mpsc::channel(8);
            let stage = tokio::spawn(batch(rx, 10, linger, out_tx));
            tx.send(vec![accepted(1)]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
            tx.send(vec![accepted(2)]).await.unwrap();
            drop(tx);
            let mut got = Vec::new();
            while let Some(batch) = out.recv().await {
                got.push(receipts(&batch));
            }
            stage.await.unwrap();
            assert_eq!(got, expected, "linger {linger:?}");
        }
    }
}
