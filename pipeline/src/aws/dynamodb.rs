//! The DynamoDB store: the event log as a table keyed by product and event key, current
//! state as one item per product whose facets are written with version-guarded updates.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hasher};
use std::sync::Arc;

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, PutRequest, ReturnConsumedCapacity, ReturnValue, WriteRequest};
use catalog_domain::state::ProductInfo;
use catalog_domain::{CatalogEvent, Change, Currency, Facet, FacetVersions, Money, ProductId, ProductState, ProductStatus};
use tokio::sync::Semaphore;

use super::retry::until_processed;
use super::{AwsMetrics, AwsSettings, describe};
use crate::ports::{ProductChanged, ProductStore, SequencedEvent, StoreError, WriteOutcome};

/// `BatchWriteItem` takes at most 25 requests, `BatchGetItem` at most 100 keys.
const BATCH_WRITE_MAX: usize = 25;
const BATCH_GET_MAX: usize = 100;

type Item = HashMap<String, AttributeValue>;
type LogKey = (String, String);

/// Attribute names of a product item; one place, so the store and `infra init` agree.
pub mod attr {
    pub const PRODUCT_ID: &str = "productId";
    pub const EVENT_KEY: &str = "eventKey";
    pub const CATEGORY: &str = "category";
    pub const NAME: &str = "productName";
    pub const DESCRIPTION: &str = "description";
    pub const LIST_PRICE_MINOR: &str = "listPriceMinor";
    pub const LIST_PRICE_CURRENCY: &str = "listPriceCurrency";
    pub const DELETED: &str = "deleted";
    pub const PRICE_MINOR: &str = "priceMinor";
    pub const PRICE_CURRENCY: &str = "priceCurrency";
    pub const QUANTITY: &str = "quantity";
    pub const PRODUCT_VERSION: &str = "productVersion";
    pub const INVENTORY_VERSION: &str = "inventoryVersion";
    pub const PRICE_VERSION: &str = "priceVersion";
    pub const REVISION: &str = "revision";
    pub const UPDATED_AT: &str = "updatedAt";
    pub const KIND: &str = "kind";
    pub const VERSION: &str = "version";
    pub const TIME: &str = "time";
    pub const EVENT: &str = "event";
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn facet_name(facet: Facet) -> &'static str {
    match facet {
        Facet::Product => "product",
        Facet::Inventory => "inventory",
        Facet::Price => "price",
    }
}

fn version_attr(facet: Facet) -> &'static str {
    match facet {
        Facet::Product => attr::PRODUCT_VERSION,
        Facet::Inventory => attr::INVENTORY_VERSION,
        Facet::Price => attr::PRICE_VERSION,
    }
}

/// The log's sort key: facet and version, or for unversioned events facet, time and a hash of
/// the event, so a redelivered message lands on the same item (idempotent) and a product's
/// log reads back in order.
pub fn event_key(event: &CatalogEvent) -> String {
    let facet = facet_name(event.change.facet());
    match event.version {
        Some(v) => format!("{facet}#v{v:020}"),
        None => {
            let mut h = DefaultHasher::new();
            h.write(&serde_json::to_vec(&event.to_compact_json()).expect("json serializes"));
            format!("{facet}#t{:013}#{:016x}", event.time_millis(), h.finish())
        }
    }
}

fn log_item(event: &CatalogEvent) -> Item {
    let mut item = Item::new();
    item.insert(attr::PRODUCT_ID.into(), s(event.product_id.as_str()));
    item.insert(attr::EVENT_KEY.into(), s(event_key(event)));
    item.insert(attr::KIND.into(), s(event.kind().detail_type()));
    item.insert(attr::TIME.into(), n(event.time_millis()));
    if let Some(v) = event.version {
        item.insert(attr::VERSION.into(), n(v));
    }
    item.insert(attr::EVENT.into(), s(event.to_compact_json().to_string()));
    item
}

fn key_of(item: &Item) -> Option<LogKey> {
    match (item.get(attr::PRODUCT_ID), item.get(attr::EVENT_KEY)) {
        (Some(AttributeValue::S(p)), Some(AttributeValue::S(k))) => Some((p.clone(), k.clone())),
        _ => None,
    }
}

/// Reads a product item back into the domain's state.
pub fn state_from_item(item: &Item) -> Result<ProductState, StoreError> {
    let text = |k: &str| match item.get(k) {
        Some(AttributeValue::S(v)) => Some(v.clone()),
        _ => None,
    };
    let number = |k: &str| match item.get(k) {
        Some(AttributeValue::N(v)) => v.parse::<i64>().ok(),
        _ => None,
    };
    let unsigned = |k: &str| number(k).and_then(|v| u64::try_from(v).ok());
    let raw_id = text(attr::PRODUCT_ID).unwrap_or_default();
    let corrupt = |detail: String| StoreError::Corrupt { product_id: raw_id.clone(), detail };
    let id = ProductId::parse(&raw_id).map_err(|e| corrupt(e.to_string()))?;
    let money = |minor: &str, currency: &str| -> Result<Option<Money>, StoreError> {
        match (number(minor), text(currency)) {
            (Some(m), Some(c)) => {
                let currency = Currency::parse(&c).ok_or_else(|| corrupt(format!("unknown currency {c:?}")))?;
                Ok(Some(Money::from_minor(m, currency)))
            }
            _ => Ok(None),
        }
    };
    let info = match text(attr::NAME) {
        Some(name) => Some(ProductInfo {
            name,
            description: text(attr::DESCRIPTION),
            category: text(attr::CATEGORY),
            list_price: money(attr::LIST_PRICE_MINOR, attr::LIST_PRICE_CURRENCY)?,
        }),
        None => None,
    };
    Ok(ProductState {
        id,
        info,
        deleted: matches!(item.get(attr::DELETED), Some(AttributeValue::Bool(true))),
        price: money(attr::PRICE_MINOR, attr::PRICE_CURRENCY)?,
        quantity: unsigned(attr::QUANTITY),
        versions: FacetVersions {
            product: unsigned(attr::PRODUCT_VERSION),
            inventory: unsigned(attr::INVENTORY_VERSION),
            price: unsigned(attr::PRICE_VERSION),
        },
        revision: unsigned(attr::REVISION).unwrap_or(0),
        updated_at_ms: unsigned(attr::UPDATED_AT).unwrap_or(0),
    })
}

/// The update expression that applies one event to its facet, guarded by its version.
struct FacetUpdate {
    expression: String,
    condition: Option<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

fn facet_update(event: &CatalogEvent) -> FacetUpdate {
    let mut set = Vec::new();
    let mut remove = Vec::new();
    let mut names = HashMap::new();
    let mut values = HashMap::new();
    let mut put = |attribute: &str, value: Option<AttributeValue>| {
        let placeholder = format!("#a{}", names.len());
        names.insert(placeholder.clone(), attribute.to_owned());
        match value {
            Some(v) => {
                let value_ph = format!(":v{}", values.len());
                values.insert(value_ph.clone(), v);
                set.push(format!("{placeholder} = {value_ph}"));
            }
            None => remove.push(placeholder),
        }
    };
    put(attr::UPDATED_AT, Some(n(event.time_millis())));
    let facet = event.change.facet();
    if let Some(v) = event.version {
        put(version_attr(facet), Some(n(v)));
    }
    match &event.change {
        Change::Product(p) if p.status == ProductStatus::Deleted => put(attr::DELETED, Some(AttributeValue::Bool(true))),
        Change::Product(p) => {
            put(attr::DELETED, Some(AttributeValue::Bool(false)));
            put(attr::NAME, p.name.clone().map(s));
            put(attr::DESCRIPTION, p.description.clone().map(s));
            put(attr::CATEGORY, p.category.clone().map(s));
            put(attr::LIST_PRICE_MINOR, p.list_price.map(|m| n(m.minor())));
            put(attr::LIST_PRICE_CURRENCY, p.list_price.map(|m| s(m.currency().code())));
        }
        Change::Inventory { quantity } => put(attr::QUANTITY, Some(n(quantity))),
        Change::Price { price } => {
            put(attr::PRICE_MINOR, Some(n(price.minor())));
            put(attr::PRICE_CURRENCY, Some(s(price.currency().code())));
        }
    }
    names.insert("#rev".into(), attr::REVISION.into());
    values.insert(":one".into(), n(1));
    let mut expression = format!("SET {}", set.join(", "));
    if !remove.is_empty() {
        expression.push_str(&format!(" REMOVE {}", remove.join(", ")));
    }
    expression.push_str(" ADD #rev :one");
    let condition = event.version.map(|v| {
        names.insert("#fv".into(), version_attr(facet).into());
        values.insert(":fv".into(), n(v));
        "attribute_not_exists(#fv) OR #fv < :fv".to_owned()
    });
    FacetUpdate { expression, condition, names, values }
}

/// What one facet update did.
enum Applied {
    Changed(ProductChanged),
    Stale,
}

#[derive(Clone)]
pub struct DynamoStore {
    client: aws_sdk_dynamodb::Client,
    settings: AwsSettings,
    metrics: AwsMetrics,
}

impl DynamoStore {
    pub fn new(client: aws_sdk_dynamodb::Client, settings: AwsSettings, metrics: AwsMetrics) -> Self {
        Self { client, settings, metrics }
    }

    fn unavailable(operation: &'static str, count: usize) -> impl Fn(String) -> StoreError {
        move |detail| StoreError::Unavailable { operation, count, detail }
    }

    async fn batch_write_once(&self, pending: Vec<(LogKey, WriteRequest)>) -> Result<Vec<(LogKey, WriteRequest)>, String> {
        let table = &self.settings.names.events_table;
        let requests: Vec<WriteRequest> = pending.iter().map(|(_, w)| w.clone()).collect();
        self.metrics.call("dynamodb", "BatchWriteItem");
        let out = self
            .client
            .batch_write_item()
            .request_items(table, requests)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(describe)?;
        self.metrics.consumed(out.consumed_capacity(), true);
        let unprocessed_count = out.unprocessed_items().and_then(|m| m.get(table)).map_or(0, Vec::len);
        let unprocessed: HashSet<LogKey> = out
            .unprocessed_items()
            .and_then(|m| m.get(table))
            .into_iter()
            .flatten()
            .filter_map(|w| w.put_request().and_then(|p| key_of(p.item())))
            .collect();
        debug_assert_eq!(unprocessed.len(), unprocessed_count);
        let (left, written): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(k, _)| unprocessed.contains(k));
        let units: u64 = written
            .iter()
            .filter_map(|(_, w)| w.put_request())
            .map(|p| super::cost::write_units(super::cost::item_size(p.item())))
            .sum();
        self.metrics.dynamodb_estimated_write_units.inc_by(units);
        Ok(left)
    }

    /// Appends the events to the log; returns the indexes of events that are not durable.
    async fn append_log(&self, events: &[SequencedEvent]) -> Result<BTreeSet<usize>, StoreError> {
        let mut owners: HashMap<LogKey, Vec<usize>> = HashMap::new();
        let mut requests = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let item = log_item(&e.event);
            let key = key_of(&item).expect("log items carry their key");
            // One request may not name a key twice: duplicates in a batch share one put.
            if let Some(owner) = owners.get_mut(&key) {
                owner.push(i);
                continue;
            }
            owners.insert(key.clone(), vec![i]);
            let put = PutRequest::builder().set_item(Some(item)).build().map_err(|e| Self::unavailable("log", events.len())(e.to_string()))?;
            requests.push((key, WriteRequest::builder().put_request(put).build()));
        }
        let mut failed = BTreeSet::new();
        for chunk in requests.chunks(BATCH_WRITE_MAX) {
            let attempts = self.settings.batch_attempts;
            match until_processed(chunk.to_vec(), attempts, self.settings.retry_base, |p| self.batch_write_once(p)).await {
                Ok(left) => {
                    if !left.is_empty() {
                        tracing::warn!(count = left.len(), "event log writes left unprocessed after retries");
                    }
                    failed.extend(left.iter().flat_map(|(k, _)| owners[k].iter().copied()));
                }
                Err(e) => {
                    tracing::error!(error = %e, "BatchWriteItem failed");
                    failed.extend(chunk.iter().flat_map(|(k, _)| owners[k].iter().copied()));
                }
            }
        }
        Ok(failed)
    }

    async fn update_facet(&self, event: &CatalogEvent) -> Result<Applied, String> {
        let update = facet_update(event);
        self.metrics.call("dynamodb", "UpdateItem");
        let result = self
            .client
            .update_item()
            .table_name(&self.settings.names.products_table)
            .key(attr::PRODUCT_ID, s(event.product_id.as_str()))
            .update_expression(update.expression)
            .set_condition_expression(update.condition)
            .set_expression_attribute_names(Some(update.names))
            .set_expression_attribute_values(Some(update.values))
            .return_values(ReturnValue::AllNew)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.metrics.consumed(out.consumed_capacity(), true);
                let item = out.attributes().ok_or("UpdateItem returned no attributes")?;
                self.metrics.dynamodb_estimated_write_units.inc_by(super::cost::write_units(super::cost::item_size(item)));
                let state = state_from_item(item).map_err(|e| e.to_string())?;
                Ok(Applied::Changed(ProductChanged { product_id: state.id, revision: state.revision, versions: state.versions }))
            }
            // The facet already holds this version or a newer one: a duplicate or stale event.
            Err(e) if e.as_service_error().is_some_and(|se| se.is_conditional_check_failed_exception()) => {
                // A failed condition still costs a write unit.
                self.metrics.dynamodb_estimated_write_units.inc();
                Ok(Applied::Stale)
            }
            Err(e) => Err(describe(e)),
        }
    }

    async fn batch_get_once(&self, keys: Vec<Item>, found: &std::sync::Mutex<Vec<Item>>) -> Result<Vec<Item>, String> {
        let table = &self.settings.names.products_table;
        let request = KeysAndAttributes::builder().set_keys(Some(keys)).consistent_read(true).build().map_err(|e| e.to_string())?;
        self.metrics.call("dynamodb", "BatchGetItem");
        let out = self
            .client
            .batch_get_item()
            .request_items(table, request)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(describe)?;
        self.metrics.consumed(out.consumed_capacity(), false);
        if let Some(items) = out.responses().and_then(|r| r.get(table)) {
            found.lock().unwrap_or_else(|p| p.into_inner()).extend(items.iter().cloned());
        }
        Ok(out.unprocessed_keys().and_then(|u| u.get(table)).map(|k| k.keys().to_vec()).unwrap_or_default())
    }

    /// Every product, for rebuilding a read model from current state.
    pub async fn scan_states(&self) -> Result<Vec<ProductState>, StoreError> {
        let mut states = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            self.metrics.call("dynamodb", "Scan");
            let out = self
                .client
                .scan()
                .table_name(&self.settings.names.products_table)
                .set_exclusive_start_key(start.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| Self::unavailable("scan", 0)(describe(e)))?;
            self.metrics.consumed(out.consumed_capacity(), false);
            for item in out.items() {
                states.push(state_from_item(item)?);
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(states),
            }
        }
    }
}

impl ProductStore for DynamoStore {
    async fn write_batch(&self, events: &[SequencedEvent]) -> Result<WriteOutcome, StoreError> {
        let mut failed = self.append_log(events).await?;
        // Group what is logged by product and facet, in arrival order.
        let mut groups: Vec<((ProductId, Facet), Vec<usize>)> = Vec::new();
        let mut index: HashMap<(ProductId, Facet), usize> = HashMap::new();
        for (i, e) in events.iter().enumerate().filter(|(i, _)| !failed.contains(i)) {
            let key = (e.event.product_id.clone(), e.event.change.facet());
            let g = *index.entry(key.clone()).or_insert_with(|| {
                groups.push((key, Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i);
        }
        let permits = Arc::new(Semaphore::new(self.settings.write_concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let mut unchanged = 0;
        for (_, members) in groups {
            // All versioned: only the highest version can change anything; the others are
            // superseded, and share its fate (if it fails, they are retried with it).
            let all_versioned = members.iter().all(|&i| events[i].event.version.is_some());
            let (to_apply, superseded): (Vec<usize>, Vec<usize>) = if all_versioned {
                let best = *members.iter().max_by_key(|&&i| events[i].event.version).expect("groups are never empty");
                (vec![best], members.into_iter().filter(|&i| i != best).collect())
            } else {
                (members, Vec::new())
            };
            let store = self.clone();
            let batch: Vec<(usize, CatalogEvent)> = to_apply.into_iter().map(|i| (i, events[i].event.clone())).collect();
            let permits = permits.clone();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await.expect("semaphore is never closed");
                let mut results = Vec::with_capacity(batch.len());
                let mut broken = false;
                for (i, event) in batch {
                    // After a failure the rest of the group waits too, so arrival order holds.
                    let r = if broken { Err("an earlier update of this facet failed".to_owned()) } else { store.update_facet(&event).await };
                    broken |= r.is_err();
                    results.push((i, r));
                }
                (results, superseded, broken)
            });
        }
        let mut changed: HashMap<ProductId, ProductChanged> = HashMap::new();
        while let Some(joined) = tasks.join_next().await {
            let (results, superseded, broken) = joined.map_err(|e| Self::unavailable("update", events.len())(e.to_string()))?;
            if broken {
                failed.extend(superseded);
            } else {
                unchanged += superseded.len();
            }
            for (i, r) in results {
                match r {
                    Ok(Applied::Changed(c)) => {
                        let slot = changed.entry(c.product_id.clone()).or_insert_with(|| c.clone());
                        if c.revision > slot.revision {
                            *slot = c;
                        }
                    }
                    Ok(Applied::Stale) => unchanged += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, product = %events[i].event.product_id, "UpdateItem failed");
                        failed.insert(i);
                    }
                }
            }
        }
        Ok(WriteOutcome { changed: changed.into_values().collect(), unchanged_products: Vec::new(), unchanged, failed: failed.into_iter().collect() })
    }

    async fn get_states(&self, ids: &[ProductId]) -> Result<Vec<ProductState>, StoreError> {
        let found = std::sync::Mutex::new(Vec::new());
        let unique: BTreeSet<&ProductId> = ids.iter().collect();
        let keys: Vec<Item> = unique.into_iter().map(|id| Item::from([(attr::PRODUCT_ID.to_owned(), s(id.as_str()))])).collect();
        for chunk in keys.chunks(BATCH_GET_MAX) {
            let (attempts, base) = (self.settings.batch_attempts, self.settings.retry_base);
            let left = until_processed(chunk.to_vec(), attempts, base, |k| self.batch_get_once(k, &found))
                .await
                .map_err(Self::unavailable("get", ids.len()))?;
            if !left.is_empty() {
                return Err(Self::unavailable("get", left.len())("keys left unprocessed after retries".into()));
            }
        }
        found.into_inner().unwrap_or_else(|p| p.into_inner()).iter().map(state_from_item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog_domain::ParseLimits;
    use std::time::SystemTime;

    fn event(body: &str) -> CatalogEvent {
        CatalogEvent::parse(body.as_bytes(), SystemTime::UNIX_EPOCH, ParseLimits::default()).unwrap()
    }

    #[test]
    fn event_keys_are_ordered_and_idempotent() {
        let v2 = event(r#"{"productId":"P1","quantity":1,"version":2}"#);
        let v10 = event(r#"{"productId":"P1","quantity":1,"version":10}"#);
        assert!(event_key(&v2) < event_key(&v10), "zero padding keeps numeric order");
        let u = event(r#"{"productId":"P1","quantity":1}"#);
        assert_eq!(event_key(&u), event_key(&u.clone()));
        assert_ne!(event_key(&u), event_key(&event(r#"{"productId":"P1","quantity":2}"#)));
    }

    #[test]
    fn versioned_updates_carry_their_guard_and_deletes_only_flag() {
        let u = facet_update(&event(r#"{"productId":"P1","price":9.99,"currency":"USD","version":4}"#));
        assert_eq!(u.condition.as_deref(), Some("attribute_not_exists(#fv) OR #fv < :fv"));
        assert_eq!(u.names["#fv"], attr::PRICE_VERSION);
        assert_eq!(u.values[":fv"], n(4));
        assert!(u.expression.ends_with("ADD #rev :one"));
        let d = facet_update(&event(r#"{"productId":"P1","status":"deleted"}"#));
        assert!(d.condition.is_none());
        assert!(d.names.values().any(|v| v == attr::DELETED));
        assert!(!d.names.values().any(|v| v == attr::NAME), "a delete keeps the facet's fields");
    }

    #[test]
    fn items_read_back_into_state() {
        let mut item = Item::new();
        item.insert(attr::PRODUCT_ID.into(), s("P1"));
        item.insert(attr::NAME.into(), s("Laptop"));
        item.insert(attr::CATEGORY.into(), s("E"));
        item.insert(attr::PRICE_MINOR.into(), n(99_999));
        item.insert(attr::PRICE_CURRENCY.into(), s("USD"));
        item.insert(attr::QUANTITY.into(), n(5));
        item.insert(attr::PRICE_VERSION.into(), n(3));
        item.insert(attr::REVISION.into(), n(7));
        let state = state_from_item(&item).unwrap();
        assert_eq!(state.effective_price().unwrap().display(), "$999.99");
        assert_eq!((state.quantity, state.versions.price, state.revision), (Some(5), Some(3), 7));
        assert!(state.is_listed());
    }
}
