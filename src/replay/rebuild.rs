//! `catalog replay rebuild`: a stopped embedded instance's read model, rebuilt from its log.

use anyhow::Context;
use catalog_pipeline::embedded::EmbeddedLog;
use catalog_readmodel::ReadModel;

use super::progress::Progress;
use crate::cli::DataArgs;
use crate::datadir::DataDir;

/// Builds the read model into a fresh database beside the live one and swaps it in: nothing
/// is deleted key by key (sled 0.34 clears a tree one key at a time, which took longer than
/// writing it), and a crash part way leaves either the old views or none, which the next
/// `serve` re-renders from the store.
pub fn rebuild(args: DataArgs) -> anyhow::Result<()> {
    let data = DataDir::existing(&args.data_dir, args.cache_mb)?;
    // Held until the swap: no `serve` can be running on this data dir meanwhile.
    let db = data.open_main()?;
    let log = EmbeddedLog::open(&db, Default::default()).context("opening the event log")?;
    let (live, fresh_path, old_path) = (data.views_path(), data.rebuild_path(), data.replaced_path());
    for leftover in [&fresh_path, &old_path] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover).with_context(|| format!("removing {}", leftover.display()))?;
        }
    }
    let fresh = data.open_rebuild()?;
    let model = ReadModel::open(&fresh, args.view_settings(), None).context("opening the read model")?;
    let total = log.last_sequence();
    let mut progress = Progress::new("rebuilding the read model", "log entries", Some(total));
    let report =
        catalog_replay::rebuild(&log, &model, args.parse_limits(), |n| progress.set(n)).context("rebuilding the read model")?;
    progress.finish();
    fresh.flush().context("flushing the rebuilt read model to disk")?;
    drop(model);
    drop(fresh);
    if live.exists() {
        std::fs::rename(&live, &old_path).with_context(|| format!("moving {} aside", live.display()))?;
    }
    std::fs::rename(&fresh_path, &live).with_context(|| format!("moving the rebuilt read model to {}", live.display()))?;
    std::fs::remove_dir_all(&old_path)
        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
        .with_context(|| format!("removing the old read model {}", old_path.display()))?;
    drop(db);
    println!(
        "rebuilt {} views of {} products from {} log entries in {:.2?} (fold {:.2?}, clear {:.2?}, write {:.2?}; {} invalid and {} dead-lettered entries skipped; checkpoint {})",
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
