//! Liveness, readiness, metrics and the OpenAPI document.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use warp::http::{Response, StatusCode, header};
use warp::reply::Response as Reply;

use crate::http::json_status;
use crate::state::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, description = "The process answers", body = crate::openapi::Health),
    (status = 405, description = "Only GET and HEAD", body = crate::openapi::ErrorBody),
), tag = "operations")]
pub fn healthz() -> Reply {
    json_status(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// Readiness: read model open, backends reachable, breaker state; 503 while draining.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Ready, with each check", body = crate::openapi::Readiness),
    (status = 405, description = "Only GET and HEAD", body = crate::openapi::ErrorBody),
    (status = 503, description = "A check failed, or the instance is shutting down", body = crate::openapi::Readiness),
), tag = "operations")]
pub async fn readyz(state: Arc<AppState>) -> Reply {
    let checks = state.readiness.checks().await;
    let draining = state.draining.load(Ordering::SeqCst);
    let ready = !draining && checks.iter().all(|c| c.ok);
    let status = if draining {
        "draining"
    } else if ready {
        "ready"
    } else {
        "not_ready"
    };
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_status(code, &serde_json::json!({"status": status, "checks": checks}))
}

/// Prometheus / OpenMetrics text of every counter and histogram.
#[utoipa::path(get, path = "/metrics", responses(
    (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text"),
    (status = 405, description = "Only GET and HEAD", body = crate::openapi::ErrorBody),
), tag = "operations")]
pub fn metrics(state: Arc<AppState>) -> Reply {
    let mut text = String::with_capacity(8 * 1024);
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => Response::builder()
            .header(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-store")
            .body(text.into())
            .expect("valid response"),
        Err(e) => json_status(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": {"code": "metrics", "message": e.to_string()}}),
        ),
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses(
    (status = 200, description = "OpenAPI 3 description of the BFF", body = Object),
    (status = 405, description = "Only GET and HEAD", body = crate::openapi::ErrorBody),
), tag = "operations")]
pub fn openapi() -> Reply {
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = DOC.get_or_init(crate::openapi::document);
    Response::builder().header(header::CONTENT_TYPE, "application/json").body(doc.clone().into()).expect("valid response")
}
