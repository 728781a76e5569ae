//! The data dir's layout, and opening its sled databases with errors an operator can act on.
//!
//! ```text
//! <data-dir>/event-log/            the event log's segment files (embedded backend)
//! <data-dir>/event-log/snapshot/   the log's snapshot: runs of product states and their MANIFEST
//! <data-dir>/catalog.sled          dead letters, the log's cursor (embedded)
//! <data-dir>/views.sled            the read model; embedded, also the store (each record a product's state and views)
//! <data-dir>/views.sled.rebuild    a rebuild in progress (removed when it is swapped in)
//! <data-dir>/views.sled.old        the read model being replaced (removed after the swap)
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};

/// The event log and product state (embedded backend).
pub const MAIN_DB: &str = "catalog.sled";
/// The event log's segment files, beside the main database that holds its cursor.
pub const LOG_DIR: &str = "event-log";
/// The read model: derived and disposable, so it lives apart and a rebuild can replace it whole.
pub const VIEWS_DB: &str = "views.sled";

#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    cache_mb: u64,
}

impl DataDir {
    /// `cache_mb` is the page cache of every database open at once together.
    pub fn new(root: impl Into<PathBuf>, cache_mb: u64) -> Self {
        Self { root: root.into(), cache_mb }
    }

    /// For tools that read what `serve` wrote: a missing data dir is a mistyped path, not an
    /// empty catalog, and must not be created.
    pub fn existing(root: impl Into<PathBuf>, cache_mb: u64) -> anyhow::Result<Self> {
        let dir = Self::new(root, cache_mb);
        if !dir.root.join(MAIN_DB).exists() {
            return Err(anyhow!(
                "no catalog data in {}: pass the --data-dir (CATALOG_DATA_DIR) that `catalog serve` uses",
                dir.root.display()
            ));
        }
        Ok(dir)
    }

    /// The event log, in `db` (the main database, whose lock also guards the log) and its
    /// segment files.
    pub fn open_log(
        &self,
        db: &sled::Db,
        config: catalog_pipeline::embedded::LogConfig,
    ) -> anyhow::Result<catalog_pipeline::embedded::EmbeddedLog> {
        catalog_pipeline::embedded::EmbeddedLog::open(db, &self.root.join(LOG_DIR), config).context("opening the event log")
    }

    pub fn views_path(&self) -> PathBuf {
        self.root.join(VIEWS_DB)
    }

    pub fn rebuild_path(&self) -> PathBuf {
        self.root.join(format!("{VIEWS_DB}.rebuild"))
    }

    pub fn replaced_path(&self) -> PathBuf {
        self.root.join(format!("{VIEWS_DB}.old"))
    }

    /// The main database, holding the data dir's lock for as long as it is open: an eighth of
    /// the cache. It holds the log's cursor and the dead letters, small and mostly written;
    /// the snapshot it held until round nine (BENCHMARKS.md) is in files of its own, and an
    /// older data dir's is moved out of it on open.
    pub fn open_main(&self) -> anyhow::Result<sled::Db> {
        self.open(&self.root.join(MAIN_DB), self.cache_mb / 8)
    }

    /// The read model's database beside the main one (half the cache).
    pub fn open_views(&self) -> anyhow::Result<sled::Db> {
        self.open(&self.views_path(), self.cache_mb / 2)
    }

    /// The read model as the only database (AWS backend): all of the cache.
    pub fn open_views_alone(&self) -> anyhow::Result<sled::Db> {
        self.open(&self.views_path(), self.cache_mb)
    }

    /// A rebuild's fresh read model, beside the open main database.
    pub fn open_rebuild(&self) -> anyhow::Result<sled::Db> {
        self.open(&self.rebuild_path(), self.cache_mb / 2)
    }

    fn open(&self, path: &Path, cache_mb: u64) -> anyhow::Result<sled::Db> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating the data dir {}", self.root.display()))?;
        sled::Config::new()
            // Half of an odd 1 MiB is 0, and sled panics on an empty cache.
            .cache_capacity(cache_mb.max(1) * 1024 * 1024)
            .path(path)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock") => anyhow!(
                    "the data dir {} is in use by another catalog process (a running `catalog serve`?): stop it first, or pass another --data-dir",
                    self.root.display()
                ),
                other => anyhow!("opening the database at {}: {other}", path.display()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_data_dir_is_an_error_for_tools_and_is_not_created() {
        let parent = tempfile::tempdir().unwrap();
        let missing = parent.path().join("nope");
        let message = DataDir::existing(&missing, 8).unwrap_err().to_string();
        assert!(message.contains("CATALOG_DATA_DIR"), "{message}");
        assert!(!missing.exists());
    }

    #[test]
    fn the_smallest_cache_opens_both_databases() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path(), 1);
        let _main = data.open_main().unwrap();
        let _views = data.open_views().unwrap();
        assert!(DataDir::existing(dir.path(), 1).is_ok());
    }
}
