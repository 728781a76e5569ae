//! `POST /events`: embedded ingest of EventBridge envelopes or PutEvents entries.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use catalog_pipeline::error::chain;
use catalog_pipeline::trace::SPAN_TARGET;
use serde_json::Value;
use serde_json::value::RawValue;
use tracing::Instrument;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::http::{ApiError, bearer, json_status};
use crate::openapi::{Accepted, ErrorBody};
use crate::state::AppState;

/// Accept events; 202 means every entry is on disk.
#[utoipa::path(
    post,
    path = "/events",
    request_body(content = inline(crate::openapi::EventsBodyRef), description = "One entry or a JSON array of them: EventBridge envelopes, compact or bare events, or PutEvents entries (`Source`, `DetailType`, `Detail` as a string)", content_type = "application/json"),
    responses(
        (status = 202, description = "Durably stored, processed asynchronously; invalid events go to the DLQ", body = Accepted),
        (status = 400, description = "Not JSON, or entries that are not events, with per-entry errors", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 405, description = "Only POST", body = ErrorBody),
        (status = 429, description = "Over this client's request rate (`--client-rate-limit`); `Retry-After` says when to try again", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 411, description = "No Content-Length", body = ErrorBody),
        (status = 413, description = "Body or entry count over the configured limit", body = ErrorBody),
        (status = 415, description = "Content-Type is not application/json", body = ErrorBody),
        (status = 503, description = "Ingest unavailable on this instance or storage failing", body = ErrorBody),
    ),
    // Bearer only when the operator set CATALOG_INGEST_TOKEN: a loopback catalog may have none.
    security((), ("bearer" = [])),
    tag = "ingest"
)]
pub async fn post_events(body: Bytes, state: Arc<AppState>) -> Response {
    let started = Instant::now();
    let response = match accept(&body, &state).await {
        Ok(n) => json_status(StatusCode::ACCEPTED, &serde_json::json!({ "accepted": n })),
        Err(e) => e.into_response(),
    };
    state.metrics.observe("post_events", response.status().as_u16(), started);
    response
}

/// A request refused before its body was read.
#[derive(Debug)]
pub(crate) struct Refused(pub ApiError);

impl warp::reject::Reject for Refused {}

/// The checks `POST /events` makes on its headers alone: the bearer token (when one is set)
/// and a JSON content type. Requiring `application/json` makes a browser send a CORS
/// preflight first, so a page on another site cannot post events through a visitor's
/// loopback catalog with a plain form or `text/plain` fetch.
pub(crate) fn gate(state: Arc<AppState>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(warp::header::optional::<String>("content-type"))
        .and_then(move |authorization: Option<String>, content_type: Option<String>| {
            let state = state.clone();
            async move {
                check_headers(&state, authorization.as_deref(), content_type.as_deref())
                    .map_err(|e| warp::reject::custom(Refused(e)))
            }
        })
        .untuple_one()
}

fn check_headers(state: &AppState, authorization: Option<&str>, content_type: Option<&str>) -> Result<(), ApiError> {
    if let Some(token) = &state.config.ingest_token
        && !bearer(authorization).is_some_and(|p| token.matches(p))
    {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <CATALOG_INGEST_TOKEN>"));
    }
    let media_type = content_type.and_then(|v| v.split(';').next()).map(str::trim);
    if !media_type.is_some_and(|m| m.eq_ignore_ascii_case("application/json")) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the events as Content-Type: application/json",
        ));
    }
    Ok(())
}

async fn accept(body: &[u8], state: &AppState) -> Result<usize, ApiError> {
    let Some(ingest) = &state.ingest else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "ingest_disabled", "this instance does not ingest events"));
    };
    let messages = split_entries(body, state.config.max_entries)?;
    let n = messages.len();
    if n > 0 {
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "append to the event log",
            otel.name = "event_log send",
            otel.kind = "producer",
            messaging.operation.type = "send",
            messaging.batch.message_count = n,
        );
        // The messages carry the send span's context: the pipeline's spans follow from it.
        let trace = span.in_scope(catalog_pipeline::trace::current);
        ingest
            .accept(messages, trace)
            .instrument(span)
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", chain(&e)))?;
    }
    Ok(n)
}

/// Splits the body into one message per entry, keeping each envelope's exact bytes so
/// prices keep their decimal text. PutEvents entries become compact envelopes, as the
/// catalog's EventBridge rule would deliver them.
fn split_entries(body: &[u8], max_entries: usize) -> Result<Vec<Bytes>, ApiError> {
    let malformed = |e: serde_json::Error| ApiError::bad_request("malformed_json", format!("body is not valid JSON: {e}"));
    let raw: Box<RawValue> = serde_json::from_slice(body).map_err(malformed)?;
    let entries: Vec<&RawValue> =
        if raw.get().trim_start().starts_with('[') { serde_json::from_str(raw.get()).map_err(malformed)? } else { vec![&raw] };
    if entries.len() > max_entries {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_entries",
            format!("{} entries; at most {max_entries} per request", entries.len()),
        ));
    }
    let mut messages = Vec::with_capacity(entries.len());
    let mut errors = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        match to_message(entry) {
            Ok(m) => messages.push(m),
            Err((code, message)) => errors.push(serde_json::json!({"index": index, "code": code, "message": message})),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_entries",
            format!("{} of {} entries are not events; nothing was accepted", errors.len(), entries.len()),
        )
        .with_details(Value::Array(errors)));
    }
    Ok(messages)
}

fn to_message(entry: &RawValue) -> Result<Bytes, (&'static str, String)> {
    let text = entry.get();
    if !text.trim_start().starts_with('{') {
        return Err(("not_an_object", "each entry must be a JSON object".into()));
    }
    // The shape is decided by the top-level keys alone (a product may well be named "Detail"),
    // without parsing the values: envelopes are passed through untouched.
    // Only the keys that decide; the values stay unparsed and nothing is allocated.
    #[derive(serde::Deserialize)]
    struct Shape<'a> {
        #[serde(borrow)]
        detail: Option<&'a RawValue>,
        #[serde(borrow, rename = "Detail")]
        put_detail: Option<&'a RawValue>,
        #[serde(borrow, rename = "DetailType")]
        put_detail_type: Option<&'a RawValue>,
    }
    let shape: Shape = serde_json::from_str(text).map_err(|e| ("invalid_entry", e.to_string()))?;
    let put_events = shape.put_detail.is_some() || shape.put_detail_type.is_some();
    if !put_events || shape.detail.is_some() {
        return Ok(Bytes::copy_from_slice(text.as_bytes()));
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct PutEventsEntry<'a> {
        source: Option<String>,
        detail_type: Option<String>,
        #[serde(borrow)]
        detail: Option<&'a RawValue>,
        time: Option<String>,
    }
    let e: PutEventsEntry = serde_json::from_str(text).map_err(|e| ("invalid_entry", e.to_string()))?;
    let source = e.source.ok_or(("missing_field", "PutEvents entry without Source".to_owned()))?;
    let detail_type = e.detail_type.ok_or(("missing_field", "PutEvents entry without DetailType".to_owned()))?;
    let detail_text: String =
        serde_json::from_str(e.detail.ok_or(("missing_field", "PutEvents entry without Detail".to_owned()))?.get())
            .map_err(|_| ("invalid_detail", "Detail must be a string holding a JSON object".to_owned()))?;
    let detail: &RawValue =
        serde_json::from_str(&detail_text).map_err(|e| ("invalid_detail", format!("Detail is not valid JSON: {e}")))?;
    #[derive(serde::Serialize)]
    struct Compact<'a> {
        #[serde(rename = "type")]
        detail_type: &'a str,
        source: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        time: Option<&'a str>,
        detail: &'a RawValue,
    }
    let compact = Compact { detail_type: &detail_type, source: &source, time: e.time.as_deref(), detail };
    Ok(Bytes::from(serde_json::to_vec(&compact).expect("json serializes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_pass_through_byte_for_byte() {
        let body = br#"[{"source":"pricing.service","detail-type":"Price Update","detail":{"productId":"P1","price":29.90,"currency":"USD"}}]"#;
        let out = split_entries(body, 10).unwrap();
        assert_eq!(&out[0][..], &body[1..body.len() - 1]);
    }

    #[test]
    fn an_envelope_mentioning_detail_in_its_values_is_still_an_envelope() {
        let body = br#"{"source":"product.service","detail-type":"Product Update","detail":{"productId":"P1","name":"Detail","description":"\"DetailType\": see \"Detail\"","category":"C","status":"created"}}"#;
        let out = split_entries(body, 10).unwrap();
        assert_eq!(&out[0][..], &body[..], "passed through untouched");
    }

    #[test]
    fn put_events_entries_become_compact_envelopes() {
        let body =
            br#"{"Source":"inventory.service","DetailType":"Inventory Update","Detail":"{\"productId\":\"P1\",\"quantity\":5}"}"#;
        let out = split_entries(body, 10).unwrap();
        let v: Value = serde_json::from_slice(&out[0]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"Inventory Update","source":"inventory.service","detail":{"productId":"P1","quantity":5}})
        );
    }

    #[test]
    fn structural_errors_are_reported_per_entry() {
        let body = br#"[{"productId":"P1","quantity":1}, 5, {"Source":"x","DetailType":"y","Detail":"{oops"}]"#;
        let err = split_entries(body, 10).unwrap_err();
        assert_eq!(err.code, "invalid_entries");
        let entries = err.details.unwrap();
        assert_eq!(entries[0]["index"], 1);
        assert_eq!(entries[1]["index"], 2);
        assert_eq!(entries[1]["code"], "invalid_detail");
    }

    #[test]
    fn malformed_json_is_a_400() {
        assert_eq!(split_entries(b"{nope", 10).unwrap_err().code, "malformed_json");
        assert_eq!(split_entries(b"[1,2,3]", 2).unwrap_err().code, "too_many_entries");
    }
}
