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
    // Each connection is a file descriptor: past the open-file limit, accepts fail.
    // The soft limit was raised to the hard one; if that is still short, the node
    // serves what the limit allows (beyond it, clients get a clear 503).
    let open_files = raise_open_file_limit();
    let fits = open_files.saturating_sub(FILES_BESIDES_CONNECTIONS) as usize;
    if fits < config.limits.max_connections {
        let log = |level_warn: bool| {
            let message = "--max-connections lowered to fit the open-file limit; raise the hard limit (ulimit -Hn) to serve more";
            if level_warn {
                tracing::warn!(
                    open_files,
                    max_connections = fits,
                    requested = config.limits.max_connections,
                    "{message}"
                );
            } else {
                tracing::info!(
                    open_files,
                    max_connections = fits,
                    requested = config.limits.max_connections,
                    "{message}"
                );
            }
        };
        // A few thousand connections is a working node; fewer is worth a warning.
        log(fits < 1024);
        config.limits.max_connections = fits.max(1);
    }

    let listener = match wsrelay::bind(&config) {
        Ok(listener) => listener,
        Err(e) => {
            let why = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "the address is already in use (another program listens there; choose another with --listen)".to_owned()
                }
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied (ports below 1024 need privileges; choose another with --listen)".to_owned()
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    "no interface of this host has that address (check --listen)".to_owned()
                }
                _ => format!("{e} (check --listen)"),
            };
            eprintln!("wsrelay: cannot listen on {}: {why}", config.listen);
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

/// File descriptors a node needs besides its connections (listener, Redis, logs,
/// the trace exporter), with room to spare.
const FILES_BESIDES_CONNECTIONS: u64 = 64;

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
