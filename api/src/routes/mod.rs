//! Route assembly: every route of docs/contract.md §2, CORS around them, JSON for every rejection.

mod admin;
mod events;
mod ops;
mod products;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, Method, Request, StatusCode, header};
use warp::{Filter, Rejection, Reply};

use crate::http::{ApiError, Conditional};
use crate::state::AppState;

pub(crate) use admin::__path_rebuild;
pub(crate) use events::__path_post_events;
pub(crate) use ops::{__path_healthz, __path_metrics, __path_openapi, __path_readyz};
pub(crate) use products::{__path_get_product, __path_list_products};

/// Every route: warp's filters, and `GET /products/{id}` routed by hand in front of them.
#[derive(Clone)]
pub struct Routes {
    pub filters: BoxedFilter<(Box<dyn Reply>,)>,
    /// `None` where the product routes are not served.
    products: Option<Arc<AppState>>,
}

impl Routes {
    /// The answer to `GET` or `HEAD /products/{id}` in its plain form (no escapes in the id, a
    /// query warp would parse, text headers, no `Origin`), from the same handler the filters
    /// call but without their chain, 4–5% of such a GET's CPU in the profile (BENCHMARKS.md).
    /// `None` for anything else, which the filters answer: every refusal keeps one source.
    pub fn product<B>(&self, request: &Request<B>) -> Option<impl Future<Output = warp::reply::Response> + Send + use<B>> {
        let state = self.products.as_ref()?;
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            return None;
        }
        // An escaped id is warp's to decode: one decoder, one set of refusals.
        let raw_id = product_segment(request.uri().path()).filter(|id| !id.contains('%'))?;
        let params: Vec<(String, String)> = match request.uri().query() {
            None => Vec::new(),
            Some(query) => serde_urlencoded::from_str(query).ok()?,
        };
        let headers = request.headers();
        if headers.contains_key(header::ORIGIN) {
            return None;
        }
        let text = |name: header::HeaderName| match headers.get(name) {
            None => Some(None),
            Some(value) => value.to_str().ok().map(|v| Some(v.to_owned())),
        };
        let cond = Conditional { if_none_match: text(header::IF_NONE_MATCH)?, accept_encoding: text(header::ACCEPT_ENCODING)? };
        Some(products::get_product(raw_id.to_owned(), params, cond, state.clone()))
    }
}

/// The raw id of a `/products/{id}` path (one segment, not empty, still escaped): the one
/// definition the hand-routed GET, the `Allow` answers and the metrics' route label share.
pub(crate) fn product_segment(path: &str) -> Option<&str> {
    path.strip_prefix("/products/").filter(|id| !id.is_empty() && !id.contains('/'))
}

/// All routes with their state; what `catalog serve` hands to its server.
pub fn routes(state: Arc<AppState>) -> Routes {
    let products = state.config.product_routes.then(|| state.clone());
    Routes { filters: filters(state), products }
}

fn filters(state: Arc<AppState>) -> BoxedFilter<(Box<dyn Reply>,)> {
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
        _ if product_routes => product_segment(path).map(|_| READ),
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::AtomicBool;
    use std::time::SystemTime;

    use bytes::Bytes;
    use catalog_domain::{CatalogEvent, ProductId, ProductState, ViewSettings};
    use catalog_readmodel::ReadModel;
    use hyper::body::Body as _;

    use super::*;
    use crate::config::ApiConfig;
    use crate::metrics::ApiMetrics;
    use crate::state::{BoxFuture, Check, Readiness};

    struct Ready;

    impl Readiness for Ready {
        fn checks(&self) -> BoxFuture<'_, Vec<Check>> {
            Box::pin(async { Vec::new() })
        }
    }

    fn routes_over(model: ReadModel, config: ApiConfig) -> Routes {
        routes(Arc::new(AppState {
            readmodel: model,
            ingest: None,
            fill: None,
            rebuilder: None,
            readiness: Arc::new(Ready),
            registry: Arc::new(Default::default()),
            metrics: ApiMetrics::default(),
            config,
            draining: Arc::new(AtomicBool::new(false)),
        }))
    }

    fn model(dir: &std::path::Path) -> ReadModel {
        let model = ReadModel::open(&sled::open(dir).unwrap(), ViewSettings::default(), None).unwrap().keep_hot(1 << 20);
        let mut short = ProductState::new(ProductId::parse("P1").unwrap());
        let mut long = ProductState::new(ProductId::parse("P2").unwrap());
        for (state, description) in [(&mut short, "short".to_owned()), (&mut long, "words ".repeat(200))] {
            let e = serde_json::json!({"productId": state.id.as_str(), "name": "A", "category": "C", "status": "created", "description": description});
            state.apply(&CatalogEvent::from_value(&e, SystemTime::UNIX_EPOCH).unwrap());
        }
        model.apply([&short, &long]).unwrap();
        model
    }

    /// Status, headers in name order, body.
    type Answer = (StatusCode, Vec<(String, String)>, Bytes);
    type Case<'a> = (Method, String, Vec<(&'a str, String)>);

    async fn body_of(response: warp::reply::Response) -> Answer {
        let (parts, mut body) = response.into_parts();
        let mut bytes = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Ok(data) = frame.unwrap().into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        let mut headers: Vec<_> =
            parts.headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned())).collect();
        headers.sort();
        (parts.status, headers, Bytes::from(bytes))
    }

    #[tokio::test]
    async fn the_hand_routed_get_answers_as_the_filters_do() {
        let dir = tempfile::tempdir().unwrap();
        let model = model(dir.path());
        let etag = String::from_utf8(model.get("P1").unwrap().unwrap().etag(catalog_readmodel::Variant::Web).to_vec()).unwrap();
        let routes = routes_over(model, ApiConfig::default());
        let cases: Vec<Case> = vec![
            (Method::GET, "/products/P1".into(), vec![]),
            (Method::HEAD, "/products/P1".into(), vec![]),
            (Method::GET, "/products/P1?view=mobile".into(), vec![]),
            (Method::GET, "/products/P1?view=web&view=mobile".into(), vec![]),
            (Method::GET, "/products/P1?view=tablet".into(), vec![]),
            (Method::GET, "/products/P1?".into(), vec![]),
            (Method::GET, "/products/P1?view=%ZZ&=&a".into(), vec![]),
            (Method::GET, "/products/P9".into(), vec![]),
            (Method::GET, "/products/P!1".into(), vec![]),
            (Method::GET, "/products/..".into(), vec![]),
            (Method::GET, "/products/P1".into(), vec![("if-none-match", etag.clone())]),
            (Method::GET, "/products/P1".into(), vec![("if-none-match", format!("\"x\", W/{etag}"))]),
            (Method::GET, "/products/P2".into(), vec![("accept-encoding", "gzip, br".into())]),
            (Method::GET, "/products/P2?view=mobile".into(), vec![("accept-encoding", "gzip;q=0".into())]),
        ];
        let mut compared = Vec::new();
        for (method, path, headers) in cases {
            let request = headers.iter().fold(Request::builder().method(method.clone()).uri(&path), |r, (k, v)| r.header(*k, v));
            let by_hand =
                routes.product(&request.body(()).unwrap()).unwrap_or_else(|| panic!("{method} {path} is routed by hand"));
            let by_hand = body_of(by_hand.await).await;
            let filtered =
                headers.iter().fold(warp::test::request().method(method.as_str()).path(&path), |r, (k, v)| r.header(*k, v));
            let filtered = filtered.reply(&routes.filters).await;
            let mut filtered_headers: Vec<_> =
                filtered.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned())).collect();
            filtered_headers.sort();
            assert_eq!(by_hand, (filtered.status(), filtered_headers, filtered.body().clone()), "{method} {path} {headers:?}");
            compared.push((path, by_hand));
        }
        let gzipped = |(path, (_, headers, _)): &(String, Answer)| {
            path == "/products/P2" && headers.iter().any(|(k, v)| k == "content-encoding" && v == "gzip")
        };
        assert!(compared.iter().any(gzipped), "the gzip twin is among the answers compared");
        assert_eq!(compared.iter().filter(|(_, (status, ..))| *status == StatusCode::NOT_MODIFIED).count(), 2);
    }

    #[test]
    fn anything_but_a_plain_product_get_is_left_to_the_filters() {
        let dir = tempfile::tempdir().unwrap();
        let routes = routes_over(model(dir.path()), ApiConfig::default());
        let plain = |method: Method, uri: &str| Request::builder().method(method).uri(uri).body(()).unwrap();
        for (method, uri) in [
            (Method::POST, "/products/P1"),
            (Method::OPTIONS, "/products/P1"),
            (Method::GET, "/products/P%31"),
            (Method::GET, "/products/P1/"),
            (Method::GET, "/products/"),
            (Method::GET, "/products"),
            (Method::GET, "/healthz"),
        ] {
            assert!(routes.product(&plain(method.clone(), uri)).is_none(), "{method} {uri}");
        }
        let from_browser = Request::builder().uri("/products/P1").header("origin", "https://shop.example").body(()).unwrap();
        assert!(routes.product(&from_browser).is_none(), "CORS stays with the filters");
        let binary = Request::builder().uri("/products/P1").header("if-none-match", &b"\xff"[..]).body(()).unwrap();
        assert!(routes.product(&binary).is_none(), "a header that is no text gets the filters' 400");
        let mut config = ApiConfig::default();
        config.product_routes = false;
        let worker = routes_over(model(tempfile::tempdir().unwrap().path()), config);
        assert!(worker.product(&plain(Method::GET, "/products/P1")).is_none(), "a worker serves no products");
    }
}
