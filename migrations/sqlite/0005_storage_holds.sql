-- (SQLite types: see 0001.) Storage held for uploads in progress, shared by every node (a user's uploads
-- through several nodes at once cannot together pass the plan's storage).
-- A hold counts while it is not released, and after its release for readers
-- whose stored-bytes read began before it (released_epoch > the epoch they read
-- first): the bytes it stood for may not have been in that read.
CREATE TABLE storage_epochs (
    user_id  BLOB PRIMARY KEY,
    epoch    INTEGER NOT NULL
);

CREATE TABLE storage_holds (
    id              BLOB PRIMARY KEY,
    user_id         BLOB NOT NULL,
    bytes           INTEGER NOT NULL CHECK (bytes >= 0),
    created_at      TEXT NOT NULL,
    released_epoch  INTEGER,
    released_at     TEXT
);
CREATE INDEX storage_holds_by_user ON storage_holds (user_id);
