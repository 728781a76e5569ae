//! The Backend-for-Frontend: every route of docs/contract.md §2 on warp, answering from the read model.
//!
//! Layout:
//! - `config`: CORS origins, cache headers, limits and the ingest token, each with its default.
//! - `state`: `AppState` and the small ports the routes call (`Ingest`, `ViewFill`, `Readiness`),
//!   so the BFF runs the same over embedded and AWS backends.
//! - `http`: ETag / If-None-Match, gzip and JSON error responses, shared by every route.
//! - `routes`: products, events and operations routes; `routes::routes` assembles them.
//! - `server`: hyper around the routes, with header, idle and body timeouts, a connection
//!   cap, and a shutdown that closes idle connections at once.
//! - `openapi`: the OpenAPI document, generated from the handlers and the view types.

pub mod config;
mod http;
pub mod metrics;
mod openapi;
pub mod routes;
pub mod server;
pub mod state;

pub use config::{ApiConfig, IngestToken};
pub use metrics::ApiMetrics;
pub use routes::{Routes, routes};
pub use state::{AppState, Check, Ingest, Readiness, Rebuilder, StoreFill, ViewFill};
