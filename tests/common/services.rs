//! Shared by the test binaries (included with `#[path]`): where the real servers are.

/// A service URL from the environment. When unset the test is skipped with a
/// message on stderr — unless RAGCHAT_REQUIRE_SERVICES=1 (CI), where a missing
/// service fails the test instead of passing silently.
pub fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("RAGCHAT_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!("{var} is not set but RAGCHAT_REQUIRE_SERVICES=1: start it with scripts/services.sh start");
            }
            eprintln!("SKIPPED: {var} not set; start the service with scripts/services.sh start");
            None
        }
    }
}
