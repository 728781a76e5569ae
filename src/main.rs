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
        cli::Command::Serve(args) => serve::run(args).map(|()| replay::Verdict::Clean),
        cli::Command::Replay(command) => match command {
            cli::ReplayCommand::Rebuild(args) => replay::rebuild(args).map(|()| replay::Verdict::Clean),
            cli::ReplayCommand::Verify(args) => replay::verify(args),
            cli::ReplayCommand::Reproject(args) => replay::reproject(args),
            cli::ReplayCommand::Dlq(args) => replay::dlq(args),
        },
        cli::Command::Infra(cli::InfraCommand::Init(args)) => infra::init(args).map(|()| replay::Verdict::Clean),
    };
    match result {
        Ok(replay::Verdict::Clean) => std::process::ExitCode::SUCCESS,
        // The command said what is left; exit 1 like any check that did not pass.
        Ok(replay::Verdict::Unfinished) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
