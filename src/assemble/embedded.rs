//! The embedded backend, assembled: everything in this process on sled, no cloud.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use catalog_api::state::FillMetrics;
use catalog_api::{Rebuilder, StoreFill};
use catalog_pipeline::breaker::{Breaker, BreakerMetrics};
use catalog_pipeline::embedded::{DEFAULT_SUBSCRIBER_CAPACITY, EmbeddedBus, EmbeddedLog, LogConfig};
use catalog_pipeline::health::{BoxFuture, Check, Readiness};
use catalog_pipeline::{PipelineMetrics, config};
use catalog_readmodel::{EmbeddedStore, OnlineRebuild, ReadModel, ReadModelError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Assembly;
use super::background::Background;
use crate::cli::ServeArgs;
use crate::datadir::DataDir;

/// How often the backlog, DLQ and checkpoint gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

pub async fn assemble(args: &ServeArgs) -> anyhow::Result<Assembly> {
    let data = DataDir::new(&args.data.data_dir, args.data.cache_mb);
    let db = data.open_main()?;
    let log_config = LogConfig {
        visibility_timeout: Duration::from_secs(args.visibility_timeout_secs),
        max_receive_count: args.max_receive_count,
        segment_bytes: args.log_segment_mb * 1024 * 1024,
        ..LogConfig::default()
    };
    let log = data.open_log(&db, log_config)?;
    let views_db = data.open_views()?;
    // The read model's records are the store: each holds its product's state and its views,
    // so they never expire (`--view-ttl-secs` is for the AWS backend's cache).
    let model = ReadModel::open_store(&views_db, args.data.view_settings())
        .context("opening the read model")?
        .keep_hot(args.hot_views_mb << 20);
    let store = Arc::new(EmbeddedStore::new(model.clone()));

    // Not "the log is empty": compaction may have emptied it.
    if args.demo && log.last_sequence() == 0 {
        log.append(&crate::demo::events()).await.context("loading the demo catalog")?;
        tracing::info!("demo catalog loaded");
    }
    let recovery = {
        let (store, db, log, limits) = (store.clone(), db.clone(), log.clone(), args.data.parse_limits());
        tokio::task::spawn_blocking(move || {
            let recovery = store.recover(&db, &log, limits)?;
            // The category index is a scan of the records: done before listening, so that no
            // request waits for it.
            store.model().prepare()?;
            Ok::<_, catalog_pipeline::StoreError>(recovery)
        })
        .await?
    }
    .context("bringing the store up to the event log")?;
    if recovery.moved > 0 || recovery.redone > 0 || recovery.from_snapshot > 0 {
        tracing::info!(
            moved = recovery.moved,
            from_snapshot = recovery.from_snapshot,
            refolded = recovery.refolded,
            redone = recovery.redone,
            "the store caught up with the event log"
        );
    }

    let stop = CancellationToken::new();
    let mut registry = Registry::default();
    super::register_disk_size(&mut registry, vec![db.clone(), views_db.clone()], Some(log.clone()));
    super::register_hot_views(&mut registry, model.clone());
    let pipeline_metrics = PipelineMetrics::default();
    pipeline_metrics.register(&mut registry);
    let breaker_metrics = BreakerMetrics::default();
    breaker_metrics.register(&mut registry);
    let breaker = Arc::new(Breaker::new(args.breaker_config(), breaker_metrics));
    let bus = Arc::new(EmbeddedBus::new());
    let refresh_metrics = catalog_readmodel::RefreshMetrics::default();
    refresh_metrics.register(&mut registry);
    let refresher = tokio::spawn(catalog_readmodel::run_refresher(
        model.clone(),
        store.clone(),
        bus.subscribe(DEFAULT_SUBSCRIBER_CAPACITY),
        refresh_metrics,
    ));
    let pipeline = tokio::spawn(catalog_pipeline::stages::run(
        Arc::new(log.clone()),
        store.clone(),
        bus,
        args.pipeline_config(args.receive_batch, 1, (config::DEFAULT_EMBEDDED_WRITE_BATCH, config::DEFAULT_WRITE_BATCH_TIMEOUT)),
        pipeline_metrics,
        breaker.clone(),
        stop.clone(),
    ));
    let gauges = spawn_gauges(&mut registry, log.clone(), model.clone(), stop.clone());
    let heartbeat = log.spawn_heartbeat(stop.clone());
    let compactor = spawn_compactor(&mut registry, (log.clone(), model.clone()), args, stop.clone())?;
    // Wakes a receive that is waiting for new entries, so the pipeline sees the stop at once.
    let closer = {
        let (log, stop) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            log.close();
        })
    };

    let fill_metrics = FillMetrics::default();
    fill_metrics.register(&mut registry);
    Ok(Assembly {
        readmodel: model.clone(),
        ingest: Some(Arc::new(log.clone())),
        rebuilder: Some(Arc::new(StoreRebuilder { store: store.clone(), model: model.clone() })),
        fill: Some(Arc::new(StoreFill::new(store, model.clone(), args.fill_config(), fill_metrics))),
        readiness: Arc::new(EmbeddedReadiness { log, model, breaker }),
        registry,
        tasks: vec![closer, pipeline, refresher, gauges, heartbeat, compactor],
        stop,
        finish: vec![
            Box::pin(async move { db.flush_async().await.map(drop).context("flushing the database") }),
            Box::pin(async move { views_db.flush_async().await.map(drop).context("flushing the read model") }),
        ],
    })
}

/// `POST /admin/rebuild`: a new generation of records from the live one's states, beside it;
/// products written meanwhile are carried over at the swap.
struct StoreRebuilder {
    store: Arc<EmbeddedStore>,
    model: ReadModel,
}

impl Rebuilder for StoreRebuilder {
    fn rebuild(&self) -> BoxFuture<'_, Result<OnlineRebuild, ReadModelError>> {
        let store = self.store.clone();
        Box::pin(catalog_readmodel::rebuild_online(&self.model, &*self.store, move |fresh| async move {
            // sled reads and writes block: off the threads that serve GETs.
            tokio::task::spawn_blocking(move || fresh.apply_all(store.model().states())).await?
        }))
    }
}

/// Keeps the log bounded: every `--log-compact-interval-secs`, acknowledged entries the read
/// model already shows are folded into the snapshot, and those past the retention removed.
fn spawn_compactor(
    registry: &mut Registry,
    (log, model): (EmbeddedLog, ReadModel),
    args: &ServeArgs,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let (retention, limits, yield_backlog) = (args.log_retention(), args.data.parse_limits(), args.log_compact_yield_backlog);
    let every = Duration::from_secs(args.log_compact_interval_secs);
    let (folded, compacted): (Counter, Counter) = Default::default();
    registry.register("catalog_event_log_folded", "Log entries folded into the snapshot", folded.clone());
    registry.register(
        "catalog_event_log_compacted",
        "Log entries the snapshot holds removed past the retention",
        compacted.clone(),
    );
    let gave_way = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    registry.register(
        "catalog_event_log_compaction_gave_way_seconds",
        "Seconds compactions slept so that a lagging pipeline could catch up",
        gave_way.clone(),
    );
    // A compaction folds a whole interval's events at once, a core's worth of work for
    // seconds: below the pipeline's priority, the scheduler gives the pipeline first claim.
    let thread = Background::spawn("catalog-compact", args.log_compact_nice)?;
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (log, model) = (log.clone(), model.clone());
            let started = std::time::Instant::now();
            let run = thread.run(move || {
                let keep_from = model.checkpoint().map_err(|e| e.to_string())?.saturating_add(1);
                // The records are the store and are flushed apart from the log: what the
                // checkpoint covers is on disk before the snapshot passes it, else a start after
                // a crash would take the whole snapshot for the few records lost.
                model.flush().map_err(|e| e.to_string())?;
                let (report, paused) =
                    catalog_pipeline::embedded::compact_beside(&log, retention, keep_from, limits, yield_backlog)
                        .map_err(|e| catalog_pipeline::error::chain(&e))?;
                Ok::<_, String>((report, paused, log.log_bytes()))
            });
            match run.await {
                Some(Ok((report, paused, now))) => {
                    folded.inc_by(report.entries_folded);
                    compacted.inc_by(report.entries_removed);
                    gave_way.inc_by(paused.as_secs_f64());
                    if report.entries_folded > 0 || report.entries_removed > 0 {
                        tracing::info!(
                            folded = report.entries_folded,
                            removed = report.entries_removed,
                            through = report.snapshot_sequence,
                            log_bytes = now,
                            took_ms = started.elapsed().as_millis() as u64,
                            gave_way_ms = paused.as_millis() as u64,
                            "event log compacted"
                        );
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "compacting the event log failed; retrying next interval"),
                None => tracing::error!("the compaction panicked; retrying next interval"),
            }
        }
    }))
}

/// Gauges are read from in-memory counters only: sled's `len()` is a full scan.
fn spawn_gauges(registry: &mut Registry, log: EmbeddedLog, model: ReadModel, stop: CancellationToken) -> JoinHandle<()> {
    let backlog = Gauge::<i64>::default();
    let dead_letters = Gauge::<i64>::default();
    let checkpoint = Gauge::<i64>::default();
    let bytes = Gauge::<i64>::default();
    registry.register("catalog_event_log_bytes", "Bytes the embedded event log's live entries take", bytes.clone());
    registry.register("catalog_event_log_backlog", "Accepted messages not yet processed", backlog.clone());
    registry.register("catalog_dead_letters", "Messages in the dead-letter queue", dead_letters.clone());
    registry.register("catalog_readmodel_checkpoint", "Highest log sequence the read model reflects", checkpoint.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(GAUGE_INTERVAL);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {
                    backlog.set(i64::try_from(log.backlog()).unwrap_or(i64::MAX));
                    dead_letters.set(i64::try_from(log.dead_letter_count()).unwrap_or(i64::MAX));
                    checkpoint.set(model.checkpoint().ok().and_then(|c| i64::try_from(c).ok()).unwrap_or(-1));
                    bytes.set(i64::try_from(log.log_bytes()).unwrap_or(i64::MAX));
                }
            }
        }
    })
}

struct EmbeddedReadiness {
    log: EmbeddedLog,
    model: ReadModel,
    breaker: Arc<Breaker>,
}

impl Readiness for EmbeddedReadiness {
    fn checks(&self) -> BoxFuture<'_, Vec<Check>> {
        Box::pin(async move {
            let read_model = match self.model.checkpoint() {
                Ok(seq) => Check { name: "readModel", ok: true, detail: format!("open, checkpoint {seq}") },
                Err(e) => Check { name: "readModel", ok: false, detail: catalog_pipeline::error::chain(&e) },
            };
            vec![
                read_model,
                Check {
                    name: "eventSource",
                    ok: true,
                    detail: format!(
                        "embedded log, backlog {}, dead letters {}",
                        self.log.backlog(),
                        self.log.dead_letter_count()
                    ),
                },
                Check { name: "store", ok: true, detail: "embedded sled store".into() },
                catalog_pipeline::health::breaker_check(Some(&self.breaker)),
            ]
        })
    }
}
