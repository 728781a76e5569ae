//! `catalog replay reproject`: the store's current state put right from the event log's
//! projection, product by product in id order, paced, resumable from a checkpoint file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use catalog_aws::dynamodb::DynamoStore;
use catalog_aws::eventbridge::EventBridgeBus;
use catalog_aws::{AwsClients, AwsMetrics};
use catalog_domain::ProductState;
use catalog_pipeline::budget::Budget;
use catalog_pipeline::{Invalidation, InvalidationBus, ProductChanged, ProductStore};
use catalog_replay::EitherOrBoth;

use super::Verdict;
use super::progress::{Progress, rate};
use crate::cli::{Backend, ReprojectArgs};
use crate::datadir::DataDir;

/// Products compared and written per step; the checkpoint moves once per step.
const STEP: usize = 100;
/// Attempts to rewrite a product whose item a live pipeline keeps changing meanwhile.
const RACE_ATTEMPTS: u32 = 3;
const CHECKPOINT_FILE: &str = "reproject.checkpoint";

#[derive(Default)]
struct Tally {
    rewritten: u64,
    already_right: u64,
    raced: u64,
}

pub fn reproject(args: ReprojectArgs) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    let checkpoint = args.checkpoint.clone().unwrap_or_else(|| args.target.data.data_dir.join(CHECKPOINT_FILE));
    let resume_after = if args.restart { None } else { read_checkpoint(&checkpoint)? };
    if let Some(id) = &resume_after {
        println!("resuming after product {id:?} (from {}; --restart starts over)", checkpoint.display());
    }
    let budget = Budget::per_second(args.max_per_sec);
    let (tally, products, store_only) = match args.target.backend {
        Backend::Embedded => embedded(&args, &checkpoint, resume_after.as_deref(), &budget)?,
        Backend::Aws => super::runtime()?.block_on(aws(&args, &checkpoint, resume_after.as_deref(), &budget))?,
    };
    remove_checkpoint(&checkpoint)?;
    let elapsed = started.elapsed();
    println!(
        "reprojected {products} products from the event log in {elapsed:.2?} ({}): {} rewritten, {} already right{}{}",
        rate(products, elapsed),
        tally.rewritten,
        tally.already_right,
        if store_only > 0 { format!(", {store_only} in the store only (kept)") } else { String::new() },
        if tally.raced > 0 {
            format!(", {} kept changing under a live pipeline (left as it is)", tally.raced)
        } else {
            String::new()
        },
    );
    Ok(if tally.raced > 0 { Verdict::Unfinished } else { Verdict::Clean })
}

fn embedded(
    args: &ReprojectArgs,
    checkpoint: &Path,
    resume_after: Option<&str>,
    budget: &Budget,
) -> anyhow::Result<(Tally, u64, u64)> {
    let data = &args.target.data;
    let dir = DataDir::existing(&data.data_dir, data.cache_mb)?;
    let db = dir.open_main()?;
    let log = dir.open_log(&db, Default::default())?;
    let (views, store) = super::open_embedded_store(&dir, &db, &log, data)?;
    let mut progress = Progress::new("folding the event log", "entries", Some(log.unfolded()));
    let (tail, snapshot) = catalog_replay::project_tail(&log, data.parse_limits(), |n| progress.set(n))?;
    progress.finish();
    // The log's projection (the tail's products from memory, the snapshot's others streamed)
    // beside the store's records, both in id order: one product of each at a time, where
    // holding the whole projection and reading each record apart took 632 MB at 1M products.
    // A step is written only once the scan is past it.
    let projected = snapshot.merged_with(tail.into_sorted());
    let mut pairs = catalog_replay::side_by_side(projected, store.states(), |s| s.id.as_str(), |s| s.id.as_str());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let (mut tally, mut store_only) = (Tally::default(), 0u64);
    let mut progress = Progress::new("reprojecting", "products", None);
    loop {
        let (mut fixed, mut last, mut projected) = (Vec::new(), None, 0u64);
        for pair in pairs.by_ref() {
            let (projected_state, current) = match pair.context("reading the event log's projection and the store")? {
                EitherOrBoth::Both(p, s) => (p, Some(s)),
                EitherOrBoth::Left(p) => (p, None),
                EitherOrBoth::Right(_) => {
                    store_only += 1;
                    continue;
                }
            };
            if done_before(&projected_state, resume_after) {
                continue;
            }
            match catalog_replay::reconcile(&projected_state, current.as_ref()) {
                Some(state) => fixed.push(state),
                None => tally.already_right += 1,
            }
            last = Some(projected_state.id.as_str().to_owned());
            projected += 1;
            if projected as usize == STEP {
                break;
            }
        }
        if projected == 0 {
            break;
        }
        runtime.block_on(budget.take(fixed.len()));
        // One write: the record is the state and its views.
        store.put(&fixed).context("writing the store")?;
        tally.rewritten += fixed.len() as u64;
        views.flush().context("flushing the store")?;
        write_checkpoint(checkpoint, last.as_deref())?;
        progress.inc(projected);
    }
    let (products, _) = progress.finish();
    Ok((tally, products, store_only))
}

async fn aws(
    args: &ReprojectArgs,
    checkpoint: &Path,
    resume_after: Option<&str>,
    budget: &Budget,
) -> anyhow::Result<(Tally, u64, u64)> {
    let target = &args.target;
    let clients = AwsClients::from_env().await?;
    let settings = target.aws.settings();
    let store = DynamoStore::new(clients.dynamodb.clone(), settings.clone(), AwsMetrics::default());
    // API instances refresh the products that changed, as they would after any write.
    let bus = EventBridgeBus::new(clients.eventbridge.clone(), settings, AwsMetrics::default());
    let (projection, _) = super::verify::project_aws(&store, target.scan_segments, Budget::unlimited()).await?;
    let states = remaining(projection.into_sorted(), resume_after);
    let mut tally = Tally::default();
    let mut progress = Progress::new("reprojecting", "products", Some(states.len() as u64));
    for step in states.chunks(STEP) {
        let mut pending: Vec<&ProductState> = step.iter().collect();
        let mut changed = Vec::new();
        for _ in 0..RACE_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let ids: Vec<_> = pending.iter().map(|s| s.id.clone()).collect();
            let current: HashMap<_, _> = store
                .get_states(&ids)
                .await
                .context("reading the products table")?
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect();
            let mut raced = Vec::new();
            for projected in pending {
                let now = current.get(&projected.id);
                let Some(state) = catalog_replay::reconcile(projected, now) else {
                    tally.already_right += 1;
                    continue;
                };
                budget.take(1).await;
                if store.put_state_if(&state, now.map(|s| s.revision)).await.context("writing the products table")? {
                    changed.push(ProductChanged {
                        product_id: state.id.clone(),
                        revision: state.revision,
                        versions: state.versions,
                        state: None,
                    });
                    tally.rewritten += 1;
                } else {
                    raced.push(projected);
                }
            }
            pending = raced;
        }
        tally.raced += pending.len() as u64;
        if !changed.is_empty() {
            bus.publish(Invalidation { products: changed, log_sequence: None, origins: Vec::new() })
                .await
                .context("announcing the rewritten products")?;
        }
        write_checkpoint(checkpoint, step.last().map(|s| s.id.as_str()))?;
        progress.inc(step.len() as u64);
    }
    let (products, _) = progress.finish();
    Ok((tally, products, 0))
}

/// The states after the checkpoint's product (ids sort the same way every run).
fn remaining(states: Vec<ProductState>, resume_after: Option<&str>) -> Vec<ProductState> {
    states.into_iter().filter(|s| !done_before(s, resume_after)).collect()
}

/// Whether a run that stopped after `resume_after` already reprojected this product.
fn done_before(state: &ProductState, resume_after: Option<&str>) -> bool {
    resume_after.is_some_and(|after| state.id.as_str() <= after)
}

fn read_checkpoint(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the checkpoint {}", path.display())),
    }
}

/// Written beside and renamed over, so a crash leaves the old checkpoint or the new one.
fn write_checkpoint(path: &Path, last: Option<&str>) -> anyhow::Result<()> {
    let Some(last) = last else { return Ok(()) };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    std::fs::write(&tmp, last).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing the checkpoint {}", path.display()))
}

fn remove_checkpoint(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the finished checkpoint {}", path.display()))
        }
        _ => Ok(()),
    }
}
