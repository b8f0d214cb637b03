//! Integration tests: the real server on port 0, spoken to over HTTP.
//! One test binary (faster to link on small machines) with a module per area.

mod account_store;
mod admin;
mod auth;
mod balancer;
mod billing;
mod chat;
mod cli;
mod conversation_store;
mod document_store;
mod errors;
mod fault_proxy;
mod helpers;
mod knowledge;
mod ledger;
mod memory;
mod metrics;
mod models;
mod nodes;
mod reindex;
mod remote_inference;
mod scopes;
mod storage_holds;
mod upgrades;
mod uploads;
