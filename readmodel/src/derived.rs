//! What the read model keeps in memory beside its records, derived from them by one scan: the
//! category index. So a write of a product is one sled write (its record) and nothing else.
//!
//! Kept in sled, the index cost a second copy-on-write insert per new product, which measured
//! about half of the whole write path's CPU (BENCHMARKS.md, round four). In memory it costs an
//! id per listed product (24 bytes inline, no allocation for ids of up to 22 bytes) and the
//! scan.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::view::StoredView;

/// Ids no longer than this are kept inline.
const INLINE_ID: usize = 22;

/// A product id in the index: 24 bytes, inline when it fits (nearly every id does), where
/// sled's `IVec` takes 40. The index holds one per listed product, so this is most of its
/// memory; ordered by its bytes, as the records are.
#[derive(Clone)]
pub(crate) enum Id {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Box<[u8]>),
}

const _: () = assert!(std::mem::size_of::<Id>() == 24);

impl Id {
    pub(crate) fn new(id: &[u8]) -> Self {
        if id.len() <= INLINE_ID {
            let mut bytes = [0; INLINE_ID];
            bytes[..id.len()].copy_from_slice(id);
            Self::Inline { len: id.len() as u8, bytes }
        } else {
            Self::Heap(id.into())
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(bytes) => bytes,
        }
    }
}

impl Borrow<[u8]> for Id {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Id {}

impl PartialOrd for Id {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Id {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

/// Complete for the records it was derived from, and kept so by every write after.
#[derive(Default)]
pub(crate) struct CategoryIndex {
    categories: RwLock<HashMap<Box<str>, BTreeSet<Id>>>,
}

impl CategoryIndex {
    /// One scan of every record.
    pub(crate) fn scan(views: &sled::Tree) -> Result<Self, sled::Error> {
        let index = Self::default();
        for item in views.iter() {
            let (id, raw) = item?;
            // A record that cannot be decoded lists nothing; `replay verify` names it.
            if let (Some(category), Ok(id)) = (StoredView::listing_of(&raw), std::str::from_utf8(&id)) {
                index.insert(category, id);
            }
        }
        Ok(index)
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<Box<str>, BTreeSet<Id>>> {
        self.categories.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<Box<str>, BTreeSet<Id>>> {
        self.categories.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, category: &str, id: &str) {
        let mut categories = self.write();
        match categories.get_mut(category) {
            Some(ids) => ids.insert(Id::new(id.as_bytes())),
            None => categories.entry(category.into()).or_default().insert(Id::new(id.as_bytes())),
        };
    }

    pub(crate) fn remove(&self, category: &str, id: &str) {
        let mut categories = self.write();
        if let Some(ids) = categories.get_mut(category) {
            ids.remove(id.as_bytes());
            if ids.is_empty() {
                categories.remove(category);
            }
        }
    }

    pub(crate) fn contains(&self, category: &str, id: &str) -> bool {
        self.read().get(category).is_some_and(|ids| ids.contains(id.as_bytes()))
    }

    /// Up to `n` ids of the category in order, after `after` (from the first without it). The
    /// lock is held only while they are copied, never while their records are read.
    pub(crate) fn after(&self, category: &str, after: Option<&[u8]>, n: usize) -> Vec<Id> {
        let categories = self.read();
        let Some(ids) = categories.get(category) else { return Vec::new() };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        ids.range::<[u8], _>((start, Bound::Unbounded)).take(n).cloned().collect()
    }

    /// Every entry as `(category, id)`, categories in no particular order.
    pub(crate) fn entries(&self) -> Vec<(String, String)> {
        let categories = self.read();
        let mut out = Vec::with_capacity(categories.values().map(BTreeSet::len).sum());
        for (category, ids) in categories.iter() {
            out.extend(ids.iter().map(|id| (category.to_string(), String::from_utf8_lossy(id.as_bytes()).into_owned())));
        }
        out
    }

    pub(crate) fn clear(&self) {
        self.write().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(index: &CategoryIndex, category: &str, after: Option<&str>, n: usize) -> Vec<String> {
        index
            .after(category, after.map(str::as_bytes), n)
            .iter()
            .map(|id| String::from_utf8_lossy(id.as_bytes()).into_owned())
            .collect()
    }

    #[test]
    fn pages_in_id_order_from_a_cursor_within_one_category() {
        let index = CategoryIndex::default();
        for id in ["P3", "P1", "P2"] {
            index.insert("Tools", id);
        }
        index.insert("Toolsets", "P0");
        assert_eq!(ids(&index, "Tools", None, 10), ["P1", "P2", "P3"]);
        assert_eq!(ids(&index, "Tools", Some("P1"), 1), ["P2"]);
        assert_eq!(ids(&index, "Tools", Some("P3"), 10), Vec::<String>::new());
        assert_eq!(ids(&index, "Toolsets", None, 10), ["P0"]);
        assert!(index.contains("Tools", "P2") && !index.contains("Tools", "P0"));
    }

    #[test]
    fn ids_longer_than_the_inline_ones_order_among_them_by_their_bytes() {
        let index = CategoryIndex::default();
        let long = "P".repeat(INLINE_ID) + "1";
        for id in [long.as_str(), "PZ", "P1", &"P".repeat(INLINE_ID)] {
            index.insert("Tools", id);
        }
        let mut expected = vec!["P1".to_owned(), "P".repeat(INLINE_ID), long.clone(), "PZ".to_owned()];
        expected.sort();
        assert_eq!(ids(&index, "Tools", None, 10), expected);
        assert!(index.contains("Tools", &long));
        assert_eq!(ids(&index, "Tools", Some(&"P".repeat(INLINE_ID)), 1), [long]);
    }

    #[test]
    fn a_removed_entry_is_gone_and_an_empty_category_with_it() {
        let index = CategoryIndex::default();
        index.insert("Tools", "P1");
        index.insert("Tools", "P1");
        index.remove("Tools", "P1");
        index.remove("Garden", "P1");
        assert!(!index.contains("Tools", "P1"));
        assert!(index.entries().is_empty());
        assert!(index.read().is_empty(), "an empty category is dropped");
    }
}
