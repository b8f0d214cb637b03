//! Admission: who may do what, how often, how much — and the record of it.
//!
//! - `session`: the `UserSession` actor, one per active user; its mailbox
//!   serializes the user's accounting (`Admit`, `Complete`, `Release`, storage).
//! - `registry`: finds or starts a user's session, supervises it, and hands out
//!   `Ticket`s (an admitted unit that is recorded once or given back).
//! - `ratelimit`: GCRA, the rate-limit rule (pure).
//! - `quota`: monthly quotas reserved in leases from the store (pure).
//! - `storage`: reservations of document storage (pure).
//! - `users`: user rows cached for a second (shared with authentication).
//! - `logins`: which logins have ended (logout), for the access tokens of each.
//! - `throttle`: limits before authentication (sign-in, registration).

#[cfg(test)]
pub(crate) mod fakes;
pub mod logins;
pub mod quota;
pub mod ratelimit;
pub mod registry;
pub mod session;
pub mod storage;
pub mod throttle;
pub mod users;
