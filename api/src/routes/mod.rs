//! Route assembly: every route of docs/contract.md §2, CORS around them, JSON for every rejection.

mod admin;
mod events;
mod ops;
mod products;

use std::convert::Infallible;
use std::sync::Arc;

use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, Method, StatusCode, header};
use warp::{Filter, Rejection, Reply};

use crate::http::{ApiError, Conditional};
use crate::state::AppState;

pub(crate) use admin::__path_rebuild;
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
    // HEAD is a GET whose body hyper leaves unsent.
    let read = || warp::get().or(warp::head()).unify();

    // Path before method: otherwise every unknown path answers 405 instead of 404.
    let get_product = warp::path!("products" / String)
        .and(read())
        .and(query)
        .and(conditional)
        .and(with_state.clone())
        .then(products::get_product);
    let list_products =
        warp::path!("products").and(read()).and(query).and(conditional).and(with_state.clone()).then(products::list_products);
    let post_events = warp::path!("events")
        .and(warp::post())
        // Before a byte of the body is read: a caller without the token costs a header parse.
        .and(events::gate(state.clone()))
        .and(warp::body::content_length_limit(state.config.max_request_bytes))
        .and(warp::body::bytes())
        .and(with_state.clone())
        .then(events::post_events);
    let rebuild = warp::path!("admin" / "rebuild")
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(with_state.clone())
        .then(admin::rebuild);
    let healthz = warp::path!("healthz").and(read()).map(ops::healthz);
    let readyz = warp::path!("readyz").and(read()).and(with_state.clone()).then(ops::readyz);
    let metrics = warp::path!("metrics").and(read()).and(with_state.clone()).map(ops::metrics);
    let openapi = warp::path!("openapi.json").and(read()).map(ops::openapi);
    // Last: a known path with a method none of the routes above took.
    let other_method = {
        let (product_routes, cors) = (state.config.product_routes, !state.config.cors_origins.is_empty());
        warp::path::full().and(warp::method()).and_then(move |path: warp::path::FullPath, method: Method| async move {
            match allowed_methods(path.as_str(), product_routes) {
                // An allowed method that its route refused (a bad token, a large body): that
                // route's rejection stands, since warp ranks any rejection above "not found".
                Some(allow) if !allow.split(", ").any(|m| m == method.as_str()) => {
                    Ok(other_method_response(&method, allow, cors))
                }
                _ => Err(warp::reject::not_found()),
            }
        })
    };

    let ops = healthz.or(readyz).unify().or(metrics).unify().or(openapi).unify().boxed();
    let api = if state.config.product_routes {
        get_product.or(list_products).unify().or(post_events).unify().or(rebuild).unify().or(ops).unify().boxed()
    } else {
        ops
    };
    let api = api.or(other_method).unify().boxed();
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
        api.with(cors)
            .recover(rejection_to_json)
            .map(|r| {
                let mut response = Reply::into_response(r);
                vary_on_origin(&mut response);
                Box::new(response) as Box<dyn Reply>
            })
            .boxed()
    }
}

/// The methods a known path takes, for `Allow`; `None` for a path the catalog does not serve.
fn allowed_methods(path: &str, product_routes: bool) -> Option<&'static str> {
    const READ: &str = "GET, HEAD";
    match path {
        "/healthz" | "/readyz" | "/metrics" | "/openapi.json" => Some(READ),
        "/products" if product_routes => Some(READ),
        "/events" | "/admin/rebuild" if product_routes => Some("POST"),
        _ if product_routes => {
            let id = path.strip_prefix("/products/")?;
            (!id.is_empty() && !id.contains('/')).then_some(READ)
        }
        _ => None,
    }
}

fn other_method_response(method: &Method, allow: &'static str, cors: bool) -> warp::reply::Response {
    if *method == Method::OPTIONS && !cors {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cors_not_configured",
            "this catalog allows no browser origins: start it with --cors-origin (CATALOG_CORS_ORIGINS)",
        )
        .into_response();
    }
    let mut response =
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{method} is not allowed here; use {allow}"))
            .into_response();
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// An answer whose `Access-Control-Allow-Origin` echoes the request's origin differs by origin:
/// caches must key on it.
fn vary_on_origin(response: &mut warp::reply::Response) {
    let echoed = response.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_some_and(|v| v.as_bytes() != b"*");
    if echoed {
        response.headers_mut().append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Every rejection warp produces becomes the contract's JSON error.
async fn rejection_to_json(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    let err = if let Some(events::Refused(e)) = rejection.find::<events::Refused>() {
        e.clone()
    } else if rejection.is_not_found() {
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
