//! `catalog infra init`: create the AWS resources, idempotently, and say what happened.

use anyhow::Context;
use catalog_aws::AwsClients;

use crate::cli::AwsArgs;

pub fn init(args: AwsArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        let clients = AwsClients::from_env().await?;
        let lines = catalog_aws::infra::init(&clients, &args.settings()).await?;
        for line in lines {
            println!("{line}");
        }
        Ok(())
    })
}
