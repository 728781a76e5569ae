//! The catalog's domain: events as producers send them, the validated forms the
//! pipeline works with, per-product state with facet versions, and the views the BFF serves.
//!
//! Layout:
//! - `id`: `ProductId`, the one key everything is partitioned by.
//! - `money`: `Money` in integer minor units and ISO 4217 `Currency`, parsed from text, never f64.
//! - `event`: the three event kinds and three body shapes of docs/contract.md §1, with typed `ValidationError`s.
//! - `state`: `ProductState`, the fold of a product's events; versions make it convergent.
//! - `stored`: a state's compact binary form, as the embedded store keeps it.
//! - `view`: the web and mobile JSON a GET returns, rendered once per change.
//!
//! Nothing here does I/O, so every rule of the contract is unit-tested in isolation.

pub mod event;
pub mod id;
pub mod money;
pub mod state;
pub mod stored;
pub mod view;

pub use event::{CatalogEvent, Change, EventKind, Facet, ParseLimits, ProductChange, ProductStatus, ValidationError};
pub use id::ProductId;
pub use money::{Currency, Money};
pub use state::{FacetVersions, ProductState};
pub use stored::StoredStateError;
pub use view::{Availability, ViewSettings};
