//! Slow, silent and too many clients, on raw sockets against the real binary: each is cut off by
//! a configured limit, and none of them holds up a shutdown. Every wait is bounded far above the
//! limit it checks, so a busy machine slows these tests down without failing them.

mod helpers;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use helpers::*;

/// Far above every limit these tests configure (1–2 s).
const PATIENCE: Duration = Duration::from_secs(15);

fn short_limits(extra: &[&str]) -> Options {
    let mut args: Vec<String> =
        ["--header-read-timeout-secs", "1", "--idle-timeout-secs", "2", "--body-timeout-secs", "1"].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    Options { args, ..Default::default() }
}

fn connect(app: &TestApp) -> TcpStream {
    let addr = app.base.trim_start_matches("http://");
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// Reads until the server closes the connection; what it sent, and how long that took.
fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open past {PATIENCE:?}: {e}"),
        }
    }
    (String::from_utf8_lossy(&seen).into_owned(), started.elapsed())
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = spawn_with(short_limits(&[]));
    let mut stream = connect(&app);
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (answer, _) = read_until_closed(&mut stream);
    assert!(!answer.contains("200 OK"), "no answer to half a request: {answer}");
    assert!(app.metric("catalog_http_connections_timed_out_total").await >= 1.0);
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let app = spawn_with(short_limits(&[]));
    let mut stream = connect(&app);
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (answer, _) = read_until_closed(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_body_that_stops_arriving_gets_408() {
    let app = spawn_with(short_limits(&[]));
    let mut stream = connect(&app);
    stream
        .write_all(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[{\"prod")
        .unwrap();
    let (answer, _) = read_until_closed(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}

#[test]
fn connections_over_the_limit_are_closed_and_the_rest_keep_working() {
    let app = spawn_with(Options {
        args: ["--max-connections", "2", "--idle-timeout-secs", "60"].map(String::from).to_vec(),
        ..Default::default()
    });
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect(&app)).collect();
    // Both held connections are being served before the third arrives.
    for stream in &mut held {
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 256];
        assert!(stream.read(&mut buf).unwrap() > 0);
    }
    let mut third = connect(&app);
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let (answer, _) = read_until_closed(&mut third);
    assert_eq!(answer, "", "refused without an answer");
    held.pop();
    // A freed slot is usable again (the server notices the close within moments).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut stream = connect(&app);
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let (answer, _) = read_until_closed(&mut stream);
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the freed connection slot never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
}

#[test]
fn shutdown_does_not_wait_for_idle_or_half_sent_connections() {
    // The drain limit is far above PATIENCE: only closing those connections at once makes
    // the process exit in time.
    let mut app =
        spawn_with(Options { args: ["--shutdown-timeout-secs", "600"].map(String::from).to_vec(), ..Default::default() });
    let mut half = connect(&app);
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut idle = connect(&app);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 256];
    assert!(idle.read(&mut buf).unwrap() > 0);
    let started = Instant::now();
    app.stop();
    assert!(started.elapsed() < PATIENCE, "shutdown took {:?}", started.elapsed());
    assert_eq!(read_until_closed(&mut half).0, "");
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after_and_others_and_probes_do_not() {
    // One request a second after a burst of two: the third in a row is over the budget.
    let app = spawn_with(Options {
        args: ["--client-rate-limit", "1", "--client-burst", "2", "--client-key-header", "x-forwarded-for"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let get = |client: &'static str| app.client.get(app.url("/products/NOPE")).header("x-forwarded-for", client).send();
    assert_eq!(get("203.0.113.7, 10.0.0.1").await.unwrap().status(), 404);
    assert_eq!(get("203.0.113.7").await.unwrap().status(), 404);
    let limited = get("203.0.113.7").await.unwrap();
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry_after), "retry after {retry_after} s");
    let body: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(get("198.51.100.2").await.unwrap().status(), 404, "another client has its own budget");
    for _ in 0..5 {
        assert_eq!(app.get("/healthz").await.status(), 200, "probes are never limited");
    }
    assert_eq!(app.metric("catalog_http_responses_total{status=\"429\"}").await, 1.0);
}
