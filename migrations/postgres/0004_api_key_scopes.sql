-- What each API key may do: scope names separated by spaces (chat, search, ingest, admin).
-- Keys made before scopes existed keep what they could do, less the admin routes.
ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT 'chat search ingest';
