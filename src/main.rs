//! `catalog`: the one binary. It parses the command line, wires the crates together and does
//! little else: `serve` runs pipeline + read model + BFF, `replay` holds the operator tools.

mod alloc;
mod assemble;
mod cli;
mod datadir;
mod demo;
mod infra;
mod replay;
mod serve;

use clap::Parser;

/// sled's info lines are noise to an operator; so are the AWS SDK's warnings that the EC2
/// metadata service cannot be reached, on any machine that is not an EC2 instance.
const DEFAULT_LOG_FILTER: &str = "info,sled=warn,aws_config::imds=error";

fn main() -> std::process::ExitCode {
    alloc::tune();
    let cli = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CATALOG_LOG").unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match cli.log_format {
        cli::LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        cli::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let result = match cli.command {
        cli::Command::Serve(args) => serve::run(args),
        cli::Command::Replay(cli::ReplayCommand::Rebuild(args)) => replay::rebuild(args),
        cli::Command::Infra(cli::InfraCommand::Init(args)) => infra::init(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
