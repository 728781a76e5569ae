//! `verify`: the log's projection, the store and the read model compared product by product,
//! every disagreement listed with what differs; `repair_views` puts the read model right
//! from the store.

use std::collections::{HashMap, HashSet};

use catalog_domain::{ProductId, ProductState};
use catalog_readmodel::{ReadModel, StoredView, Variant};

use crate::{Projection, ReplayError};

/// Which two sides disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DriftKind {
    /// The store's state and the log's projection.
    Store,
    /// A view and the store's state.
    View,
    /// A category listing and the views.
    Listing,
}

impl std::fmt::Display for DriftKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Store => "store≠log",
            Self::View => "view≠store",
            Self::Listing => "listing≠views",
        })
    }
}

/// One disagreement about one product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub kind: DriftKind,
    pub product: String,
    pub detail: String,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.product, self.detail)
    }
}

fn drift(kind: DriftKind, product: &str, detail: impl Into<String>) -> Drift {
    Drift { kind, product: product.to_owned(), detail: detail.into() }
}

/// Compares the store with the log's projection; `store` in any order.
pub fn compare_store(log: &Projection, store: &[ProductState]) -> Vec<Drift> {
    let mut out = Vec::new();
    let mut seen = HashSet::with_capacity(store.len());
    for state in store {
        seen.insert(&state.id);
        match log.get(&state.id) {
            Some(projected) => out.extend(
                projected.differences(state, ("log", "store")).into_iter().map(|d| drift(DriftKind::Store, state.id.as_str(), d)),
            ),
            None => out.push(drift(DriftKind::Store, state.id.as_str(), "in the store, but no event of the log names it")),
        }
    }
    let mut missing: Vec<&ProductId> = log.states().map(|s| &s.id).filter(|id| !seen.contains(id)).collect();
    missing.sort_unstable();
    out.extend(missing.into_iter().map(|id| drift(DriftKind::Store, id.as_str(), "in the log, but not in the store")));
    out
}

/// What `compare_views` looked at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ViewReport {
    pub views: u64,
    pub listings: u64,
}

/// Compares every view and category listing with the store's states: a listed product has a
/// view of the same revision with the bodies its state renders to, and an entry in its
/// category's listing; nothing else is served or listed.
pub fn compare_views(model: &ReadModel, store: &[ProductState]) -> Result<(Vec<Drift>, ViewReport), ReplayError> {
    let settings = model.settings();
    let by_id: HashMap<&str, &ProductState> = store.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut out = Vec::new();
    let mut report = ViewReport::default();
    let mut seen = HashSet::with_capacity(store.len());
    for item in model.views() {
        let (id, view) = item?;
        report.views += 1;
        let Some(view) = view else {
            out.push(drift(DriftKind::View, &id, "the stored view cannot be decoded"));
            continue;
        };
        match by_id.get(id.as_str()) {
            Some(state) => {
                seen.insert(state.id.as_str());
                out.extend(view_differences(&view, state, settings).into_iter().map(|d| drift(DriftKind::View, &id, d)));
                if view.listed && !view.category().is_empty() && !model.is_indexed(view.category(), &id)? {
                    out.push(drift(
                        DriftKind::Listing,
                        &id,
                        format!("missing from the listing of category {:?}", view.category()),
                    ));
                }
            }
            None if view.listed => out.push(drift(DriftKind::View, &id, "served, but the store has no such product")),
            None => {}
        }
    }
    for state in store {
        if state.is_listed() && !seen.contains(state.id.as_str()) {
            out.push(drift(
                DriftKind::View,
                state.id.as_str(),
                format!("listed in the store (revision {}), but no view", state.revision),
            ));
        }
    }
    for (category, id) in model.listings()? {
        report.listings += 1;
        let view = model.get(&id)?;
        if !view.as_ref().is_some_and(|v| v.listed && v.category() == category) {
            let actual = match view {
                Some(v) if v.listed => format!("its view is in category {:?}", v.category()),
                _ => "it has no listed view".to_owned(),
            };
            out.push(drift(DriftKind::Listing, &id, format!("listed under category {category:?}, but {actual}")));
        }
    }
    Ok((out, report))
}

fn view_differences(view: &StoredView, state: &ProductState, settings: catalog_domain::ViewSettings) -> Vec<String> {
    let expected = StoredView::decode(StoredView::encode(state, settings, 0, false).into()).expect("a fresh encoding decodes");
    if view.listed != expected.listed {
        let says = |listed: bool| if listed { "listed" } else { "not listed" };
        return vec![format!("the store says {}, the view says {}", says(expected.listed), says(view.listed))];
    }
    if !view.listed {
        return Vec::new();
    }
    let mut out = Vec::new();
    if view.revision != expected.revision {
        out.push(format!("revision: view {}, store {}", view.revision, expected.revision));
    }
    if view.category() != expected.category() {
        out.push(format!("category: view {:?}, store {:?}", view.category(), expected.category()));
    }
    for (variant, name) in [(Variant::Web, "web"), (Variant::Mobile, "mobile")] {
        if view.body(variant) != expected.body(variant) {
            out.push(format!(
                "{name} body: view {}, store renders {}",
                String::from_utf8_lossy(&view.body(variant)),
                String::from_utf8_lossy(&expected.body(variant))
            ));
        }
    }
    out
}

/// Puts the read model right from the store for every product named by a view or listing
/// drift: its view rewritten from the store's state (or dropped when the store has none),
/// and index entries that point at no matching view removed. Returns the products repaired.
pub fn repair_views(model: &ReadModel, store: &[ProductState], drifts: &[Drift]) -> Result<usize, ReplayError> {
    let by_id: HashMap<&str, &ProductState> = store.iter().map(|s| (s.id.as_str(), s)).collect();
    let ids: HashSet<&str> =
        drifts.iter().filter(|d| matches!(d.kind, DriftKind::View | DriftKind::Listing)).map(|d| d.product.as_str()).collect();
    for id in &ids {
        match by_id.get(id) {
            Some(state) => model.overwrite(state)?,
            None => model.remove(id)?,
        }
    }
    for (category, id) in model.listings()? {
        if !model.get(&id)?.is_some_and(|v| v.listed && v.category() == category) {
            model.unindex(&category, &id)?;
        }
    }
    Ok(ids.len())
}
