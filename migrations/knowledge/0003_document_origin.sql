-- How a document reached the knowledge base: 'api', 'upload:<format>' or 'seed';
-- '' for documents stored before this was recorded.
ALTER TABLE documents ADD COLUMN origin TEXT NOT NULL DEFAULT '';
