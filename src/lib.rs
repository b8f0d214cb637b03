//! ragchat: the edges of the server — configuration, HTTP, authentication and the
//! store adapters. The core (actors, domain rules, ports) is the `ragchat-actors` crate.

pub mod accounts;
pub mod auth;
pub mod config;
pub mod error;
pub mod http;
pub mod inference;
pub mod knowledge;
pub mod memory;
pub mod models;
pub mod payments;
pub mod startup;
pub mod stores;
pub mod telemetry;
