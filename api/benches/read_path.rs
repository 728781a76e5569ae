//! In-process read path: a view lookup, and a whole GET through the warp filter chain
//! (routing, ETag, headers, metrics) without TCP. Prints p50 / p99 / mean per operation.
//!
//! cargo bench -p catalog-api --bench read_path

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use catalog_api::{ApiConfig, ApiMetrics, AppState, Check, Readiness};
use catalog_domain::{CatalogEvent, ProductId, ProductState, ViewSettings};
use catalog_readmodel::ReadModel;

const PRODUCTS: usize = 10_000;
const CATEGORIES: usize = 50;
const ITERATIONS: usize = 200_000;

struct AlwaysReady;

impl Readiness for AlwaysReady {
    fn checks(&self) -> catalog_api::state::BoxFuture<'_, Vec<Check>> {
        Box::pin(async { Vec::new() })
    }
}

/// xorshift: random ids without a dependency, reproducible run to run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as usize
    }
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{name:<48} p50 {:>8.2?}  p99 {:>8.2?}  p99.9 {:>8.2?}  mean {:>8.2?}  ({} ops)",
        pct(0.50),
        pct(0.99),
        pct(0.999),
        mean,
        samples.len()
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).cache_capacity(256 << 20).open().unwrap();
    // As `catalog serve` opens it: the most read views in memory in front of sled.
    let model = ReadModel::open(&db, ViewSettings::default(), None).unwrap().keep_hot(catalog_readmodel::DEFAULT_HOT_VIEWS_BYTES);
    let cold = ReadModel::open(&db, ViewSettings::default(), None).unwrap();
    let states: Vec<ProductState> = (0..PRODUCTS)
        .map(|i| {
            let id = format!("P{i:05}");
            let mut s = ProductState::new(ProductId::parse(&id).unwrap());
            for e in [
                serde_json::json!({"productId": id, "name": format!("Product {i}"), "category": format!("C{}", i % CATEGORIES),
                    "description": "A representative product description of a few dozen words, as a catalog would hold for a storefront.",
                    "status": "created", "version": 1}),
                serde_json::json!({"productId": id, "price": 19.99, "currency": "USD", "version": 1}),
                serde_json::json!({"productId": id, "quantity": i % 40, "version": 1}),
            ] {
                s.apply(&CatalogEvent::from_value(&e, SystemTime::now()).unwrap());
            }
            s
        })
        .collect();
    model.apply(&states).unwrap();
    let state = Arc::new(AppState {
        readmodel: model.clone(),
        ingest: None,
        fill: None,
        rebuilder: None,
        readiness: Arc::new(AlwaysReady),
        registry: Arc::new(Default::default()),
        metrics: ApiMetrics::default(),
        config: ApiConfig::default(),
        draining: Arc::new(AtomicBool::new(false)),
    });
    let routes = catalog_api::routes(state).filters;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let ids: Vec<String> = (0..PRODUCTS).map(|i| format!("P{i:05}")).collect();

    println!("read path, {PRODUCTS} products in the read model, random ids");
    for (name, model) in [("view lookup + body bytes, from sled", &cold), ("view lookup + body bytes, hot views", &model)] {
        let mut samples = Vec::with_capacity(ITERATIONS);
        for _ in 0..ITERATIONS {
            let id = &ids[rng.next() % PRODUCTS];
            let t = Instant::now();
            let view = model.get(id).unwrap().unwrap();
            std::hint::black_box(view.body(catalog_readmodel::Variant::Web));
            samples.push(t.elapsed());
        }
        report(name, samples);
    }

    let paths: Vec<String> = ids.iter().map(|id| format!("/products/{id}")).collect();
    let mut samples = Vec::with_capacity(ITERATIONS);
    rt.block_on(async {
        for _ in 0..ITERATIONS {
            let path = &paths[rng.next() % PRODUCTS];
            let t = Instant::now();
            let res = warp::test::request().path(path).reply(&routes).await;
            samples.push(t.elapsed());
            assert_eq!(res.status(), 200);
        }
    });
    report("GET /products/{id} through warp filters", samples);

    let mut samples = Vec::with_capacity(ITERATIONS / 10);
    rt.block_on(async {
        for _ in 0..ITERATIONS / 10 {
            let path = format!("/products?category=C{}&limit=20", rng.next() % CATEGORIES);
            let t = Instant::now();
            let res = warp::test::request().path(&path).reply(&routes).await;
            samples.push(t.elapsed());
            assert_eq!(res.status(), 200);
        }
    });
    report("GET /products?category=…&limit=20", samples);
}
