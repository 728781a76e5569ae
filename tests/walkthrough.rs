//! README's "Try every route", run word for word by scripts/walkthrough against a fresh
//! `serve --demo`: the README cannot promise what the product does not do.

mod helpers;

use helpers::*;

#[test]
fn the_readme_walkthrough_does_what_it_says_from_a_fresh_data_dir() {
    let app = spawn_with(Options { args: vec!["--demo".into()], ..Default::default() });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/walkthrough");
    let out = std::process::Command::new(script).arg(&app.base).output().expect("run scripts/walkthrough (needs bash, curl, jq)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("every stated result seen"));
}
