//! `catalog replay dlq`: list dead letters, or move chosen ones back to be processed again
//! (embedded DLQ or SQS), paced, with a dry run, filters, and an exit code that says whether
//! everything chosen moved.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use catalog_aws::dlq::{DeadLetterMessage, Moved, SqsDeadLetters};
use catalog_aws::{AwsClients, AwsMetrics};
use catalog_domain::{CatalogEvent, ParseLimits};
use catalog_pipeline::budget::Budget;

use super::Verdict;
use super::progress::{Progress, rate};
use crate::cli::{Backend, DlqArgs};
use crate::datadir::DataDir;

/// How long an SQS walk keeps the dead letters it has seen hidden: long enough for a paced
/// run to finish, after which anything not moved is made visible again explicitly (or, if
/// the command dies, by SQS when this runs out).
const SQS_HOLD: Duration = Duration::from_secs(15 * 60);

/// One dead letter as the tool shows and filters it, whatever the backend.
struct Letter {
    id: String,
    code: String,
    stage: String,
    receives: String,
    message: String,
    product: Option<String>,
    detail_type: Option<String>,
    /// Why the body fails validation today, if it does.
    invalid: Option<String>,
}

impl Letter {
    fn new(id: String, body: &[u8], limits: ParseLimits) -> Self {
        let parsed = CatalogEvent::parse(body, SystemTime::UNIX_EPOCH, limits);
        let raw: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let raw_text = |keys: &[&[&str]]| {
            keys.iter()
                .find_map(|path| path.iter().try_fold(raw.as_ref()?, |v, k| v.get(k)).and_then(|v| v.as_str()).map(str::to_owned))
        };
        let (product, detail_type, invalid) = match parsed {
            Ok(event) => (Some(event.product_id.as_str().to_owned()), Some(event.kind().detail_type().to_owned()), None),
            Err(e) => (
                raw_text(&[&["detail", "productId"], &["productId"]]),
                raw_text(&[&["detail-type"], &["type"]]),
                Some(e.to_string()),
            ),
        };
        Self {
            id,
            code: String::new(),
            stage: String::new(),
            receives: String::new(),
            message: String::new(),
            product,
            detail_type,
            invalid,
        }
    }

    fn matches(&self, args: &DlqArgs) -> bool {
        let any =
            |wanted: &[String], have: Option<&str>| wanted.is_empty() || have.is_some_and(|h| wanted.iter().any(|w| w == h));
        any(&args.products, self.product.as_deref())
            && any(&args.codes, Some(&self.code))
            && any(&args.detail_types, self.detail_type.as_deref())
    }

    fn row(&self) -> String {
        let or_dash = |s: Option<&str>| s.filter(|s| !s.is_empty()).unwrap_or("-").to_owned();
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.id,
            or_dash(Some(&self.code)),
            or_dash(Some(&self.stage)),
            or_dash(Some(&self.receives)),
            or_dash(self.product.as_deref()),
            or_dash(self.detail_type.as_deref()),
            or_dash(Some(&self.message)).replace(['\t', '\n'], " ")
        )
    }
}

const HEADER: &str = "id\tcode\tstage\treceives\tproduct\tdetail-type\treason";

/// What the run decided for each letter it looked at.
#[derive(Default)]
struct Plan {
    looked_at: usize,
    unmatched: usize,
    invalid_kept: usize,
    chosen: Vec<usize>,
}

fn plan(letters: &[Letter], args: &DlqArgs) -> Plan {
    let mut plan = Plan { looked_at: letters.len(), ..Plan::default() };
    for (i, letter) in letters.iter().enumerate() {
        if !letter.matches(args) {
            plan.unmatched += 1;
        } else if letter.invalid.is_some() && !args.force {
            plan.invalid_kept += 1;
        } else {
            plan.chosen.push(i);
        }
    }
    plan
}

pub fn dlq(args: DlqArgs) -> anyhow::Result<Verdict> {
    match args.target.backend {
        Backend::Embedded => embedded(&args),
        Backend::Aws => super::runtime()?.block_on(sqs(&args)),
    }
}

fn embedded(args: &DlqArgs) -> anyhow::Result<Verdict> {
    let data = &args.target.data;
    let dir = DataDir::existing(&data.data_dir, data.cache_mb)?;
    let db = dir.open_main()?;
    let log = dir.open_log(&db, Default::default())?;
    let records = log.dead_letters().context("reading the dead-letter queue")?;
    let records = &records[..args.max.unwrap_or(usize::MAX).min(records.len())];
    let letters: Vec<Letter> = records
        .iter()
        .map(|(record, body)| Letter {
            code: record.code.clone(),
            stage: record.stage.clone(),
            receives: record.attempts.to_string(),
            message: record.message.clone(),
            ..Letter::new(record.sequence.to_string(), body, data.parse_limits())
        })
        .collect();
    let plan = plan(&letters, args);
    if args.inspect || args.dry_run {
        return Ok(show(&letters, &plan, args, log.dead_letter_count() as usize));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let budget = Budget::per_second(args.max_per_sec);
    let started = Instant::now();
    let mut progress = Progress::new("moving dead letters back", "messages", Some(plan.chosen.len() as u64));
    let step = usize::try_from(args.max_per_sec).unwrap_or(usize::MAX).clamp(1, 1_000);
    let mut moved = 0;
    for chunk in plan.chosen.chunks(step) {
        let sequences: Vec<u64> = chunk.iter().map(|&i| records[i].0.sequence).collect();
        runtime.block_on(budget.take(sequences.len()));
        moved += runtime.block_on(log.redrive(&sequences)).context("moving dead letters back into the log")?.len();
        progress.set(moved as u64);
    }
    progress.finish();
    db.flush().context("flushing the event log")?;
    Ok(summary(moved, plan.chosen.len(), &plan, started.elapsed(), Vec::new()))
}

async fn sqs(args: &DlqArgs) -> anyhow::Result<Verdict> {
    let clients = AwsClients::from_env().await?;
    let queue = SqsDeadLetters::connect(clients.sqs, &args.target.aws.settings().names, AwsMetrics::default()).await?;
    let limits = args.target.data.parse_limits();
    let mut progress = Progress::new("reading the dead-letter queue", "messages", None);
    let messages = queue.walk(args.max, SQS_HOLD).await.context("reading the dead-letter queue")?;
    progress.set(messages.len() as u64);
    progress.finish();
    let letters: Vec<Letter> = messages
        .iter()
        .map(|m| Letter {
            code: m.code.clone().unwrap_or_else(|| "max_receive_count_exceeded".into()),
            stage: m.stage.clone().unwrap_or_else(|| "queue".into()),
            receives: m.receives.map(|r| r.to_string()).unwrap_or_default(),
            message: m.message.clone().unwrap_or_else(|| "moved by the ingest queue's redrive policy".into()),
            ..Letter::new(m.message_id.clone(), m.body.as_bytes(), limits)
        })
        .collect();
    let plan = plan(&letters, args);
    let chosen: Vec<&DeadLetterMessage> = plan.chosen.iter().map(|&i| &messages[i]).collect();
    let verdict = if args.inspect || args.dry_run {
        Ok(show(&letters, &plan, args, messages.len()))
    } else {
        move_sqs(&queue, &chosen, args, &plan).await
    };
    // Whatever was not moved goes back as it was, visible at once.
    let left: Vec<&DeadLetterMessage> = if args.inspect || args.dry_run {
        messages.iter().collect()
    } else {
        messages.iter().enumerate().filter(|(i, _)| !plan.chosen.contains(i)).map(|(_, m)| m).collect()
    };
    queue.release(&left).await.context("making the dead letters not moved visible again")?;
    verdict
}

async fn move_sqs(queue: &SqsDeadLetters, chosen: &[&DeadLetterMessage], args: &DlqArgs, plan: &Plan) -> anyhow::Result<Verdict> {
    let budget = Budget::per_second(args.max_per_sec);
    let started = Instant::now();
    let mut progress = Progress::new("moving dead letters back", "messages", Some(chosen.len() as u64));
    let (mut moved, mut failures) = (0, Vec::new());
    for chunk in chosen.chunks(10) {
        budget.take(chunk.len()).await;
        for (m, outcome) in chunk.iter().zip(queue.move_back(chunk).await.context("moving dead letters back")?) {
            match outcome {
                Moved::Moved => moved += 1,
                Moved::Failed(why) => failures.push(format!("{}: {why}", m.message_id)),
            }
        }
        progress.set(moved as u64);
    }
    progress.finish();
    Ok(summary(moved, chosen.len(), plan, started.elapsed(), failures))
}

fn show(letters: &[Letter], plan: &Plan, args: &DlqArgs, total: usize) -> Verdict {
    if args.inspect {
        println!("{HEADER}");
        for letter in letters.iter().filter(|l| l.matches(args)) {
            println!("{}", letter.row());
        }
        println!("{} dead letters, {} shown", total, letters.len() - plan.unmatched);
    } else {
        for &i in &plan.chosen {
            println!("would move {}", letters[i].row());
        }
        println!("dry run: would move {} of {} dead letters{}", plan.chosen.len(), plan.looked_at, kept(plan));
    }
    Verdict::Clean
}

fn kept(plan: &Plan) -> String {
    let mut out = String::new();
    if plan.invalid_kept > 0 {
        out.push_str(&format!("; {} still invalid, kept (--force moves them)", plan.invalid_kept));
    }
    if plan.unmatched > 0 {
        out.push_str(&format!("; {} not matching the filters, kept", plan.unmatched));
    }
    out
}

fn summary(moved: usize, chosen: usize, plan: &Plan, elapsed: Duration, failures: Vec<String>) -> Verdict {
    for failure in &failures {
        println!("not moved {failure}");
    }
    println!(
        "moved {moved} of {chosen} chosen dead letters back in {elapsed:.2?} ({}){}",
        rate(moved as u64, elapsed),
        kept(plan)
    );
    if moved == chosen { Verdict::Clean } else { Verdict::Unfinished }
}
