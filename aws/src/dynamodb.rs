//! The DynamoDB store: the event log as gzip-compressed segments of many events each, current
//! state as one item per product whose facets are written with version-guarded updates.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, PutRequest, ReturnConsumedCapacity, ReturnValue, ReturnValuesOnConditionCheckFailure,
    WriteRequest,
};
use catalog_domain::state::ProductInfo;
use catalog_domain::{CatalogEvent, Change, Currency, Facet, FacetVersions, Money, ProductId, ProductState, ProductStatus};
use tokio::sync::{Semaphore, mpsc};

use catalog_pipeline::budget::Budget;
use catalog_pipeline::{
    BackendError, BoxError, FailureClass, ProductChanged, ProductStore, SequencedEvent, StoreError, WriteOutcome,
};

use crate::retry::until_processed;
use crate::{AwsMetrics, AwsSettings, classify};

/// `BatchWriteItem` takes at most 25 requests, `BatchGetItem` at most 100 keys.
const BATCH_WRITE_MAX: usize = 25;
const BATCH_GET_MAX: usize = 100;

type Item = HashMap<String, AttributeValue>;
/// A log segment's key.
type LogKey = String;

/// Attribute names of a product item; one place, so the store and `infra init` agree.
pub mod attr {
    pub const PRODUCT_ID: &str = "productId";
    /// Log segments: key, event count, first event time, gzip of the events' JSON lines.
    pub const SEGMENT: &str = "segment";
    pub const COUNT: &str = "count";
    pub const EVENTS: &str = "events";
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
    /// Per facet, the position of the last unversioned event applied (`ProductState::positions`).
    pub const PRODUCT_POSITION: &str = "productPosition";
    pub const INVENTORY_POSITION: &str = "inventoryPosition";
    pub const PRICE_POSITION: &str = "pricePosition";
    /// In a log segment's JSON line: the event's position, beside the compact envelope.
    pub const LINE_POSITION: &str = "position";
    pub const REVISION: &str = "revision";
    pub const UPDATED_AT: &str = "updatedAt";
    pub const TIME: &str = "time";
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn version_attr(facet: Facet) -> &'static str {
    match facet {
        Facet::Product => attr::PRODUCT_VERSION,
        Facet::Inventory => attr::INVENTORY_VERSION,
        Facet::Price => attr::PRICE_VERSION,
    }
}

fn position_attr(facet: Facet) -> &'static str {
    match facet {
        Facet::Product => attr::PRODUCT_POSITION,
        Facet::Inventory => attr::INVENTORY_POSITION,
        Facet::Price => attr::PRICE_POSITION,
    }
}

/// What orders an event within its facet: its version, else its position (`None`: arrival).
fn order_key(e: &SequencedEvent) -> Option<u64> {
    e.event.version.or(e.position)
}

/// Packs events into log segments of at most `max_bytes` of JSON lines each (an event larger
/// than that gets a segment of its own). DynamoDB bills a write per started KiB of each item,
/// so one compressed segment of many events costs a fraction of a unit per event where one
/// item per event costs a whole one; that is most of the bill's gap to the classic design.
///
/// A segment's key is unique per write (`<first event ms>-<writer>-<counter>`), so a retry of
/// an unprocessed put is idempotent while a redelivered event lands in a later segment too:
/// readers fold events by version (see [`decode_segment`]).
/// Members are the events' positions in `events`.
fn segments<'a>(
    events: impl IntoIterator<Item = &'a SequencedEvent>,
    max_bytes: usize,
    writer: &SegmentIds,
) -> Vec<(LogKey, Item, Vec<usize>)> {
    let mut out = Vec::new();
    let mut lines: Vec<u8> = Vec::new();
    let mut members: Vec<usize> = Vec::new();
    let mut first_time = 0;
    let mut flush = |lines: &mut Vec<u8>, members: &mut Vec<usize>, first_time: u64| {
        if members.is_empty() {
            return;
        }
        let key = writer.next(first_time);
        let mut gz = flate2::write::GzEncoder::new(Vec::with_capacity(lines.len() / 3), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, lines).expect("writing to a Vec cannot fail");
        let compressed = gz.finish().expect("writing to a Vec cannot fail");
        let mut item = Item::new();
        item.insert(attr::SEGMENT.into(), s(key.clone()));
        item.insert(attr::COUNT.into(), n(members.len()));
        item.insert(attr::TIME.into(), n(first_time));
        item.insert(attr::EVENTS.into(), AttributeValue::B(compressed.into()));
        out.push((key, item, std::mem::take(members)));
        lines.clear();
    };
    for (i, sequenced) in events.into_iter().enumerate() {
        let event = &sequenced.event;
        let mut json = event.to_compact_json();
        if let (Some(position), serde_json::Value::Object(envelope)) = (sequenced.position, &mut json) {
            envelope.insert(attr::LINE_POSITION.into(), position.into());
        }
        let line = json.to_string();
        if !members.is_empty() && lines.len() + line.len() + 1 > max_bytes {
            flush(&mut lines, &mut members, first_time);
        }
        if members.is_empty() {
            first_time = event.time_millis();
        }
        lines.extend_from_slice(line.as_bytes());
        lines.push(b'\n');
        members.push(i);
    }
    flush(&mut lines, &mut members, first_time);
    out
}

/// The events of one log segment item, in the order they were written.
pub fn decode_segment(item: &Item) -> Result<Vec<serde_json::Value>, StoreError> {
    let key = match item.get(attr::SEGMENT) {
        Some(AttributeValue::S(k)) => k.as_str(),
        _ => "?",
    };
    let corrupt = |e: BoxError| StoreError::corrupt(format!("event log segment {key}"), e);
    let Some(AttributeValue::B(blob)) = item.get(attr::EVENTS) else {
        return Err(corrupt(format!("no binary {:?} attribute", attr::EVENTS).into()));
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(blob.as_ref()), &mut text).map_err(|e| corrupt(e.into()))?;
    text.lines().map(|l| serde_json::from_str(l).map_err(|e| corrupt(e.into()))).collect()
}

/// One event-log line read back: the event and, where the writer knew it, its position.
pub fn decode_log_line(line: &serde_json::Value) -> Result<(Option<u64>, CatalogEvent), StoreError> {
    let position = line.get(attr::LINE_POSITION).and_then(serde_json::Value::as_u64);
    // Every line carries its `time`, so the fallback time is never used.
    let event = CatalogEvent::from_value(line, std::time::SystemTime::UNIX_EPOCH)
        .map_err(|e| StoreError::corrupt("an event-log line that no longer validates", e))?;
    Ok((position, event))
}

/// A log segment read back: its key (which sorts by the time of its first event) and events.
#[derive(Debug)]
pub struct LogSegment {
    pub key: String,
    pub events: Vec<(Option<u64>, CatalogEvent)>,
}

/// Decodes a page of log-segment items.
pub fn log_segments(items: &[Item]) -> Result<Vec<LogSegment>, StoreError> {
    items
        .iter()
        .map(|item| {
            let key = match item.get(attr::SEGMENT) {
                Some(AttributeValue::S(k)) => k.clone(),
                _ => return Err(StoreError::corrupt("event log", "a segment without a key")),
            };
            let events = decode_segment(item)?.iter().map(decode_log_line).collect::<Result<_, _>>()?;
            Ok(LogSegment { key, events })
        })
        .collect()
}

/// Unique segment keys for one writer process.
pub struct SegmentIds {
    writer: u64,
    counter: std::sync::atomic::AtomicU64,
}

impl SegmentIds {
    fn new() -> Self {
        // RandomState is seeded per process from the OS: enough to keep writers apart.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        h.write_u32(std::process::id());
        Self { writer: h.finish(), counter: std::sync::atomic::AtomicU64::new(0) }
    }

    fn next(&self, first_time_ms: u64) -> String {
        let c = self.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{first_time_ms:013}-{:016x}-{c}", self.writer)
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
    let corrupt = |detail: BoxError| StoreError::corrupt(format!("products table item {raw_id:?}"), detail);
    let id = ProductId::parse(&raw_id).map_err(|e| corrupt(e.into()))?;
    let money = |minor: &str, currency: &str| -> Result<Option<Money>, StoreError> {
        match (number(minor), text(currency)) {
            (Some(m), Some(c)) => {
                let currency = Currency::parse(&c).ok_or_else(|| corrupt(format!("unknown currency {c:?}").into()))?;
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
        positions: FacetVersions {
            product: unsigned(attr::PRODUCT_POSITION),
            inventory: unsigned(attr::INVENTORY_POSITION),
            price: unsigned(attr::PRICE_POSITION),
        },
        revision: unsigned(attr::REVISION).unwrap_or(0),
        updated_at_ms: unsigned(attr::UPDATED_AT).unwrap_or(0),
    })
}

/// A product's whole item, as [`state_from_item`] reads it back.
pub fn item_from_state(state: &ProductState) -> Item {
    let mut item = Item::new();
    let mut put = |k: &str, v: Option<AttributeValue>| {
        if let Some(v) = v {
            item.insert(k.to_owned(), v);
        }
    };
    put(attr::PRODUCT_ID, Some(s(state.id.as_str())));
    if let Some(info) = &state.info {
        put(attr::NAME, Some(s(info.name.clone())));
        put(attr::DESCRIPTION, info.description.clone().map(s));
        put(attr::CATEGORY, info.category.clone().map(s));
        put(attr::LIST_PRICE_MINOR, info.list_price.map(|m| n(m.minor())));
        put(attr::LIST_PRICE_CURRENCY, info.list_price.map(|m| s(m.currency().code())));
    }
    put(attr::DELETED, Some(AttributeValue::Bool(state.deleted)));
    put(attr::PRICE_MINOR, state.price.map(|m| n(m.minor())));
    put(attr::PRICE_CURRENCY, state.price.map(|m| s(m.currency().code())));
    put(attr::QUANTITY, state.quantity.map(n));
    for (facet, versions, attribute) in [
        (Facet::Product, &state.versions, version_attr as fn(Facet) -> &'static str),
        (Facet::Inventory, &state.versions, version_attr),
        (Facet::Price, &state.versions, version_attr),
        (Facet::Product, &state.positions, position_attr),
        (Facet::Inventory, &state.positions, position_attr),
        (Facet::Price, &state.positions, position_attr),
    ] {
        put(attribute(facet), versions.get(facet).map(n));
    }
    put(attr::REVISION, Some(n(state.revision)));
    put(attr::UPDATED_AT, Some(n(state.updated_at_ms)));
    item
}

/// The update expression that applies one event to its facet, guarded by its version.
struct FacetUpdate {
    expression: String,
    condition: Option<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

fn facet_update(event: &CatalogEvent, position: Option<u64>) -> FacetUpdate {
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
    // The same guard as `ProductState::apply_at`: the version, else the position.
    let guard = match (event.version, position) {
        (Some(v), _) => Some((version_attr(facet), v)),
        (None, Some(p)) => Some((position_attr(facet), p)),
        (None, None) => None,
    };
    if let Some((attribute, value)) = guard {
        put(attribute, Some(n(value)));
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
    let condition = guard.map(|(attribute, value)| {
        names.insert("#fv".into(), attribute.into());
        values.insert(":fv".into(), n(value));
        "attribute_not_exists(#fv) OR #fv < :fv".to_owned()
    });
    FacetUpdate { expression, condition, names, values }
}

/// One facet's share of a write batch: the updates to run in turn (indexes into the batch, in
/// arrival order) and the events they supersede, which share their fate.
#[derive(Debug, PartialEq, Eq)]
struct FacetWork {
    updates: Vec<usize>,
    superseded: Vec<usize>,
}

/// What a write batch asks of the products table, decided before any call: per product (in
/// first-arrival order), its facets in turn. Events in `skip` (not durable in the log) are left
/// out. Where every event of a facet is ordered alike (all versioned, or all positioned and
/// unversioned) only the highest can change anything, so it alone is written and the others
/// are superseded.
fn plan(events: &[SequencedEvent], skip: &BTreeSet<usize>) -> Vec<Vec<FacetWork>> {
    let mut products: Vec<Vec<FacetWork>> = Vec::new();
    let mut product_slot: HashMap<&ProductId, usize> = HashMap::new();
    let mut facet_slot: HashMap<(&ProductId, Facet), usize> = HashMap::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    let mut facet_product: Vec<usize> = Vec::new();
    for (i, e) in events.iter().enumerate().filter(|(i, _)| !skip.contains(i)) {
        let id = &e.event.product_id;
        let p = *product_slot.entry(id).or_insert_with(|| {
            products.push(Vec::new());
            products.len() - 1
        });
        let f = *facet_slot.entry((id, e.event.change.facet())).or_insert_with(|| {
            members.push(Vec::new());
            facet_product.push(p);
            members.len() - 1
        });
        members[f].push(i);
    }
    for (indexes, p) in members.into_iter().zip(facet_product) {
        let versioned = indexes.iter().all(|&i| events[i].event.version.is_some());
        let positioned = indexes.iter().all(|&i| events[i].event.version.is_none() && events[i].position.is_some());
        let work = if versioned || positioned {
            let best = *indexes.iter().max_by_key(|&&i| order_key(&events[i])).expect("a facet has at least one event");
            FacetWork { updates: vec![best], superseded: indexes.into_iter().filter(|&i| i != best).collect() }
        } else {
            FacetWork { updates: indexes, superseded: Vec::new() }
        };
        products[p].push(work);
    }
    products
}

/// One event's fate in the products table.
enum UpdateResult {
    Applied(Applied),
    Failed(BackendError),
    /// An earlier update of the same facet failed, so this one waits too (arrival order holds).
    Held,
}

/// What one facet update did.
enum Applied {
    Changed(ProductChanged),
    /// The facet already held this or a newer change; the product as it stands, when known,
    /// so a redelivery can announce it again (its first announcement may have been lost).
    Stale(Option<ProductChanged>),
}

#[derive(Clone)]
pub struct DynamoStore {
    client: aws_sdk_dynamodb::Client,
    settings: AwsSettings,
    metrics: AwsMetrics,
    segment_ids: Arc<SegmentIds>,
}

impl DynamoStore {
    pub fn new(client: aws_sdk_dynamodb::Client, settings: AwsSettings, metrics: AwsMetrics) -> Self {
        Self { client, settings, metrics, segment_ids: Arc::new(SegmentIds::new()) }
    }

    async fn batch_write_once(&self, pending: Vec<(LogKey, WriteRequest)>) -> Result<Vec<(LogKey, WriteRequest)>, StoreError> {
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
            .map_err(|e| classify(format!("DynamoDB BatchWriteItem on {table}"), e))?;
        self.metrics.consumed(out.consumed_capacity(), true);
        let unprocessed_count = out.unprocessed_items().and_then(|m| m.get(table)).map_or(0, Vec::len);
        let unprocessed: HashSet<LogKey> = out
            .unprocessed_items()
            .and_then(|m| m.get(table))
            .into_iter()
            .flatten()
            .filter_map(|w| match w.put_request()?.item().get(attr::SEGMENT) {
                Some(AttributeValue::S(k)) => Some(k.clone()),
                _ => None,
            })
            .collect();
        debug_assert_eq!(unprocessed.len(), unprocessed_count);
        let (left, written): (Vec<_>, Vec<_>) = pending.into_iter().partition(|(k, _)| unprocessed.contains(k));
        let units: u64 = written
            .iter()
            .filter_map(|(_, w)| w.put_request())
            .map(|p| crate::cost::write_units(crate::cost::item_size(p.item())))
            .sum();
        self.metrics.dynamodb_estimated_write_units.inc_by(units);
        Ok(left)
    }

    /// Appends the events to the log; returns the indexes of events that are not durable, and
    /// the last error behind them.
    async fn append_log(&self, events: &[SequencedEvent]) -> Result<(BTreeSet<usize>, Option<StoreError>), StoreError> {
        let mut owners: HashMap<LogKey, Vec<usize>> = HashMap::new();
        let mut requests = Vec::new();
        for (key, item, members) in segments(events, self.settings.log_segment_bytes, &self.segment_ids) {
            owners.insert(key.clone(), members);
            let put = PutRequest::builder()
                .set_item(Some(item))
                .build()
                .map_err(|e| StoreError::rejected("building a DynamoDB PutRequest", e))?;
            requests.push((key, WriteRequest::builder().put_request(put).build()));
        }
        let mut failed = BTreeSet::new();
        let mut failure = None;
        for chunk in requests.chunks(BATCH_WRITE_MAX) {
            let attempts = self.settings.batch_attempts;
            match until_processed(chunk.to_vec(), attempts, self.settings.retry_base, |p| self.batch_write_once(p)).await {
                Ok(left) => {
                    if !left.is_empty() {
                        tracing::warn!(segments = left.len(), "event log writes left unprocessed after retries");
                        let detail = format!("{} segments left unprocessed after {attempts} attempts", left.len());
                        failure = Some(StoreError::new(FailureClass::Throttled, "DynamoDB BatchWriteItem", detail));
                    }
                    failed.extend(left.iter().flat_map(|(k, _)| owners[k].iter().copied()));
                }
                Err(e) => {
                    tracing::error!(error = %catalog_pipeline::error::chain(&e), "BatchWriteItem failed");
                    failed.extend(chunk.iter().flat_map(|(k, _)| owners[k].iter().copied()));
                    failure = Some(e);
                }
            }
        }
        Ok((failed, failure))
    }

    async fn update_facet(&self, sequenced: &SequencedEvent) -> Result<Applied, StoreError> {
        let event = &sequenced.event;
        let update = facet_update(event, sequenced.position);
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
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await;
        match result {
            Ok(out) => {
                self.metrics.consumed(out.consumed_capacity(), true);
                let item = out
                    .attributes()
                    .ok_or_else(|| StoreError::corrupt("DynamoDB UpdateItem", "the answer holds no attributes"))?;
                self.metrics.dynamodb_estimated_write_units.inc_by(crate::cost::write_units(crate::cost::item_size(item)));
                let state = state_from_item(item)?;
                Ok(Applied::Changed(ProductChanged {
                    product_id: state.id,
                    revision: state.revision,
                    versions: state.versions,
                    state: None,
                }))
            }
            // The facet already holds this version or a newer one: a duplicate or stale event.
            Err(e) if e.as_service_error().is_some_and(|se| se.is_conditional_check_failed_exception()) => {
                // A failed condition still costs a write unit.
                self.metrics.dynamodb_estimated_write_units.inc();
                let current = match e.as_service_error() {
                    Some(aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c)) => {
                        c.item().and_then(|item| state_from_item(item).ok())
                    }
                    _ => None,
                };
                Ok(Applied::Stale(current.map(|s| ProductChanged {
                    product_id: s.id,
                    revision: s.revision,
                    versions: s.versions,
                    state: None,
                })))
            }
            Err(e) => Err(classify(format!("DynamoDB UpdateItem of {}", event.product_id), e)),
        }
    }

    async fn batch_get_once(&self, keys: Vec<Item>, found: &std::sync::Mutex<Vec<Item>>) -> Result<Vec<Item>, StoreError> {
        let table = &self.settings.names.products_table;
        let request = KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .consistent_read(true)
            .build()
            .map_err(|e| StoreError::rejected("building a DynamoDB BatchGetItem", e))?;
        self.metrics.call("dynamodb", "BatchGetItem");
        let out = self
            .client
            .batch_get_item()
            .request_items(table, request)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| classify(format!("DynamoDB BatchGetItem on {table}"), e))?;
        self.metrics.consumed(out.consumed_capacity(), false);
        if let Some(items) = out.responses().and_then(|r| r.get(table)) {
            found.lock().unwrap_or_else(|p| p.into_inner()).extend(items.iter().cloned());
        }
        Ok(out.unprocessed_keys().and_then(|u| u.get(table)).map(|k| k.keys().to_vec()).unwrap_or_default())
    }

    /// Reads a whole table by a parallel Scan of `segments` segments, each page handed to the
    /// returned receiver as it arrives: memory holds a few pages, never the table. `budget`
    /// paces the items read. The first error ends the scan and is the last thing received.
    pub fn scan_pages(&self, table: &str, segments: u32, budget: Budget) -> mpsc::Receiver<Result<Vec<Item>, StoreError>> {
        let segments = segments.max(1);
        let (tx, rx) = mpsc::channel(2 * segments as usize);
        for segment in 0..segments {
            let (store, tx, budget, table) = (self.clone(), tx.clone(), budget.clone(), table.to_owned());
            tokio::spawn(async move {
                let mut start: Option<Item> = None;
                loop {
                    store.metrics.call("dynamodb", "Scan");
                    let out = store
                        .client
                        .scan()
                        .table_name(&table)
                        .segment(segment as i32)
                        .total_segments(segments as i32)
                        .set_exclusive_start_key(start.take())
                        .return_consumed_capacity(ReturnConsumedCapacity::Total)
                        .send()
                        .await
                        .map_err(|e| classify(format!("DynamoDB Scan of {table} (segment {segment} of {segments})"), e));
                    let out = match out {
                        Ok(out) => out,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    store.metrics.consumed(out.consumed_capacity(), false);
                    budget.take(out.items().len()).await;
                    if tx.send(Ok(out.items().to_vec())).await.is_err() {
                        return;
                    }
                    match out.last_evaluated_key() {
                        Some(k) if !k.is_empty() => start = Some(k.clone()),
                        _ => return,
                    }
                }
            });
        }
        rx
    }

    /// Every product's state, page by page, to `sink` (a parallel Scan of the products table).
    pub async fn scan_states(
        &self,
        segments: u32,
        budget: Budget,
        mut sink: impl FnMut(Vec<ProductState>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut pages = self.scan_pages(&self.settings.names.products_table, segments, budget);
        while let Some(page) = pages.recv().await {
            sink(page?.iter().map(state_from_item).collect::<Result<_, _>>()?)?;
        }
        Ok(())
    }

    /// The whole event log, segments in key order (a parallel Scan of the events table).
    pub async fn scan_log(
        &self,
        segments: u32,
        budget: Budget,
        mut progress: impl FnMut(u64),
    ) -> Result<Vec<LogSegment>, StoreError> {
        let mut pages = self.scan_pages(&self.settings.names.events_table, segments, budget);
        let mut out = Vec::new();
        let mut events = 0;
        while let Some(page) = pages.recv().await {
            let decoded = log_segments(&page?)?;
            events += decoded.iter().map(|s| s.events.len() as u64).sum::<u64>();
            out.extend(decoded);
            progress(events);
        }
        out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Writes a whole product item, only if the item's revision is still `expected` (`None`:
    /// only if there is no item): `replay reproject`, racing a live pipeline safely. Returns
    /// false when the item moved on meanwhile.
    pub async fn put_state_if(&self, state: &ProductState, expected: Option<u64>) -> Result<bool, StoreError> {
        let table = &self.settings.names.products_table;
        let mut request = self
            .client
            .put_item()
            .table_name(table)
            .set_item(Some(item_from_state(state)))
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        request = match expected {
            Some(revision) => request
                .condition_expression("#rev = :rev")
                .expression_attribute_names("#rev", attr::REVISION)
                .expression_attribute_values(":rev", n(revision)),
            None => request.condition_expression("attribute_not_exists(#id)").expression_attribute_names("#id", attr::PRODUCT_ID),
        };
        self.metrics.call("dynamodb", "PutItem");
        match request.send().await {
            Ok(out) => {
                self.metrics.consumed(out.consumed_capacity(), true);
                Ok(true)
            }
            Err(e) if e.as_service_error().is_some_and(|se| se.is_conditional_check_failed_exception()) => Ok(false),
            Err(e) => Err(classify(format!("DynamoDB PutItem of {} into {table}", state.id), e)),
        }
    }
}

impl DynamoStore {
    /// Runs one product's facet work in turn; one task per product runs these concurrently.
    async fn run_product(&self, events: Arc<[SequencedEvent]>, facets: Vec<FacetWork>) -> Vec<(FacetWork, Vec<UpdateResult>)> {
        let mut done = Vec::with_capacity(facets.len());
        for work in facets {
            let mut results = Vec::with_capacity(work.updates.len());
            let mut broken = false;
            for &i in &work.updates {
                let result = if broken {
                    UpdateResult::Held
                } else {
                    match self.update_facet(&events[i]).await {
                        Ok(applied) => UpdateResult::Applied(applied),
                        Err(e) => {
                            broken = true;
                            UpdateResult::Failed(e)
                        }
                    }
                };
                results.push(result);
            }
            done.push((work, results));
        }
        done
    }
}

impl ProductStore for DynamoStore {
    async fn write_batch(&self, events: &[SequencedEvent]) -> Result<WriteOutcome, StoreError> {
        let (mut failed, mut failure) = self.append_log(events).await?;
        let work = plan(events, &failed);
        let shared: Arc<[SequencedEvent]> = events.into();
        // One task per product, its facets one after another: DynamoDB serializes writes to one
        // item anyway, and emulators built on moto (LocalStack included) lose one of two
        // concurrent updates that create the same item.
        let permits = Arc::new(Semaphore::new(self.settings.write_concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for facets in work {
            let (store, permits, events) = (self.clone(), permits.clone(), shared.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await.expect("semaphore is never closed");
                store.run_product(events, facets).await
            });
        }
        let mut unchanged = 0;
        let mut changed: HashMap<ProductId, ProductChanged> = HashMap::new();
        // Products a stale or duplicate event touched, as they stand: announced again on a
        // redelivery, which may follow a crash between this write and its announcement.
        let mut as_is: HashMap<ProductId, ProductChanged> = HashMap::new();
        while let Some(joined) = tasks.join_next().await {
            let facets = joined.map_err(|e| StoreError::unavailable("DynamoDB update task", e))?;
            for (work, results) in facets {
                let mut broken = false;
                for (&i, result) in work.updates.iter().zip(results) {
                    match result {
                        UpdateResult::Applied(Applied::Changed(c)) => {
                            let slot = changed.entry(c.product_id.clone()).or_insert_with(|| c.clone());
                            if c.revision > slot.revision {
                                *slot = c;
                            }
                        }
                        UpdateResult::Applied(Applied::Stale(current)) => {
                            unchanged += 1;
                            if let Some(c) = current {
                                let slot = as_is.entry(c.product_id.clone()).or_insert_with(|| c.clone());
                                if c.revision > slot.revision {
                                    *slot = c;
                                }
                            }
                        }
                        UpdateResult::Failed(e) => {
                            tracing::warn!(error = %catalog_pipeline::error::chain(&e), product = %events[i].event.product_id, "UpdateItem failed");
                            failure = Some(e);
                            broken = true;
                            failed.insert(i);
                        }
                        UpdateResult::Held => {
                            failed.insert(i);
                        }
                    }
                }
                if broken {
                    failed.extend(work.superseded);
                } else {
                    unchanged += work.superseded.len();
                }
            }
        }
        let unchanged_products = as_is.into_iter().filter(|(id, _)| !changed.contains_key(id)).map(|(_, c)| c).collect();
        Ok(WriteOutcome {
            changed: changed.into_values().collect(),
            unchanged_products,
            unchanged,
            failed: failed.into_iter().collect(),
            failure,
        })
    }

    async fn get_states(&self, ids: &[ProductId]) -> Result<Vec<ProductState>, StoreError> {
        let found = std::sync::Mutex::new(Vec::new());
        let unique: BTreeSet<&ProductId> = ids.iter().collect();
        let keys: Vec<Item> = unique.into_iter().map(|id| Item::from([(attr::PRODUCT_ID.to_owned(), s(id.as_str()))])).collect();
        for chunk in keys.chunks(BATCH_GET_MAX) {
            let (attempts, base) = (self.settings.batch_attempts, self.settings.retry_base);
            let left = until_processed(chunk.to_vec(), attempts, base, |k| self.batch_get_once(k, &found)).await?;
            if !left.is_empty() {
                let detail = format!("{} keys left unprocessed after {attempts} attempts", left.len());
                return Err(StoreError::new(FailureClass::Throttled, "DynamoDB BatchGetItem", detail));
            }
        }
        found.into_inner().unwrap_or_else(|p| p.into_inner()).iter().map(state_from_item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_LOG_SEGMENT_BYTES as DEFAULT_LOG_SEGMENT;
    use catalog_domain::ParseLimits;
    use std::time::SystemTime;

    fn event(body: &str) -> CatalogEvent {
        CatalogEvent::parse(body.as_bytes(), SystemTime::UNIX_EPOCH, ParseLimits::default()).unwrap()
    }

    fn batch(bodies: &[&str]) -> Vec<SequencedEvent> {
        bodies
            .iter()
            .map(|b| SequencedEvent {
                sequence: None,
                position: None,
                event: event(b),
                trace: None,
                accepted_at: std::time::SystemTime::UNIX_EPOCH,
            })
            .collect()
    }

    #[test]
    fn the_plan_writes_the_highest_version_per_facet_and_supersedes_the_rest() {
        let events = batch(&[
            r#"{"productId":"P1","quantity":1,"version":2}"#,
            r#"{"productId":"P2","quantity":1,"version":1}"#,
            r#"{"productId":"P1","quantity":2,"version":5}"#,
            r#"{"productId":"P1","price":1.00,"currency":"USD","version":1}"#,
            r#"{"productId":"P1","quantity":3,"version":4}"#,
        ]);
        let plan = plan(&events, &BTreeSet::new());
        assert_eq!(
            plan,
            vec![
                vec![FacetWork { updates: vec![2], superseded: vec![0, 4] }, FacetWork { updates: vec![3], superseded: vec![] }],
                vec![FacetWork { updates: vec![1], superseded: vec![] }],
            ],
            "products in first-arrival order, each facet once"
        );
    }

    #[test]
    fn the_plan_keeps_every_unversioned_update_in_arrival_order_and_skips_what_is_not_logged() {
        let events = batch(&[
            r#"{"productId":"P1","quantity":1}"#,
            r#"{"productId":"P1","quantity":2,"version":9}"#,
            r#"{"productId":"P1","quantity":3}"#,
            r#"{"productId":"P2","quantity":1}"#,
        ]);
        let plan = plan(&events, &BTreeSet::from([3]));
        assert_eq!(
            plan,
            vec![vec![FacetWork { updates: vec![0, 1, 2], superseded: vec![] }]],
            "a mixed facet applies all in turn"
        );
    }

    #[test]
    fn versioned_updates_carry_their_guard_and_deletes_only_flag() {
        let u = facet_update(&event(r#"{"productId":"P1","price":9.99,"currency":"USD","version":4}"#), Some(77));
        assert_eq!(u.condition.as_deref(), Some("attribute_not_exists(#fv) OR #fv < :fv"));
        assert_eq!(u.names["#fv"], attr::PRICE_VERSION);
        assert_eq!(u.values[":fv"], n(4));
        assert!(u.expression.ends_with("ADD #rev :one"));
        let d = facet_update(&event(r#"{"productId":"P1","status":"deleted"}"#), None);
        assert!(d.condition.is_none());
        assert!(d.names.values().any(|v| v == attr::DELETED));
        assert!(!d.names.values().any(|v| v == attr::NAME), "a delete keeps the facet's fields");
    }

    #[test]
    fn unversioned_updates_are_guarded_by_their_position_and_only_the_latest_is_planned() {
        let u = facet_update(&event(r#"{"productId":"P1","quantity":3}"#), Some(42));
        assert_eq!(u.condition.as_deref(), Some("attribute_not_exists(#fv) OR #fv < :fv"));
        assert_eq!((u.names["#fv"].as_str(), &u.values[":fv"]), (attr::INVENTORY_POSITION, &n(42)));
        let mut events = batch(&[r#"{"productId":"P1","quantity":1}"#, r#"{"productId":"P1","quantity":2}"#]);
        events[0].position = Some(9);
        events[1].position = Some(4);
        assert_eq!(plan(&events, &BTreeSet::new()), vec![vec![FacetWork { updates: vec![0], superseded: vec![1] }]]);
    }

    #[test]
    fn segments_pack_events_within_the_limit_and_read_back_in_order() {
        let bodies: Vec<String> =
            (1..=50).map(|v| format!(r#"{{"productId":"P{}","quantity":{v},"version":{v}}}"#, v % 7)).collect();
        let mut events = batch(&bodies.iter().map(String::as_str).collect::<Vec<_>>());
        events[0].position = Some(12);
        let ids = SegmentIds::new();
        let one = segments(&events, DEFAULT_LOG_SEGMENT, &ids);
        assert_eq!(one.len(), 1);
        let (key, item, members) = &one[0];
        assert_eq!(members, &(0..50).collect::<Vec<_>>());
        assert_eq!(item[attr::SEGMENT], s(key.clone()));
        assert_eq!(item[attr::COUNT], n(50));
        let decoded = decode_segment(item).unwrap();
        let mut again: Vec<serde_json::Value> = events.iter().map(|e| e.event.to_compact_json()).collect();
        again[0][attr::LINE_POSITION] = 12.into();
        assert_eq!(decoded, again, "each line the compact envelope, with the position where known");
        // Compressed, 50 events take fewer started KiB than one item per event would.
        let units = crate::cost::write_units(crate::cost::item_size(item));
        assert!(units * 10 <= 50, "{units} write units for 50 events");

        let small = segments(&events, 200, &ids);
        assert!(small.len() > 1);
        let members: Vec<usize> = small.iter().flat_map(|(_, _, m)| m.iter().copied()).collect();
        assert_eq!(members, (0..50).collect::<Vec<_>>(), "every event in exactly one segment, in order");
        let keys: HashSet<&String> = small.iter().map(|(k, _, _)| k).collect();
        assert_eq!(keys.len(), small.len(), "segment keys are unique");
        // An event larger than the limit still gets a segment of its own.
        assert_eq!(segments(&events[..3], 1, &ids).len(), 3);
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
        item.insert(attr::INVENTORY_POSITION.into(), n(11));
        item.insert(attr::REVISION.into(), n(7));
        let state = state_from_item(&item).unwrap();
        assert_eq!(state.positions.inventory, Some(11));
        assert_eq!(state_from_item(&item_from_state(&state)).unwrap(), state, "an item written whole reads back the same");
        assert_eq!(state.effective_price().unwrap().display(), "$999.99");
        assert_eq!((state.quantity, state.versions.price, state.revision), (Some(5), Some(3), 7));
        assert!(state.is_listed());
    }
}
