//! The `wsrelay` binary: parse configuration, set up logs and traces, bind, run one node.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use wsrelay::config::Command;
use wsrelay::metrics::Metrics;
use wsrelay::{Config, Node, healthcheck, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let mut config = Config::parse();
    if let Some(Command::Healthcheck { url }) = &config.command {
        let url = url
            .clone()
            .unwrap_or_else(|| healthcheck::default_url(config.listen));
        return match healthcheck::check(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wsrelay healthcheck {url}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = config.validate() {
        eprintln!("wsrelay: {e}");
        return ExitCode::from(2);
    }
    // Resolved once: logs, traces and `welcome` must agree on it.
    let node_id = config.resolved_node_id();
    config.node_id = Some(node_id.clone());

    let metrics = Arc::new(Metrics::new());
    let (tracing, _telemetry) = match telemetry::init(
        config.log_format,
        &node_id,
        metrics.trace_spans_dropped.clone(),
    ) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            return ExitCode::from(2);
        }
    };
    if tracing.enabled() {
        tracing::info!("exporting traces over OTLP");
    }

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
    let served = match Node::with_telemetry(config, metrics, tracing) {
        Ok(node) => node.serve(listener, wsrelay::shutdown::signal()).await,
        Err(e) => Err(e),
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            ExitCode::FAILURE
        }
    }
}
