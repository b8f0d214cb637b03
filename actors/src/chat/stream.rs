//! The one generation stream: what the model worker sends, read the same way
//! by the chat turn (JSON, SSE, WebSocket) and by the OpenAI-compatible routes.

use tokio::sync::mpsc::UnboundedReceiver;

use crate::generate_worker::{FinishReason, GenEvent};
use crate::inference::ModelError;

/// What a transport writes, in this order: `Sources` once (chat only), `Token`
/// any number of times, then `Done` or `Error`; nothing after.
#[derive(Debug)]
pub enum Event<D, E> {
    Sources(serde_json::Value),
    Token(String),
    Done(D),
    Error(E),
}

/// The end of a generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub first_token_ms: f64,
    /// Prompt tokens the model's prompt cache held (not prefilled).
    pub cached_tokens: usize,
}

/// One step of a generation, as read from the worker.
#[derive(Debug)]
pub enum Step {
    Text(String),
    Done(Finish),
    Failed(ModelError),
}

/// The worker's events for one request.
pub struct Generation {
    events: UnboundedReceiver<GenEvent>,
}

impl Generation {
    pub fn new(events: UnboundedReceiver<GenEvent>) -> Self {
        Generation { events }
    }

    /// The next step; empty text (held back by the worker) is skipped. A worker
    /// that goes away without an answer is a failure.
    pub async fn next(&mut self) -> Step {
        loop {
            return match self.events.recv().await {
                Some(GenEvent::Token { text }) if text.is_empty() => continue,
                Some(GenEvent::Token { text }) => Step::Text(text),
                Some(GenEvent::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    first_token_ms,
                    cached_tokens,
                }) => Step::Done(Finish {
                    reason: finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    first_token_ms,
                    cached_tokens,
                }),
                Some(GenEvent::Error(e)) => Step::Failed(e),
                None => Step::Failed(ModelError::Unavailable("generation ended without an answer".into())),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc::unbounded_channel;

    use super::*;

    #[tokio::test]
    async fn empty_text_is_skipped_and_a_vanished_worker_is_a_failure() {
        let (tx, rx) = unbounded_channel();
        let mut g = Generation::new(rx);
        let _ = tx.send(GenEvent::Token { text: String::new() });
        let _ = tx.send(GenEvent::Token { text: "hi".into() });
        let _ = tx.send(GenEvent::Error(ModelError::TooLong("too long".into())));
        drop(tx);
        assert!(matches!(g.next().await, Step::Text(t) if t == "hi"));
        assert!(matches!(g.next().await, Step::Failed(ModelError::TooLong(_))));
        assert!(matches!(g.next().await, Step::Failed(ModelError::Unavailable(_))));
    }
}
