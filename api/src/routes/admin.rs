//! `POST /admin/rebuild`: the read model rebuilt beside itself and swapped in while this
//! instance keeps serving, behind its own bearer token.

use std::sync::Arc;

use catalog_pipeline::error::chain;
use catalog_readmodel::ReadModelError;
use warp::http::StatusCode;
use warp::reply::Response;

use crate::http::{ApiError, bearer, json_status};
use crate::openapi::{ErrorBody, RebuildReport};
use crate::state::AppState;

/// Rebuild this instance's read model from the store while it keeps serving.
#[utoipa::path(
    post,
    path = "/admin/rebuild",
    responses(
        (status = 200, description = "Rebuilt from the store and swapped in", body = RebuildReport),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 403, description = "Admin routes are off: start the catalog with --admin-token", body = ErrorBody),
        (status = 405, description = "Only POST", body = ErrorBody),
        (status = 429, description = "Over this client's request rate (`--client-rate-limit`); `Retry-After` says when to try again", body = ErrorBody),
        (status = 409, description = "A rebuild is already running", body = ErrorBody),
        (status = 503, description = "This instance cannot rebuild, or the store failed", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "admin"
)]
pub async fn rebuild(authorization: Option<String>, state: Arc<AppState>) -> Response {
    match run(authorization.as_deref(), &state).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn run(authorization: Option<&str>, state: &AppState) -> Result<Response, ApiError> {
    let Some(token) = &state.config.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin routes are off: start the catalog with --admin-token (CATALOG_ADMIN_TOKEN)",
        ));
    };
    if !bearer(authorization).is_some_and(|p| token.matches(p)) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <CATALOG_ADMIN_TOKEN>"));
    }
    let Some(rebuilder) = &state.rebuilder else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "rebuild_unavailable",
            "this instance has no read model to rebuild",
        ));
    };
    tracing::info!("online rebuild of the read model started");
    match rebuilder.rebuild().await {
        Ok(done) => {
            tracing::info!(products = done.products, caught_up = done.caught_up, generation = done.generation, elapsed = ?done.elapsed, "online rebuild swapped in");
            Ok(json_status(
                StatusCode::OK,
                &serde_json::json!({
                    "products": done.products,
                    "caughtUp": done.caught_up,
                    "generation": done.generation,
                    "elapsedMs": done.elapsed.as_millis() as u64,
                }),
            ))
        }
        Err(ReadModelError::Busy) => Err(ApiError::new(StatusCode::CONFLICT, "rebuild_running", "a rebuild is already running")),
        Err(e) => {
            tracing::error!(error = %chain(&e), "online rebuild failed; the live read model is unchanged");
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "rebuild_failed", chain(&e)))
        }
    }
}
