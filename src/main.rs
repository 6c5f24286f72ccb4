//! The `wsrelay` binary: parse configuration, set up logs and traces, bind, run one node.

use std::process::ExitCode;
use std::sync::Arc;

use wsrelay::config::Command;
use wsrelay::metrics::Metrics;
use wsrelay::{Config, Node, healthcheck, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let mut config = match Config::load() {
        Ok(config) => config,
        Err(e) => return ExitCode::from(e.report()),
    };
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
    let open_files = raise_open_file_limit();
    if open_files < config.limits.max_connections as u64 + 64 {
        tracing::warn!(
            open_files,
            max_connections = config.limits.max_connections,
            "the open-file limit is below --max-connections: connections beyond it will fail; raise `ulimit -n`"
        );
    }

    let listener = match wsrelay::bind(&config) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "wsrelay: invalid --listen: cannot listen on {}: {e}",
                config.listen
            );
            return ExitCode::from(2);
        }
    };
    let node = match Node::with_telemetry(config, metrics, tracing) {
        Ok(node) => node,
        Err(e @ wsrelay::NodeError::Config(_)) => {
            eprintln!("wsrelay: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("wsrelay: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = node.serve(listener, wsrelay::shutdown::signal()).await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-file limit to the hard one (each connection is a file
/// descriptor; many systems start processes with a soft limit of 1024) and returns
/// the limit now in force.
fn raise_open_file_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        limit.rlim_cur
    }
}
