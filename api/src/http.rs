//! Response helpers every route shares: JSON errors, conditional GETs, gzip.

use bytes::Bytes;
use catalog_readmodel::{Effort, GZIP_MIN_BYTES, etag, gzip};
use warp::http::{HeaderValue, Response, StatusCode, header};
use warp::reply::Response as Reply;

/// `{"error": {"code", "message"}}` with `Cache-Control: no-store`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), details: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn into_response(self) -> Reply {
        let mut error = serde_json::json!({"code": self.code, "message": self.message});
        if let Some(details) = self.details {
            error["entries"] = details;
        }
        let body = serde_json::to_vec(&serde_json::json!({ "error": error })).expect("json serializes");
        Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-store")
            .body(body.into())
            .expect("static headers are valid")
    }
}

/// What a client said about caching and encodings.
#[derive(Debug, Default)]
pub struct Conditional {
    pub if_none_match: Option<String>,
    pub accept_encoding: Option<String>,
}

impl Conditional {
    fn not_modified(&self, etag: &[u8]) -> bool {
        let Some(header) = &self.if_none_match else { return false };
        header.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/").as_bytes() == etag)
    }

    fn accepts_gzip(&self) -> bool {
        self.accept_encoding.as_deref().is_some_and(|v| {
            v.split(',').any(|part| {
                let mut it = part.split(';');
                let coding = it.next().unwrap_or("").trim();
                let refused = it.any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
                (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
            })
        })
    }
}

/// The ETag of the gzip representation: `"…-gz"`. The two encodings of one body are different
/// bytes, so they must not share a strong ETag (RFC 9110 §8.8.3).
fn gzip_etag(etag: &[u8]) -> Bytes {
    let mut tag = Vec::with_capacity(etag.len() + 3);
    tag.extend_from_slice(etag.strip_suffix(b"\"").unwrap_or(etag));
    tag.extend_from_slice(b"-gz\"");
    Bytes::from(tag)
}

/// A JSON answer with the ETag of the representation sent, 304 when it matches, and the gzip
/// twin when the client accepts it.
pub fn cached_json(cond: &Conditional, etag: Bytes, body: Bytes, gzip_body: Option<Bytes>, cache_control: &HeaderValue) -> Reply {
    let gzip_body = gzip_body.filter(|_| cond.accepts_gzip());
    let etag = if gzip_body.is_some() { gzip_etag(&etag) } else { etag };
    let etag_value = HeaderValue::from_maybe_shared(etag.clone()).unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
    let builder = Response::builder()
        .header(header::ETAG, etag_value)
        .header(header::CACHE_CONTROL, cache_control.clone())
        .header(header::VARY, "Accept-Encoding");
    if cond.not_modified(&etag) {
        return builder.status(StatusCode::NOT_MODIFIED).body(Bytes::new().into()).expect("valid response");
    }
    let builder = builder.header(header::CONTENT_TYPE, "application/json");
    match gzip_body {
        Some(gz) => builder.header(header::CONTENT_ENCODING, "gzip").body(gz.into()),
        None => builder.body(body.into()),
    }
    .expect("valid response")
}

/// For bodies assembled per request: computes the ETag and, when worth it, the gzip twin.
pub fn dynamic_json(cond: &Conditional, body: Vec<u8>, cache_control: &HeaderValue) -> Reply {
    let etag = Bytes::from(etag(&body));
    // Compressed only when it will be sent: not for a small body, nor for a 304.
    let gz = (cond.accepts_gzip() && body.len() >= GZIP_MIN_BYTES && !cond.not_modified(&gzip_etag(&etag)))
        .then(|| gzip(&body, Effort::PerRequest))
        .flatten()
        .map(Bytes::from);
    cached_json(cond, etag, Bytes::from(body), gz, cache_control)
}

/// The credentials of an `Authorization: Bearer …` header; RFC 9110 §11.1: the scheme is
/// case-insensitive.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|h| h.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim())
}

pub fn json_status(status: StatusCode, value: &serde_json::Value) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(serde_json::to_vec(value).expect("json serializes").into())
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(inm: Option<&str>, ae: Option<&str>) -> Conditional {
        Conditional { if_none_match: inm.map(str::to_owned), accept_encoding: ae.map(str::to_owned) }
    }

    #[test]
    fn if_none_match_handles_lists_weak_tags_and_star() {
        assert!(cond(Some("\"a\""), None).not_modified(b"\"a\""));
        assert!(cond(Some("\"x\", W/\"a\""), None).not_modified(b"\"a\""));
        assert!(cond(Some("*"), None).not_modified(b"\"a\""));
        assert!(!cond(Some("\"b\""), None).not_modified(b"\"a\""));
        assert!(!cond(None, None).not_modified(b"\"a\""));
    }

    #[test]
    fn the_gzip_representation_has_its_own_etag() {
        let cc = HeaderValue::from_static("no-cache");
        let etag = Bytes::from_static(b"\"abc\"");
        let body = Bytes::from_static(b"{}");
        let gz = Some(Bytes::from_static(b"gz"));
        let plain = cached_json(&cond(None, None), etag.clone(), body.clone(), gz.clone(), &cc);
        let zipped = cached_json(&cond(None, Some("gzip")), etag.clone(), body.clone(), gz.clone(), &cc);
        assert_eq!(plain.headers()[header::ETAG], "\"abc\"");
        assert_eq!(zipped.headers()[header::ETAG], "\"abc-gz\"");
        let revalidated = cached_json(&cond(Some("\"abc-gz\""), Some("gzip")), etag.clone(), body.clone(), gz.clone(), &cc);
        assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
        let other = cached_json(&cond(Some("\"abc-gz\""), None), etag, body, gz, &cc);
        assert_eq!(other.status(), StatusCode::OK, "the gzip tag does not validate the identity body");
    }

    #[test]
    fn gzip_is_used_only_when_accepted() {
        assert!(cond(None, Some("gzip, deflate, br")).accepts_gzip());
        assert!(cond(None, Some("GZIP;q=0.5")).accepts_gzip());
        assert!(!cond(None, Some("gzip;q=0")).accepts_gzip());
        assert!(!cond(None, Some("br")).accepts_gzip());
        assert!(!cond(None, None).accepts_gzip());
    }
}
