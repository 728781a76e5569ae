//! `catalog serve`: binds the listener, has the chosen backend assemble itself, serves the BFF
//! over it, and shuts down in one order whatever the backend: stop accepting, drain the
//! background tasks (bounded), run the backend's finishing steps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use catalog_api::server::{ClientRateLimit, ConnectionLimits};
use catalog_api::{ApiConfig, ApiMetrics, AppState};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::assemble::{self, Assembly};
use crate::cli::{Backend, ServeArgs};
use crate::telemetry::Telemetry;

pub fn run(args: ServeArgs, telemetry: &Telemetry) -> anyhow::Result<()> {
    let api = args.api_config()?;
    let client_rate = args.client_rate_limit()?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(n);
    }
    let runtime = runtime.enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        // Bound first: a taken port is reported before minutes of warming up.
        let listener = TcpListener::bind(args.addr).await.with_context(|| format!("binding {}", args.addr))?;
        let assembly = match args.backend {
            Backend::Embedded => assemble::embedded::assemble(&args).await?,
            Backend::Aws => assemble::aws::assemble(&args).await?,
        };
        let backend = match args.backend {
            Backend::Embedded => "embedded",
            Backend::Aws => "aws",
        };
        let limits = (args.connection_limits(), client_rate);
        serve(listener, assembly, (backend, telemetry), api, limits, args.shutdown_timeout()).await
    })
}

async fn serve(
    listener: TcpListener,
    assembly: Assembly,
    (backend, telemetry): (&'static str, &Telemetry),
    api: ApiConfig,
    (limits, client_rate): (ConnectionLimits, Option<ClientRateLimit>),
    shutdown_timeout: Duration,
) -> anyhow::Result<()> {
    let Assembly { readmodel, ingest, fill, rebuilder, readiness, mut registry, mut tasks, stop, finish } = assembly;
    let metrics = ApiMetrics::default();
    metrics.register(&mut registry);
    catalog_api::metrics::register_process(&mut registry, env!("CARGO_PKG_VERSION"), backend);
    let draining = Arc::new(AtomicBool::new(false));
    let registry = Arc::new(registry);
    let stop_export = CancellationToken::new();
    let exporter = telemetry.export_metrics(registry.clone(), stop_export.clone());
    let state = AppState {
        readmodel,
        ingest,
        fill,
        rebuilder,
        readiness,
        registry,
        metrics: metrics.clone(),
        config: api,
        draining: draining.clone(),
    };
    let stop_http = CancellationToken::new();
    let local = listener.local_addr().context("reading the bound address")?;
    let routes = catalog_api::routes(Arc::new(state));
    let server = tokio::spawn(catalog_api::server::serve(listener, routes, limits, client_rate, metrics, stop_http.clone()));
    announce(local);

    shutdown_signal().await;
    tracing::info!("shutting down: no new requests, draining in-flight batches");
    draining.store(true, Ordering::SeqCst);
    stop_http.cancel();
    stop.cancel();
    tasks.push(server);
    drain(shutdown_timeout, tasks).await;
    for step in finish {
        step.await?;
    }
    // The last figures, after the drain: what the stop itself did is counted too.
    stop_export.cancel();
    if let Some(exporter) = exporter {
        let _ = tokio::task::spawn_blocking(move || exporter.join()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

fn announce(local: SocketAddr) {
    // Tests and scripts read this line to find a port-0 server.
    println!("catalog listening on http://{local}");
    tracing::info!(%local, "serving");
}

/// Waits for tasks to finish, at most `limit`; what has not finished by then is abandoned
/// (unacknowledged messages come back: every write is idempotent).
async fn drain(limit: Duration, tasks: Vec<JoinHandle<()>>) {
    let all = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(limit, all).await.is_err() {
        tracing::warn!("drain timed out; unacknowledged messages are redelivered later");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
