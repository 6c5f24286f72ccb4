//! Calls to the application backend: the connect, refresh, subscribe, publish and
//! rpc proxies (`docs/proxy.md`).
//!
//! One HTTP client per node (keep-alive connections to the backend, reused by every
//! call), a bound on the calls in flight (`--proxy-max-concurrency`, waited for
//! within the call's timeout), one timeout around the whole call, a span whose
//! `traceparent` the backend receives, and a metric per call. The answer is
//! `{"result": ...}` or `{"error": {"code": 4000..=4999, "message": ...}}`; anything
//! else is a [`ProxyError::BadAnswer`], logged with the proxy's name. Nothing here
//! knows what a connection is: the session and the hub decide what an answer means.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use crate::config::ProxyConfig;
use crate::metrics::Metrics;
use crate::telemetry::Tracing;

/// Largest answer read from the backend: an rpc answer goes to one client, whose
/// messages are bounded far below this.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Which proxy a call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Connect,
    Refresh,
    Subscribe,
    Publish,
    Rpc,
}

impl Kind {
    /// The proxy's name, in metrics, logs and spans.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Refresh => "refresh",
            Kind::Subscribe => "subscribe",
            Kind::Publish => "publish",
            Kind::Rpc => "rpc",
        }
    }
}

/// Why a proxy call did not give a result.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The backend answered with a refusal.
    #[error("{message}")]
    Refused {
        /// The application's code, 4000 to 4999.
        code: u16,
        /// The application's message.
        message: String,
    },
    /// No answer in time, a 5xx, no connection, or no free call slot in time.
    #[error("the application backend is unavailable: {0}")]
    Unavailable(String),
    /// An answer that is not the documented JSON.
    #[error("the application backend's answer was not understood")]
    BadAnswer,
}

/// What of a client's HTTP request travels with every proxy call of its
/// connection: the allowlisted headers, and a `Cookie` header with the
/// allowlisted cookies only.
///
/// One pointer when there is nothing to forward (the usual case): every connection
/// keeps it for its life.
#[derive(Debug, Clone, Default)]
pub(crate) struct Forwarded(Option<Box<[(HeaderName, HeaderValue)]>>);

/// The node's proxies to the application backend.
#[derive(Debug)]
pub(crate) struct Proxy {
    client: reqwest::Client,
    config: ProxyConfig,
    /// Calls in flight: a slot each.
    slots: Semaphore,
    headers: Vec<HeaderName>,
    metrics: Arc<Metrics>,
    tracing: Tracing,
}

/// `{"result": ...}` or `{"error": {...}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    #[serde(default)]
    result: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<AppError>,
}

#[derive(Deserialize)]
struct AppError {
    code: u16,
    #[serde(default)]
    message: String,
}

impl Proxy {
    /// The proxies `config` configures (none configured is fine: nothing calls them).
    pub(crate) fn new(config: &ProxyConfig, metrics: Arc<Metrics>, tracing: Tracing) -> Proxy {
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(config.proxy_max_concurrency)
            // Keep-alive with the backend, and no proxy of the environment: the
            // backend is a neighbour, and a call must not leave the cluster.
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .expect("an HTTP client without TLS always builds");
        let headers = config
            .proxy_forward_headers
            .iter()
            .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        Proxy {
            client,
            config: config.clone(),
            slots: Semaphore::new(config.proxy_max_concurrency),
            headers,
            metrics,
            tracing,
        }
    }

    /// The URL of `kind`, if configured.
    pub(crate) fn url(&self, kind: Kind) -> Option<&str> {
        let c = &self.config;
        match kind {
            Kind::Connect => c.proxy_connect_url.as_deref(),
            Kind::Refresh => c.proxy_refresh_url.as_deref(),
            Kind::Subscribe => c.proxy_subscribe_url.as_deref(),
            Kind::Publish => c.proxy_publish_url.as_deref(),
            Kind::Rpc => c.proxy_rpc_url.as_deref(),
        }
    }

    /// What of a client's request headers its calls carry (see [`Forwarded`]).
    pub(crate) fn forwarded(&self, request: &HeaderMap) -> Forwarded {
        let mut out = Vec::new();
        for name in &self.headers {
            for value in request.get_all(name) {
                out.push((name.clone(), value.clone()));
            }
        }
        let wanted = &self.config.proxy_forward_cookies;
        if !wanted.is_empty() {
            let cookies: Vec<&str> = request
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .map(str::trim)
                .filter(|pair| {
                    pair.split_once('=')
                        .is_some_and(|(name, _)| wanted.iter().any(|w| w == name.trim()))
                })
                .collect();
            if !cookies.is_empty()
                && let Ok(value) = HeaderValue::from_str(&cookies.join("; "))
            {
                out.push((header::COOKIE, value));
            }
        }
        Forwarded((!out.is_empty()).then(|| out.into_boxed_slice()))
    }

    /// Calls `kind` with `body` (a JSON object) and parses the `result` as `T`.
    /// `traceparent`: the client's, continued by the call's span; the span's own is
    /// returned with the result, for what follows (a publish).
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        kind: Kind,
        body: Vec<u8>,
        forwarded: &Forwarded,
        traceparent: Option<&str>,
    ) -> (Result<T, ProxyError>, Option<String>) {
        let Some(url) = self.url(kind) else {
            return (
                Err(ProxyError::Unavailable(format!(
                    "no --proxy-{}-url is configured",
                    kind.as_str()
                ))),
                None,
            );
        };
        let started = Instant::now();
        let span = self.tracing.proxy(kind.as_str(), traceparent);
        let context = span
            .as_ref()
            .map(|s| s.traceparent.clone())
            .filter(|tp| !tp.is_empty());
        let timeout = self.config.proxy_timeout;
        let call = self.round_trip(url, body, forwarded, context.as_deref());
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::Unavailable(format!(
                "no answer within {timeout:?} (--proxy-timeout)"
            ))),
        };
        let result = result.and_then(|raw| {
            serde_json::from_str::<T>(raw.get()).map_err(|e| {
                tracing::warn!(proxy = kind.as_str(), error = %e, "the backend's result is not what the proxy contract says");
                ProxyError::BadAnswer
            })
        });
        let label = match &result {
            Ok(_) => "ok",
            Err(ProxyError::Refused { .. }) => "refused",
            Err(ProxyError::Unavailable(e)) => {
                tracing::warn!(proxy = kind.as_str(), error = %e, "proxy call failed");
                "unavailable"
            }
            Err(ProxyError::BadAnswer) => "bad_answer",
        };
        self.metrics
            .proxy_call(kind.as_str(), label, started.elapsed().as_secs_f64());
        if let Some(span) = span {
            let error = result.as_ref().err().map(|e| e.to_string());
            span.end(error.as_deref());
        }
        (result, context.or_else(|| traceparent.map(str::to_owned)))
    }

    /// One call: a slot, the POST, the answer read (bounded) and split into its
    /// result or refusal. The caller bounds it in time.
    async fn round_trip(
        &self,
        url: &str,
        body: Vec<u8>,
        forwarded: &Forwarded,
        traceparent: Option<&str>,
    ) -> Result<Box<RawValue>, ProxyError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| ProxyError::Unavailable("the node is stopping".into()))?;
        self.metrics.proxy_in_flight.inc();
        let _in_flight = scopeguard(|| {
            self.metrics.proxy_in_flight.dec();
        });
        let mut request = self
            .client
            .post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        for (name, value) in forwarded.0.iter().flatten() {
            request = request.header(name, value);
        }
        if let Some(tp) = traceparent {
            request = request.header("traceparent", tp);
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| ProxyError::Unavailable(e.to_string()))?;
        let status = response.status();
        if status.is_server_error() {
            return Err(ProxyError::Unavailable(format!("HTTP {status}")));
        }
        let mut text = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ProxyError::Unavailable(e.to_string()))?
        {
            if text.len() + chunk.len() > MAX_ANSWER_BYTES {
                tracing::warn!(url, "the backend's answer is over 1 MiB");
                return Err(ProxyError::BadAnswer);
            }
            text.extend_from_slice(&chunk);
        }
        if status != reqwest::StatusCode::OK {
            tracing::warn!(url, %status, "the backend answered a proxy call with a status other than 200");
            return Err(ProxyError::BadAnswer);
        }
        parse_answer(&text).inspect_err(|e| {
            if matches!(e, ProxyError::BadAnswer) {
                tracing::warn!(url, answer = %String::from_utf8_lossy(&text[..text.len().min(200)]), "the backend's answer is not {{\"result\":..}} or {{\"error\":{{\"code\":4000..4999,..}}}}");
            }
        })
    }
}

/// Splits an answer into its result or the application's refusal.
fn parse_answer(text: &[u8]) -> Result<Box<RawValue>, ProxyError> {
    // serde reads a struct from a JSON array too: the answer is an object only.
    if !text.trim_ascii_start().starts_with(b"{") {
        return Err(ProxyError::BadAnswer);
    }
    let answer: Answer = serde_json::from_slice(text).map_err(|_| ProxyError::BadAnswer)?;
    match answer {
        Answer {
            result: Some(result),
            error: None,
        } => Ok(result),
        Answer {
            result: None,
            error: Some(AppError { code, message }),
        } if (4000..=4999).contains(&code) => Err(ProxyError::Refused { code, message }),
        _ => Err(ProxyError::BadAnswer),
    }
}

/// Runs `f` when dropped (a call cancelled by its timeout still gives its slot back
/// and leaves the gauge right).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(
            parse_answer(br#"{"result":{"a":1}}"#).unwrap().get(),
            r#"{"a":1}"#
        );
        assert!(matches!(
            parse_answer(br#"{"error":{"code":4403,"message":"no"}}"#),
            Err(ProxyError::Refused { code: 4403, .. })
        ));
        for bad in [
            &br#"{"error":{"code":403,"message":"no"}}"#[..],
            br#"{"result":{},"error":{"code":4403}}"#,
            br#"{}"#,
            br#"{"result":{},"extra":1}"#,
            b"not json",
            br#"[1]"#,
        ] {
            assert!(
                matches!(parse_answer(bad), Err(ProxyError::BadAnswer)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn only_allowlisted_headers_and_cookies_travel() {
        let config = ProxyConfig {
            proxy_forward_headers: vec!["X-Real-IP".into()],
            proxy_forward_cookies: vec!["sid".into()],
            ..crate::Config::load_from(["wsrelay"]).unwrap().proxy
        };
        let proxy = Proxy::new(&config, Arc::new(Metrics::new()), Tracing::disabled());
        let mut request = HeaderMap::new();
        request.insert("x-real-ip", HeaderValue::from_static("10.0.0.1"));
        request.insert("authorization", HeaderValue::from_static("Bearer x"));
        request.insert(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; sid=abc; other=1"),
        );
        let forwarded = proxy.forwarded(&request);
        let pairs: Vec<(String, String)> = forwarded
            .0
            .iter()
            .flatten()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("x-real-ip".to_owned(), "10.0.0.1".to_owned()),
                ("cookie".to_owned(), "sid=abc".to_owned())
            ]
        );
    }
}
