//! schemathesis (PyPI) against the served OpenAPI document of a `serve --demo`: it generates
//! requests for every documented operation, valid and invalid, and checks that no answer is a
//! 5xx, that every status, content type and body is the one documented, and that other methods
//! get 405 with `Allow`. scripts/test installs it and sets CATALOG_TEST_SCHEMATHESIS.

mod helpers;

use helpers::*;

/// Where scripts/test puts the schemathesis executable.
const SCHEMATHESIS: &str = "CATALOG_TEST_SCHEMATHESIS";
/// A fixed seed keeps CI deterministic; set CATALOG_SCHEMATHESIS_SEED to explore others.
const DEFAULT_SEED: &str = "20261125";
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,\
                      response_schema_conformance,unsupported_method,allow_header_conformance,ignored_auth";

#[test]
fn every_generated_request_gets_a_documented_answer_and_no_5xx() {
    let Some(schemathesis) = std::env::var_os(SCHEMATHESIS) else {
        eprintln!("skipped: needs schemathesis; run scripts/test, which installs it and sets {SCHEMATHESIS}");
        return;
    };
    let app = spawn_with(Options { args: vec!["--demo".into()], ..Default::default() });
    let seed = std::env::var("CATALOG_SCHEMATHESIS_SEED").unwrap_or_else(|_| DEFAULT_SEED.to_owned());
    let out = std::process::Command::new(schemathesis)
        .arg("run")
        .arg(app.url("/openapi.json"))
        .args(["--checks", CHECKS, "--max-examples", "100", "--seed", &seed, "--no-color"])
        // One worker: Python 3.11's ast module is not thread-safe under hypothesis's lambdas.
        .args(["--workers", "1", "--generation-database", "none"])
        .output()
        .expect("run schemathesis");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    assert!(report.contains("passed"), "{report}");
}
