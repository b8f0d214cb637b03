//! Conversations as they are stored: sessions, messages and the cursor that
//! pages through them.

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            _ => Err(()),
        }
    }
}

/// One conversation of one user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatSession {
    pub id: Uuid,
    pub user_id: Uuid,
    /// The start of the first question.
    pub title: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub message_count: u64,
}

/// One message of a conversation. Times are kept to the millisecond (what every
/// store holds), so a message reads back equal to what was written.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatRecord {
    pub id: Uuid,
    pub session_id: Uuid,
    pub role: Role,
    pub content: String,
    pub created_at: DateTime<Utc>,
    /// Sources, token counts, whether the answer was cancelled.
    pub metadata: serde_json::Value,
}

/// The metadata key of a question's text as the model read it (with its
/// sources): internal, replayed in later prompts, left out of the API's views.
pub const PROMPT_MESSAGE: &str = "prompt_message";

/// `t` cut to whole milliseconds.
pub fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(t.timestamp_millis()).single().unwrap_or(t)
}

/// Where a page of messages starts: strictly older than this message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    pub fn of(m: &ChatRecord) -> Cursor {
        Cursor {
            at: m.created_at,
            id: m.id,
        }
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{}", self.at.timestamp_millis(), self.id.simple())
    }
}

impl std::str::FromStr for Cursor {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, id) = s.split_once('_').ok_or(())?;
        let ms: i64 = ms.parse().map_err(|_| ())?;
        Ok(Cursor {
            at: Utc.timestamp_millis_opt(ms).single().ok_or(())?,
            id: id.parse().map_err(|_| ())?,
        })
    }
}

/// The title of a new session: the first words of its first question.
pub fn title_of(question: &str) -> String {
    const MAX: usize = 80;
    let flat = question.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= MAX {
        return flat;
    }
    let cut: String = flat.chars().take(MAX).collect();
    let cut = cut.rsplit_once(' ').map(|(a, _)| a.to_string()).unwrap_or(cut);
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_and_titles() {
        let c = Cursor {
            at: to_millis(Utc::now()),
            id: Uuid::new_v4(),
        };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        assert!("nonsense".parse::<Cursor>().is_err());
        assert_eq!(title_of("  What is   the  answer? "), "What is the answer?");
        let long = title_of(&vec!["word"; 40].join(" "));
        assert!(long.ends_with('…') && long.chars().count() <= 81, "{long}");
    }
}
