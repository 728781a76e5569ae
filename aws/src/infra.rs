//! `catalog infra init`: creates what the AWS mode needs, idempotently, and says what it
//! created and what it found.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_eventbridge::types::{InputTransformer, Target};
use aws_sdk_sqs::types::QueueAttributeName;
use catalog_domain::EventKind;

use catalog_pipeline::BackendError;

use crate::dynamodb::attr;
use crate::{AwsClients, AwsSettings, CATEGORY_INDEX, classify};

const INGEST_TARGET_ID: &str = "catalog-ingest-queue";
/// How long `init` waits for a new table to become ACTIVE.
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// The compact shape of docs/contract.md §1, built by EventBridge itself: string variables are quoted
/// in the template, `detail` is spliced in as the JSON object it is.
pub const INPUT_TEMPLATE: &str = r#"{"id":"<id>","type":"<type>","source":"<source>","time":"<time>","detail":<detail>}"#;

fn input_paths() -> HashMap<String, String> {
    [("id", "$.id"), ("type", "$.detail-type"), ("source", "$.source"), ("time", "$.time"), ("detail", "$.detail")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The ingest rule's pattern: the three sources and detail-types of docs/contract.md §1.
pub fn ingest_pattern() -> String {
    let sources: Vec<&str> = EventKind::ALL.iter().map(|k| k.source()).collect();
    let types: Vec<&str> = EventKind::ALL.iter().map(|k| k.detail_type()).collect();
    serde_json::json!({"source": sources, "detail-type": types}).to_string()
}

pub(crate) async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> Result<String, BackendError> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| classify(format!("reading the ARN of {url}"), e))?;
    out.attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| BackendError::rejected(format!("reading the ARN of {url}"), "the queue has no ARN"))
}

/// Lets the rule (and only it) send to the queue, as EventBridge requires on real AWS.
pub(crate) async fn allow_rule_to_send(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    queue_arn: &str,
    rule_arn: &str,
) -> Result<(), BackendError> {
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "catalog-eventbridge",
            "Effect": "Allow",
            "Principal": {"Service": "events.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}}
        }]
    });
    sqs.set_queue_attributes()
        .queue_url(url)
        .attributes(QueueAttributeName::Policy, policy.to_string())
        .send()
        .await
        .map_err(|e| classify(format!("setting the policy of {url}"), e))?;
    Ok(())
}

struct Report(Vec<String>);

impl Report {
    fn say(&mut self, created: bool, what: String) {
        self.0.push(format!("{} {what}", if created { "created" } else { "found  " }));
    }
}

/// Creates (or finds) every resource; returns one line per resource.
pub async fn init(clients: &AwsClients, settings: &AwsSettings) -> Result<Vec<String>, BackendError> {
    let names = &settings.names;
    let mut report = Report(Vec::new());

    if names.bus != "default" {
        match clients.eventbridge.create_event_bus().name(&names.bus).send().await {
            Ok(_) => report.say(true, format!("event bus {}", names.bus)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_already_exists_exception()) => {
                report.say(false, format!("event bus {}", names.bus));
            }
            Err(e) => return Err(classify(format!("creating event bus {}", names.bus), e)),
        }
    }

    let (dlq_url, created) = ensure_queue(&clients.sqs, &names.dead_letter_queue, HashMap::new()).await?;
    report.say(created, format!("queue {} (dead letters)", names.dead_letter_queue));
    let dlq_arn = queue_arn(&clients.sqs, &dlq_url).await?;
    let redrive = serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": settings.max_receive_count.to_string()});
    let ingest_attributes = HashMap::from([
        (QueueAttributeName::VisibilityTimeout, settings.visibility_timeout.as_secs().to_string()),
        (QueueAttributeName::ReceiveMessageWaitTimeSeconds, settings.wait_time.as_secs().min(20).to_string()),
        (QueueAttributeName::RedrivePolicy, redrive.to_string()),
    ]);
    let (ingest_url, created) = ensure_queue(&clients.sqs, &names.ingest_queue, ingest_attributes.clone()).await?;
    if !created {
        // Bring an existing queue in line with the current settings (redrive, timeouts).
        clients
            .sqs
            .set_queue_attributes()
            .queue_url(&ingest_url)
            .set_attributes(Some(ingest_attributes))
            .send()
            .await
            .map_err(|e| classify(format!("updating {}", names.ingest_queue), e))?;
    }
    report.say(
        created,
        format!(
            "queue {} (redrive to {} after {} receives)",
            names.ingest_queue, names.dead_letter_queue, settings.max_receive_count
        ),
    );
    let ingest_arn = queue_arn(&clients.sqs, &ingest_url).await?;

    let existed = clients.eventbridge.describe_rule().name(&names.ingest_rule).event_bus_name(&names.bus).send().await.is_ok();
    let rule_arn = clients
        .eventbridge
        .put_rule()
        .name(&names.ingest_rule)
        .event_bus_name(&names.bus)
        .event_pattern(ingest_pattern())
        .description("Catalog change events to the ingest queue, in the compact shape")
        .send()
        .await
        .map_err(|e| classify(format!("creating rule {}", names.ingest_rule), e))?
        .rule_arn()
        .unwrap_or_default()
        .to_owned();
    allow_rule_to_send(&clients.sqs, &ingest_url, &ingest_arn, &rule_arn).await?;
    let transformer = InputTransformer::builder()
        .set_input_paths_map(Some(input_paths()))
        .input_template(INPUT_TEMPLATE)
        .build()
        .map_err(|e| BackendError::rejected("building an AWS request", e))?;
    let target = Target::builder()
        .id(INGEST_TARGET_ID)
        .arn(&ingest_arn)
        .input_transformer(transformer)
        .build()
        .map_err(|e| BackendError::rejected("building an AWS request", e))?;
    clients
        .eventbridge
        .put_targets()
        .rule(&names.ingest_rule)
        .event_bus_name(&names.bus)
        .targets(target)
        .send()
        .await
        .map_err(|e| classify(format!("targeting rule {}", names.ingest_rule), e))?;
    report.say(!existed, format!("rule {} → {} (InputTransformer: compact shape)", names.ingest_rule, names.ingest_queue));

    let created = ensure_table(clients, &names.events_table, &[(attr::SEGMENT, KeyType::Hash)], None).await?;
    report.say(created, format!("table {} (event log: gzip segments of events)", names.events_table));
    let category_index = GlobalSecondaryIndex::builder()
        .index_name(CATEGORY_INDEX)
        .key_schema(key(attr::CATEGORY, KeyType::Hash)?)
        .key_schema(key(attr::PRODUCT_ID, KeyType::Range)?)
        // Keys only: updates that leave the category alone then cost the index nothing.
        .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build())
        .build()
        .map_err(|e| BackendError::rejected("building an AWS request", e))?;
    let created =
        ensure_table(clients, &names.products_table, &[(attr::PRODUCT_ID, KeyType::Hash)], Some(category_index)).await?;
    report.say(created, format!("table {} (current state, GSI {CATEGORY_INDEX})", names.products_table));
    Ok(report.0)
}

async fn ensure_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    attributes: HashMap<QueueAttributeName, String>,
) -> Result<(String, bool), BackendError> {
    if let Ok(out) = sqs.get_queue_url().queue_name(name).send().await
        && let Some(url) = out.queue_url()
    {
        return Ok((url.to_owned(), false));
    }
    let out = sqs
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attributes))
        .send()
        .await
        .map_err(|e| classify(format!("creating queue {name}"), e))?;
    Ok((
        out.queue_url().ok_or_else(|| BackendError::rejected("SQS CreateQueue", "the answer holds no queue URL"))?.to_owned(),
        true,
    ))
}

fn key(name: &str, key_type: KeyType) -> Result<KeySchemaElement, BackendError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(key_type)
        .build()
        .map_err(|e| BackendError::rejected("building an AWS request", e))
}

fn string_attribute(name: &str) -> Result<AttributeDefinition, BackendError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| BackendError::rejected("building an AWS request", e))
}

async fn ensure_table(
    clients: &AwsClients,
    name: &str,
    keys: &[(&str, KeyType)],
    index: Option<GlobalSecondaryIndex>,
) -> Result<bool, BackendError> {
    let db = &clients.dynamodb;
    let mut request = db.create_table().table_name(name).billing_mode(BillingMode::PayPerRequest);
    let mut attributes: Vec<&str> = keys.iter().map(|(n, _)| *n).collect();
    for (attribute, key_type) in keys {
        request = request.key_schema(key(attribute, key_type.clone())?);
    }
    if let Some(index) = index {
        attributes.extend(index.key_schema().iter().map(|k| k.attribute_name()));
        attributes.sort_unstable();
        attributes.dedup();
        let definitions = attributes.iter().map(|a| string_attribute(a)).collect::<Result<Vec<_>, _>>()?;
        request = request.set_attribute_definitions(Some(definitions)).global_secondary_indexes(index);
    } else {
        let definitions = attributes.iter().map(|a| string_attribute(a)).collect::<Result<Vec<_>, _>>()?;
        request = request.set_attribute_definitions(Some(definitions));
    }
    let created = match request.send().await {
        Ok(_) => true,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => false,
        Err(e) => return Err(classify(format!("creating table {name}"), e)),
    };
    let deadline = tokio::time::Instant::now() + TABLE_ACTIVE_TIMEOUT;
    loop {
        let status = db.describe_table().table_name(name).send().await.map_err(|e| classify(format!("describing {name}"), e))?;
        if status.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(created);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(BackendError::unavailable(
                format!("waiting for table {name}"),
                format!("not ACTIVE within {TABLE_ACTIVE_TIMEOUT:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
