//! The AWS backend, assembled: SQS → pipeline → DynamoDB → EventBridge for the worker role;
//! a per-instance invalidation queue → read model for the api role; `--role all` runs both.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use catalog_api::state::BoxFuture;
use catalog_api::state::FillMetrics;
use catalog_api::{Rebuilder, StoreFill};
use catalog_aws::dynamodb::DynamoStore;
use catalog_aws::eventbridge::{EventBridgeBus, InvalidationSubscription};
use catalog_aws::readiness::AwsReadiness;
use catalog_aws::sqs::SqsSource;
use catalog_aws::{AwsClients, AwsMetrics};
use catalog_pipeline::breaker::{Breaker, BreakerMetrics};
use catalog_pipeline::budget::Budget;
use catalog_pipeline::embedded::DEFAULT_SUBSCRIBER_CAPACITY;
use catalog_pipeline::{PipelineMetrics, config};
use catalog_readmodel::{OnlineRebuild, ReadModel, ReadModelError};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{Assembly, FinishStep};
use crate::cli::{Role, ServeArgs};
use crate::datadir::DataDir;

/// Writes every product of the products table into `model`, page by page as a parallel Scan
/// delivers them: memory holds a few pages, never the table. Returns (products, views written).
async fn fill_from_table(store: &DynamoStore, model: &ReadModel) -> Result<(u64, u64), ReadModelError> {
    fill_from_table_with(store, model, catalog_aws::DEFAULT_SCAN_SEGMENTS, Budget::unlimited(), |_| {}).await
}

/// [`fill_from_table`] with the Scan's segments and pace, and `progress` told the products so far.
pub(crate) async fn fill_from_table_with(
    store: &DynamoStore,
    model: &ReadModel,
    segments: u32,
    budget: Budget,
    mut progress: impl FnMut(u64),
) -> Result<(u64, u64), ReadModelError> {
    let (mut products, mut written) = (0, 0);
    let mut failed = None;
    let scanned = store
        .scan_states(segments, budget, |states| {
            products += states.len() as u64;
            progress(products);
            match model.apply(&states) {
                Ok(n) => written += n as u64,
                Err(e) => {
                    failed = Some(e);
                    return Err(catalog_pipeline::BackendError::unavailable("writing views", "the read model failed"));
                }
            }
            Ok(())
        })
        .await;
    match (failed, scanned) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(ReadModelError::Store(e)),
        (None, Ok(())) => Ok((products, written)),
    }
}

/// `POST /admin/rebuild` on an API instance: a new read model from a parallel Scan.
struct TableRebuilder {
    store: Arc<DynamoStore>,
    model: ReadModel,
}

impl Rebuilder for TableRebuilder {
    fn rebuild(&self) -> BoxFuture<'_, Result<OnlineRebuild, ReadModelError>> {
        let store = self.store.clone();
        Box::pin(catalog_readmodel::rebuild_online(&self.model, &*self.store, move |fresh| async move {
            fill_from_table(&store, &fresh).await.map(|(products, _)| products)
        }))
    }
}

pub async fn assemble(args: &ServeArgs) -> anyhow::Result<Assembly> {
    // Every role keeps a read model; only the api role fills and serves it. It is the only
    // database in AWS mode, so it has all of `--cache-mb`. Opened first, so that a data dir of
    // the embedded backend, whose read model is its store, is refused before any AWS call.
    let db = DataDir::new(&args.data.data_dir, args.data.cache_mb).open_views_alone()?;
    let model = ReadModel::open(&db, args.data.view_settings(), Some(Duration::from_secs(args.data.view_ttl_secs)))
        .context("opening the read model")?
        .keep_hot(args.hot_views_mb << 20);
    anyhow::ensure!(
        !model.holds_state(),
        "the data dir {} holds an embedded catalog (its read model is the embedded store): an AWS instance needs a --data-dir of its own",
        args.data.data_dir.display()
    );
    // The category index is a scan of the records: done before listening, so that no request
    // waits for it.
    tokio::task::spawn_blocking({
        let model = model.clone();
        move || model.prepare()
    })
    .await?
    .context("reading the read model's records")?;
    let clients = AwsClients::from_env().await?;
    let settings = args.aws_settings();
    let mut registry = Registry::default();
    let aws_metrics = AwsMetrics::default();
    aws_metrics.register(&mut registry);
    let store = Arc::new(DynamoStore::new(clients.dynamodb.clone(), settings.clone(), aws_metrics.clone()));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut finish: Vec<FinishStep> = Vec::new();

    let worker = matches!(args.role, Role::All | Role::Worker);
    let mut breaker = None;
    if worker {
        let source = SqsSource::connect(clients.sqs.clone(), settings.clone(), aws_metrics.clone())
            .await
            .context("connecting to the ingest queue")?;
        tasks.push(source.spawn_heartbeat(stop.clone()));
        tasks.push(spawn_queue_gauges(&mut registry, source.clone(), stop.clone()));
        let pipeline_metrics = PipelineMetrics::default();
        pipeline_metrics.register(&mut registry);
        let breaker_metrics = BreakerMetrics::default();
        breaker_metrics.register(&mut registry);
        let guard = Arc::new(Breaker::new(args.breaker_config(), breaker_metrics));
        breaker = Some(guard.clone());
        let bus = Arc::new(EventBridgeBus::new(clients.eventbridge.clone(), settings.clone(), aws_metrics.clone()));
        tasks.push(tokio::spawn(catalog_pipeline::stages::run(
            Arc::new(source),
            store.clone(),
            bus,
            args.pipeline_config(
                10,
                args.aws_runtime.pollers,
                (config::DEFAULT_WRITE_BATCH, config::DEFAULT_AWS_WRITE_BATCH_TIMEOUT),
            ),
            pipeline_metrics,
            guard,
            stop.clone(),
        )));
    }

    super::register_disk_size(&mut registry, vec![db.clone()], None);
    super::register_hot_views(&mut registry, model.clone());
    if matches!(args.role, Role::All | Role::Api) {
        let started = std::time::Instant::now();
        let (products, warmed) =
            fill_from_table(&store, &model).await.context("warming the read model from the products table")?;
        tracing::info!(products, views = warmed, elapsed = ?started.elapsed(), "read model warmed from the store");
        let subscription = Arc::new(
            InvalidationSubscription::create(
                clients.sqs.clone(),
                clients.eventbridge.clone(),
                settings.names.clone(),
                &instance_id(),
                aws_metrics.clone(),
            )
            .await
            .context("subscribing to invalidations")?,
        );
        let (feed, invalidations) = tokio::sync::mpsc::channel(DEFAULT_SUBSCRIBER_CAPACITY);
        let refresh_metrics = catalog_readmodel::RefreshMetrics::default();
        refresh_metrics.register(&mut registry);
        tasks.push(tokio::spawn(catalog_readmodel::run_refresher(model.clone(), store.clone(), invalidations, refresh_metrics)));
        let (poller, wait, stop) = (subscription.clone(), settings.wait_time, stop.clone());
        tasks.push(tokio::spawn(async move { poller.run(feed, wait, stop).await }));
        finish.push(Box::pin(async move {
            subscription.remove().await;
            Ok(())
        }));
    }
    finish.push(Box::pin(async move { db.flush_async().await.map(drop).context("flushing the read model") }));

    let fill_metrics = FillMetrics::default();
    fill_metrics.register(&mut registry);
    Ok(Assembly {
        readmodel: model.clone(),
        ingest: None,
        rebuilder: matches!(args.role, Role::All | Role::Api)
            .then(|| Arc::new(TableRebuilder { store: store.clone(), model: model.clone() }) as Arc<dyn Rebuilder>),
        fill: Some(Arc::new(StoreFill::new(store, model, args.fill_config(), fill_metrics))),
        readiness: Arc::new(AwsReadiness { clients, settings, breaker }),
        registry,
        tasks,
        stop,
        finish,
    })
}

/// How often the worker asks SQS how deep its queues are: two cheap calls, priced like any other.
const QUEUE_GAUGE_INTERVAL: Duration = Duration::from_secs(10);

/// The same backlog and dead-letter gauges the embedded log keeps, from SQS's approximations,
/// so one dashboard serves both backends.
fn spawn_queue_gauges(registry: &mut Registry, source: SqsSource, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let backlog = Gauge::<i64>::default();
    let dead_letters = Gauge::<i64>::default();
    registry.register(
        "catalog_event_log_backlog",
        "Accepted messages not yet processed (SQS: waiting and in flight)",
        backlog.clone(),
    );
    registry.register("catalog_dead_letters", "Messages in the dead-letter queue", dead_letters.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(QUEUE_GAUGE_INTERVAL);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => match source.depths().await {
                    Ok((waiting, dead)) => {
                        backlog.set(i64::try_from(waiting).unwrap_or(i64::MAX));
                        dead_letters.set(i64::try_from(dead).unwrap_or(i64::MAX));
                    }
                    Err(e) => tracing::debug!(error = %catalog_pipeline::error::chain(&e), "reading the queue depths failed"),
                },
            }
        }
    })
}

/// Names this API instance's invalidation queue: unique per process, short enough for SQS.
fn instance_id() -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}
