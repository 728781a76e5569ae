//! A small sample catalog for `catalog serve --demo`, sent through the real ingest path.

use bytes::Bytes;
use serde_json::json;

/// (id, name, category, price, currency, quantity)
const PRODUCTS: &[(&str, &str, &str, &str, &str, u64)] = &[
    ("P123", "Laptop", "Electronics", "999.99", "USD", 50),
    ("P124", "Wireless Mouse", "Electronics", "29.99", "USD", 4),
    ("P125", "USB-C Hub", "Electronics", "49.00", "USD", 0),
    ("P126", "Noise-Cancelling Headphones", "Electronics", "249.50", "USD", 12),
    ("B200", "The Rust Programming Language", "Books", "39.95", "USD", 30),
    ("B201", "Designing Data-Intensive Applications", "Books", "45.00", "USD", 2),
    ("K300", "Chef's Knife", "Kitchen", "89.00", "EUR", 15),
    ("K301", "Espresso Cups (set of 4)", "Kitchen", "24.00", "GBP", 7),
    ("K302", "Matcha Whisk", "Kitchen", "1200", "JPY", 20),
];

pub fn events() -> Vec<Bytes> {
    let mut out = Vec::new();
    for &(id, name, category, price, currency, quantity) in PRODUCTS {
        let price: serde_json::Number = price.parse().expect("demo prices are numbers");
        let messages = [
            json!({"source": "product.service", "detail-type": "Product Update",
                   "detail": {"productId": id, "name": name, "category": category, "status": "created",
                              "description": format!("{name}, from the demo catalog"), "version": 1}}),
            json!({"source": "pricing.service", "detail-type": "Price Update",
                   "detail": {"productId": id, "price": price, "currency": currency, "version": 1}}),
            json!({"source": "inventory.service", "detail-type": "Inventory Update",
                   "detail": {"productId": id, "quantity": quantity, "version": 1}}),
        ];
        out.extend(messages.iter().map(|m| Bytes::from(serde_json::to_vec(m).expect("json serializes"))));
    }
    out
}
