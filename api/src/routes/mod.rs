//! Route assembly: every route of docs/contract.md §2, CORS around them, JSON for every rejection.

mod events;
mod ops;
mod products;

use std::convert::Infallible;
use std::sync::Arc;

use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::http::{ApiError, Conditional};
use crate::state::AppState;

pub(crate) use events::__path_post_events;
pub(crate) use ops::{__path_healthz, __path_metrics, __path_openapi, __path_readyz};
pub(crate) use products::{__path_get_product, __path_list_products};

/// All routes with their state; what `catalog serve` hands to `warp::serve`.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Box<dyn Reply>,)> {
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };
    let conditional = warp::header::optional::<String>("if-none-match")
        .and(warp::header::optional::<String>("accept-encoding"))
        .map(|if_none_match, accept_encoding| Conditional { if_none_match, accept_encoding });
    let query = warp::query::<Vec<(String, String)>>();

    // Path before method: otherwise every unknown path answers 405 instead of 404.
    let get_product = warp::path!("products" / String)
        .and(warp::get())
        .and(query)
        .and(conditional)
        .and(with_state.clone())
        .then(products::get_product);
    let list_products = warp::path!("products")
        .and(warp::get())
        .and(query)
        .and(conditional)
        .and(with_state.clone())
        .then(products::list_products);
    let post_events = warp::path!("events")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::body::content_length_limit(state.config.max_request_bytes))
        .and(warp::body::bytes())
        .and(with_state.clone())
        .then(events::post_events);
    let healthz = warp::path!("healthz").and(warp::get()).map(ops::healthz);
    let readyz = warp::path!("readyz").and(warp::get()).and(with_state.clone()).then(ops::readyz);
    let metrics = warp::path!("metrics").and(warp::get()).and(with_state.clone()).map(ops::metrics);
    let openapi = warp::path!("openapi.json").and(warp::get()).map(ops::openapi);

    let ops = healthz.or(readyz).unify().or(metrics).unify().or(openapi).unify().boxed();
    let api = if state.config.product_routes {
        get_product.or(list_products).unify().or(post_events).unify().or(ops).unify().boxed()
    } else {
        ops
    };
    let origins = &state.config.cors_origins;
    if origins.is_empty() {
        api.recover(rejection_to_json).map(|r| Box::new(r) as Box<dyn Reply>).boxed()
    } else {
        let mut cors = warp::cors()
            .allow_methods(["GET", "POST", "OPTIONS"])
            .allow_headers(["content-type", "authorization", "if-none-match", "accept-encoding"])
            .expose_headers(["etag"])
            .max_age(600);
        cors = if origins.iter().any(|o| o == "*") {
            cors.allow_any_origin()
        } else {
            cors.allow_origins(origins.iter().map(String::as_str))
        };
        api.with(cors).recover(rejection_to_json).map(|r| Box::new(r) as Box<dyn Reply>).boxed()
    }
}

/// Every rejection warp produces becomes the contract's JSON error.
async fn rejection_to_json(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    let err = if rejection.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see /openapi.json")
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is over the configured limit")
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::new(StatusCode::LENGTH_REQUIRED, "length_required", "send a Content-Length header")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route")
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        ApiError::bad_request("invalid_query", "the query string is not valid form encoding")
    } else if rejection.find::<warp::reject::InvalidHeader>().is_some() {
        ApiError::bad_request("invalid_header", "a request header is not valid text")
    } else if let Some(cors) = rejection.find::<warp::filters::cors::CorsForbidden>() {
        ApiError::new(StatusCode::FORBIDDEN, "cors_forbidden", cors.to_string())
    } else {
        tracing::error!(?rejection, "unhandled rejection");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "unexpected error")
    };
    Ok(err.into_response())
}
