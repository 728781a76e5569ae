//! `verify`: the log's projection, the store and the read model compared product by product,
//! every disagreement listed with what differs; `repair_views` puts the read model right
//! from the store.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use catalog_domain::ProductState;
use catalog_readmodel::{ReadModel, StoredView, Variant};
pub use itertools::EitherOrBoth;
use itertools::Itertools;

use crate::ReplayError;

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

/// What [`compare_store`] found, and how many products each side holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoreComparison {
    pub drifts: Vec<Drift>,
    pub log_products: u64,
    pub store_products: u64,
}

/// Compares the store with the log's projection, both in id order (as the embedded store,
/// the snapshot merged with its tail, and a sorted projection are), one state of each side at
/// a time: at 1M products, holding both sides took `replay verify` to 1.15 GB (BENCHMARKS.md,
/// round eight).
pub fn compare_store<L, S, E, F>(
    log: impl IntoIterator<Item = Result<L, E>>,
    store: impl IntoIterator<Item = Result<S, F>>,
) -> Result<StoreComparison, ReplayError>
where
    L: Borrow<ProductState>,
    S: Borrow<ProductState>,
    E: Into<ReplayError>,
    F: Into<ReplayError>,
{
    let mut out = StoreComparison::default();
    for pair in side_by_side(log, store, |p: &L| p.borrow().id.as_str(), |s: &S| s.borrow().id.as_str()) {
        match pair? {
            EitherOrBoth::Both(p, s) => {
                let (p, s) = (p.borrow(), s.borrow());
                out.drifts
                    .extend(p.differences(s, ("log", "store")).into_iter().map(|d| drift(DriftKind::Store, s.id.as_str(), d)));
                out.log_products += 1;
                out.store_products += 1;
            }
            EitherOrBoth::Left(p) => {
                out.drifts.push(drift(DriftKind::Store, p.borrow().id.as_str(), "in the log, but not in the store"));
                out.log_products += 1;
            }
            EitherOrBoth::Right(s) => {
                out.drifts.push(drift(
                    DriftKind::Store,
                    s.borrow().id.as_str(),
                    "in the store, but no event of the log names it",
                ));
                out.store_products += 1;
            }
        }
    }
    Ok(out)
}

/// Two sides read in id order, lined up by id: per id, what each side holds. A read error
/// ends it, where it happened.
pub fn side_by_side<A, B, E, F>(
    a: impl IntoIterator<Item = Result<A, E>>,
    b: impl IntoIterator<Item = Result<B, F>>,
    a_id: impl Fn(&A) -> &str,
    b_id: impl Fn(&B) -> &str,
) -> impl Iterator<Item = Result<EitherOrBoth<A, B>, ReplayError>>
where
    E: Into<ReplayError>,
    F: Into<ReplayError>,
{
    let a = a.into_iter().map(|r| r.map_err(Into::into));
    let b = b.into_iter().map(|r| r.map_err(Into::into));
    // An error sorts first, so it comes out as soon as it is read, and never pairs.
    let by_id = move |x: &Result<A, ReplayError>, y: &Result<B, ReplayError>| match (x, y) {
        (Ok(x), Ok(y)) => a_id(x).cmp(b_id(y)),
        (Err(_), _) => Ordering::Less,
        (_, Err(_)) => Ordering::Greater,
    };
    a.merge_join_by(b, by_id).map(|pair| match pair {
        EitherOrBoth::Both(x, y) => Ok(EitherOrBoth::Both(x?, y?)),
        EitherOrBoth::Left(x) => x.map(EitherOrBoth::Left),
        EitherOrBoth::Right(y) => y.map(EitherOrBoth::Right),
    })
}

/// What `compare_views` looked at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ViewReport {
    pub views: u64,
    pub listings: u64,
}

/// Compares every view and category listing with the store's states (in id order, read one at
/// a time beside the views): a listed product has a view of the same revision with the bodies
/// its state renders to, and an entry in its category's listing; nothing else is served or
/// listed.
pub fn compare_views<S, F>(
    model: &ReadModel,
    store: impl IntoIterator<Item = Result<S, F>>,
) -> Result<(Vec<Drift>, ViewReport), ReplayError>
where
    S: Borrow<ProductState>,
    F: Into<ReplayError>,
{
    let settings = model.settings();
    let mut out = Vec::new();
    let mut report = ViewReport::default();
    for pair in side_by_side(model.views(), store, |(id, _): &(String, _)| id.as_str(), |s: &S| s.borrow().id.as_str()) {
        let (view, state) = match pair? {
            EitherOrBoth::Both(v, s) => (Some(v), Some(s)),
            EitherOrBoth::Left(v) => (Some(v), None),
            EitherOrBoth::Right(s) => (None, Some(s)),
        };
        let state = state.as_ref().map(Borrow::borrow);
        let decoded = match &view {
            Some((id, None)) => {
                out.push(drift(DriftKind::View, id, "the stored view cannot be decoded"));
                None
            }
            Some((id, Some(view))) => Some((id, view)),
            None => None,
        };
        if view.is_some() {
            report.views += 1;
        }
        match (decoded, state) {
            (Some((id, view)), Some(state)) => {
                out.extend(view_differences(view, state, settings).into_iter().map(|d| drift(DriftKind::View, id, d)));
                if view.listed && !view.category().is_empty() && !model.is_indexed(view.category(), id)? {
                    out.push(drift(
                        DriftKind::Listing,
                        id,
                        format!("missing from the listing of category {:?}", view.category()),
                    ));
                }
            }
            (Some((id, view)), None) if view.listed => {
                out.push(drift(DriftKind::View, id, "served, but the store has no such product"))
            }
            (Some(_), None) => {}
            // No view, or only one that cannot be decoded.
            (None, Some(state)) if state.is_listed() => out.push(drift(
                DriftKind::View,
                state.id.as_str(),
                format!("listed in the store (revision {}), but no view", state.revision),
            )),
            (None, _) => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use catalog_domain::{ProductId, ViewSettings};

    fn state(id: &str, quantity: u64) -> ProductState {
        ProductState { quantity: Some(quantity), revision: 1, ..ProductState::new(ProductId::parse(id).unwrap()) }
    }

    #[test]
    fn each_side_s_missing_and_differing_products_are_found_in_one_pass() {
        let log = [state("A", 1), state("B", 1), state("D", 1), state("E", 1)];
        let store = [state("B", 2), state("C", 1), state("D", 1)];
        let ok = Ok::<_, ReplayError>;
        let compared = compare_store(log.iter().map(ok), store.iter().map(ok)).unwrap();
        let text: Vec<String> = compared.drifts.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "store≠log A: in the log, but not in the store",
                "store≠log B: quantity: log 1, store 2",
                "store≠log C: in the store, but no event of the log names it",
                "store≠log E: in the log, but not in the store",
            ]
        );
        assert_eq!((compared.log_products, compared.store_products), (4, 3));
    }

    #[test]
    fn views_are_checked_beside_the_store_s_states_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let model = ReadModel::open(&db, ViewSettings::default(), None).unwrap();
        let listed = |id: &str| {
            let mut s = state(id, 3);
            s.info = Some(catalog_domain::state::ProductInfo {
                name: id.into(),
                description: None,
                category: Some("C".into()),
                list_price: None,
            });
            s
        };
        let (a, b, c, d) = (listed("A"), listed("B"), listed("C"), listed("D"));
        model.apply([&a, &b, &d]).unwrap();
        // B's view is behind the store; C has no view; D is served but gone from the store.
        let mut b2 = b.clone();
        b2.revision = 2;
        let (drifts, report) = compare_views(&model, [&a, &b2, &c].map(Ok::<_, ReplayError>)).unwrap();
        let text: Vec<String> = drifts.iter().map(ToString::to_string).collect();
        assert_eq!(report, ViewReport { views: 3, listings: 3 });
        assert!(text[0].starts_with("view≠store B: revision: view 1, store 2"), "{text:?}");
        assert_eq!(
            &text[1..],
            [
                "view≠store C: listed in the store (revision 1), but no view",
                "view≠store D: served, but the store has no such product"
            ]
        );
    }
}
