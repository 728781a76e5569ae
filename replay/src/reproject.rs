//! `reproject`: the store's current state put right from the log's projection.

use catalog_domain::ProductState;

/// What the store should hold for a product, given the log's projection and what it holds
/// now: `None` when they already agree (so a rerun writes nothing). A rewritten state takes a
/// revision above the current one, so every read model, which only ever moves forward,
/// takes it.
pub fn reconcile(projected: &ProductState, current: Option<&ProductState>) -> Option<ProductState> {
    let Some(current) = current else { return Some(projected.clone()) };
    if projected.differences(current, ("", "")).is_empty() {
        return None;
    }
    let mut state = projected.clone();
    state.revision = projected.revision.max(current.revision + 1);
    state.updated_at_ms = projected.updated_at_ms.max(current.updated_at_ms);
    Some(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog_domain::{CatalogEvent, ParseLimits, ProductId};
    use std::time::SystemTime;

    fn state(bodies: &[&str]) -> ProductState {
        let mut s = ProductState::new(ProductId::parse("P1").unwrap());
        for b in bodies {
            s.apply(&CatalogEvent::parse(b.as_bytes(), SystemTime::UNIX_EPOCH, ParseLimits::default()).unwrap());
        }
        s
    }

    #[test]
    fn agreeing_states_are_left_alone_and_others_move_past_the_current_revision() {
        let projected = state(&[r#"{"productId":"P1","quantity":5,"version":2}"#]);
        let mut current = projected.clone();
        current.revision = 40;
        assert_eq!(reconcile(&projected, Some(&current)), None);
        let behind = state(&[r#"{"productId":"P1","quantity":1,"version":1}"#, r#"{"productId":"P1","quantity":2}"#]);
        let fixed = reconcile(&projected, Some(&behind)).unwrap();
        assert_eq!((fixed.quantity, fixed.revision), (Some(5), behind.revision + 1));
        assert_eq!(reconcile(&projected, None), Some(projected.clone()));
    }
}
