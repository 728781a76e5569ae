//! `catalog replay …`: the operator tools, run against a stopped instance's data dir.

use anyhow::Context;
use catalog_domain::{ParseLimits, ViewSettings};
use catalog_pipeline::embedded::EmbeddedLog;
use catalog_readmodel::ReadModel;

use crate::cli::DataArgs;
use crate::serve::open_db;

pub fn rebuild(args: DataArgs) -> anyhow::Result<()> {
    let db = open_db(&args)?;
    let log = EmbeddedLog::open(&db, Default::default()).context("opening the event log")?;
    let model = ReadModel::open(&db, ViewSettings { low_stock_threshold: args.low_stock_threshold }, None)
        .context("opening the read model")?;
    let total = log.last_sequence();
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("{spinner} rebuilding read model [{bar:40}] {pos}/{len} events ({per_sec}, {eta} left)")
            .expect("static template")
            .progress_chars("=> "),
    );
    let report = catalog_replay::rebuild(&log, &model, ParseLimits { max_body_bytes: args.max_body_bytes }, |n| bar.set_position(n))
        .context("rebuilding the read model")?;
    bar.finish_and_clear();
    db.flush().context("flushing the read model to disk")?;
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
