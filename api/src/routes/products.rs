//! `GET /products/{id}` and `GET /products?category=…|ids=…`: bytes from the read model.

use std::sync::Arc;
use std::time::Instant;

use catalog_domain::ProductId;
use catalog_pipeline::error::chain;
use catalog_readmodel::{ReadModelError, StoredView, Variant};
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;

use crate::http::{ApiError, Conditional, cached_json, dynamic_json};
use crate::openapi::{AnyView, ErrorBody, ListBody, ViewParam};
use crate::state::AppState;

fn parse_variant(params: &[(String, String)]) -> Result<Variant, ApiError> {
    match params.iter().rev().find(|(k, _)| k == "view").map(|(_, v)| v.as_str()) {
        None | Some("web") => Ok(Variant::Web),
        Some("mobile") => Ok(Variant::Mobile),
        Some(other) => Err(ApiError::bad_request("invalid_view", format!("view must be web or mobile, got {other:?}"))),
    }
}

/// An id as it stands in the path, percent-encoded or not: `P%3A1` is `P:1`, as any client
/// that escapes reserved characters sends it. Only the fast path (nothing escaped) borrows.
fn parse_path_id(raw: &str) -> Result<ProductId, ApiError> {
    if !raw.contains('%') {
        return parse_id(raw);
    }
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_request("invalid_product_id", "the id is not valid UTF-8 once percent-decoded"))?;
    parse_id(&decoded)
}

fn parse_id(raw: &str) -> Result<ProductId, ApiError> {
    ProductId::parse(raw).map_err(|e| ApiError::bad_request("invalid_product_id", e.to_string()))
}

fn cache_control(state: &AppState) -> &HeaderValue {
    state.config.cache_control_header()
}

/// The view, or a cache-aside fill from the store when the read model has not got it yet.
async fn lookup(state: &AppState, id: &ProductId) -> Result<Option<StoredView>, ApiError> {
    let unavailable = |e: ReadModelError| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", chain(&e));
    if let Some(view) = state.readmodel.get(id.as_str()).map_err(unavailable)? {
        // Past its TTL: serve it now, re-read it in the background (stale-while-revalidate).
        if state.readmodel.is_expired(&view)
            && let Some(fill) = &state.fill
        {
            fill.clone().refresh_later(id.clone());
        }
        state.metrics.cache_hits.inc();
        return Ok(Some(view));
    }
    state.metrics.cache_misses.inc();
    let Some(fill) = &state.fill else { return Ok(None) };
    let view = fill.clone().fill(id.clone()).await.map_err(unavailable)?;
    if view.is_some() {
        state.metrics.cache_fills.inc();
    }
    Ok(view)
}

/// One product's view.
#[utoipa::path(
    get,
    path = "/products/{id}",
    params(
        ("id" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,64}$", example = "P123", description = "1–64 characters of [A-Za-z0-9_.:-], not `.` or `..`"),
        ("view" = Option<ViewParam>, Query, description = "`web` (default) or `mobile`"),
        ("If-None-Match" = Option<String>, Header, description = "ETag of a cached copy: 304 when unchanged"),
    ),
    responses(
        (status = 200, description = "The product, in the web or the mobile view", body = AnyView),
        (status = 304, description = "Not modified"),
        (status = 400, description = "Invalid id or view", body = ErrorBody),
        (status = 404, description = "Unknown or deleted product", body = ErrorBody),
        (status = 405, description = "Only GET and HEAD", body = ErrorBody),
        (status = 429, description = "Over this client's request rate (`--client-rate-limit`); `Retry-After` says when to try again", body = ErrorBody),
        (status = 503, description = "The read model or the store cannot answer", body = ErrorBody),
    ),
    tag = "products"
)]
pub async fn get_product(raw_id: String, params: Vec<(String, String)>, cond: Conditional, state: Arc<AppState>) -> Response {
    let started = Instant::now();
    let response = match product_response(&raw_id, &params, &cond, &state).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state.metrics.observe("get_product", response.status().as_u16(), started);
    response
}

async fn product_response(
    raw_id: &str,
    params: &[(String, String)],
    cond: &Conditional,
    state: &AppState,
) -> Result<Response, ApiError> {
    let id = parse_path_id(raw_id)?;
    let variant = parse_variant(params)?;
    match lookup(state, &id).await? {
        Some(view) if view.listed => {
            Ok(cached_json(cond, view.etag(variant), view.body(variant), view.gzip_body(variant), cache_control(state)))
        }
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "product_not_found", format!("no product with id {id}"))),
    }
}

/// A category page, or several products by id.
#[utoipa::path(
    get,
    path = "/products",
    params(
        ("category" = Option<String>, Query, description = "List this category, in product-id order"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Page size, 1–100, default 20"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page of the same category (opaque)"),
        ("ids" = Option<String>, Query, description = "Comma-separated product ids, at most 100 (instead of category)"),
        ("view" = Option<ViewParam>, Query, description = "`web` (default) or `mobile`"),
        ("If-None-Match" = Option<String>, Header, description = "ETag of a cached copy: 304 when unchanged"),
    ),
    responses(
        (status = 200, description = "A page of a category, or the products asked for by id", body = ListBody),
        (status = 304, description = "Not modified"),
        (status = 400, description = "Invalid or missing parameters", body = ErrorBody),
        (status = 405, description = "Only GET and HEAD", body = ErrorBody),
        (status = 429, description = "Over this client's request rate (`--client-rate-limit`); `Retry-After` says when to try again", body = ErrorBody),
        (status = 503, description = "The read model or the store cannot answer", body = ErrorBody),
    ),
    tag = "products"
)]
pub async fn list_products(params: Vec<(String, String)>, cond: Conditional, state: Arc<AppState>) -> Response {
    let started = Instant::now();
    let response = match list_response(&params, &cond, &state).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state.metrics.observe("list_products", response.status().as_u16(), started);
    response
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

async fn list_response(params: &[(String, String)], cond: &Conditional, state: &AppState) -> Result<Response, ApiError> {
    let variant = parse_variant(params)?;
    match (param(params, "category"), param(params, "ids")) {
        (Some(_), Some(_)) => Err(ApiError::bad_request("invalid_query", "give either category or ids, not both")),
        (None, None) => Err(ApiError::bad_request("invalid_query", "give category=… (with limit, cursor) or ids=a,b,c")),
        (Some(category), None) => category_page(category, params, variant, cond, state),
        (None, Some(ids)) => by_ids(ids, variant, cond, state).await,
    }
}

fn category_page(
    category: &str,
    params: &[(String, String)],
    variant: Variant,
    cond: &Conditional,
    state: &AppState,
) -> Result<Response, ApiError> {
    if category.is_empty() {
        return Err(ApiError::bad_request("invalid_category", "category must not be empty"));
    }
    let max = state.config.max_page_size;
    let limit = match param(params, "limit") {
        None => state.config.default_page_size,
        Some(text) => text.parse::<usize>().ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
            ApiError::bad_request("invalid_limit", format!("limit must be an integer from 1 to {max}, got {text:?}"))
        })?,
    };
    let cursor = param(params, "cursor").map(|c| decode_cursor(category, c)).transpose()?;
    let page = state
        .readmodel
        .page(category, cursor.as_ref().map(ProductId::as_str), limit)
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", chain(&e)))?;
    let mut body = Vec::with_capacity(page.items.len() * 400 + 64);
    body.extend_from_slice(b"{\"items\":[");
    join_bodies(&mut body, &page.items, variant);
    body.extend_from_slice(b"],\"nextCursor\":");
    let next = page.next_cursor.map(|id| encode_cursor(category, &id));
    serde_json::to_writer(&mut body, &next).expect("json serializes");
    body.push(b'}');
    Ok(dynamic_json(cond, body, cache_control(state)))
}

/// A cursor names the category and the last id of the page it ends, hex-encoded: opaque to
/// clients, so a raw id or another category's cursor is refused instead of silently giving
/// an empty page that looks like the end of the listing.
fn encode_cursor(category: &str, last_id: &str) -> String {
    let mut out = String::with_capacity(2 * (category.len() + 1 + last_id.len()));
    for b in category.bytes().chain([0]).chain(last_id.bytes()) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn decode_cursor(category: &str, cursor: &str) -> Result<ProductId, ApiError> {
    let invalid = || ApiError::bad_request("invalid_cursor", "cursor must be the nextCursor of a page of this category");
    if !cursor.len().is_multiple_of(2) || !cursor.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    let bytes: Vec<u8> = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&cursor[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    match text.split_once('\0') {
        Some((c, id)) if c == category => ProductId::parse(id).map_err(|_| invalid()),
        _ => Err(invalid()),
    }
}

async fn by_ids(ids: &str, variant: Variant, cond: &Conditional, state: &AppState) -> Result<Response, ApiError> {
    let mut parsed: Vec<ProductId> = Vec::new();
    for raw in ids.split(',') {
        let id = parse_id(raw)?;
        if !parsed.contains(&id) {
            parsed.push(id);
        }
    }
    if parsed.len() > state.config.max_ids {
        return Err(ApiError::bad_request("too_many_ids", format!("at most {} ids per request", state.config.max_ids)));
    }
    let mut found = Vec::with_capacity(parsed.len());
    let mut missing = Vec::new();
    // All at once: the misses among them share one store read.
    let views = futures_util::future::join_all(parsed.iter().map(|id| lookup(state, id))).await;
    for (id, view) in parsed.iter().zip(views) {
        match view? {
            Some(view) if view.listed => found.push(view),
            _ => missing.push(id.as_str()),
        }
    }
    let mut body = Vec::with_capacity(found.len() * 400 + 64);
    body.extend_from_slice(b"{\"items\":[");
    join_bodies(&mut body, &found, variant);
    body.extend_from_slice(b"],\"missing\":");
    serde_json::to_writer(&mut body, &missing).expect("json serializes");
    body.push(b'}');
    Ok(dynamic_json(cond, body, cache_control(state)))
}

/// Splices stored bodies into a JSON array: nothing is parsed or re-serialized.
fn join_bodies(out: &mut Vec<u8>, views: &[StoredView], variant: Variant) {
    for (i, view) in views.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&view.body(variant));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_ids_are_percent_decoded() {
        assert_eq!(parse_path_id("P%3A1").unwrap().as_str(), "P:1");
        assert_eq!(parse_path_id("P:1").unwrap().as_str(), "P:1");
        assert_eq!(parse_path_id("P%201").unwrap_err().code, "invalid_product_id", "a decoded space is still refused");
        assert_eq!(parse_path_id("%FF").unwrap_err().code, "invalid_product_id");
    }

    #[test]
    fn a_cursor_round_trips_for_its_own_category_only() {
        let cursor = encode_cursor("Home & Garden", "P124");
        assert_eq!(decode_cursor("Home & Garden", &cursor).unwrap().as_str(), "P124");
        for (category, bad) in
            [("Books", cursor.as_str()), ("Home & Garden", "P124"), ("Home & Garden", "zz"), ("Home & Garden", "")]
        {
            assert_eq!(decode_cursor(category, bad).unwrap_err().code, "invalid_cursor", "{category} {bad}");
        }
    }
}
