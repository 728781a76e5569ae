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
mod telemetry;

use clap::Parser;

fn main() -> std::process::ExitCode {
    alloc::tune();
    let cli = cli::Cli::parse();
    let telemetry = match telemetry::init(cli.log_format, env!("CARGO_PKG_VERSION")) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        cli::Command::Serve(args) => serve::run(args, &telemetry).map(|()| replay::Verdict::Clean),
        cli::Command::Replay(command) => match command {
            cli::ReplayCommand::Rebuild(args) => replay::rebuild(args).map(|()| replay::Verdict::Clean),
            cli::ReplayCommand::Verify(args) => replay::verify(args),
            cli::ReplayCommand::Reproject(args) => replay::reproject(args),
            cli::ReplayCommand::Dlq(args) => replay::dlq(args),
        },
        cli::Command::Infra(cli::InfraCommand::Init(args)) => infra::init(args).map(|()| replay::Verdict::Clean),
    };
    telemetry.shutdown();
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
