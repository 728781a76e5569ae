//! The OpenAPI document, derived from the handlers' annotations and the domain's view types,
//! and committed as `docs/openapi.json` (a test keeps the two equal).
//!
//! The body types below describe what the routes send. List bodies are spliced from stored
//! view bytes and small answers are written with `json!`, so these types are never built at
//! run time: they exist for the document, which schemathesis checks every answer against.

// Documentation types: constructed by no code path (see above).
#![allow(dead_code)]

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use catalog_domain::view::{MobileView, WebView};

use crate::routes::{
    __path_get_product, __path_healthz, __path_list_products, __path_metrics, __path_openapi, __path_post_events, __path_readyz,
    __path_rebuild,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "Catalog BFF", description = "Product views for web and mobile frontends, and embedded event ingest."),
    paths(get_product, list_products, post_events, rebuild, healthz, readyz, metrics, openapi),
    components(schemas(
        catalog_domain::view::WebView,
        catalog_domain::view::MobileView,
        catalog_domain::view::Availability,
        ErrorBody,
        ErrorDetail,
        EntryError,
        ProductPage,
        ProductsByIds,
        AnyView,
        Accepted,
        Health,
        Readiness,
        ReadinessCheck,
        ViewParam,
        ListBody,
        EventEntry,
        RebuildReport,
    )),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

/// What `POST /admin/rebuild` did.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildReport {
    /// Products written into the new generation.
    products: u64,
    /// Products changed while it was built, written again after the swap.
    caught_up: u64,
    /// The generation now live.
    generation: u64,
    elapsed_ms: u64,
}

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `invalid_product_id`, `product_not_found`, …
    code: String,
    /// For people: what was wrong and what to do.
    message: String,
    /// `invalid_entries` only: what is wrong with each refused entry of `POST /events`.
    #[schema(nullable = false)]
    entries: Option<Vec<EntryError>>,
}

#[derive(Serialize, ToSchema)]
pub struct EntryError {
    index: usize,
    code: String,
    message: String,
}

/// A product in the web or the mobile shape, as `view` asked.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum AnyView {
    Web(#[schema(inline = false)] WebView<'static>),
    Mobile(#[schema(inline = false)] MobileView<'static>),
}

/// `view=`: which shape of a product to send.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ViewParam {
    Web,
    Mobile,
}

/// A category page or an ids answer, as the query asked.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum ListBody {
    Page(#[schema(inline = false)] ProductPage),
    ByIds(#[schema(inline = false)] ProductsByIds),
}

/// `POST /events`: one entry, or an array of them.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum EventsBodyRef {
    One(EventEntry),
    Many(Vec<EventEntry>),
}

/// An EventBridge envelope, a compact event, a bare detail, or a PutEvents entry: any JSON
/// object; the pipeline judges it, and dead-letters it with a reason when it is not an event.
#[derive(Serialize, ToSchema)]
pub struct EventEntry(std::collections::HashMap<String, serde_json::Value>);

/// A page of a category, in product-id order.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProductPage {
    items: Vec<AnyView>,
    /// Pass it back as `cursor` for the next page; `null` on the last one.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// The products asked for by id, and the ids that are unknown or deleted.
#[derive(Serialize, ToSchema)]
pub struct ProductsByIds {
    items: Vec<AnyView>,
    missing: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// Entries on disk, to be applied (or dead-lettered) by the pipeline.
    accepted: usize,
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    status: String,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, `not_ready` or `draining`.
    status: String,
    checks: Vec<ReadinessCheck>,
}

#[derive(Serialize, ToSchema)]
pub struct ReadinessCheck {
    name: String,
    ok: bool,
    detail: String,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes")
}

#[cfg(test)]
mod tests {
    use super::document;

    #[test]
    fn every_route_is_described() {
        let doc: serde_json::Value = serde_json::from_str(&document()).unwrap();
        for path in ["/products/{id}", "/products", "/events", "/healthz", "/readyz", "/metrics", "/openapi.json"] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        assert!(doc["components"]["schemas"]["ProductView"].is_object());
    }

    #[test]
    fn the_committed_document_is_the_served_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let served = document();
        if std::env::var_os("CATALOG_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, format!("{served}\n")).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed.trim_end() == served,
            "docs/openapi.json differs from the served document: run `CATALOG_UPDATE_OPENAPI=1 cargo test -p catalog-api openapi` and commit it"
        );
    }
}
