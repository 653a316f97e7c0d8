-- The SQLite schema of CloudChat at 66a5f54 (SQLITE_SCHEMA), kept to test upgrades.
CREATE TABLE IF NOT EXISTS users (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    uid          TEXT NOT NULL UNIQUE,
    email        TEXT NOT NULL
                 CHECK (email = lower(trim(email)) AND length(email) BETWEEN 3 AND 254),
    phone        TEXT UNIQUE CHECK (length(phone) BETWEEN 5 AND 21),
    display_name TEXT CHECK (length(display_name) <= 64),
    is_active    INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS users_email_lower_key ON users (lower(email));
CREATE TABLE IF NOT EXISTS credentials (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    type         TEXT NOT NULL CHECK (type IN ('password', 'totp', 'webauthn', 'oauth')),
    provider     TEXT,
    provider_uid TEXT,
    secret       TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    UNIQUE (provider, provider_uid)
);
CREATE UNIQUE INDEX IF NOT EXISTS credentials_user_type_key
    ON credentials (user_id, type) WHERE type <> 'oauth';
CREATE TABLE IF NOT EXISTS sessions (
    id_hash      TEXT PRIMARY KEY CHECK (length(id_hash) = 64),
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    user_agent   TEXT,
    ip           TEXT,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    revoked_at   TEXT
);
CREATE INDEX IF NOT EXISTS sessions_user_id_idx ON sessions (user_id);
CREATE INDEX IF NOT EXISTS sessions_expires_at_idx ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS password_resets (
    token_hash   TEXT PRIMARY KEY CHECK (length(token_hash) = 64),
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS password_resets_user_id_idx ON password_resets (user_id);
