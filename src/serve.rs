//! `catalog serve`: wires one of two topologies and shuts it down in order (stop accepting,
//! drain, flush).
//! - embedded: event log → pipeline → sled store → in-process bus → read model → BFF.
//! - aws: SQS → pipeline → DynamoDB → EventBridge (worker); per-instance invalidation queue →
//!   read model → BFF (api). `--role` picks one or both.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use catalog_api::{ApiConfig, ApiMetrics, AppState, Check, IngestToken, Readiness, StoreFill};
use catalog_domain::{CatalogEvent, ParseLimits, ViewSettings};
use catalog_pipeline::aws::dynamodb::DynamoStore;
use catalog_pipeline::aws::eventbridge::{EventBridgeBus, InvalidationSubscription};
use catalog_pipeline::aws::sqs::SqsSource;
use catalog_pipeline::aws::{AwsClients, AwsMetrics, AwsSettings};
use catalog_pipeline::embedded::{DEFAULT_SUBSCRIBER_CAPACITY, EmbeddedBus, EmbeddedLog, EmbeddedStore, LogConfig};
use catalog_pipeline::{PipelineConfig, PipelineMetrics};
use catalog_readmodel::ReadModel;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::{Backend, DataArgs, Role, ServeArgs};

/// How often the backlog, DLQ and checkpoint gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The event log and product state (embedded backend).
pub const MAIN_DB: &str = "catalog.sled";
/// The read model: derived and disposable, so it lives apart and a rebuild can replace it whole.
pub const VIEWS_DB: &str = "views.sled";

/// Opens the main database; it holds the data dir's lock for as long as it is open. A read
/// model's database is always open beside it, so each gets half of `--cache-mb`.
pub fn open_db(args: &DataArgs) -> anyhow::Result<sled::Db> {
    open_sled(args, &args.data_dir.join(MAIN_DB), args.cache_mb / 2)
}

/// Opens the read model's database beside the main one (half of `--cache-mb`).
pub fn open_views_db(args: &DataArgs) -> anyhow::Result<sled::Db> {
    open_sled(args, &args.data_dir.join(VIEWS_DB), args.cache_mb / 2)
}

pub fn open_sled(args: &DataArgs, path: &std::path::Path, cache_mb: u64) -> anyhow::Result<sled::Db> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating the data dir {}", args.data_dir.display()))?;
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_mb * 1024 * 1024)
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
    if args.backend == Backend::Embedded && args.role != Role::All {
        return Err(anyhow!("--role {:?} needs --backend aws: the embedded backend runs everything in one process", args.role));
    }
    let api = api_config(&args)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.enable_all().build().context("starting the async runtime")?;
    match args.backend {
        Backend::Embedded => runtime.block_on(embedded(args, api)),
        Backend::Aws => runtime.block_on(aws(args, api)),
    }
}

fn api_config(args: &ServeArgs) -> anyhow::Result<ApiConfig> {
    for origin in &args.cors_origins {
        catalog_api::config::validate_origin(origin).map_err(|e| anyhow!(e))?;
    }
    let ingests = args.backend == Backend::Embedded;
    if ingests && !args.addr.ip().is_loopback() && args.ingest_token.is_none() && !args.allow_public_ingest {
        return Err(anyhow!(
            "refusing to serve POST /events on {} without a token: set CATALOG_INGEST_TOKEN, bind to 127.0.0.1, or pass --allow-public-ingest",
            args.addr
        ));
    }
    let mut config = ApiConfig::default();
    config.cors_origins = args.cors_origins.clone();
    config.cache_control = args.cache_control.clone();
    config.ingest_token = args.ingest_token.clone().filter(|t| !t.is_empty()).map(IngestToken::new);
    config.max_request_bytes = args.max_request_bytes;
    config.max_entries = args.max_entries;
    config.product_routes = args.role != Role::Worker;
    Ok(config)
}

fn view_settings(data: &DataArgs) -> ViewSettings {
    ViewSettings { low_stock_threshold: data.low_stock_threshold }
}

fn open_read_model(db: &sled::Db, data: &DataArgs) -> anyhow::Result<ReadModel> {
    ReadModel::open(db, view_settings(data), Some(Duration::from_secs(data.view_ttl_secs))).context("opening the read model")
}

fn pipeline_config(args: &ServeArgs, receive_batch: usize, pollers: usize, default_linger: Duration) -> PipelineConfig {
    PipelineConfig {
        receive_batch,
        pollers,
        write_batch: args.write_batch.max(1),
        write_batch_timeout: args.write_batch_timeout_ms.map_or(default_linger, Duration::from_millis),
        parse_limits: ParseLimits { max_body_bytes: args.data.max_body_bytes },
        ..PipelineConfig::default()
    }
}

/// The BFF on its listener, stoppable.
struct Http {
    server: JoinHandle<()>,
    stop: CancellationToken,
    draining: Arc<AtomicBool>,
}

async fn start_http(addr: std::net::SocketAddr, state: AppState) -> anyhow::Result<Http> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let draining = state.draining.clone();
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        warp::serve(catalog_api::routes(Arc::new(state))).incoming(listener).graceful(stop.clone().cancelled_owned()).run(),
    );
    // Tests and scripts read this line to find a port-0 server.
    println!("catalog listening on http://{local}");
    tracing::info!(%local, "serving");
    Ok(Http { server, stop, draining })
}

impl Http {
    fn begin_shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.stop.cancel();
    }
}

/// Waits for tasks to finish, at most `limit`; what has not finished by then is abandoned
/// (unacknowledged messages come back: every write is idempotent).
async fn drain(limit: Duration, tasks: Vec<JoinHandle<()>>) {
    let all = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(limit, all).await.is_err() {
        tracing::warn!("drain timed out; unacknowledged messages are redelivered later");
    }
}

async fn embedded(args: ServeArgs, api: ApiConfig) -> anyhow::Result<()> {
    let db = open_db(&args.data)?;
    let limits = ParseLimits { max_body_bytes: args.data.max_body_bytes };
    let log_config = LogConfig {
        visibility_timeout: Duration::from_secs(args.visibility_timeout_secs),
        max_receive_count: args.max_receive_count.max(1),
        ..LogConfig::default()
    };
    let log = EmbeddedLog::open(&db, log_config).context("opening the event log")?;
    let store = Arc::new(EmbeddedStore::open(&db).context("opening the product store")?);
    let views_db = open_views_db(&args.data)?;
    let model = open_read_model(&views_db, &args.data)?;

    if args.demo && log.entries_from(1).next().is_none() {
        log.append(&crate::demo::events()).await.context("loading the demo catalog")?;
        tracing::info!("demo catalog loaded");
    }
    catch_up(&log, &model, &store, limits).await?;

    let bus = Arc::new(EmbeddedBus::new());
    let refresher =
        tokio::spawn(catalog_readmodel::run_refresher(model.clone(), store.clone(), bus.subscribe(DEFAULT_SUBSCRIBER_CAPACITY)));
    let mut registry = Registry::default();
    let pipeline_metrics = PipelineMetrics::default();
    pipeline_metrics.register(&mut registry);
    let api_metrics = ApiMetrics::default();
    api_metrics.register(&mut registry);
    let stop_pipeline = CancellationToken::new();
    let gauges = spawn_gauges(&mut registry, log.clone(), model.clone(), stop_pipeline.clone());
    let pipeline = tokio::spawn(catalog_pipeline::stages::run(
        Arc::new(log.clone()),
        store.clone(),
        bus,
        pipeline_config(&args, args.receive_batch.max(1), 1, catalog_pipeline::config::DEFAULT_WRITE_BATCH_TIMEOUT),
        pipeline_metrics,
        stop_pipeline.clone(),
    ));
    let http = start_http(
        args.addr,
        AppState {
            readmodel: model.clone(),
            ingest: Some(Arc::new(log.clone())),
            fill: Some(Arc::new(StoreFill::new(store.clone(), model.clone()))),
            readiness: Arc::new(EmbeddedReadiness { log: log.clone(), model: model.clone() }),
            registry: Arc::new(registry),
            metrics: api_metrics,
            config: api,
            draining: Arc::new(AtomicBool::new(false)),
        },
    )
    .await?;

    shutdown_signal().await;
    tracing::info!("shutting down: no new requests, draining in-flight batches");
    http.begin_shutdown();
    stop_pipeline.cancel();
    log.close();
    drain(Duration::from_secs(args.shutdown_timeout_secs), vec![http.server, pipeline, refresher, gauges]).await;
    db.flush_async().await.context("flushing the database")?;
    views_db.flush_async().await.context("flushing the read model")?;
    tracing::info!("stopped");
    Ok(())
}

async fn aws(args: ServeArgs, api: ApiConfig) -> anyhow::Result<()> {
    let clients = AwsClients::from_env().await;
    let settings = args.aws.settings();
    let mut registry = Registry::default();
    let aws_metrics = AwsMetrics::default();
    aws_metrics.register(&mut registry);
    let api_metrics = ApiMetrics::default();
    api_metrics.register(&mut registry);
    let store = Arc::new(DynamoStore::new(clients.dynamodb.clone(), settings.clone(), aws_metrics.clone()));
    let stop_pipeline = CancellationToken::new();
    let stop_api = CancellationToken::new();
    let mut tasks = Vec::new();

    let worker = matches!(args.role, Role::All | Role::Worker);
    if worker {
        let source = SqsSource::connect(clients.sqs.clone(), settings.clone(), aws_metrics.clone())
            .await
            .context("connecting to the ingest queue")?;
        tasks.push(source.spawn_heartbeat(stop_pipeline.clone()));
        let pipeline_metrics = PipelineMetrics::default();
        pipeline_metrics.register(&mut registry);
        let bus = Arc::new(EventBridgeBus::new(clients.eventbridge.clone(), settings.clone(), aws_metrics.clone()));
        tasks.push(tokio::spawn(catalog_pipeline::stages::run(
            Arc::new(source),
            store.clone(),
            bus,
            pipeline_config(&args, 10, args.aws.pollers.max(1), catalog_pipeline::config::DEFAULT_AWS_WRITE_BATCH_TIMEOUT),
            pipeline_metrics,
            stop_pipeline.clone(),
        )));
    }

    // Every role keeps a read model; only the api role fills and serves it. It is the only
    // database in AWS mode, so it has all of `--cache-mb`.
    let db = open_sled(&args.data, &args.data.data_dir.join(VIEWS_DB), args.data.cache_mb)?;
    let model = open_read_model(&db, &args.data)?;
    let mut subscription = None;
    if matches!(args.role, Role::All | Role::Api) {
        let states = store.scan_states().await.context("warming the read model from the products table")?;
        let warmed = model.apply(&states)?;
        tracing::info!(products = states.len(), views = warmed, "read model warmed from the store");
        let sub = Arc::new(
            InvalidationSubscription::create(
                clients.sqs.clone(),
                clients.eventbridge.clone(),
                settings.names.clone(),
                &instance_id(),
                aws_metrics.clone(),
            )
            .await
            .map_err(|e| anyhow!(e))
            .context("subscribing to invalidations")?,
        );
        let (feed, invalidations) = tokio::sync::mpsc::channel(DEFAULT_SUBSCRIBER_CAPACITY);
        tasks.push(tokio::spawn(catalog_readmodel::run_refresher(model.clone(), store.clone(), invalidations)));
        let (poller, wait, stop) = (sub.clone(), settings.wait_time, stop_api.clone());
        tasks.push(tokio::spawn(async move { poller.run(feed, wait, stop).await }));
        subscription = Some(sub);
    }

    let http = start_http(
        args.addr,
        AppState {
            readmodel: model.clone(),
            ingest: None,
            fill: Some(Arc::new(StoreFill::new(store.clone(), model.clone()))),
            readiness: Arc::new(AwsReadiness { clients: clients.clone(), settings: settings.clone(), worker }),
            registry: Arc::new(registry),
            metrics: api_metrics,
            config: api,
            draining: Arc::new(AtomicBool::new(false)),
        },
    )
    .await?;

    shutdown_signal().await;
    tracing::info!("shutting down: no new requests, draining in-flight batches");
    http.begin_shutdown();
    stop_pipeline.cancel();
    stop_api.cancel();
    tasks.push(http.server);
    drain(Duration::from_secs(args.shutdown_timeout_secs), tasks).await;
    if let Some(sub) = subscription {
        sub.remove().await;
    }
    db.flush_async().await.context("flushing the database")?;
    tracing::info!("stopped");
    Ok(())
}

/// Names this API instance's invalidation queue: unique per process, short enough for SQS.
fn instance_id() -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
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
fn spawn_gauges(registry: &mut Registry, log: EmbeddedLog, model: ReadModel, stop: CancellationToken) -> JoinHandle<()> {
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
                    detail: format!(
                        "embedded log, backlog {}, dead letters {}",
                        self.log.backlog(),
                        self.log.dead_letter_count()
                    ),
                },
                Check { name: "store", ok: true, detail: "embedded sled store".into() },
                Check { name: "breaker", ok: true, detail: "closed (embedded store is local)".into() },
            ]
        })
    }
}

/// Readiness in AWS mode: the queue and table answer (with the queue's backlog).
struct AwsReadiness {
    clients: AwsClients,
    settings: AwsSettings,
    worker: bool,
}

impl Readiness for AwsReadiness {
    fn checks(&self) -> catalog_api::state::BoxFuture<'_, Vec<Check>> {
        Box::pin(async move {
            let names = &self.settings.names;
            let table = tokio::time::timeout(
                CHECK_TIMEOUT,
                self.clients.dynamodb.describe_table().table_name(&names.products_table).send(),
            )
            .await;
            let store = match table {
                Ok(Ok(_)) => {
                    Check { name: "store", ok: true, detail: format!("DynamoDB table {} reachable", names.products_table) }
                }
                Ok(Err(e)) => {
                    Check { name: "store", ok: false, detail: aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string() }
                }
                Err(_) => Check { name: "store", ok: false, detail: format!("DynamoDB did not answer within {CHECK_TIMEOUT:?}") },
            };
            let mut checks = vec![Check { name: "readModel", ok: true, detail: "open".into() }, store];
            if self.worker {
                let queue = tokio::time::timeout(CHECK_TIMEOUT, async {
                    let url = self.clients.sqs.get_queue_url().queue_name(&names.ingest_queue).send().await?;
                    self.clients
                        .sqs
                        .get_queue_attributes()
                        .queue_url(url.queue_url().unwrap_or_default())
                        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
                        .send()
                        .await
                        .map_err(aws_sdk_sqs::Error::from)
                })
                .await;
                checks.push(match queue {
                    Ok(Ok(out)) => {
                        let backlog = out
                            .attributes()
                            .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages))
                            .cloned()
                            .unwrap_or_default();
                        Check { name: "eventSource", ok: true, detail: format!("SQS {}, backlog {backlog}", names.ingest_queue) }
                    }
                    Ok(Err(e)) => Check { name: "eventSource", ok: false, detail: e.to_string() },
                    Err(_) => {
                        Check { name: "eventSource", ok: false, detail: format!("SQS did not answer within {CHECK_TIMEOUT:?}") }
                    }
                });
            }
            checks.push(Check { name: "breaker", ok: true, detail: "closed (failed writes are released to SQS redrive)".into() });
            checks
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
