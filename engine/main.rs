//! The `llama32` command-line tool.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = llama32::cli::Cli::parse();
    match llama32::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
