-- The document change feed: one entry per insert, re-chunking or delete, written
-- in the same transaction; every node tails it to keep its search index current.
CREATE TABLE document_changes (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id  BLOB NOT NULL,
    kind         TEXT NOT NULL,
    at           TEXT NOT NULL
);
CREATE INDEX document_changes_by_time ON document_changes (at);
