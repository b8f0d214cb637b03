-- Conversations of the embedded default (ScyllaDB keeps the same shape: see
-- src/stores/conversations.rs). Times are Unix milliseconds.
CREATE TABLE chat_sessions (
    user_id       BLOB NOT NULL,
    id            BLOB NOT NULL,
    title         TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, id)
);
CREATE INDEX chat_sessions_recent ON chat_sessions (user_id, updated_at DESC);

CREATE TABLE chat_messages (
    user_id    BLOB NOT NULL,
    session_id BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    id         BLOB NOT NULL,
    role       TEXT NOT NULL,
    content    TEXT NOT NULL,
    metadata   TEXT NOT NULL,
    PRIMARY KEY (user_id, session_id, created_at, id)
);
