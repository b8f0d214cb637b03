//! Structured logs with tracing: human-readable in development, JSON in production.

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
