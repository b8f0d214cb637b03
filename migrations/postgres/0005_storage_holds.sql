-- Storage held for uploads in progress, shared by every node (a user's uploads
-- through several nodes at once cannot together pass the plan's storage).
-- A hold counts while it is not released, and after its release for readers
-- whose stored-bytes read began before it (released_epoch > the epoch they read
-- first): the bytes it stood for may not have been in that read.
CREATE TABLE storage_epochs (
    user_id  UUID PRIMARY KEY,
    epoch    BIGINT NOT NULL
);

CREATE TABLE storage_holds (
    id              UUID PRIMARY KEY,
    user_id         UUID NOT NULL,
    bytes           BIGINT NOT NULL CHECK (bytes >= 0),
    created_at      TIMESTAMPTZ NOT NULL,
    released_epoch  BIGINT,
    released_at     TIMESTAMPTZ
);
CREATE INDEX storage_holds_by_user ON storage_holds (user_id);
