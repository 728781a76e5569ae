//! `/readyz` in AWS mode: the products table answers, and for a worker the ingest queue too
//! (with its backlog). Each check is bounded, so a dead endpoint turns the check red instead of
//! hanging the probe.

use std::time::Duration;

use std::sync::Arc;

use catalog_pipeline::breaker::Breaker;
use catalog_pipeline::health::{BoxFuture, Check, Readiness, breaker_check};

use crate::{AwsClients, AwsSettings, ServiceFault};

/// Longest a readiness check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct AwsReadiness {
    pub clients: AwsClients,
    pub settings: AwsSettings,
    /// The store's breaker, where this process runs the pipeline (and so depends on the
    /// ingest queue); `None` for an API-only instance.
    pub breaker: Option<Arc<Breaker>>,
}

impl AwsReadiness {
    async fn store(&self) -> Check {
        let table = &self.settings.names.products_table;
        let answer = tokio::time::timeout(CHECK_TIMEOUT, self.clients.dynamodb.describe_table().table_name(table).send()).await;
        match answer {
            Ok(Ok(_)) => Check { name: "store", ok: true, detail: format!("DynamoDB table {table} reachable") },
            Ok(Err(e)) => Check { name: "store", ok: false, detail: ServiceFault::from(e).to_string() },
            Err(_) => Check { name: "store", ok: false, detail: format!("DynamoDB did not answer within {CHECK_TIMEOUT:?}") },
        }
    }

    async fn event_source(&self) -> Check {
        let queue = &self.settings.names.ingest_queue;
        let answer = tokio::time::timeout(CHECK_TIMEOUT, async {
            let url = crate::sqs::lookup_queue_url(&self.clients.sqs, queue).await?;
            crate::sqs::queue_depth(&self.clients.sqs, &url).await
        })
        .await;
        match answer {
            Ok(Ok((waiting, in_flight))) => {
                // "backlog 0 waiting, 0 in flight" is how an operator knows a recovery has drained.
                Check {
                    name: "eventSource",
                    ok: true,
                    detail: format!("SQS {queue}, backlog {waiting} waiting, {in_flight} in flight"),
                }
            }
            Ok(Err(e)) => Check { name: "eventSource", ok: false, detail: catalog_pipeline::error::chain(&e) },
            Err(_) => Check { name: "eventSource", ok: false, detail: format!("SQS did not answer within {CHECK_TIMEOUT:?}") },
        }
    }
}

impl Readiness for AwsReadiness {
    fn checks(&self) -> BoxFuture<'_, Vec<Check>> {
        Box::pin(async move {
            let mut checks = vec![Check { name: "readModel", ok: true, detail: "open".into() }, self.store().await];
            if self.breaker.is_some() {
                checks.push(self.event_source().await);
            }
            checks.push(breaker_check(self.breaker.as_deref()));
            checks
        })
    }
}
