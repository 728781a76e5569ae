//! The materialized read model: one ready-to-send view per product in sled, a category index
//! in memory for cursor pagination, and a checkpoint of the last applied log sequence.
//!
//! Layout:
//! - `view`: the stored form of a view: bodies, gzip bodies and ETags, so a GET only slices bytes.
//! - `derived`: what is kept in memory beside the records: the category index.
//! - `hot`: the most read views, decoded, in memory in front of sled.
//! - `model`: `ReadModel`, reads (by id, by category, many ids) and monotonic writes.
//! - `refresh`: the task that turns invalidations into fresh views (refresh-ahead).
//! - `online`: a rebuild beside the live model, swapped in while reads go on.
//! - `store`: the embedded store, which is the read model's records themselves.

mod derived;
mod hot;
mod model;
mod online;
mod refresh;
mod store;
mod view;

pub use hot::{DEFAULT_HOT_VIEWS_BYTES, HotStats};
pub use model::{DEFAULT_MAX_PAGE, DEFAULT_VIEW_TTL, Page, ReadModel, ReadModelError};
pub use online::{OnlineRebuild, rebuild_online};
pub use refresh::{RefreshMetrics, catch_up, run_refresher};
pub use store::{EmbeddedStore, Recovery};
pub use view::{Effort, GZIP_MIN_BYTES, StoredView, Variant, etag, gzip};
