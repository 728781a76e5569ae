//! sled 0.34's bulk-load floor on this machine: how long writing N keys takes into a fresh
//! database, in 4,096-key batches, with nothing of ours in the way. It bounds what any rebuild
//! of the read model (one view key plus one category-index key per product) can reach.
//!
//! cargo run --release -p catalog-readmodel --example sled_floor -- [keys] [batch]
//!   MODE=views|index|seq|par|par2 (default seq: views then index; par: both trees at once;
//!   par2: the views from two threads). Prints the time and peak RSS.

use std::time::Instant;
fn rss() -> String {
    std::fs::read_to_string("/proc/self/status").unwrap().lines().filter(|l| l.starts_with("VmHWM")).collect::<Vec<_>>().join(" ")
}
fn main() {
    let n: usize = std::env::args().nth(1).map(|a| a.parse().unwrap()).unwrap_or(1_000_000);
    let batch: usize = std::env::args().nth(2).map(|a| a.parse().unwrap()).unwrap_or(4096);
    let mode = std::env::var("MODE").unwrap_or_default();
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).cache_capacity(256 << 20).open().unwrap();
    let views = db.open_tree("v").unwrap();
    let index = db.open_tree("i").unwrap();
    let value = vec![7u8; std::env::var("VALUE_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(700)];
    let t = Instant::now();
    let write_views = |tree: sled::Tree, range: std::ops::Range<usize>| {
        let mut b = sled::Batch::default();
        let mut k = 0;
        for i in range {
            b.insert(format!("P{i:07}").as_bytes(), value.as_slice());
            k += 1;
            if k == batch {
                tree.apply_batch(std::mem::take(&mut b)).unwrap();
                k = 0;
            }
        }
        tree.apply_batch(b).unwrap();
    };
    let write_index = |tree: sled::Tree| {
        let mut b = sled::Batch::default();
        let mut k = 0;
        for i in 0..n {
            b.insert(format!("C{}\0P{i:07}", i % 500).as_bytes(), &[][..]);
            k += 1;
            if k == batch {
                tree.apply_batch(std::mem::take(&mut b)).unwrap();
                k = 0;
            }
        }
        tree.apply_batch(b).unwrap();
    };
    match mode.as_str() {
        "par" => std::thread::scope(|s| {
            s.spawn(|| write_views(views.clone(), 0..n));
            s.spawn(|| write_index(index.clone()));
        }),
        "views" => write_views(views.clone(), 0..n),
        "index" => write_index(index.clone()),
        "par2" => std::thread::scope(|s| {
            s.spawn(|| write_views(views.clone(), 0..n / 2));
            s.spawn(|| write_views(views.clone(), n / 2..n));
        }),
        _ => {
            write_views(views.clone(), 0..n);
            write_index(index.clone());
        }
    }
    println!("{mode} write {:?} {}", t.elapsed(), rss());
    db.flush().unwrap();
}
