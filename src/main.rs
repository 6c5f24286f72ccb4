//! The `wsrelay` binary: parse configuration, set up logging, bind, run one node.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wsrelay::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(e) = config.validate() {
        eprintln!("wsrelay: {e}");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "wsrelay: invalid --listen: cannot listen on {}: {e}",
                config.listen
            );
            return ExitCode::from(2);
        }
    };
    match wsrelay::run(listener, config, wsrelay::shutdown::signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            ExitCode::FAILURE
        }
    }
}
