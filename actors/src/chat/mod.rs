//! Chat: answers from the knowledge base, with sources, in a conversation.
//!
//! - `records`: sessions and messages as the `ConversationStore` keeps them;
//! - `grounding`: which source sentences support an answer (quotes,
//!   confidence);
//! - `prompt`: the prompt within the model's context (sources, then turns);
//! - `stream`: the one generation stream every transport reads (`Event`);
//! - `turn`: the chat turn as a service: validate, read the conversation,
//!   retrieve, build the prompt, generate, store the question and the answer,
//!   record usage once (`ChatService::start` → `Turn`).
//!
//! The transports (HTTP JSON, SSE, WebSocket in the `ragchat` crate) parse a
//! request, call `ChatService::start` with an admitted `Ticket`, and write the
//! events of the `Turn` as frames.

pub mod grounding;
pub mod prompt;
pub mod records;
pub mod stream;
pub mod turn;
