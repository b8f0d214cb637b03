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
    /// The question as the model read it: with its sources, when it had any.
    /// Stored with the question, it stands for it in the next turns' history.
    pub question_message: String,
}

/// Builds the prompt within `budget` tokens (the context minus the room kept for
/// the answer), in the order system prompt, past messages, sources with the
/// question. Room goes first to the question, then to the sources (the
/// lowest-ranked are dropped when they would not fit), then to past messages.
/// `history` is in time order; a past question may carry the sources it was
/// asked with ([`Prompt::question_message`], stored with it), so that a turn's
/// prompt begins with the whole previous one and the model's prompt cache
/// prefills only what is new. The question itself must fit, or the request is
/// invalid.
///
/// Which past messages: the history is cut into windows of at most
/// `history_tokens` tokens (0: the budget), from the oldest message read, each
/// beginning with a question; the prompt holds the newest window. A new turn
/// joins the last window, or starts the next one when it would not fit: then,
/// and only then, the prompt stops beginning with the previous one. (Keeping the
/// newest messages that fit would drop one more old message every turn, and
/// change the start of every prompt.) Should the window and the question still
/// not fit the budget, its oldest turns are dropped.
pub fn build_prompt(
    tok: &dyn ChatTokenizer,
    system: &str,
    passages: &[Passage],
    history: &[(Role, String)],
    question: &str,
    budget: usize,
    history_tokens: usize,
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
    // History: the newest window (see above). The template adds a few tokens per
    // message; they are counted with the message.
    let marker = count(&[])?;
    let limit = if history_tokens == 0 {
        budget
    } else {
        history_tokens.min(budget)
    };
    let mut start = 0;
    let mut window = 0;
    let mut i = 0;
    while i < history.len() {
        // A question with the answers that follow it: one turn.
        let mut end = i + 1;
        while end < history.len() && history[end].0 != Role::User {
            end += 1;
        }
        let mut cost = 0;
        for (role, text) in &history[i..end] {
            cost += count(&[(role.as_str().to_string(), text.clone())])?.saturating_sub(marker);
        }
        if window > 0 && window + cost > limit {
            start = i;
            window = 0;
        }
        window += cost;
        i = end;
    }
    // Turns must begin with the user: an answer without its question is dropped.
    while start < history.len() && history[start].0 != Role::User {
        start += 1;
    }
    // The window and the question may not fit together (and the per-message
    // costs assume tokens do not merge across message boundaries): drop the
    // oldest turns until the whole fits.
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
                question_message: q.1,
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
        let p = build_prompt(&Words, "sys", &passages(), &history, "question now", 1000, 0).expect("prompt");
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
        let full = build_prompt(&Words, "sys", &[], &history, "q", 10_000, 0).expect("prompt");
        assert_eq!(full.history_used, 10);
        // Room for the head, the question and about three messages of 12 tokens.
        let head = build_prompt(&Words, "sys", &[], &[], "q", 10_000, 0)
            .expect("prompt")
            .tokens
            .len();
        let p = build_prompt(&Words, "sys", &[], &history, "q", head + 3 * 12 + 2, 0).expect("prompt");
        assert_eq!(
            p.history_used, 2,
            "three fit, but the oldest of them is an answer: dropped"
        );
        assert!(p.tokens.len() <= head + 3 * 12 + 2);
    }

    #[test]
    fn low_ranked_sources_are_dropped_when_they_do_not_fit() {
        let head = build_prompt(&Words, "sys", &[], &[], "q", 10_000, 0)
            .expect("prompt")
            .tokens
            .len();
        let p = build_prompt(&Words, "sys", &passages(), &[], "q", head + 50, 0).expect("prompt");
        assert_eq!(p.sources_used, 2, "each source costs 22 tokens");
        let p = build_prompt(&Words, "sys", &passages(), &[], "q", head + 10, 0).expect("prompt");
        assert_eq!(p.sources_used, 0);
    }

    #[test]
    fn the_next_turn_begins_with_this_turns_system_prompt_and_history() {
        let history = vec![(Role::User, words(5, "q")), (Role::Assistant, words(5, "a"))];
        let first = build_prompt(&Words, "sys", &passages(), &history, "first", 1000, 0).expect("prompt");
        let mut next_history = history.clone();
        next_history.push((Role::User, "first".into()));
        next_history.push((Role::Assistant, words(4, "answer")));
        let other: Vec<Passage> = passages().into_iter().rev().collect();
        let next = build_prompt(&Words, "sys", &other, &next_history, "second", 1000, 0).expect("prompt");
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
    fn a_turn_begins_with_the_whole_previous_prompt_until_its_window_is_full() {
        // Each past question replayed as the model read it, sources included; a turn
        // is 78 tokens here, so a window of 200 holds two.
        let mut history: Vec<(Role, String)> = Vec::new();
        let mut previous: Option<Vec<u32>> = None;
        let (mut kept, mut restarted) = (Vec::new(), Vec::new());
        for turn in 0..8 {
            let question = format!("question {turn}");
            let p = build_prompt(&Words, "sys", &passages(), &history, &question, 10_000, 200).expect("prompt");
            assert!(p.question_message.starts_with("Sources:") && p.question_message.ends_with(&question));
            if let Some(prev) = &previous {
                if p.tokens.starts_with(prev) {
                    kept.push(turn);
                } else {
                    restarted.push(turn);
                    assert_eq!(p.history_used, 2, "a new window holds the previous turn");
                }
            }
            history.push((Role::User, p.question_message.clone()));
            history.push((Role::Assistant, words(4, "answer")));
            previous = Some(p.tokens);
        }
        assert_eq!(kept, [1, 2, 4, 6]);
        assert_eq!(restarted, [3, 5, 7]);
        // Without a window of its own the history fills the budget.
        let p = build_prompt(&Words, "sys", &passages(), &history, "q", 10_000, 0).expect("prompt");
        assert_eq!(p.history_used, history.len());
    }

    #[test]
    fn a_question_longer_than_the_budget_is_refused() {
        let r = build_prompt(&Words, "sys", &[], &[], &words(100, "w"), 50, 0);
        assert!(matches!(r, Err(ModelError::TooLong(_))));
    }
}
