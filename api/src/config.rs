//! BFF settings, each a named value with its default.

use std::fmt;
use std::sync::OnceLock;

use sha2::Digest;
use warp::http::HeaderValue;

pub const DEFAULT_CACHE_CONTROL: &str = "public, max-age=5, stale-while-revalidate=30";
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 4 * 1024 * 1024;
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;
pub const DEFAULT_MAX_IDS: usize = 100;
pub const DEFAULT_PAGE_SIZE: usize = 20;

/// A bearer token (`POST /events`'s, or the admin routes'); never printed, never logged. Only
/// its SHA-256 digest is kept.
#[derive(Clone)]
pub struct IngestToken([u8; 32]);

impl IngestToken {
    pub fn new(token: String) -> Self {
        Self(digest(&token))
    }

    /// Compares digests, in constant time: the timing says neither how many bytes matched
    /// nor how long the token is.
    pub fn matches(&self, presented: &str) -> bool {
        let presented = digest(presented);
        self.0.iter().zip(presented).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

fn digest(text: &str) -> [u8; 32] {
    sha2::Sha256::digest(text.as_bytes()).into()
}

impl fmt::Debug for IngestToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IngestToken(***)")
    }
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Origins allowed to call from a browser; `*` allows any; empty sends no CORS headers.
    pub cors_origins: Vec<String>,
    /// `Cache-Control` of product answers, so a CDN can absorb spikes.
    pub cache_control: String,
    pub ingest_token: Option<IngestToken>,
    /// Bearer token of the admin routes (`POST /admin/rebuild`); `None` turns them off.
    pub admin_token: Option<IngestToken>,
    /// Largest `POST /events` body; larger ones get 413.
    pub max_request_bytes: u64,
    /// Most entries in one `POST /events`.
    pub max_entries: usize,
    /// Most ids in one `GET /products?ids=`.
    pub max_ids: usize,
    pub default_page_size: usize,
    pub max_page_size: usize,
    /// Product and ingest routes; off for a worker, which serves only health, readiness and metrics.
    pub product_routes: bool,
    /// `cache_control` as a header value, parsed once rather than per response.
    cache_control_header: OnceLock<HeaderValue>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            cors_origins: Vec::new(),
            cache_control: DEFAULT_CACHE_CONTROL.to_owned(),
            ingest_token: None,
            admin_token: None,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_ids: DEFAULT_MAX_IDS,
            default_page_size: DEFAULT_PAGE_SIZE,
            max_page_size: catalog_readmodel::DEFAULT_MAX_PAGE,
            product_routes: true,
            cache_control_header: OnceLock::new(),
        }
    }
}

impl ApiConfig {
    /// The configured `Cache-Control`; a value that is not a valid header falls back to `no-cache`.
    pub fn cache_control_header(&self) -> &HeaderValue {
        self.cache_control_header
            .get_or_init(|| HeaderValue::from_str(&self.cache_control).unwrap_or_else(|_| HeaderValue::from_static("no-cache")))
    }
}

/// Checks an allowed origin the way browsers send it (`scheme://host[:port]`), so a typo is a
/// clear start-up error rather than a panic inside the CORS filter.
pub fn validate_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| format!("CORS origin {origin:?} must start with http:// or https://"))?;
    let ok = !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if ok { Ok(()) } else { Err(format!("CORS origin {origin:?} must be scheme://host[:port], with no path")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_only_itself_and_never_prints() {
        let t = IngestToken::new("s3cret".into());
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre") && !t.matches("s3cret!") && !t.matches(""));
        assert_eq!(format!("{t:?}"), "IngestToken(***)");
    }

    #[test]
    fn origins_are_checked() {
        assert!(validate_origin("https://shop.example.com").is_ok());
        assert!(validate_origin("http://localhost:3000").is_ok());
        assert!(validate_origin("*").is_ok());
        assert!(validate_origin("shop.example.com").is_err());
        assert!(validate_origin("https://shop.example.com/path").is_err());
    }
}
