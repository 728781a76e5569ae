//! `catalog replay rebuild`: a stopped instance's read model, rebuilt beside the old one and
//! swapped in: embedded from the event log, AWS from the products table.

use anyhow::Context;
use catalog_readmodel::ReadModel;

use super::progress::Progress;
use crate::cli::{Backend, DataArgs, RebuildArgs};
use crate::datadir::DataDir;

/// Builds the read model into a fresh database beside the live one and swaps it in: nothing
/// is deleted key by key (sled 0.34 clears a tree one key at a time, which took longer than
/// writing it), and a crash part way leaves either the old views or none, which the next
/// `serve` re-renders from the store.
pub fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    match args.target.backend {
        Backend::Embedded => embedded(args.target.data),
        Backend::Aws => aws(&args),
    }
}

/// An API instance's read model from the products table, page by page (a parallel Scan).
fn aws(args: &RebuildArgs) -> anyhow::Result<()> {
    let data = &args.target.data;
    let dir = DataDir::new(&data.data_dir, data.cache_mb);
    let (live, fresh_path, old_path) = (dir.views_path(), dir.rebuild_path(), dir.replaced_path());
    // Opened only to prove no instance is running on this data dir.
    drop(dir.open_views_alone()?);
    for leftover in [&fresh_path, &old_path] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover).with_context(|| format!("removing {}", leftover.display()))?;
        }
    }
    let started = std::time::Instant::now();
    let fresh = dir.open_rebuild()?;
    let model = ReadModel::open(&fresh, data.view_settings(), None).context("opening the read model")?;
    let runtime = super::runtime()?;
    let (products, written) = runtime.block_on(async {
        let clients = catalog_aws::AwsClients::from_env().await?;
        let store = catalog_aws::dynamodb::DynamoStore::new(clients.dynamodb, args.target.aws.settings(), Default::default());
        let mut progress = Progress::new("rebuilding the read model from the products table", "products", None);
        let budget = catalog_pipeline::budget::Budget::per_second(args.max_per_sec);
        let filled =
            crate::assemble::aws::fill_from_table_with(&store, &model, args.target.scan_segments, budget, |n| progress.set(n))
                .await
                .context("reading the products table");
        progress.finish();
        filled
    })?;
    fresh.flush().context("flushing the rebuilt read model to disk")?;
    drop(model);
    drop(fresh);
    swap_directories(&live, &fresh_path, &old_path)?;
    println!("rebuilt {written} views of {products} products from the products table in {:.2?}", started.elapsed());
    Ok(())
}

/// The fresh directory becomes the live one; the old one is removed.
fn swap_directories(live: &std::path::Path, fresh: &std::path::Path, old: &std::path::Path) -> anyhow::Result<()> {
    if live.exists() {
        std::fs::rename(live, old).with_context(|| format!("moving {} aside", live.display()))?;
    }
    std::fs::rename(fresh, live).with_context(|| format!("moving the rebuilt read model to {}", live.display()))?;
    std::fs::remove_dir_all(old)
        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        .with_context(|| format!("removing the old read model {}", old.display()))
}

fn embedded(args: DataArgs) -> anyhow::Result<()> {
    let data = DataDir::existing(&args.data_dir, args.cache_mb)?;
    // Held until the swap: no `serve` can be running on this data dir meanwhile.
    let db = data.open_main()?;
    let log = data.open_log(&db, Default::default())?;
    let (live, fresh_path, old_path) = (data.views_path(), data.rebuild_path(), data.replaced_path());
    for leftover in [&fresh_path, &old_path] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover).with_context(|| format!("removing {}", leftover.display()))?;
        }
    }
    // An older data dir's states are moved out of the main database first, as `serve` would,
    // so none are left there to be mistaken for the store's later. Only then is the live store
    // opened: its recovery is work the rebuild redoes anyway (about a second at 1M products).
    if live.exists() && catalog_pipeline::embedded::holds_legacy_states(&db) {
        drop(super::open_embedded_store(&data, &db, &log, &args)?);
    }
    let fresh = data.open_rebuild()?;
    // The records are the store: rebuilt from the log, they hold its projection's states.
    let model = ReadModel::open_store(&fresh, args.view_settings()).context("opening the read model")?;
    let mut progress = Progress::new("rebuilding the read model", "log entries", Some(log.unfolded()));
    let report =
        catalog_replay::rebuild(&log, &model, args.parse_limits(), |n| progress.set(n)).context("rebuilding the read model")?;
    progress.finish();
    fresh.flush().context("flushing the rebuilt read model to disk")?;
    drop(model);
    drop(fresh);
    swap_directories(&live, &fresh_path, &old_path)?;
    drop(db);
    let snapshot = match report.snapshot_sequence {
        0 => String::new(),
        seq => format!("the snapshot through sequence {seq} and "),
    };
    println!(
        "rebuilt {} views of {} products from {snapshot}{} log entries in {:.2?} (fold {:.2?}, clear {:.2?}, write {:.2?}; {} invalid and {} dead-lettered entries skipped; checkpoint {})",
        report.views_written,
        report.products,
        report.entries_read,
        report.elapsed,
        report.fold_elapsed,
        report.clear_elapsed,
        report.write_elapsed,
        report.invalid_skipped,
        report.dead_lettered_skipped,
        report.last_sequence
    );
    Ok(())
}
