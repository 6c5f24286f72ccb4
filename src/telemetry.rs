//! Telemetry: logs (text or JSON), OpenTelemetry traces exported over OTLP, and the
//! W3C trace context that travels with a message between nodes.
//!
//! Configuration follows the OpenTelemetry conventions: `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns tracing on, and
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, `http/protobuf`), `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)` and `OTEL_BSP_*` are read
//! by the SDK. With no endpoint no exporter runs and [`Tracing`] is disabled: the
//! message path then pays one branch.
//!
//! Message spans (publish, Redis PUBLISH, delivery) use the OpenTelemetry API
//! directly rather than `tracing` spans: an unsampled message then costs a sampler
//! decision and no allocation, and nothing at all when tracing is off. The
//! connection span and every log line go through `tracing`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span, SpanKind, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Log line format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors (Kubernetes).
    Json,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[error("OpenTelemetry exporter: {0}")]
pub struct TelemetryError(String);

/// The node's tracer for message spans; disabled (a no-op) when no OTLP endpoint is set.
#[derive(Debug, Clone, Default)]
pub struct Tracing {
    tracer: Option<SdkTracer>,
    node_id: Arc<str>,
}

/// Keeps the exporter alive; flushes and shuts it down on drop.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Whether the environment asks for trace export.
pub fn export_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Installs the process-wide log subscriber and, when an OTLP endpoint is configured,
/// the trace exporter; `dropped` counts spans the collector did not take. Call once,
/// inside the tokio runtime.
pub fn init(
    format: LogFormat,
    node_id: &str,
    dropped: Counter,
) -> Result<(Tracing, TelemetryGuard), TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = if export_configured() {
        Some(build_provider(node_id, dropped)?)
    } else {
        None
    };
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("wsrelay"))
            .with_tracked_inactivity(false)
            .with_threads(false)
    });
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    let tracing = Tracing {
        tracer: provider.as_ref().map(|p| p.tracer("wsrelay")),
        node_id: node_id.into(),
    };
    Ok((tracing, TelemetryGuard { provider }))
}

fn build_provider(node_id: &str, dropped: Counter) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    let exporter = CountingExporter {
        inner: Arc::new(exporter),
        runtime: tokio::runtime::Handle::current(),
        dropped,
    };
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the default
    // detectors and win over what is set here.
    let mut attributes = vec![KeyValue::new("service.instance.id", node_id.to_owned())];
    for (attribute, vars) in [
        ("k8s.pod.name", ["K8S_POD_NAME", "POD_NAME"]),
        ("k8s.namespace.name", ["K8S_NAMESPACE", "POD_NAMESPACE"]),
        ("k8s.node.name", ["K8S_NODE_NAME", "NODE_NAME"]),
    ] {
        if let Some(value) = vars
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        {
            attributes.push(KeyValue::new(attribute, value));
        }
    }
    let mut resource = Resource::builder().with_attributes(attributes);
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("wsrelay");
    }
    resource = resource.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Runs each export on the node's tokio runtime (the batch processor exports from
/// its own thread, and the OTLP clients need a runtime), and counts the spans of
/// failed exports: when the collector is down, spans are dropped and counted, and
/// the relay carries on.
#[derive(Debug)]
struct CountingExporter {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
    dropped: Counter,
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let inner = self.inner.clone();
        let result = self
            .runtime
            .spawn(async move { inner.export(batch).await })
            .await
            .unwrap_or_else(|e| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    e.to_string(),
                ))
            });
        if result.is_err() {
            self.dropped.inc_by(spans);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The span of one publish on its origin node.
pub struct PublishSpan {
    cx: Context,
    /// The W3C `traceparent` to carry in the envelope: empty when the publish is not
    /// sampled (receivers then trace nothing either).
    pub traceparent: String,
}

impl PublishSpan {
    /// Records the Redis PUBLISH as a child span around `publish`.
    pub async fn broker_publish<T>(
        &self,
        tracing: &Tracing,
        publish: impl Future<Output = T>,
    ) -> T {
        let Some(tracer) = tracing
            .tracer
            .as_ref()
            .filter(|_| !self.traceparent.is_empty())
        else {
            return publish.await;
        };
        let mut span = tracer
            .span_builder("redis PUBLISH")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("db.system.name", "redis"),
                KeyValue::new("db.operation.name", "PUBLISH"),
            ])
            .start_with_context(tracer, &self.cx);
        let result = publish.await;
        span.end();
        result
    }

    /// Ends the publish span, marking it failed if `error` is given.
    pub fn end(self, error: Option<&str>) {
        let span = self.cx.span();
        if let Some(error) = error {
            span.set_status(opentelemetry::trace::Status::error(error.to_owned()));
        }
        span.end();
    }
}

impl Tracing {
    /// Tracing turned off.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.tracer.is_some()
    }

    /// Starts the span of a publish: a child of the client's `traceparent` when it
    /// gave one, a new trace otherwise. `None` when tracing is off.
    pub fn publish(
        &self,
        channel: &str,
        payload_bytes: usize,
        client_traceparent: Option<&str>,
    ) -> Option<PublishSpan> {
        self.start(SpanKind::Producer, client_traceparent, || {
            let attributes = vec![
                KeyValue::new("messaging.system", "wsrelay"),
                KeyValue::new("messaging.destination.name", channel.to_owned()),
                KeyValue::new("messaging.message.body.size", payload_bytes as i64),
                KeyValue::new("wsrelay.node", self.node_id.to_string()),
            ];
            ("publish".into(), attributes)
        })
    }

    /// Starts the span of a call to the application backend (`proxy` is its name):
    /// a child of the client's `traceparent` when it gave one, a new trace
    /// otherwise. Its `traceparent` goes to the backend in the call's header, and
    /// on to the publish that may follow, so client, relay, backend and fan-out are
    /// one trace. `None` when tracing is off.
    pub fn proxy(
        &self,
        proxy: &'static str,
        client_traceparent: Option<&str>,
    ) -> Option<PublishSpan> {
        self.start(SpanKind::Client, client_traceparent, || {
            let attributes = vec![
                KeyValue::new("wsrelay.proxy", proxy),
                KeyValue::new("wsrelay.node", self.node_id.to_string()),
            ];
            (format!("proxy {proxy}").into(), attributes)
        })
    }

    /// Starts a span that continues `client_traceparent` (a new trace without
    /// one), with the `traceparent` to hand on (empty when not sampled). Its name
    /// and attributes are only made when traces are exported.
    fn start(
        &self,
        kind: SpanKind,
        client_traceparent: Option<&str>,
        describe: impl FnOnce() -> (std::borrow::Cow<'static, str>, Vec<KeyValue>),
    ) -> Option<PublishSpan> {
        let tracer = self.tracer.as_ref()?;
        let (name, attributes) = describe();
        let parent = client_traceparent.map(extract).unwrap_or_default();
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        let traceparent = if cx.span().span_context().is_sampled() {
            inject(&cx)
        } else {
            String::new()
        };
        Some(PublishSpan { cx, traceparent })
    }

    /// Runs a local delivery inside a span that continues the origin's publish span
    /// (its `traceparent` from the envelope). `deliver` returns the recipient count.
    pub fn deliver(
        &self,
        channel: &str,
        traceparent: &[u8],
        deliver: impl FnOnce() -> usize,
    ) -> usize {
        let Some(tracer) = self.tracer.as_ref().filter(|_| !traceparent.is_empty()) else {
            return deliver();
        };
        let Ok(traceparent) = std::str::from_utf8(traceparent) else {
            return deliver();
        };
        let parent = extract(traceparent);
        let mut span = tracer
            .span_builder("deliver")
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("messaging.system", "wsrelay"),
                KeyValue::new("messaging.destination.name", channel.to_owned()),
                KeyValue::new("wsrelay.node", self.node_id.to_string()),
            ])
            .start_with_context(tracer, &parent);
        let recipients = deliver();
        span.set_attribute(KeyValue::new("wsrelay.recipients", recipients as i64));
        span.end();
        recipients
    }
}

fn extract(traceparent: &str) -> Context {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

fn inject(cx: &Context) -> String {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_survives_extract_and_inject() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(inject(&extract(tp)), tp);
        assert!(!extract("garbage").span().span_context().is_valid());
    }

    #[test]
    fn disabled_tracing_does_nothing() {
        let t = Tracing::disabled();
        assert!(!t.enabled());
        assert!(t.publish("c", 10, None).is_none());
        assert_eq!(
            t.deliver(
                "c",
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                || 7
            ),
            7
        );
    }
}
