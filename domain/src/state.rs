//! `ProductState`: a product's current state as the fold of its events. Versions per facet
//! make the fold convergent: duplicates and stale deliveries change nothing.

use crate::event::{CatalogEvent, Change, Facet, ProductStatus, millis_since_epoch};
use crate::id::ProductId;
use crate::money::Money;

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FacetVersions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<u64>,
}

impl FacetVersions {
    pub fn is_empty(&self) -> bool {
        self.product.is_none() && self.inventory.is_none() && self.price.is_none()
    }

    pub fn get(&self, facet: Facet) -> Option<u64> {
        match facet {
            Facet::Product => self.product,
            Facet::Inventory => self.inventory,
            Facet::Price => self.price,
        }
    }

    fn set(&mut self, facet: Facet, version: u64) {
        let slot = match facet {
            Facet::Product => &mut self.product,
            Facet::Inventory => &mut self.inventory,
            Facet::Price => &mut self.price,
        };
        *slot = Some(version);
    }
}

/// What the product service says about a product.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProductInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_price: Option<Money>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProductState {
    pub id: ProductId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<ProductInfo>,
    #[serde(default)]
    pub deleted: bool,
    /// The pricing service's price; it wins over the product service's list price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u64>,
    #[serde(default)]
    pub versions: FacetVersions,
    /// Per facet, the position of the last unversioned event applied to it (see
    /// [`ProductState::apply_at`]); the implicit version of events that carry none.
    #[serde(default, skip_serializing_if = "FacetVersions::is_empty")]
    pub positions: FacetVersions,
    /// Bumped by every applied change: the monotonic stamp read-model views compare, so an
    /// older state can never overwrite a newer view, whatever order refreshes finish in.
    pub revision: u64,
    pub updated_at_ms: u64,
}

/// Whether an event changed the state, or why it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Changed,
    /// The facet already holds this version or a newer one.
    Stale,
    /// Applying it left the state exactly as it was (an unversioned duplicate).
    Unchanged,
}

impl ProductState {
    pub fn new(id: ProductId) -> Self {
        Self {
            id,
            info: None,
            deleted: false,
            price: None,
            quantity: None,
            versions: FacetVersions::default(),
            positions: FacetVersions::default(),
            revision: 0,
            updated_at_ms: 0,
        }
    }

    /// Applies one event with no known position: unversioned events apply in arrival order.
    pub fn apply(&mut self, event: &CatalogEvent) -> Applied {
        self.apply_at(event, None)
    }

    /// Applies one event under the version rule of docs/contract.md §1: a facet whose stored
    /// version is ≥ the event's ignores it. An event without a version is ordered by its
    /// `position`, the order the event log and the store agree on (the embedded log's
    /// sequence, SQS's send time): a facet that already applied a later or the same position
    /// ignores it, so a retried event can never undo a later one, and the log folded in
    /// order gives the state the store holds. Without a position it applies in arrival order.
    pub fn apply_at(&mut self, event: &CatalogEvent, position: Option<u64>) -> Applied {
        debug_assert_eq!(event.product_id, self.id);
        let facet = event.change.facet();
        if let (Some(incoming), Some(stored)) = (event.version, self.versions.get(facet))
            && stored >= incoming
        {
            return Applied::Stale;
        }
        if event.version.is_none()
            && let (Some(incoming), Some(stored)) = (position, self.positions.get(facet))
            && stored >= incoming
        {
            return Applied::Stale;
        }
        let before = (self.info.clone(), self.deleted, self.price, self.quantity, self.versions.clone(), self.positions.clone());
        match &event.change {
            Change::Product(change) => match change.status {
                ProductStatus::Deleted => self.deleted = true,
                // A Product Update carries the whole facet: merging partial updates could not
                // converge when versions arrive out of order (a stale v1 would be needed to fill
                // in what v2 left out, and it is rightly ignored).
                ProductStatus::Created | ProductStatus::Updated => {
                    self.deleted = false;
                    self.info = Some(ProductInfo {
                        name: change.name.clone().unwrap_or_default(),
                        description: change.description.clone(),
                        category: change.category.clone(),
                        list_price: change.list_price,
                    });
                }
            },
            Change::Inventory { quantity } => self.quantity = Some(*quantity),
            Change::Price { price } => self.price = Some(*price),
        }
        match (event.version, position) {
            (Some(version), _) => self.versions.set(facet, version),
            (None, Some(position)) => self.positions.set(facet, position),
            (None, None) => {}
        }
        if before == (self.info.clone(), self.deleted, self.price, self.quantity, self.versions.clone(), self.positions.clone()) {
            return Applied::Unchanged;
        }
        self.revision += 1;
        self.updated_at_ms = self.updated_at_ms.max(millis_since_epoch(event.time));
        Applied::Changed
    }

    /// A product is served once the product service has described it and until it deletes it.
    pub fn is_listed(&self) -> bool {
        !self.deleted && self.info.as_ref().is_some_and(|i| !i.name.is_empty())
    }

    pub fn category(&self) -> Option<&str> {
        if self.is_listed() { self.info.as_ref().and_then(|i| i.category.as_deref()) } else { None }
    }

    pub fn effective_price(&self) -> Option<Money> {
        self.price.or_else(|| self.info.as_ref().and_then(|i| i.list_price))
    }

    /// Where two states of one product disagree on what the events said, as `field: a, b`
    /// lines labelled with `names`; empty when they agree. Revision, times and positions are
    /// bookkeeping that differ with delivery order, and are not compared.
    pub fn differences(&self, other: &Self, names: (&str, &str)) -> Vec<String> {
        fn show<T: std::fmt::Debug>(v: &Option<T>) -> String {
            v.as_ref().map_or_else(|| "none".to_owned(), |v| format!("{v:?}"))
        }
        let info = |s: &Self| s.info.clone();
        let field = |s: &Self, f: fn(&ProductInfo) -> String| info(s).map(|i| f(&i));
        let money = |m: Option<Money>| m.map(|m| m.display());
        let mut out = Vec::new();
        let mut check = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name}: {} {a}, {} {b}", names.0, names.1));
            }
        };
        check("name", show(&field(self, |i| i.name.clone())), show(&field(other, |i| i.name.clone())));
        check("description", show(&info(self).and_then(|i| i.description)), show(&info(other).and_then(|i| i.description)));
        check("category", show(&info(self).and_then(|i| i.category)), show(&info(other).and_then(|i| i.category)));
        check(
            "list price",
            show(&money(info(self).and_then(|i| i.list_price))),
            show(&money(info(other).and_then(|i| i.list_price))),
        );
        check("deleted", self.deleted.to_string(), other.deleted.to_string());
        check("price", show(&money(self.price)), show(&money(other.price)));
        check("quantity", show(&self.quantity), show(&other.quantity));
        check("product version", show(&self.versions.product), show(&other.versions.product));
        check("inventory version", show(&self.versions.inventory), show(&other.versions.inventory));
        check("price version", show(&self.versions.price), show(&other.versions.price));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ParseLimits;
    use std::time::{Duration, SystemTime};

    fn event(body: &str) -> CatalogEvent {
        CatalogEvent::parse(body.as_bytes(), SystemTime::UNIX_EPOCH + Duration::from_secs(1), ParseLimits::default()).unwrap()
    }

    fn fold(bodies: &[&str]) -> ProductState {
        let mut state = ProductState::new(ProductId::parse("P1").unwrap());
        for b in bodies {
            state.apply(&event(b));
        }
        state
    }

    const PRICE_V2: &str = r#"{"productId":"P1","price":20,"currency":"USD","version":2}"#;
    const PRICE_V1: &str = r#"{"productId":"P1","price":10,"currency":"USD","version":1}"#;

    #[test]
    fn stale_price_update_is_ignored() {
        let mut state = fold(&[PRICE_V2]);
        assert_eq!(state.apply(&event(PRICE_V1)), Applied::Stale);
        assert_eq!(state.price.unwrap().minor(), 2_000);
    }

    #[test]
    fn duplicate_versioned_event_changes_nothing() {
        let mut state = fold(&[PRICE_V2]);
        let revision = state.revision;
        assert_eq!(state.apply(&event(PRICE_V2)), Applied::Stale);
        assert_eq!(state.revision, revision);
    }

    #[test]
    fn any_delivery_order_converges_on_the_highest_versions() {
        let events = [
            r#"{"productId":"P1","name":"A","category":"C","status":"created","version":1}"#,
            r#"{"productId":"P1","name":"B","status":"updated","version":2}"#,
            r#"{"productId":"P1","quantity":3,"version":1}"#,
            r#"{"productId":"P1","quantity":9,"version":4}"#,
            PRICE_V1,
            PRICE_V2,
        ];
        let expected = fold(&events);
        let orders: [[usize; 6]; 4] = [[5, 4, 3, 2, 1, 0], [1, 3, 5, 0, 2, 4], [3, 3, 1, 1, 5, 0], [0, 1, 2, 3, 4, 5]];
        for order in orders {
            let mut bodies: Vec<&str> = order.iter().map(|&i| events[i]).collect();
            bodies.extend(events);
            let got = fold(&bodies);
            assert_eq!(
                (got.info, got.price, got.quantity, got.versions),
                (expected.info.clone(), expected.price, expected.quantity, expected.versions.clone())
            );
        }
    }

    #[test]
    fn unversioned_events_apply_in_arrival_order() {
        let state = fold(&[r#"{"productId":"P1","quantity":3}"#, r#"{"productId":"P1","quantity":1}"#]);
        assert_eq!(state.quantity, Some(1));
    }

    #[test]
    fn unversioned_duplicate_is_unchanged() {
        let mut state = fold(&[r#"{"productId":"P1","quantity":3}"#]);
        assert_eq!(state.apply(&event(r#"{"productId":"P1","quantity":3}"#)), Applied::Unchanged);
        assert_eq!(state.revision, 1);
    }

    #[test]
    fn positioned_unversioned_events_converge_on_the_latest_position_in_any_delivery_order() {
        let events = [
            (r#"{"productId":"P1","quantity":3}"#, 5),
            (r#"{"productId":"P1","quantity":1}"#, 8),
            (r#"{"productId":"P1","quantity":3}"#, 10),
        ];
        let fold_at = |order: &[usize]| {
            let mut state = ProductState::new(ProductId::parse("P1").unwrap());
            for &i in order {
                state.apply_at(&event(events[i].0), Some(events[i].1));
            }
            state
        };
        let in_log_order = fold_at(&[0, 1, 2]);
        assert_eq!((in_log_order.quantity, in_log_order.positions.inventory), (Some(3), Some(10)));
        for order in [[2, 1, 0], [0, 2, 1], [1, 2, 0], [2, 0, 1]] {
            let got = fold_at(&order);
            assert_eq!((got.quantity, got.positions.clone()), (Some(3), in_log_order.positions.clone()), "order {order:?}");
        }
        let mut state = in_log_order;
        assert_eq!(state.apply_at(&event(events[1].0), Some(8)), Applied::Stale, "a retried earlier event is stale");
        assert_eq!(state.apply_at(&event(events[2].0), Some(10)), Applied::Stale, "a redelivery is stale");
    }

    #[test]
    fn product_update_replaces_the_facet_and_delete_unlists() {
        let mut state = fold(&[
            r#"{"productId":"P1","name":"A","description":"d","category":"C","status":"created"}"#,
            r#"{"productId":"P1","name":"B","category":"D","status":"updated"}"#,
        ]);
        let info = state.info.clone().unwrap();
        assert_eq!((info.name.as_str(), info.description.as_deref(), info.category.as_deref()), ("B", None, Some("D")));
        assert!(state.is_listed());
        state.apply(&event(r#"{"productId":"P1","status":"deleted"}"#));
        assert!(!state.is_listed());
        assert_eq!(state.category(), None);
    }

    #[test]
    fn pricing_service_price_wins_over_list_price() {
        let state = fold(&[
            r#"{"productId":"P1","name":"A","status":"updated","price":5}"#,
            PRICE_V1,
            r#"{"productId":"P1","name":"A","status":"updated","price":7}"#,
        ]);
        assert_eq!(state.effective_price().unwrap().minor(), 1_000);
    }

    #[test]
    fn differences_name_each_field_that_disagrees_and_ignore_bookkeeping() {
        let a = fold(&[r#"{"productId":"P1","name":"A","category":"C","status":"created"}"#, PRICE_V1]);
        let mut b = fold(&[r#"{"productId":"P1","name":"B","category":"C","status":"created"}"#, PRICE_V2]);
        assert_eq!(
            a.differences(&b, ("log", "store")),
            ["name: log \"A\", store \"B\"", "price: log \"$10.00\", store \"$20.00\"", "price version: log 1, store 2"]
        );
        b = a.clone();
        b.revision += 5;
        b.positions.inventory = Some(9);
        assert!(a.differences(&b, ("log", "store")).is_empty());
    }

    #[test]
    fn inventory_alone_is_not_listed() {
        assert!(!fold(&[r#"{"productId":"P1","quantity":3}"#]).is_listed());
    }
}
