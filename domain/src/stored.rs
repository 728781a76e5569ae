//! A product state as the embedded store keeps it: compact binary (postcard) in records and
//! snapshots, with the id left to the key it is stored under. JSON is still read, for data dirs
//! from before.
//!
//! Why not JSON: every byte of a record is copied several times over by sled (into each leaf
//! clone, its log, every consolidation and split of the leaf), and the state was a quarter of
//! the record. Field names, `null`s and decimal text made it three to four times larger than
//! this form, and slower both ways.

use serde::{Deserialize, Serialize};

use crate::id::{InvalidProductId, ProductId};
use crate::money::{Currency, Money};
use crate::state::{FacetVersions, ProductInfo, ProductState};

/// The first byte of the compact form. A JSON state starts with `{`, so one byte tells them apart.
const COMPACT: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoredStateError {
    #[error("an empty state")]
    Empty,
    #[error("an unknown state format (first byte {0:#04x})")]
    UnknownFormat(u8),
    #[error("a compact state that does not decode: {0}")]
    Compact(#[from] postcard::Error),
    #[error("a JSON state that does not decode: {0}")]
    Json(#[from] serde_json::Error),
    #[error("an unknown currency {0:?}")]
    Currency(String),
    #[error(transparent)]
    Id(#[from] InvalidProductId),
}

/// The fields in a fixed order, with no names: postcard writes integers as varints and each
/// `Option` as one byte before its value. Strings borrow from the bytes they decode from.
#[derive(Serialize, Deserialize)]
struct Compact<'a> {
    #[serde(borrow)]
    info: Option<CompactInfo<'a>>,
    deleted: bool,
    #[serde(borrow)]
    price: Option<CompactMoney<'a>>,
    quantity: Option<u64>,
    versions: [Option<u64>; 3],
    positions: [Option<u64>; 3],
    revision: u64,
    updated_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct CompactInfo<'a> {
    name: &'a str,
    description: Option<&'a str>,
    category: Option<&'a str>,
    #[serde(borrow)]
    list_price: Option<CompactMoney<'a>>,
}

#[derive(Serialize, Deserialize)]
struct CompactMoney<'a> {
    minor: i64,
    currency: &'a str,
}

impl<'a> CompactMoney<'a> {
    fn of(money: &Money) -> Self {
        Self { minor: money.minor(), currency: money.currency().code() }
    }

    fn money(&self) -> Result<Money, StoredStateError> {
        let currency = Currency::parse(self.currency).ok_or_else(|| StoredStateError::Currency(self.currency.to_owned()))?;
        Ok(Money::from_minor(self.minor, currency))
    }
}

fn facets(v: &FacetVersions) -> [Option<u64>; 3] {
    [v.product, v.inventory, v.price]
}

fn from_facets([product, inventory, price]: [Option<u64>; 3]) -> FacetVersions {
    FacetVersions { product, inventory, price }
}

impl ProductState {
    /// Appends the compact form of this state to `out` (its id is the key it is stored under).
    pub fn encode_stored(&self, out: &mut Vec<u8>) {
        let compact = Compact {
            info: self.info.as_ref().map(|i| CompactInfo {
                name: &i.name,
                description: i.description.as_deref(),
                category: i.category.as_deref(),
                list_price: i.list_price.as_ref().map(CompactMoney::of),
            }),
            deleted: self.deleted,
            price: self.price.as_ref().map(CompactMoney::of),
            quantity: self.quantity,
            versions: facets(&self.versions),
            positions: facets(&self.positions),
            revision: self.revision,
            updated_at_ms: self.updated_at_ms,
        };
        out.push(COMPACT);
        // Into a Vec, serializing these types cannot fail: no map of unknown length, no I/O.
        let written = postcard::to_extend(&compact, std::mem::take(out)).expect("a state serializes");
        *out = written;
    }

    /// The state of product `id` from what [`Self::encode_stored`] wrote, or from the JSON
    /// that data dirs from before hold.
    pub fn decode_stored(id: &str, bytes: &[u8]) -> Result<Self, StoredStateError> {
        match bytes.first() {
            None => Err(StoredStateError::Empty),
            Some(&COMPACT) => {
                let c: Compact<'_> = postcard::from_bytes(&bytes[1..])?;
                let info = match c.info {
                    None => None,
                    Some(i) => Some(ProductInfo {
                        name: i.name.to_owned(),
                        description: i.description.map(str::to_owned),
                        category: i.category.map(str::to_owned),
                        list_price: i.list_price.as_ref().map(CompactMoney::money).transpose()?,
                    }),
                };
                Ok(Self {
                    id: ProductId::parse(id)?,
                    info,
                    deleted: c.deleted,
                    price: c.price.as_ref().map(CompactMoney::money).transpose()?,
                    quantity: c.quantity,
                    versions: from_facets(c.versions),
                    positions: from_facets(c.positions),
                    revision: c.revision,
                    updated_at_ms: c.updated_at_ms,
                })
            }
            Some(b'{') => Ok(serde_json::from_slice(bytes)?),
            Some(&other) => Err(StoredStateError::UnknownFormat(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{CatalogEvent, ParseLimits};
    use std::time::{Duration, SystemTime};

    fn folded(bodies: &[&str]) -> ProductState {
        let mut state = ProductState::new(ProductId::parse("P-1").unwrap());
        for (i, b) in bodies.iter().enumerate() {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            let event = CatalogEvent::parse(b.as_bytes(), at, ParseLimits::default()).unwrap();
            state.apply_at(&event, Some(i as u64 + 7));
        }
        state
    }

    fn states() -> Vec<ProductState> {
        vec![
            ProductState::new(ProductId::parse("P-1").unwrap()),
            folded(&[r#"{"productId":"P-1","name":"Laptop","category":"Electronics","status":"created","version":3}"#]),
            folded(&[
                r#"{"productId":"P-1","name":"Läptöp ✓","description":"with \"quotes\"","category":"E","price":999.99,"currency":"EUR","status":"created"}"#,
                r#"{"productId":"P-1","quantity":0,"version":9007199254740991}"#,
                r#"{"productId":"P-1","price":1200,"currency":"JPY"}"#,
            ]),
            folded(&[
                r#"{"productId":"P-1","name":"A","category":"C","status":"created","version":1}"#,
                r#"{"productId":"P-1","status":"deleted","version":2}"#,
            ]),
        ]
    }

    #[test]
    fn every_state_round_trips() {
        for state in states() {
            let mut out = vec![9, 9];
            state.encode_stored(&mut out);
            assert_eq!(&out[..2], &[9, 9], "appends, and keeps what was there");
            assert_eq!(ProductState::decode_stored("P-1", &out[2..]).unwrap(), state);
        }
    }

    #[test]
    fn the_json_of_data_dirs_from_before_still_reads() {
        for state in states() {
            let json = serde_json::to_vec(&state).unwrap();
            assert_eq!(ProductState::decode_stored("P-1", &json).unwrap(), state);
            let mut compact = Vec::new();
            state.encode_stored(&mut compact);
            assert!(compact.len() * 2 < json.len(), "compact {} B against JSON {} B", compact.len(), json.len());
        }
    }

    #[test]
    fn damaged_bytes_are_errors_not_states() {
        let mut good = Vec::new();
        states()[2].encode_stored(&mut good);
        assert!(matches!(ProductState::decode_stored("P-1", &[]), Err(StoredStateError::Empty)));
        assert!(matches!(ProductState::decode_stored("P-1", &[7, 0]), Err(StoredStateError::UnknownFormat(7))));
        assert!(ProductState::decode_stored("P-1", b"{\"id\":").is_err());
        for cut in 1..good.len() {
            assert!(ProductState::decode_stored("P-1", &good[..cut]).is_err(), "cut at {cut} of {}", good.len());
        }
        assert!(matches!(ProductState::decode_stored("bad id!", &good), Err(StoredStateError::Id(_))));
        let mut unknown = Vec::new();
        let mut s = states()[2].clone();
        s.price = None;
        s.encode_stored(&mut unknown);
        let at = unknown.windows(3).position(|w| w == b"EUR").unwrap();
        unknown[at..at + 3].copy_from_slice(b"XXX");
        assert!(matches!(ProductState::decode_stored("P-1", &unknown), Err(StoredStateError::Currency(c)) if c == "XXX"));
    }
}
