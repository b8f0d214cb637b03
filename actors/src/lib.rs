//! ragchat core: domain types, the ports (traits) the core needs from the outside
//! world, and — as later issues land — the actors (sessions, ledger, retrieval,
//! model workers) that depend only on those ports. This crate never names a driver.

pub mod admission;
pub mod billing;
pub mod chat;
pub mod domain;
pub mod embed_worker;
pub mod generate_worker;
pub mod index_feed;
pub mod inference;
pub mod knowledge;
pub mod ledger;
pub mod plans;
pub mod ports;
pub mod retrieval;
pub mod supervision;
