//! The prompt a RAG answer is generated from: system prompt, as many recent
//! turns as the model's context leaves room for, then the numbered sources with
//! the question.

use crate::chat::records::Role;
use crate::inference::{ChatTokenizer, ModelError};

/// A retrieved passage offered to the model.
#[derive(Debug, Clone)]
pub struct Passage {
    pub title: String,
    pub text: String,
}

pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant. Answer the user's question. When sources are \
given, base the answer on them and cite them by number, like [1]; if they do not contain the answer, say so.";

/// What went into a prompt: the tokens, how many sources and past messages fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    pub sources_used: usize,
    pub history_used: usize,
}

/// Builds the prompt within `budget` tokens (the context minus the room kept for
/// the answer), in the order system prompt, past messages, sources with the
/// question. Room goes first to the question, then to the sources (the
/// lowest-ranked are dropped when they would not fit), then to past messages
/// newest first (oldest dropped first). `history` is in time order. The
/// question itself must fit, or the request is invalid.
pub fn build_prompt(
    tok: &dyn ChatTokenizer,
    system: &str,
    passages: &[Passage],
    history: &[(Role, String)],
    question: &str,
    budget: usize,
) -> Result<Prompt, ModelError> {
    let count =
        |turns: &[(String, String)]| -> Result<usize, ModelError> { Ok(tok.encode(&tok.chat_prompt(turns))?.len()) };
    // The sources go with the question, after the history: the system prompt
    // and the conversation so far stay the same from one turn to the next, so
    // the model's prompt cache prefills only what follows them.
    let question_with = |n: usize| {
        if n == 0 {
            return ("user".to_string(), question.to_string());
        }
        let mut s = String::from("Sources:\n");
        for (i, p) in passages.iter().take(n).enumerate() {
            s.push_str(&format!("[{}] {}\n{}\n\n", i + 1, p.title.trim(), p.text.trim()));
        }
        s.push_str("Question: ");
        s.push_str(question);
        ("user".to_string(), s)
    };
    let head = ("system".to_string(), system.to_string());
    let bare = count(&[head.clone(), question_with(0)])?;
    if bare > budget {
        return Err(ModelError::TooLong(format!(
            "the message is too long: the prompt needs {bare} tokens and the model has room for {budget}"
        )));
    }
    // Sources: as many of the best as fit; history gets what they leave.
    let mut sources_used = passages.len();
    while sources_used > 0 && count(&[head.clone(), question_with(sources_used)])? > budget {
        sources_used -= 1;
    }
    let q = question_with(sources_used);
    // History: one message at a time from the newest, while the whole still fits.
    let mut kept = 0;
    let mut total = count(&[head.clone(), q.clone()])?;
    for (role, text) in history.iter().rev() {
        // The template adds a few tokens per message; count them with the message.
        let one = count(&[(role.as_str().to_string(), text.clone())])?;
        let marker = count(&[])?;
        let cost = one.saturating_sub(marker);
        if total + cost > budget {
            break;
        }
        total += cost;
        kept += 1;
    }
    // Turns must begin with the user: an answer without its question is dropped.
    let mut start = history.len() - kept;
    while start < history.len() && history[start].0 != Role::User {
        start += 1;
    }
    // The per-message costs assume tokens do not merge across message
    // boundaries; if the whole comes out longer, drop the oldest turns again.
    loop {
        let mut turns = vec![head.clone()];
        turns.extend(
            history[start..]
                .iter()
                .map(|(r, t)| (r.as_str().to_string(), t.clone())),
        );
        turns.push(q.clone());
        let tokens = tok.encode(&tok.chat_prompt(&turns))?;
        if tokens.len() <= budget {
            return Ok(Prompt {
                tokens,
                sources_used,
                history_used: history.len() - start,
            });
        }
        if start >= history.len() {
            return Err(ModelError::TooLong(
                "the conversation does not fit the model's context".into(),
            ));
        }
        start += 1;
        while start < history.len() && history[start].0 != Role::User {
            start += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per whitespace-separated word (template markers included).
    struct Words;
    impl ChatTokenizer for Words {
        fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
            Ok(text.split_whitespace().map(|w| w.len() as u32).collect())
        }
        fn decode(&self, _: &[u32]) -> Result<String, ModelError> {
            Ok(String::new())
        }
        fn stop_tokens(&self) -> &[u32] {
            &[]
        }
        fn chat_prompt(&self, messages: &[(String, String)]) -> String {
            let mut p = String::new();
            for (role, content) in messages {
                p.push_str(&format!("<{role}> {content} </> "));
            }
            p.push_str("<assistant>");
            p
        }
    }

    fn words(n: usize, w: &str) -> String {
        vec![w; n].join(" ")
    }

    fn passages() -> Vec<Passage> {
        (0..3)
            .map(|i| Passage {
                title: format!("doc{i}"),
                text: words(20, "fact"),
            })
            .collect()
    }

    #[test]
    fn everything_fits_in_a_large_budget() {
        let history = vec![(Role::User, words(5, "q")), (Role::Assistant, words(5, "a"))];
        let p = build_prompt(&Words, "sys", &passages(), &history, "question now", 1000).expect("prompt");
        assert_eq!((p.sources_used, p.history_used), (3, 2));
    }

    #[test]
    fn oldest_history_goes_first_and_turns_start_with_a_question() {
        let history: Vec<(Role, String)> = (0..10)
            .map(|i| {
                let r = if i % 2 == 0 { Role::User } else { Role::Assistant };
                (r, words(10, &format!("t{i}")))
            })
            .collect();
        let full = build_prompt(&Words, "sys", &[], &history, "q", 10_000).expect("prompt");
        assert_eq!(full.history_used, 10);
        // Room for the head, the question and about three messages of 12 tokens.
        let head = build_prompt(&Words, "sys", &[], &[], "q", 10_000)
            .expect("prompt")
            .tokens
            .len();
        let p = build_prompt(&Words, "sys", &[], &history, "q", head + 3 * 12 + 2).expect("prompt");
        assert_eq!(
            p.history_used, 2,
            "three fit, but the oldest of them is an answer: dropped"
        );
        assert!(p.tokens.len() <= head + 3 * 12 + 2);
    }

    #[test]
    fn low_ranked_sources_are_dropped_when_they_do_not_fit() {
        let head = build_prompt(&Words, "sys", &[], &[], "q", 10_000)
            .expect("prompt")
            .tokens
            .len();
        let p = build_prompt(&Words, "sys", &passages(), &[], "q", head + 50).expect("prompt");
        assert_eq!(p.sources_used, 2, "each source costs 22 tokens");
        let p = build_prompt(&Words, "sys", &passages(), &[], "q", head + 10).expect("prompt");
        assert_eq!(p.sources_used, 0);
    }

    #[test]
    fn the_next_turn_begins_with_this_turns_system_prompt_and_history() {
        let history = vec![(Role::User, words(5, "q")), (Role::Assistant, words(5, "a"))];
        let first = build_prompt(&Words, "sys", &passages(), &history, "first", 1000).expect("prompt");
        let mut next_history = history.clone();
        next_history.push((Role::User, "first".into()));
        next_history.push((Role::Assistant, words(4, "answer")));
        let other: Vec<Passage> = passages().into_iter().rev().collect();
        let next = build_prompt(&Words, "sys", &other, &next_history, "second", 1000).expect("prompt");
        let turns: Vec<(String, String)> = std::iter::once(("system".to_string(), "sys".to_string()))
            .chain(history.iter().map(|(r, t)| (r.as_str().to_string(), t.clone())))
            .collect();
        // Everything up to the assistant marker the template ends with.
        let stable = Words.encode(&Words.chat_prompt(&turns)).expect("encode").len() - 1;
        assert_eq!(next.tokens[..stable], first.tokens[..stable]);
        assert_eq!((first.sources_used, next.sources_used), (3, 3));
        assert!(next.tokens.len() > first.tokens.len());
    }

    #[test]
    fn a_question_longer_than_the_budget_is_refused() {
        let r = build_prompt(&Words, "sys", &[], &[], &words(100, "w"), 50);
        assert!(matches!(r, Err(ModelError::TooLong(_))));
    }
}
