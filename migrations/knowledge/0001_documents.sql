-- Knowledge base for the embedded default. owner is 'user:<uuid>', 'org:<uuid>' or
-- 'global'; an embedding is its f32 values, little-endian, as a BLOB.
CREATE TABLE documents (
    id            BLOB PRIMARY KEY,
    owner         TEXT NOT NULL,
    title         TEXT NOT NULL,
    source        TEXT NOT NULL,
    content_hash  TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',
    chunk_count   INTEGER NOT NULL,
    created_at    TEXT NOT NULL,
    UNIQUE (owner, content_hash)
);
CREATE INDEX documents_by_owner ON documents (owner, created_at);

CREATE TABLE chunks (
    id           BLOB PRIMARY KEY,
    document_id  BLOB NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ordinal      INTEGER NOT NULL,
    content      TEXT NOT NULL,
    embedding    BLOB NOT NULL,
    UNIQUE (document_id, ordinal)
);
