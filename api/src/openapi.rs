//! The OpenAPI document, derived from the handlers' annotations and the domain's view types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{
    __path_get_product, __path_healthz, __path_list_products, __path_metrics, __path_openapi, __path_post_events, __path_readyz,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "Catalog BFF", description = "Product views for web and mobile frontends, and embedded event ingest."),
    paths(get_product, list_products, post_events, healthz, readyz, metrics, openapi),
    components(schemas(
        catalog_domain::view::WebView,
        catalog_domain::view::MobileView,
        catalog_domain::view::Availability,
    )),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

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
    #[test]
    fn every_route_is_described() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        for path in ["/products/{id}", "/products", "/events", "/healthz", "/readyz", "/metrics", "/openapi.json"] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        assert!(doc["components"]["schemas"]["ProductView"].is_object());
    }
}
