//! `catalog serve`: wires the embedded topology (event log → pipeline → store → bus →
//! read model → BFF) and shuts it down in order: stop accepting, drain, flush.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use catalog_api::{ApiConfig, ApiMetrics, AppState, Check, IngestToken, Readiness, StoreFill};
use catalog_domain::{CatalogEvent, ParseLimits, ViewSettings};
use catalog_pipeline::embedded::{DEFAULT_SUBSCRIBER_CAPACITY, EmbeddedBus, EmbeddedLog, EmbeddedStore, LogConfig};
use catalog_pipeline::{PipelineConfig, PipelineMetrics};
use catalog_readmodel::ReadModel;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::cli::{DataArgs, ServeArgs};

/// How often the backlog, DLQ and view gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

pub fn open_db(args: &DataArgs) -> anyhow::Result<sled::Db> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data dir {}", args.data_dir.display()))?;
    let path = args.data_dir.join("catalog.sled");
    sled::Config::new()
        .path(&path)
        .cache_capacity(args.cache_mb * 1024 * 1024)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => anyhow!(
                "the data dir {} is in use by another catalog process (a running `catalog serve`?): stop it first, or pass another --data-dir",
                args.data_dir.display()
            ),
            other => anyhow!("opening the database at {}: {other}", path.display()),
        })
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let api = api_config(&args)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(n.max(1));
    }
    runtime.enable_all().build().context("starting the async runtime")?.block_on(serve(args, api))
}

fn api_config(args: &ServeArgs) -> anyhow::Result<ApiConfig> {
    for origin in &args.cors_origins {
        catalog_api::config::validate_origin(origin).map_err(|e| anyhow!(e))?;
    }
    if !args.addr.ip().is_loopback() && args.ingest_token.is_none() && !args.allow_public_ingest {
        return Err(anyhow!(
            "refusing to serve POST /events on {} without a token: set CATALOG_INGEST_TOKEN, bind to 127.0.0.1, or pass --allow-public-ingest",
            args.addr
        ));
    }
    Ok(ApiConfig {
        cors_origins: args.cors_origins.clone(),
        cache_control: args.cache_control.clone(),
        ingest_token: args.ingest_token.clone().filter(|t| !t.is_empty()).map(IngestToken::new),
        max_request_bytes: args.max_request_bytes,
        max_entries: args.max_entries,
        ..ApiConfig::default()
    })
}

async fn serve(args: ServeArgs, api: ApiConfig) -> anyhow::Result<()> {
    let db = open_db(&args.data)?;
    let limits = ParseLimits { max_body_bytes: args.data.max_body_bytes };
    let log_config = LogConfig {
        visibility_timeout: Duration::from_secs(args.visibility_timeout_secs),
        max_receive_count: args.max_receive_count.max(1),
        ..LogConfig::default()
    };
    let log = EmbeddedLog::open(&db, log_config).context("opening the event log")?;
    let store = Arc::new(EmbeddedStore::open(&db).context("opening the product store")?);
    let model = ReadModel::open(&db, ViewSettings { low_stock_threshold: args.data.low_stock_threshold })
        .context("opening the read model")?;

    if args.demo && log.entries_from(1).next().is_none() {
        log.append(&crate::demo::events()).await.context("loading the demo catalog")?;
        tracing::info!("demo catalog loaded");
    }
    catch_up(&log, &model, &store, limits).await?;

    let bus = Arc::new(EmbeddedBus::new());
    let refresher = tokio::spawn(catalog_readmodel::run_refresher(
        model.clone(),
        store.clone(),
        bus.subscribe(DEFAULT_SUBSCRIBER_CAPACITY),
    ));

    let mut registry = Registry::default();
    let pipeline_metrics = PipelineMetrics::default();
    pipeline_metrics.register(&mut registry);
    let api_metrics = ApiMetrics::default();
    api_metrics.register(&mut registry);
    let stop_pipeline = CancellationToken::new();
    let gauges = spawn_gauges(&mut registry, log.clone(), model.clone(), stop_pipeline.clone());

    let pipeline_config = PipelineConfig {
        receive_batch: args.receive_batch.max(1),
        write_batch: args.write_batch.max(1),
        write_batch_timeout: Duration::from_millis(args.write_batch_timeout_ms),
        parse_limits: limits,
        ..PipelineConfig::default()
    };
    let pipeline = tokio::spawn(catalog_pipeline::stages::run(
        Arc::new(log.clone()),
        store.clone(),
        bus,
        pipeline_config,
        pipeline_metrics,
        stop_pipeline.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("binding {}", args.addr))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let draining = Arc::new(AtomicBool::new(false));
    let state = Arc::new(AppState {
        readmodel: model.clone(),
        ingest: Some(Arc::new(log.clone())),
        fill: Some(Arc::new(StoreFill { store: store.clone(), model: model.clone() })),
        readiness: Arc::new(EmbeddedReadiness { log: log.clone(), model: model.clone() }),
        registry: Arc::new(registry),
        metrics: api_metrics,
        config: api,
        draining: draining.clone(),
    });
    let stop_http = CancellationToken::new();
    let server = tokio::spawn(
        warp::serve(catalog_api::routes(state)).incoming(listener).graceful(stop_http.clone().cancelled_owned()).run(),
    );
    // Tests and scripts read this line to find a port-0 server.
    println!("catalog listening on http://{local}");
    tracing::info!(%local, data_dir = %args.data.data_dir.display(), "serving");

    shutdown_signal().await;
    tracing::info!("shutting down: no new requests, draining in-flight batches");
    draining.store(true, Ordering::SeqCst);
    stop_http.cancel();
    stop_pipeline.cancel();
    log.close();
    let drained = tokio::time::timeout(Duration::from_secs(args.shutdown_timeout_secs), async {
        let _ = server.await;
        let _ = pipeline.await;
        let _ = refresher.await;
        let _ = gauges.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("drain timed out; unacknowledged messages are redelivered at the next start");
    }
    db.flush_async().await.context("flushing the database")?;
    tracing::info!("stopped");
    Ok(())
}

/// Re-renders products whose views may be behind the store: after a crash between a store
/// write and its view write, or when the pipeline re-applies messages it had not acked.
async fn catch_up(log: &EmbeddedLog, model: &ReadModel, store: &Arc<EmbeddedStore>, limits: ParseLimits) -> anyhow::Result<()> {
    let watermark = log.consumed_watermark();
    let from = model.checkpoint()?.saturating_add(1).min(watermark);
    let mut ids = BTreeSet::new();
    for entry in log.entries_from(from) {
        let entry = entry.context("reading the event log")?;
        if let Ok(event) = CatalogEvent::parse(&entry.body, entry.accepted_at, limits) {
            ids.insert(event.product_id);
        }
    }
    if !ids.is_empty() {
        let n = catalog_readmodel::catch_up(model, &**store, ids.into_iter().collect()).await?;
        tracing::info!(from, views = n, "read model caught up with the store");
    }
    let covered = watermark.saturating_sub(1);
    if covered > model.checkpoint()? {
        model.set_checkpoint(covered)?;
    }
    Ok(())
}

/// Gauges are read from in-memory counters only: sled's `len()` is a full scan.
fn spawn_gauges(registry: &mut Registry, log: EmbeddedLog, model: ReadModel, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let backlog = Gauge::<i64>::default();
    let dead_letters = Gauge::<i64>::default();
    let checkpoint = Gauge::<i64>::default();
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
                }
            }
        }
    })
}

struct EmbeddedReadiness {
    log: EmbeddedLog,
    model: ReadModel,
}

impl Readiness for EmbeddedReadiness {
    fn checks(&self) -> catalog_api::state::BoxFuture<'_, Vec<Check>> {
        Box::pin(async move {
            let read_model = match self.model.checkpoint() {
                Ok(seq) => Check { name: "readModel", ok: true, detail: format!("open, checkpoint {seq}") },
                Err(e) => Check { name: "readModel", ok: false, detail: e.to_string() },
            };
            vec![
                read_model,
                Check {
                    name: "eventSource",
                    ok: true,
                    detail: format!("embedded log, backlog {}, dead letters {}", self.log.backlog(), self.log.dead_letter_count()),
                },
                Check { name: "store", ok: true, detail: "embedded sled store".into() },
                Check { name: "breaker", ok: true, detail: "closed (embedded store is local)".into() },
            ]
        })
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
