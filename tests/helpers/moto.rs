//! The standard AWS environment pointed at a moto server, with resource names of their own:
//! shared by the AWS tests and the AWS cost bench (which includes this file by path).

/// `AWS_*` pointing at `endpoint` with dummy credentials, and every `CATALOG_*` resource name
/// suffixed with `suffix`, so runs never share a queue, table or bus.
pub fn moto_env(endpoint: &str, suffix: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        // Never probe the instance-metadata address.
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("CATALOG_BACKEND", "aws"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (var, base) in [
        ("CATALOG_BUS", "bus"),
        ("CATALOG_INGEST_RULE", "ingest"),
        ("CATALOG_INGEST_QUEUE", "ingest"),
        ("CATALOG_DLQ", "dlq"),
        ("CATALOG_EVENTS_TABLE", "events"),
        ("CATALOG_PRODUCTS_TABLE", "products"),
        ("CATALOG_INVALIDATION_PREFIX", "inv"),
    ] {
        env.push((var.to_owned(), format!("{base}-{suffix}")));
    }
    env
}
