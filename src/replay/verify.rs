//! `catalog replay verify`: the log's projection ⇄ the store ⇄ the read model, every drift
//! printed; `--repair` rewrites drifted views and listings from the store.

use std::time::Instant;

use anyhow::Context;
use catalog_aws::dynamodb::DynamoStore;
use catalog_aws::{AwsClients, AwsMetrics};
use catalog_domain::ProductState;
use catalog_pipeline::budget::Budget;
use catalog_readmodel::{EmbeddedStore, ReadModel};
use catalog_replay::{Drift, DriftKind, FoldReport, Projection};

use super::Verdict;
use super::progress::{Progress, rate};
use crate::cli::{Backend, VerifyArgs};
use crate::datadir::DataDir;

pub fn verify(args: VerifyArgs) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    let data = &args.target.data;
    // `_main` holds the embedded data dir's lock until the end: no `serve` may start meanwhile.
    let (compared, fold, store, views, _main) = match args.target.backend {
        Backend::Embedded => {
            let dir = DataDir::existing(&data.data_dir, data.cache_mb)?;
            let db = dir.open_main()?;
            let log = dir.open_log(&db, Default::default())?;
            let mut progress = Progress::new("folding the event log", "entries", Some(log.unfolded()));
            // The tail's products in memory, the snapshot's others read in id order beside the
            // store's records: 1M products verified in about a rebuild's memory.
            let (tail, snapshot) = catalog_replay::project_tail(&log, data.parse_limits(), |n| progress.set(n))?;
            progress.finish();
            let fold = tail.report.clone();
            // The store is the read model's records: their states against the log, their
            // bodies and listings against those states.
            let (views, store) = super::open_embedded_store(&dir, &db, &log, data)?;
            let compared = catalog_replay::compare_store(snapshot.merged_with(tail.into_sorted()), store.states())
                .context("comparing the store with the event log")?;
            (compared, fold, Store::Embedded(store), Some(views), Some(db))
        }
        Backend::Aws => {
            let (projection, mut states) = super::runtime()?.block_on(read_aws(&args))?;
            let fold = projection.report.clone();
            states.sort_unstable_by(|a, b| a.id.cmp(&b.id));
            let compared = catalog_replay::compare_store(
                projection.into_sorted().into_iter().map(Ok::<_, catalog_replay::ReplayError>),
                states.iter().map(Ok::<_, catalog_replay::ReplayError>),
            )?;
            let dir = DataDir::new(&data.data_dir, data.cache_mb);
            let views = if dir.views_path().exists() { Some(dir.open_views_alone()?) } else { None };
            (compared, fold, Store::Aws(states), views, None)
        }
    };
    let mut drifts = compared.drifts;
    let mut summary = describe_sources(&fold, compared.log_products, compared.store_products);
    if let Some(views) = &views {
        let model = ReadModel::open(views, data.view_settings(), None).context("opening the read model")?;
        let (view_drifts, report) = store.compare_views(&model)?;
        summary.push_str(&format!(", read model {} views and {} listing entries", report.views, report.listings));
        for d in &view_drifts {
            println!("{d}");
        }
        if args.repair && !view_drifts.is_empty() {
            let repaired = catalog_replay::repair_views(&model, &store.states_of(&view_drifts)?, &view_drifts)?;
            views.flush().context("flushing the repaired read model")?;
            let (left, _) = store.compare_views(&model)?;
            println!("repaired the views and listings of {repaired} product(s) from the store");
            drifts.extend(left);
        } else {
            drifts.extend(view_drifts);
        }
    } else {
        summary.push_str(&format!(
            ", no read model in {} (pass an API instance's --data-dir, stopped, to check its views)",
            data.data_dir.display()
        ));
    }
    for d in drifts.iter().filter(|d| d.kind == DriftKind::Store) {
        println!("{d}");
    }
    let elapsed = started.elapsed();
    if drifts.is_empty() {
        println!("verified {summary}: no drift ({elapsed:.2?})");
        return Ok(Verdict::Clean);
    }
    println!("verified {summary}: {} ({elapsed:.2?})", count(&drifts));
    if drifts.iter().any(|d| d.kind == DriftKind::Store) {
        println!("the store disagrees with the event log: `catalog replay reproject` puts the store right from the log");
    }
    if !args.repair && drifts.iter().any(|d| d.kind != DriftKind::Store) {
        println!("the read model disagrees with the store: `catalog replay verify --repair` rewrites those views");
    }
    Ok(Verdict::Unfinished)
}

/// The store's states the views are checked against: read from the records as needed
/// (embedded), or the products table as read, in id order (AWS).
enum Store {
    Embedded(EmbeddedStore),
    Aws(Vec<ProductState>),
}

impl Store {
    fn compare_views(&self, model: &ReadModel) -> anyhow::Result<(Vec<Drift>, catalog_replay::ViewReport)> {
        let compared = match self {
            Self::Embedded(store) => catalog_replay::compare_views(model, store.states()),
            Self::Aws(states) => catalog_replay::compare_views(model, states.iter().map(Ok::<_, catalog_replay::ReplayError>)),
        };
        compared.context("comparing the read model with the store")
    }

    /// The states of the products these drifts name, those the store has.
    fn states_of(&self, drifts: &[Drift]) -> anyhow::Result<Vec<ProductState>> {
        let ids: std::collections::BTreeSet<&str> = drifts.iter().map(|d| d.product.as_str()).collect();
        match self {
            Self::Embedded(store) => {
                let mut states = Vec::with_capacity(ids.len());
                for id in ids {
                    states.extend(store.model().state(id).context("reading the store")?);
                }
                Ok(states)
            }
            Self::Aws(states) => Ok(states.iter().filter(|s| ids.contains(s.id.as_str())).cloned().collect()),
        }
    }
}

fn describe_sources(fold: &FoldReport, log_products: u64, store_products: u64) -> String {
    let snapshot = match fold.snapshot_sequence {
        0 => String::new(),
        seq => format!("its snapshot through sequence {seq} and "),
    };
    format!(
        "the event log ({snapshot}{} entries, {} invalid and {} dead-lettered skipped; {log_products} products), the store ({store_products} products)",
        fold.entries_read, fold.invalid_skipped, fold.dead_lettered_skipped
    )
}

fn count(drifts: &[Drift]) -> String {
    let products: std::collections::HashSet<&str> = drifts.iter().map(|d| d.product.as_str()).collect();
    format!("{} drifts in {} products", drifts.len(), products.len())
}

/// The events table folded in segment order, and every product of the products table.
pub(super) async fn read_aws(args: &VerifyArgs) -> anyhow::Result<(Projection, Vec<ProductState>)> {
    let target = &args.target;
    let store = DynamoStore::new(AwsClients::from_env().await?.dynamodb, target.aws.settings(), AwsMetrics::default());
    let budget = Budget::per_second(args.max_per_sec);
    let (projection, _segments) = project_aws(&store, target.scan_segments, budget.clone()).await?;
    let mut progress = Progress::new("reading the products table", "products", None);
    let mut all = Vec::new();
    store
        .scan_states(target.scan_segments, budget, |page| {
            progress.inc(page.len() as u64);
            all.extend(page);
            Ok(())
        })
        .await
        .context("scanning the products table")?;
    let (n, elapsed) = progress.finish();
    tracing::info!(products = n, rate = %rate(n, elapsed), "products table read");
    Ok((projection, all))
}

/// Folds the events table: segments in key order (the time of their first event), events
/// within a segment in the order they were written.
pub(super) async fn project_aws(store: &DynamoStore, segments: u32, budget: Budget) -> anyhow::Result<(Projection, u64)> {
    let mut progress = Progress::new("reading the event log", "events", None);
    let log = store.scan_log(segments, budget, |n| progress.set(n)).await.context("scanning the events table")?;
    let (events, elapsed) = progress.finish();
    tracing::info!(segments = log.len(), events, rate = %rate(events, elapsed), "event log read");
    let mut projection = Projection::default();
    for segment in &log {
        for (position, event) in &segment.events {
            projection.report.entries_read += 1;
            projection.apply(event, *position);
        }
    }
    Ok((projection, log.len() as u64))
}
