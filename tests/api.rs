//! Every route of docs/contract.md §2 against the real binary.

mod helpers;

use std::io::Read;

use helpers::*;
use serde_json::{Value, json};

#[tokio::test]
async fn seed_example_end_to_end_shows_display_price() {
    let app = spawn_app();
    let r = app.client.post(app.url("/events")).header("content-type", "application/json").body(SEED).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"accepted": 1}));
    let view = app.eventually("/products/P123", |_| true).await;
    assert_eq!(view["displayPrice"], "$999.99");
    assert_eq!(view["price"], json!({"amount": "999.99", "currency": "USD"}));
    assert_eq!(view["product"]["name"], "Laptop");
    assert_eq!(view["availability"], "Unknown");
}

#[tokio::test]
async fn product_view_web_and_mobile_shapes() {
    let app = spawn_app();
    app.ingest(&json!([product("P1", "Mug", "Kitchen"), price("P1", "5", "GBP", 1), stock("P1", 3, 1)])).await;
    let web = app.eventually("/products/P1", |v| v["stock"]["quantity"] == 3 && v["price"].is_object()).await;
    assert_eq!(web["product"], json!({"id": "P1", "name": "Mug", "description": null, "category": "Kitchen"}));
    assert_eq!(web["displayPrice"], "£5.00");
    assert_eq!(web["availability"], "Low Stock");
    assert!(web["updatedAt"].as_str().unwrap().ends_with('Z'));
    let (status, mobile) = app.get_json("/products/P1?view=mobile").await;
    assert_eq!(status, 200);
    assert_eq!(mobile, json!({"id": "P1", "name": "Mug", "displayPrice": "£5.00", "availability": "Low Stock"}));
}

#[tokio::test]
async fn unknown_invalid_and_deleted_products() {
    let app = spawn_app();
    let (status, body) = app.get_json("/products/NOPE").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "product_not_found");
    let r = app.get("/products/bad%20id").await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "invalid_product_id");
    assert_eq!(app.get_json(&format!("/products/{}", "x".repeat(65))).await.0, 400);
    assert_eq!(app.get_json("/products/P1?view=tablet").await.0, 400);

    app.ingest(&json!([product("D1", "Doomed", "C")])).await;
    app.eventually("/products/D1", |_| true).await;
    app.ingest(&json!({"source": "product.service", "detail-type": "Product Update", "detail": {"productId": "D1", "status": "deleted"}})).await;
    for _ in 0..500 {
        if app.get_json("/products/D1").await.0 == 404 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("deleted product still served");
}

#[tokio::test]
async fn etag_gives_304_and_cache_headers_are_set() {
    let app = spawn_app();
    app.ingest(&json!([product("E1", "Lamp", "Home")])).await;
    app.eventually("/products/E1", |_| true).await;
    let r = app.get("/products/E1").await;
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(r.headers()["cache-control"], "public, max-age=5, stale-while-revalidate=30");
    let r = app.client.get(app.url("/products/E1")).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    let mobile = app.get("/products/E1?view=mobile").await;
    assert_ne!(mobile.headers()["etag"].to_str().unwrap(), etag, "variants have their own ETag");
    let r = app.client.get(app.url("/products?category=Home")).send().await.unwrap();
    let list_etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let r = app.client.get(app.url("/products?category=Home")).header("if-none-match", list_etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
}

#[tokio::test]
async fn large_answers_are_gzipped_when_accepted() {
    let app = spawn_app();
    let long = "a long description ".repeat(100);
    app.ingest(&json!({"source": "product.service", "detail-type": "Product Update",
        "detail": {"productId": "G1", "name": "Big", "category": "Huge", "status": "created", "description": long}}))
        .await;
    app.eventually("/products/G1", |_| true).await;
    let plain = app.get("/products/G1").await.bytes().await.unwrap();
    assert!(plain.len() > 1024);
    for path in ["/products/G1", "/products?category=Huge"] {
        let r = app.client.get(app.url(path)).header("accept-encoding", "gzip").send().await.unwrap();
        assert_eq!(r.headers()["content-encoding"], "gzip", "{path}");
        let gz = r.bytes().await.unwrap();
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert!(v.to_string().contains("a long description"), "{path}");
    }
    let small = app.client.get(app.url("/products/G1?view=mobile")).header("accept-encoding", "gzip").send().await.unwrap();
    assert!(small.headers().get("content-encoding").is_none(), "small bodies stay plain");
}

#[tokio::test]
async fn category_pages_have_no_duplicates_or_gaps() {
    let app = spawn_app();
    let mut events: Vec<Value> = (0..45).map(|i| product(&format!("C{i:03}"), "Thing", "Tools")).collect();
    events.push(product("X1", "Other", "Garden"));
    app.ingest(&Value::Array(events)).await;
    app.caught_up(46).await;
    let (ids, pages) = app.listing("Tools", 10).await;
    let expected: Vec<String> = (0..45).map(|i| format!("C{i:03}")).collect();
    assert_eq!(ids, expected);
    assert_eq!(pages, 5);
    let (_, first) = app.get_json("/products?category=Tools").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 20, "default limit is 20");
    let (_, empty) = app.get_json("/products?category=Nothing").await;
    assert_eq!(empty, json!({"items": [], "nextCursor": null}));
    let (_, first_ten) = app.get_json("/products?category=Tools&limit=10").await;
    let tools_cursor = first_ten["nextCursor"].as_str().unwrap().to_owned();
    for cursor in ["C009", "NOPE", tools_cursor.as_str()] {
        let (status, body) = app.get_json(&format!("/products?category=Garden&cursor={cursor}")).await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_cursor")), "{cursor}: not a position in Garden");
    }
    for bad in ["limit=0", "limit=101", "limit=abc", "cursor=bad%20id", ""] {
        let path = format!("/products?category=Tools&{bad}");
        let path = if bad.is_empty() { "/products".to_owned() } else { path };
        assert_eq!(app.get_json(&path).await.0, 400, "{path}");
    }
}

#[tokio::test]
async fn many_ids_answer_items_and_missing() {
    let app = spawn_app();
    app.ingest(&json!([product("I1", "One", "C"), product("I2", "Two", "C")])).await;
    app.eventually("/products/I2", |_| true).await;
    app.eventually("/products/I1", |_| true).await;
    let (status, body) = app.get_json("/products?ids=I2,NOPE,I1&view=mobile").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = body["items"].as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["I2", "I1"]);
    assert_eq!(body["missing"], json!(["NOPE"]));
    let too_many = (0..101).map(|i| format!("P{i}")).collect::<Vec<_>>().join(",");
    assert_eq!(app.get_json(&format!("/products?ids={too_many}")).await.0, 400);
    assert_eq!(app.get_json("/products?ids=ok,bad%20id").await.0, 400);
    assert_eq!(app.get_json("/products?ids=I1&category=C").await.0, 400);
}

#[tokio::test]
async fn post_events_accepts_envelopes_and_put_events_entries_and_rejects_bad_json() {
    let app = spawn_app();
    let r = app
        .post_events(&json!([
            {"Source": "product.service", "DetailType": "Product Update",
             "Detail": "{\"productId\":\"PE1\",\"name\":\"Kettle\",\"category\":\"Kitchen\",\"status\":\"created\"}"},
            {"id": "x", "type": "Price Update", "source": "pricing.service", "time": "2026-01-01T10:00:00Z",
             "detail": {"productId": "PE1", "price": 1200, "currency": "JPY"}},
        ]))
        .await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"accepted": 2}));
    app.eventually("/products/PE1", |v| v["displayPrice"] == "¥1200").await;

    let r = app.client.post(app.url("/events")).header("content-type", "application/json").body("{nope").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "malformed_json");
    let r = app.post_events(&json!([{"productId": "A", "quantity": 1}, 7])).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["entries"][0]["index"], 1);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let app = spawn_with(Options { args: vec!["--max-request-bytes".into(), "1000".into()], ..Default::default() });
    let r = app
        .client
        .post(app.url("/events"))
        .header("content-type", "application/json")
        .body(vec![b' '; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "payload_too_large");
    assert_eq!(
        app.client.post(app.url("/events")).header("content-type", "application/json").body(SEED).send().await.unwrap().status(),
        202
    );
}

#[tokio::test]
async fn ingest_requires_the_bearer_token_when_configured() {
    let app = spawn_with(Options { envs: vec![("CATALOG_INGEST_TOKEN".into(), "t0ken".into())], ..Default::default() });
    let r = app.client.post(app.url("/events")).header("content-type", "application/json").body(SEED).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(app.url("/events"))
        .header("content-type", "application/json")
        .bearer_auth("wrong")
        .body(SEED)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(app.url("/events"))
        .header("content-type", "application/json")
        .bearer_auth("t0ken")
        .body(SEED)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = app
        .client
        .post(app.url("/events"))
        .header("content-type", "application/json")
        .header("authorization", "bEaReR t0ken")
        .body(SEED)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "the scheme is case-insensitive");
    assert_ne!(app.get("/products/P123").await.status(), 401, "reads never need the token");
}

#[tokio::test]
async fn the_token_is_checked_before_the_body_is_read() {
    let app = spawn_with(Options {
        args: vec!["--max-request-bytes".into(), "1000".into()],
        envs: vec![("CATALOG_INGEST_TOKEN".into(), "t0ken".into())],
    });
    let r = app
        .client
        .post(app.url("/events"))
        .header("content-type", "application/json")
        .body(vec![b' '; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "an unauthenticated caller learns nothing about the body limit");
}

#[tokio::test]
async fn events_must_be_sent_as_json_so_browsers_preflight_them() {
    let app = spawn_app();
    for content_type in [None, Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data")] {
        let mut request = app.client.post(app.url("/events")).body(SEED);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 415, "{content_type:?}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "unsupported_media_type");
    }
    assert_eq!(app.get("/products/P123").await.status(), 404, "nothing was ingested");
    let r = app
        .client
        .post(app.url("/events"))
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(SEED)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[test]
fn serve_refuses_public_ingest_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_catalog"))
        .args(["serve", "--addr", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CATALOG_INGEST_TOKEN"));
}

#[test]
fn an_empty_token_does_not_switch_authentication_off_on_a_public_bind() {
    let dir = tempfile::tempdir().unwrap();
    for token in ["", "   "] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_catalog"))
            .args(["serve", "--addr", "0.0.0.0:0", "--data-dir"])
            .arg(dir.path())
            .env("CATALOG_INGEST_TOKEN", token)
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with token {token:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn dot_segments_are_not_product_ids() {
    use std::io::{Read, Write};
    let app = spawn_app();
    // Raw requests: an HTTP client library would normalise these paths away before sending.
    for path in ["/products/.", "/products/.."] {
        let mut s = std::net::TcpStream::connect(app.base.trim_start_matches("http://")).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("invalid_product_id"), "{path}: {answer}");
    }
}

#[tokio::test]
async fn cors_allows_configured_origins_only() {
    let app = spawn_with(Options { args: vec!["--cors-origin".into(), "https://shop.example.com".into()], ..Default::default() });
    let r = app.client.get(app.url("/healthz")).header("origin", "https://shop.example.com").send().await.unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "https://shop.example.com");
    let r = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/products/P1"))
        .header("origin", "https://shop.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app.client.get(app.url("/healthz")).header("origin", "https://evil.example").send().await.unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn an_echoed_origin_varies_the_answer_by_origin() {
    let app = spawn_with(Options { args: vec!["--cors-origin".into(), "https://shop.example.com".into()], ..Default::default() });
    app.ingest(&json!([product("VO1", "Vase", "Home")])).await;
    app.eventually("/products/VO1", |_| true).await;
    let r = app
        .client
        .get(app.url("/products/VO1"))
        .header("origin", "https://shop.example.com")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    let vary: Vec<String> = r.headers().get_all("vary").iter().map(|v| v.to_str().unwrap().to_ascii_lowercase()).collect();
    assert!(vary.iter().any(|v| v.contains("origin")), "{vary:?}");
    assert!(vary.iter().any(|v| v.contains("accept-encoding")), "{vary:?}");
    let r = app.client.get(app.url("/products/VO1")).send().await.unwrap();
    let vary: Vec<&str> = r.headers().get_all("vary").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(vary, ["Accept-Encoding"], "no origin sent, none echoed");
}

#[tokio::test]
async fn a_preflight_without_cors_configured_says_which_flag_allows_browsers() {
    let app = spawn_app();
    let r = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/events"))
        .header("origin", "https://shop.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "cors_not_configured");
    assert!(body["error"]["message"].as_str().unwrap().contains("--cors-origin"));
}

#[tokio::test]
async fn head_works_on_every_read_route_and_405_says_what_is_allowed() {
    let app = spawn_with(Options { args: vec!["--demo".into()], ..Default::default() });
    app.eventually("/products/P123", |_| true).await;
    for path in ["/products/P123", "/products?category=Electronics", "/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let get = app.client.get(app.url(path)).send().await.unwrap();
        let head = app.client.head(app.url(path)).send().await.unwrap();
        assert_eq!(head.status(), get.status(), "HEAD {path}");
        assert_eq!(head.headers().get("content-type"), get.headers().get("content-type"), "HEAD {path}");
        assert!(head.bytes().await.unwrap().is_empty(), "HEAD {path} has no body");
    }
    for (method, path, allow) in [
        (reqwest::Method::GET, "/events", "POST"),
        (reqwest::Method::DELETE, "/products/P123", "GET, HEAD"),
        (reqwest::Method::POST, "/products", "GET, HEAD"),
        (reqwest::Method::PUT, "/healthz", "GET, HEAD"),
    ] {
        let r = app.client.request(method.clone(), app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "method_not_allowed");
    }
    assert_eq!(app.client.delete(app.url("/nope")).send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn operations_routes() {
    let app = spawn_app();
    assert_eq!(app.get_json("/healthz").await, (200, json!({"status": "ok"})));
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
    assert!(ready["checks"].as_array().unwrap().iter().any(|c| c["name"] == "breaker"));
    app.get("/products/NOPE").await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("catalog_http_requests_total{route=\"get_product\",status=\"404\"}"), "{metrics}");
    assert!(metrics.contains("catalog_pipeline_events_received_total"));
    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in ["/products/{id}", "/products", "/events", "/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
    assert_eq!(app.get_json("/nope").await.0, 404);
    assert_eq!(app.get_json("/events").await.0, 405);
}
