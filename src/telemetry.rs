//! Structured logs with tracing (human-readable in development, JSON in
//! production), and the process's Prometheus recorder with the figures the
//! HTTP layer records as things happen (requests, admission rejections).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::counter;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LoggingSettings;

pub fn init(settings: &LoggingSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    // try_init: tests build several apps in one process; only the first installs.
    let _ = if settings.format == "json" {
        builder.json().flatten_event(true).with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Latency buckets in seconds: 1 ms to 2 minutes (chat answers are long).
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder: installed on first use (None if another
/// recorder was installed first). Histogram buffers are drained every few
/// seconds by a thread of its own.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZES))
                .and_then(|b| b.install_recorder());
            match built {
                Ok(h) => {
                    let upkeep = h.clone();
                    let _ = std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(Duration::from_secs(5));
                            upkeep.run_upkeep();
                        });
                    Some(h)
                }
                Err(e) => {
                    tracing::error!(error = %e, "metrics recorder not installed: /metrics answers 503");
                    None
                }
            }
        })
        .as_ref()
}

/// Records one HTTP request (called by the request middleware).
/// The method as a label: the standard ones, else `other` (a client chooses the
/// method string, and each label value is a new series kept for good).
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

pub fn record_request(method: &str, route: &str, status: u16, seconds: f64) {
    let method = method_label(method);
    let labels = [
        ("method", method.to_string()),
        ("route", route.to_string()),
        ("status", status.to_string()),
    ];
    counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!(
        "http_request_duration_seconds",
        "method" => method.to_string(),
        "route" => route.to_string()
    )
    .record(seconds);
}

/// Records a throttled sign-in or registration, by what it throttles (the part
/// of the key before the account or address: never the account itself).
pub fn record_throttled(key: &str) {
    let kind = match key.split(':').take(2).collect::<Vec<_>>().as_slice() {
        ["login", "ip"] => "login_per_address",
        ["login", "acct"] => "login_per_account",
        ["register", "ip"] => "register_per_address",
        _ => "other",
    };
    counter!("auth_throttled_total", "kind" => kind).increment(1);
}

/// Records a refused admission: the reason and the resource or bucket.
pub fn record_rejection(r: &ragchat_actors::admission::session::Rejection, resource: &str) {
    use ragchat_actors::admission::session::Rejection as R;
    let (reason, what) = match r {
        R::RateLimited { bucket, .. } => ("rate_limited", bucket.as_str().to_string()),
        R::QuotaExceeded { resource, .. } => ("quota_exceeded", resource.as_str().to_string()),
        R::StorageExceeded { .. } => ("storage_exceeded", "storage_mb".to_string()),
        R::Busy { bucket, .. } => ("busy", bucket.as_str().to_string()),
        R::UnknownUser => ("unknown_user", resource.to_string()),
        R::Unavailable(_) => ("unavailable", resource.to_string()),
        R::UsageUnrecordable => ("usage_unrecordable", resource.to_string()),
    };
    counter!("admission_rejections_total", "reason" => reason, "resource" => what).increment(1);
}
