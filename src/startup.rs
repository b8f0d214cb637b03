//! Builds the application from settings: stores, credentials, the HTTP server bound
//! to its listener. Tests bind port 0 and read the port back.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer};

use crate::auth::{PasswordHasher, TokenService};
use crate::config::{Environment, Settings};
use crate::http::{self, AppState};
use crate::stores;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Connect(#[from] stores::ConnectError),
    #[error("cannot bind {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("{0}")]
    Other(String),
}

pub struct Application {
    port: u16,
    server: Server,
    state: AppState,
}

impl Application {
    /// Connects the stores (running migrations), seeds demo users where the
    /// environment allows it, and binds the listener. `handle_signals` installs
    /// SIGTERM/SIGINT handlers for graceful shutdown (the binary; not tests).
    pub async fn build(settings: Settings, handle_signals: bool) -> Result<Self, StartupError> {
        let settings = Arc::new(settings);
        let accounts = stores::connect_accounts(&settings.database).await?;
        let passwords = Arc::new(
            PasswordHasher::new(settings.auth.argon2).map_err(|e| StartupError::Other(e.to_string()))?,
        );
        if settings.seed.demo_users && settings.environment() != Environment::Production {
            let n = crate::accounts::seed_demo_users(accounts.as_ref(), &passwords)
                .await
                .map_err(|e| StartupError::Other(format!("seeding demo users: {e}")))?;
            if n > 0 {
                tracing::info!(created = n, "seeded demo users");
            }
        }
        let state = AppState {
            tokens: Arc::new(TokenService::new(&settings.auth)),
            settings: settings.clone(),
            accounts,
            passwords,
        };
        let addr = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&addr).map_err(|e| StartupError::Bind(addr.clone(), e))?;
        let port = listener.local_addr().map_err(|e| StartupError::Bind(addr, e))?.port();

        let app_state = state.clone();
        let mut server = HttpServer::new(move || {
            App::new().wrap(from_fn(http::request_context)).configure(http::configure(app_state.clone()))
        })
        .shutdown_timeout(settings.server.shutdown_timeout_secs)
        .client_request_timeout(Duration::from_secs(30));
        if settings.server.workers > 0 {
            server = server.workers(settings.server.workers);
        }
        if !handle_signals {
            server = server.disable_signals();
        }
        let server = server.listen(listener).map_err(|e| StartupError::Other(e.to_string()))?.run();
        Ok(Application { port, server, state })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The server future plus a handle to stop it.
    pub fn into_server(self) -> Server {
        self.server
    }

    /// Runs until stopped (SIGTERM/SIGINT when signals are handled): in-flight
    /// requests get `server.shutdown_timeout_secs` to finish.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
