//! The stored form of one product's view: everything a GET sends, prepared when it changed,
//! and, where the read model is the store (embedded), the product's state after the bodies.

use std::hash::{DefaultHasher, Hasher};
use std::io::Write;

use bytes::Bytes;
use catalog_domain::view::{RenderedView, ViewSettings, render};
use catalog_domain::{ProductState, StoredStateError};

/// Bodies at least this large are also stored gzipped (docs/contract.md §2: over 1 KiB).
pub const GZIP_MIN_BYTES: usize = 1024;
/// A view alone: the read model is a cache of another store (AWS).
const FORMAT: u8 = 2;
/// A view and, last, its product's state: the read model is the store (embedded).
const FORMAT_WITH_STATE: u8 = 3;
const ETAG_LEN: usize = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Web,
    Mobile,
}

/// A view as stored: `revision` orders it, `listed` is false for a tombstone (deleted or not
/// yet described), which still holds its revision so an older refresh cannot resurrect it.
#[derive(Clone)]
pub struct StoredView {
    raw: Bytes,
    pub revision: u64,
    /// When this view was written: with the read model's TTL, the backstop for a missed invalidation.
    pub refreshed_at_ms: u64,
    pub listed: bool,
    category: (usize, usize),
    /// For each variant: ETag, body, gzipped body (empty when not worth it).
    parts: [[(usize, usize); 3]; 2],
    /// The product's state in its stored form (compact, or JSON from before), when the record holds it.
    state: Option<(usize, usize)>,
}

impl std::fmt::Debug for StoredView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredView").field("revision", &self.revision).field("listed", &self.listed).finish()
    }
}

/// The strong ETag of a body, quoted.
pub fn etag(body: &[u8]) -> String {
    // SipHash with fixed keys: stable for a given build, which is all an ETag needs.
    let mut h = DefaultHasher::new();
    h.write(body);
    // Hex by hand, not `format!`: two of these per changed product per batch, and the
    // formatting machinery showed in a bulk load's profile (BENCHMARKS.md, round seventeen).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = h.finish();
    let mut tag = [b'"'; ETAG_LEN];
    for (i, digit) in tag[1..ETAG_LEN - 1].iter_mut().enumerate() {
        *digit = HEX[(hash >> (60 - 4 * i) & 0xf) as usize];
    }
    String::from_utf8(tag.to_vec()).expect("hex digits and quotes are ASCII")
}

/// How hard to compress: views are compressed once when they change, list pages on every request.
#[derive(Debug, Clone, Copy)]
pub enum Effort {
    Stored,
    PerRequest,
}

/// The body gzipped, when it is large enough to be worth it (at least [`GZIP_MIN_BYTES`]).
pub fn gzip(body: &[u8], effort: Effort) -> Option<Vec<u8>> {
    if body.len() < GZIP_MIN_BYTES {
        return None;
    }
    let level = match effort {
        Effort::Stored => flate2::Compression::default(),
        Effort::PerRequest => flate2::Compression::fast(),
    };
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 3), level);
    enc.write_all(body).expect("writing to a Vec cannot fail");
    Some(enc.finish().expect("writing to a Vec cannot fail"))
}

impl StoredView {
    /// Encodes the view of `state`: rendered bodies when listed, a tombstone otherwise; with
    /// `with_state`, the state itself after them (where the read model is the store).
    pub fn encode(state: &ProductState, settings: ViewSettings, now_ms: u64, with_state: bool) -> Vec<u8> {
        let rendered = render(state, settings);
        let category = state.category().unwrap_or_default().as_bytes();
        let mut out = Vec::with_capacity(if with_state { 1024 } else { 512 });
        out.push(if with_state { FORMAT_WITH_STATE } else { FORMAT });
        out.extend_from_slice(&state.revision.to_be_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.push(u8::from(rendered.is_some()));
        put(&mut out, category);
        if let Some(RenderedView { web, mobile }) = rendered {
            for body in [web, mobile] {
                put(&mut out, etag(&body).as_bytes());
                let gz = gzip(&body, Effort::Stored).unwrap_or_default();
                put(&mut out, &body);
                put(&mut out, &gz);
            }
        }
        if with_state {
            // Written in place: its length is known only after it.
            let at = out.len();
            out.extend_from_slice(&[0; 4]);
            state.encode_stored(&mut out);
            let len = (out.len() - at - 4) as u32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        out
    }

    pub fn decode(raw: Bytes) -> Option<Self> {
        let with_state = match raw.first() {
            Some(&FORMAT) => false,
            Some(&FORMAT_WITH_STATE) => true,
            _ => return None,
        };
        let revision = u64::from_be_bytes(raw.get(1..9)?.try_into().ok()?);
        let refreshed_at_ms = u64::from_be_bytes(raw.get(9..17)?.try_into().ok()?);
        let listed = *raw.get(17)? == 1;
        let mut at = 18;
        let category = take(&raw, &mut at)?;
        let mut parts = [[(0, 0); 3]; 2];
        if listed {
            for variant in &mut parts {
                for part in variant.iter_mut() {
                    *part = take(&raw, &mut at)?;
                }
            }
            if parts[0][0].1 - parts[0][0].0 != ETAG_LEN {
                return None;
            }
        }
        let state = if with_state { Some(take(&raw, &mut at)?) } else { None };
        Some(Self { raw, revision, refreshed_at_ms, listed, category, parts, state })
    }

    /// The category a record is listed in, read from its header alone: `None` for a tombstone,
    /// a product without a category, or bytes that are no record.
    pub fn listing_of(raw: &[u8]) -> Option<&str> {
        if !matches!(raw.first(), Some(&FORMAT | &FORMAT_WITH_STATE)) || *raw.get(17)? != 1 {
            return None;
        }
        let (start, end) = take(raw, &mut 18)?;
        std::str::from_utf8(&raw[start..end]).ok().filter(|c| !c.is_empty())
    }

    /// Whether the record holds its product's state (it does wherever the read model is the store).
    pub fn has_state(&self) -> bool {
        self.state.is_some()
    }

    /// The state the record of product `id` holds: `None` when it holds none, `Some(Err)` when
    /// it cannot be decoded.
    pub fn state(&self, id: &str) -> Option<Result<ProductState, StoredStateError>> {
        self.state.map(|(s, e)| ProductState::decode_stored(id, &self.raw[s..e]))
    }

    /// The same record in bytes of its own: a record read from sled may share its allocation
    /// with the rest of a page, which keeping it would keep too.
    pub(crate) fn detached(&self) -> Self {
        Self { raw: Bytes::copy_from_slice(&self.raw), ..self.clone() }
    }

    /// The whole record as stored.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn category(&self) -> &str {
        std::str::from_utf8(&self.raw[self.category.0..self.category.1]).unwrap_or_default()
    }

    pub fn etag(&self, variant: Variant) -> Bytes {
        let (s, e) = self.parts[variant as usize][0];
        self.raw.slice(s..e)
    }

    pub fn body(&self, variant: Variant) -> Bytes {
        let (s, e) = self.parts[variant as usize][1];
        self.raw.slice(s..e)
    }

    /// The gzipped body, when the body was large enough to be worth compressing.
    pub fn gzip_body(&self, variant: Variant) -> Option<Bytes> {
        let (s, e) = self.parts[variant as usize][2];
        (e > s).then(|| self.raw.slice(s..e))
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn take(raw: &[u8], at: &mut usize) -> Option<(usize, usize)> {
    let len = u32::from_be_bytes(raw.get(*at..*at + 4)?.try_into().ok()?) as usize;
    let start = *at + 4;
    let end = start.checked_add(len)?;
    if end > raw.len() {
        return None;
    }
    *at = end;
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog_domain::{CatalogEvent, ProductId};
    use std::time::SystemTime;

    fn state(description_len: usize) -> ProductState {
        let mut s = ProductState::new(ProductId::parse("P1").unwrap());
        let body = serde_json::json!({"productId":"P1","name":"Laptop","category":"Electronics","status":"created","description":"d".repeat(description_len)});
        s.apply(&CatalogEvent::from_value(&body, SystemTime::UNIX_EPOCH).unwrap());
        s
    }

    #[test]
    fn an_etag_is_its_hash_in_sixteen_hex_digits_quoted() {
        for body in [&b""[..], b"{}", b"a body of some length, with \"quotes\""] {
            let mut h = DefaultHasher::new();
            h.write(body);
            assert_eq!(etag(body), format!("\"{:016x}\"", h.finish()));
        }
    }

    #[test]
    fn round_trips_bodies_etags_and_category() {
        let v = StoredView::decode(Bytes::from(StoredView::encode(&state(10), ViewSettings::default(), 7, false))).unwrap();
        assert!(v.listed);
        assert_eq!((v.revision, v.refreshed_at_ms), (1, 7));
        assert_eq!(v.category(), "Electronics");
        let web: serde_json::Value = serde_json::from_slice(&v.body(Variant::Web)).unwrap();
        assert_eq!(web["product"]["name"], "Laptop");
        let mobile: serde_json::Value = serde_json::from_slice(&v.body(Variant::Mobile)).unwrap();
        assert_eq!(mobile["id"], "P1");
        assert_ne!(v.etag(Variant::Web), v.etag(Variant::Mobile));
        assert_eq!(v.etag(Variant::Web).len(), ETAG_LEN);
        assert!(v.gzip_body(Variant::Web).is_none(), "small bodies are not compressed");
    }

    #[test]
    fn large_bodies_carry_a_gzip_twin() {
        let v = StoredView::decode(Bytes::from(StoredView::encode(&state(4000), ViewSettings::default(), 7, false))).unwrap();
        let gz = v.gzip_body(Variant::Web).unwrap();
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut plain).unwrap();
        assert_eq!(plain, v.body(Variant::Web));
    }

    #[test]
    fn a_record_of_the_store_carries_its_state_after_the_bodies() {
        let s = state(10);
        let v = StoredView::decode(Bytes::from(StoredView::encode(&s, ViewSettings::default(), 7, true))).unwrap();
        assert_eq!(v.state("P1").unwrap().unwrap(), s);
        let web: serde_json::Value = serde_json::from_slice(&v.body(Variant::Web)).unwrap();
        assert_eq!(web["product"]["name"], "Laptop");
        let alone = StoredView::decode(Bytes::from(StoredView::encode(&s, ViewSettings::default(), 7, false))).unwrap();
        assert!(alone.state("P1").is_none() && !alone.has_state());
        let mut deleted = s.clone();
        let del = serde_json::json!({"productId":"P1","status":"deleted"});
        deleted.apply(&CatalogEvent::from_value(&del, SystemTime::UNIX_EPOCH).unwrap());
        let tombstone = StoredView::decode(Bytes::from(StoredView::encode(&deleted, ViewSettings::default(), 7, true))).unwrap();
        assert!(!tombstone.listed);
        assert_eq!(tombstone.state("P1").unwrap().unwrap(), deleted, "a tombstone keeps the whole state");
    }

    #[test]
    fn a_record_from_before_holds_its_state_as_json_and_still_reads() {
        let s = state(10);
        let mut raw = StoredView::encode(&s, ViewSettings::default(), 7, true);
        let (start, _) = StoredView::decode(Bytes::from(raw.clone())).unwrap().state.unwrap();
        raw.truncate(start - 4);
        put(&mut raw, &serde_json::to_vec(&s).unwrap());
        let v = StoredView::decode(Bytes::from(raw)).unwrap();
        assert_eq!(v.state("P1").unwrap().unwrap(), s);
        assert_eq!(v.category(), "Electronics");
    }

    #[test]
    fn tombstones_keep_their_revision() {
        let mut s = state(1);
        let del = serde_json::json!({"productId":"P1","status":"deleted"});
        s.apply(&CatalogEvent::from_value(&del, SystemTime::UNIX_EPOCH).unwrap());
        let v = StoredView::decode(Bytes::from(StoredView::encode(&s, ViewSettings::default(), 7, false))).unwrap();
        assert!(!v.listed);
        assert_eq!(v.revision, 2);
        assert_eq!(v.category(), "");
    }
}
