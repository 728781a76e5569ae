//! Product views as the BFF sends them (docs/contract.md §2), rendered once when a product changes
//! so that a GET only copies bytes.

use std::time::Duration;

use serde::Serialize;

use crate::event::time_from_millis;
use crate::state::ProductState;

/// The default quantity at or below which a product shows as `Low Stock`.
pub const DEFAULT_LOW_STOCK_THRESHOLD: u64 = 5;

#[derive(Debug, Clone, Copy)]
pub struct ViewSettings {
    pub low_stock_threshold: u64,
}

impl Default for ViewSettings {
    fn default() -> Self {
        Self { low_stock_threshold: DEFAULT_LOW_STOCK_THRESHOLD }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Availability {
    #[serde(rename = "In Stock")]
    InStock,
    #[serde(rename = "Low Stock")]
    LowStock,
    #[serde(rename = "Out of Stock")]
    OutOfStock,
    Unknown,
}

impl Availability {
    pub fn of(quantity: Option<u64>, settings: ViewSettings) -> Self {
        match quantity {
            None => Availability::Unknown,
            Some(0) => Availability::OutOfStock,
            Some(q) if q <= settings.low_stock_threshold => Availability::LowStock,
            Some(_) => Availability::InStock,
        }
    }
}

#[derive(Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
/// The web view of a product (docs/contract.md §2).
#[cfg_attr(feature = "openapi", schema(as = ProductView))]
pub struct WebView<'a> {
    product: ProductPart<'a>,
    price: Option<PricePart>,
    #[serde(rename = "displayPrice")]
    display_price: Option<String>,
    stock: Option<StockPart>,
    availability: Availability,
    #[serde(rename = "updatedAt")]
    updated_at: String,
}

#[derive(Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProductPart<'a> {
    id: &'a str,
    name: &'a str,
    description: Option<&'a str>,
    category: Option<&'a str>,
}

#[derive(Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PricePart {
    amount: String,
    currency: &'static str,
}

#[derive(Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StockPart {
    quantity: u64,
}

#[derive(Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
/// The compact view for mobile clients (`?view=mobile`).
#[cfg_attr(feature = "openapi", schema(as = MobileProductView))]
pub struct MobileView<'a> {
    id: &'a str,
    name: &'a str,
    #[serde(rename = "displayPrice")]
    display_price: Option<String>,
    availability: Availability,
}

/// The JSON bodies of one product, for each client kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedView {
    pub web: Vec<u8>,
    pub mobile: Vec<u8>,
}

/// Renders a listed product; `None` for one that is deleted or not yet described.
pub fn render(state: &ProductState, settings: ViewSettings) -> Option<RenderedView> {
    if !state.is_listed() {
        return None;
    }
    let info = state.info.as_ref()?;
    let price = state.effective_price();
    let display_price = price.map(|p| p.display());
    let availability = Availability::of(state.quantity, settings);
    let updated_at = humantime::format_rfc3339_seconds(time_from_millis(state.updated_at_ms) + Duration::ZERO).to_string();
    let web = WebView {
        product: ProductPart {
            id: state.id.as_str(),
            name: &info.name,
            description: info.description.as_deref(),
            category: info.category.as_deref(),
        },
        price: price.map(|p| PricePart { amount: p.amount_text(), currency: p.currency().code() }),
        display_price: display_price.clone(),
        stock: state.quantity.map(|quantity| StockPart { quantity }),
        availability,
        updated_at,
    };
    let mobile = MobileView { id: state.id.as_str(), name: &info.name, display_price, availability };
    // Serializing plain structs of strings and integers cannot fail.
    Some(RenderedView {
        web: serde_json::to_vec(&web).expect("view serializes"),
        mobile: serde_json::to_vec(&mobile).expect("view serializes"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{CatalogEvent, ParseLimits};
    use crate::id::ProductId;
    use std::time::SystemTime;

    fn state_of(bodies: &[&str]) -> ProductState {
        let mut state = ProductState::new(ProductId::parse("P123").unwrap());
        for b in bodies {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_261_600);
            state.apply(&CatalogEvent::parse(b.as_bytes(), at, ParseLimits::default()).unwrap());
        }
        state
    }

    #[test]
    fn seed_example_renders_the_contract_shape() {
        let state = state_of(&[
            r#"{"source":"product.service","detail-type":"Product Update","detail":{"productId":"P123","name":"Laptop","price":999.99,"status":"updated"}}"#,
        ]);
        let web: serde_json::Value = serde_json::from_slice(&render(&state, ViewSettings::default()).unwrap().web).unwrap();
        assert_eq!(
            web,
            serde_json::json!({
                "product": {"id": "P123", "name": "Laptop", "description": null, "category": null},
                "price": {"amount": "999.99", "currency": "USD"},
                "displayPrice": "$999.99",
                "stock": null,
                "availability": "Unknown",
                "updatedAt": "2026-01-01T10:00:00Z"
            })
        );
    }

    #[test]
    fn mobile_view_is_compact() {
        let state = state_of(&[
            r#"{"productId":"P123","name":"Laptop","category":"E","status":"created"}"#,
            r#"{"productId":"P123","price":1200,"currency":"JPY"}"#,
            r#"{"productId":"P123","quantity":2}"#,
        ]);
        let mobile: serde_json::Value = serde_json::from_slice(&render(&state, ViewSettings::default()).unwrap().mobile).unwrap();
        assert_eq!(
            mobile,
            serde_json::json!({"id": "P123", "name": "Laptop", "displayPrice": "¥1200", "availability": "Low Stock"})
        );
    }

    #[test]
    fn availability_follows_the_threshold() {
        let s = ViewSettings { low_stock_threshold: 5 };
        assert_eq!(Availability::of(None, s), Availability::Unknown);
        assert_eq!(Availability::of(Some(0), s), Availability::OutOfStock);
        assert_eq!(Availability::of(Some(1), s), Availability::LowStock);
        assert_eq!(Availability::of(Some(5), s), Availability::LowStock);
        assert_eq!(Availability::of(Some(6), s), Availability::InStock);
    }

    #[test]
    fn deleted_products_have_no_view() {
        let state = state_of(&[
            r#"{"productId":"P123","name":"Laptop","category":"E","status":"created"}"#,
            r#"{"productId":"P123","status":"deleted"}"#,
        ]);
        assert!(render(&state, ViewSettings::default()).is_none());
    }
}
