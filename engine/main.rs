//! The `llama32` command-line tool.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = llama32::cli::Cli::parse();
    match llama32::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A reader that stopped reading (`llama32 tokenize ... | head -c1`) is not an error to report: end quietly
        // with the shell's status for a process ended by SIGPIPE, as Unix tools do.
        Err(llama32::Error::Io { path, source })
            if path.as_os_str() == "<stdout>" && source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            std::process::ExitCode::from(141)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
