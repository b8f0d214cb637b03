//! ConversationStore contract: the same checks against the embedded SQLite store
//! (always) and ScyllaDB's protocol (Cassandra from scripts/services.sh, when
//! SCYLLA_URL is set).

use std::sync::Arc;

use chrono::{Duration, Utc};
use ragchat::stores::connect_conversations;
use ragchat_actors::chat::records::{to_millis, ChatRecord, ChatSession, Cursor, Role};
use ragchat_actors::domain::Page;
use ragchat_actors::ports::{ConversationStore, StoreError};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::service_url;

async fn sqlite() -> Arc<dyn ConversationStore> {
    let dir = std::env::temp_dir().join("ragchat-tests");
    let _ = std::fs::create_dir_all(&dir);
    let url = format!("sqlite:{}", dir.join(format!("chat-{}.db", Uuid::new_v4())).display());
    connect_conversations(None, "unused", 1, &url)
        .await
        .expect("sqlite store")
}

/// One keyspace per test run is enough: every test writes under fresh user ids.
async fn scylla() -> Option<Arc<dyn ConversationStore>> {
    let nodes = service_url("SCYLLA_URL")?;
    Some(
        connect_conversations(Some(&nodes), "ragchat_contract", 1, "unused")
            .await
            .expect("scylla store"),
    )
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(#[actix_web::test] async fn $name() { super::$name(super::sqlite().await).await; })*
        }
        mod scylla_backend {
            $(#[actix_web::test] async fn $name() {
                if let Some(store) = super::scylla().await { super::$name(store).await; }
            })*
        }
    };
}

contract!(
    a_turn_round_trips_and_updates_its_session,
    messages_page_newest_first_with_a_cursor,
    sessions_list_most_recent_first_and_only_their_owners,
    another_user_cannot_read_append_or_delete,
    deleting_a_session_removes_its_messages,
    a_delete_racing_appends_leaves_no_orphaned_messages,
);

fn new_session(user: Uuid, title: &str, age_s: i64) -> ChatSession {
    let at = to_millis(Utc::now() - Duration::seconds(age_s));
    ChatSession {
        id: Uuid::new_v4(),
        user_id: user,
        title: title.into(),
        created_at: at,
        updated_at: at,
        message_count: 0,
    }
}

/// A question and its answer, `age_s` seconds ago (the answer 1 ms later).
fn turn(session: Uuid, n: usize, age_s: i64) -> Vec<ChatRecord> {
    let at = to_millis(Utc::now() - Duration::seconds(age_s));
    vec![
        ChatRecord {
            id: Uuid::new_v4(),
            session_id: session,
            role: Role::User,
            content: format!("question {n}"),
            created_at: at,
            metadata: json!({}),
        },
        ChatRecord {
            id: Uuid::new_v4(),
            session_id: session,
            role: Role::Assistant,
            content: format!("answer {n} — with ünïcode"),
            created_at: at + Duration::milliseconds(1),
            metadata: json!({"sources": [{"document_id": Uuid::new_v4(), "score": 0.5}], "tokens": 12}),
        },
    ]
}

async fn a_turn_round_trips_and_updates_its_session(store: Arc<dyn ConversationStore>) {
    let user = Uuid::new_v4();
    let s = new_session(user, "What is RAG?", 60);
    store.create_session(&s).await.expect("create");
    assert_eq!(store.session(user, s.id).await.expect("read"), Some(s.clone()));
    let t = turn(s.id, 0, 10);
    store.append(user, s.id, &t).await.expect("append");
    let got = store.messages(user, s.id, None, 10).await.expect("messages");
    assert_eq!(
        got,
        vec![t[1].clone(), t[0].clone()],
        "newest first, equal to what was written"
    );
    let after = store.session(user, s.id).await.expect("read").expect("session");
    assert_eq!(after.message_count, 2);
    assert_eq!(after.updated_at, t[1].created_at);
    assert_eq!(after.created_at, s.created_at);
    // Appending to a session that does not exist is refused and writes nothing.
    let ghost = Uuid::new_v4();
    let r = store.append(user, ghost, &turn(ghost, 1, 0)).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert!(store
        .messages(user, ghost, None, 10)
        .await
        .expect("messages")
        .is_empty());
}

async fn messages_page_newest_first_with_a_cursor(store: Arc<dyn ConversationStore>) {
    let user = Uuid::new_v4();
    let s = new_session(user, "long", 100);
    store.create_session(&s).await.expect("create");
    let mut all = Vec::new();
    for n in 0..7 {
        let t = turn(s.id, n, 90 - n as i64);
        store.append(user, s.id, &t).await.expect("append");
        all.extend(t);
    }
    all.reverse();
    let mut read = Vec::new();
    let mut before = None;
    loop {
        let page = store.messages(user, s.id, before, 4).await.expect("page");
        assert!(page.len() <= 4);
        if page.is_empty() {
            break;
        }
        before = page.last().map(Cursor::of);
        read.extend(page);
    }
    assert_eq!(read, all, "pages cover every message once, newest first");
}

async fn sessions_list_most_recent_first_and_only_their_owners(store: Arc<dyn ConversationStore>) {
    let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
    let old = new_session(user, "old", 300);
    let mid = new_session(user, "mid", 200);
    let new = new_session(user, "new", 100);
    for s in [&old, &mid, &new] {
        store.create_session(s).await.expect("create");
    }
    store
        .create_session(&new_session(other, "theirs", 10))
        .await
        .expect("create");
    // A message in the oldest makes it the most recently active.
    store.append(user, old.id, &turn(old.id, 0, 5)).await.expect("append");
    let (list, total) = store.sessions(user, Page { offset: 0, limit: 10 }).await.expect("list");
    assert_eq!(total, 3);
    let titles: Vec<&str> = list.iter().map(|s| s.title.as_str()).collect();
    assert_eq!(titles, ["old", "new", "mid"]);
    assert_eq!(list[0].message_count, 2);
    let (page, total) = store.sessions(user, Page { offset: 1, limit: 1 }).await.expect("page");
    assert_eq!((page.len(), total), (1, 3));
    assert_eq!(page[0].title, "new");
}

async fn another_user_cannot_read_append_or_delete(store: Arc<dyn ConversationStore>) {
    let (owner, intruder) = (Uuid::new_v4(), Uuid::new_v4());
    let s = new_session(owner, "private", 30);
    store.create_session(&s).await.expect("create");
    store.append(owner, s.id, &turn(s.id, 0, 20)).await.expect("append");
    assert_eq!(store.session(intruder, s.id).await.expect("read"), None);
    assert!(store.messages(intruder, s.id, None, 10).await.expect("read").is_empty());
    let r = store.append(intruder, s.id, &turn(s.id, 1, 10)).await;
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert!(!store.delete_session(intruder, s.id).await.expect("delete"));
    assert_eq!(store.messages(owner, s.id, None, 10).await.expect("read").len(), 2);
    assert_eq!(
        store
            .sessions(intruder, Page { offset: 0, limit: 10 })
            .await
            .expect("list")
            .1,
        0
    );
}

async fn deleting_a_session_removes_its_messages(store: Arc<dyn ConversationStore>) {
    let user = Uuid::new_v4();
    let (a, b) = (new_session(user, "a", 30), new_session(user, "b", 20));
    store.create_session(&a).await.expect("create");
    store.create_session(&b).await.expect("create");
    store.append(user, a.id, &turn(a.id, 0, 10)).await.expect("append");
    store.append(user, b.id, &turn(b.id, 0, 10)).await.expect("append");
    assert!(store.delete_session(user, a.id).await.expect("delete"));
    assert!(!store.delete_session(user, a.id).await.expect("delete again"));
    assert_eq!(store.session(user, a.id).await.expect("read"), None);
    assert!(store.messages(user, a.id, None, 10).await.expect("read").is_empty());
    let (list, total) = store.sessions(user, Page { offset: 0, limit: 10 }).await.expect("list");
    assert_eq!((total, list[0].id), (1, b.id));
    assert_eq!(store.messages(user, b.id, None, 10).await.expect("read").len(), 2);
}

/// Appends and a delete of the same session, at once, many times: afterwards the
/// session is gone and so is every message (none written after the delete's
/// check survives it).
async fn a_delete_racing_appends_leaves_no_orphaned_messages(store: Arc<dyn ConversationStore>) {
    let user = Uuid::new_v4();
    for round in 0..40 {
        let s = new_session(user, "racing", 30);
        store.create_session(&s).await.expect("create");
        let appends = (0..3).map(|n| {
            let (store, records) = (store.clone(), turn(s.id, round * 10 + n, 10 - n as i64));
            async move { store.append(user, s.id, &records).await }
        });
        let delete = async {
            // Let the appends read the session first, now and then.
            if round % 2 == 1 {
                tokio::task::yield_now().await;
            }
            store.delete_session(user, s.id).await.expect("delete")
        };
        let (results, deleted) = futures_util::join!(futures_util::future::join_all(appends), delete);
        assert!(deleted, "round {round}");
        for r in results {
            assert!(matches!(r, Ok(()) | Err(StoreError::NotFound)), "round {round}: {r:?}");
        }
        assert_eq!(store.session(user, s.id).await.expect("read"), None, "round {round}");
        let left = store.messages(user, s.id, None, 100).await.expect("read");
        assert!(left.is_empty(), "round {round}: {} orphaned messages", left.len());
    }
    let (_, total) = store.sessions(user, Page { offset: 0, limit: 10 }).await.expect("list");
    assert_eq!(total, 0);
}
