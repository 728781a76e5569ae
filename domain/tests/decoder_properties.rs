//! The event decoder over generated input: whatever the bytes or the JSON, it answers an event
//! or a typed error and never panics; every valid event reads back unchanged from the compact
//! envelope the event log stores, and the same change reads the same in each of the three body
//! shapes. `PROPTEST_CASES=N` runs longer (the default is proptest's 256 per property).

use std::time::{Duration, SystemTime};

use catalog_domain::{CatalogEvent, ParseLimits};
use proptest::prelude::*;
use serde_json::{Value, json};

fn accepted() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_000_000_123)
}

/// Keys the decoder looks at, so generated objects reach deep into it, not only its first check.
const KEYS: &[&str] = &[
    "productId",
    "name",
    "status",
    "category",
    "description",
    "price",
    "currency",
    "quantity",
    "version",
    "detail",
    "detail-type",
    "type",
    "source",
    "time",
    "id",
    "Detail",
    "DetailType",
    "Source",
];
const TEXTS: &[&str] = &[
    "product.service",
    "inventory.service",
    "pricing.service",
    "Product Update",
    "Inventory Update",
    "Price Update",
    "created",
    "updated",
    "deleted",
    "USD",
    "JPY",
    "EUR",
    "P1",
    "",
    "..",
    "2026-11-25T10:00:00+02:00",
    "not a time",
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(TEXTS).prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop_oneof![prop::sample::select(KEYS).prop_map(str::to_owned), "[a-z]{1,8}"], inner), 0..8)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// A valid change as its bare detail and its kind's source and detail-type.
fn valid_detail() -> impl Strategy<Value = (Value, &'static str, &'static str)> {
    let id = "[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,63}";
    let version = prop::option::of(0u64..(1 << 53));
    // Free text as producers send it: no control characters, not blank.
    let text = "[^\\p{C}\\s]([^\\p{C}]{0,38}[^\\p{C}\\s])?";
    let currency = prop::sample::select(&[("USD", 2u32), ("EUR", 2), ("JPY", 0), ("KWD", 3)][..]);
    let amount = (0i64..10_000_000_000, currency).prop_map(|(minor, (code, digits))| {
        let scale = 10i64.pow(digits);
        let text = if digits == 0 {
            minor.to_string()
        } else {
            format!("{}.{:0width$}", minor / scale, minor % scale, width = digits as usize)
        };
        (text, code)
    });
    let product =
        (id, version.clone(), text, prop::option::of(text), prop::option::of(text), 0..3usize, prop::option::of(amount.clone()))
            .prop_map(|(id, version, name, description, category, status, price)| {
                let status = ["created", "updated", "deleted"][status];
                let mut d = json!({"productId": id, "name": name, "status": status});
                if let Some(v) = version {
                    d["version"] = v.into();
                }
                if let Some(t) = description {
                    d["description"] = t.into();
                }
                // A new product must say where it is listed.
                match (category, status) {
                    (Some(c), _) => d["category"] = c.into(),
                    (None, "created") => d["category"] = "General".into(),
                    (None, _) => {}
                }
                if let Some((amount, code)) = price {
                    d["price"] = serde_json::from_str(&amount).unwrap();
                    d["currency"] = code.into();
                }
                (d, "product.service", "Product Update")
            });
    let stock = (id, version.clone(), 0u64..(1 << 53)).prop_map(|(id, version, quantity)| {
        let mut d = json!({"productId": id, "quantity": quantity});
        if let Some(v) = version {
            d["version"] = v.into();
        }
        (d, "inventory.service", "Inventory Update")
    });
    let price = (id, version, amount).prop_map(|(id, version, (amount, code))| {
        let mut d = json!({"productId": id, "currency": code});
        d["price"] = serde_json::from_str(&amount).unwrap();
        if let Some(v) = version {
            d["version"] = v.into();
        }
        (d, "pricing.service", "Price Update")
    });
    prop_oneof![product, stock, price]
        .prop_filter("`.` and `..` are not ids", |(d, _, _)| !matches!(d["productId"].as_str(), Some(".") | Some("..")))
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = CatalogEvent::parse(&bytes, accepted(), ParseLimits { max_body_bytes: 512 });
    }

    #[test]
    fn arbitrary_json_never_panics(value in any_json()) {
        let _ = CatalogEvent::from_value(&value, accepted());
        let _ = CatalogEvent::parse(value.to_string().as_bytes(), accepted(), ParseLimits::default());
        // The same value as the detail of each kind's envelope reaches the per-kind checks.
        for (source, detail_type) in [("product.service", "Product Update"), ("pricing.service", "Price Update"), ("inventory.service", "Inventory Update")] {
            let envelope = json!({"source": source, "detail-type": detail_type, "detail": value.clone()});
            let _ = CatalogEvent::from_value(&envelope, accepted());
        }
    }

    #[test]
    fn valid_events_read_back_unchanged_in_every_shape((detail, source, detail_type) in valid_detail()) {
        let bare = CatalogEvent::from_value(&detail, accepted());
        prop_assert!(bare.is_ok(), "a valid detail was refused: {bare:?} for {detail}");
        let bare = bare.unwrap();
        let envelope = json!({"source": source, "detail-type": detail_type, "detail": detail.clone(), "time": "2025-11-24T16:00:00.123Z", "id": "e-1"});
        let compact = json!({"source": source, "type": detail_type, "detail": detail, "time": "2025-11-24T16:00:00.123Z", "id": "e-1"});
        let from_envelope = CatalogEvent::from_value(&envelope, accepted()).unwrap();
        let from_compact = CatalogEvent::from_value(&compact, accepted()).unwrap();
        prop_assert_eq!(&from_envelope, &from_compact);
        prop_assert_eq!((&bare.product_id, bare.version, &bare.change), (&from_envelope.product_id, from_envelope.version, &from_envelope.change));
        for event in [bare, from_envelope] {
            let logged = event.to_compact_json();
            let back = CatalogEvent::parse(logged.to_string().as_bytes(), SystemTime::UNIX_EPOCH, ParseLimits::default());
            prop_assert_eq!(back.as_ref(), Ok(&event), "the log's form of an event reads back as it");
        }
    }
}
