-- CloudChat schema for PostgreSQL (13 or newer).
-- Applied by `python cloudchat.py initdb`; every statement is idempotent, so running it
-- again on a live database is harmless. The embedded SQLite setup carries its own copy of
-- these tables inside cloudchat.py (SQLITE_SCHEMA) and creates them at first start.
-- Times are timestamptz in UTC; the application passes them as parameters so that the same
-- SQL text runs on both databases.

CREATE TABLE IF NOT EXISTS users (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid          uuid NOT NULL UNIQUE,                 -- external id, safe to show
    email        text NOT NULL
                 CHECK (email = lower(btrim(email)) AND length(email) BETWEEN 3 AND 254),
    phone        text UNIQUE                           -- normalised: optional +, digits only
                 CHECK (phone ~ '^\+?[0-9]{5,20}$'),
    display_name text CHECK (length(display_name) <= 64),
    is_active    boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    email_verified_at timestamptz                      -- NULL: never verified
);
-- Emails are stored lower-cased already; the expression index also keeps a hand-written
-- mixed-case row from ever duplicating an address.
CREATE UNIQUE INDEX IF NOT EXISTS users_email_lower_key ON users (lower(email));

-- One row per user and credential type (password, totp, webauthn); OAuth identities may be
-- several per user but each provider account belongs to one user only.
CREATE TABLE IF NOT EXISTS credentials (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    type         text NOT NULL CHECK (type IN ('password', 'totp', 'webauthn', 'oauth')),
    provider     text,
    provider_uid text,
    secret       text,                                 -- e.g. the Argon2id hash
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    confirmed_at timestamptz,                          -- totp: NULL while set up, unconfirmed
    last_step    bigint,                               -- totp: the last time step accepted
    UNIQUE (provider, provider_uid)
);
CREATE UNIQUE INDEX IF NOT EXISTS credentials_user_type_key
    ON credentials (user_id, type) WHERE type <> 'oauth';

-- Durable login sessions. The cookie holds a random id; only its SHA-256 is stored here.
-- Redis caches these rows; this table is the authority (a Redis flush loses nothing).
CREATE TABLE IF NOT EXISTS sessions (
    id_hash      text PRIMARY KEY CHECK (length(id_hash) = 64),
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    user_agent   text,
    ip           text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    last_seen_at timestamptz                           -- written at most once a minute
);
CREATE INDEX IF NOT EXISTS sessions_user_id_idx ON sessions (user_id);
CREATE INDEX IF NOT EXISTS sessions_expires_at_idx ON sessions (expires_at);

-- Password reset tokens: only the SHA-256 of the emailed token, one live token per user
-- (issuing a new one deletes the old), deleted when used.
CREATE TABLE IF NOT EXISTS password_resets (
    token_hash   text PRIMARY KEY CHECK (length(token_hash) = 64),
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS password_resets_user_id_idx ON password_resets (user_id);

-- Development only: the key that signs cookies when SECRET_KEY is unset, made by the first
-- process that needs it. Production sets SECRET_KEY and never reads this table.
CREATE TABLE IF NOT EXISTS server_secrets (
    name         text PRIMARY KEY,
    value        text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The schema's version history (cloudchat.py MIGRATIONS): `initdb` records each version it
-- applies; the server refuses a database older or newer than itself.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version      integer PRIMARY KEY,
    description  text NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now()
);

-- Mailed links that confirm an address: `verify` the account's own, `change` a new one
-- (the account's address becomes `email` when the link is used). Only the SHA-256 of the
-- token; one live token per user and purpose; deleted when used.
CREATE TABLE IF NOT EXISTS email_tokens (
    token_hash   text PRIMARY KEY CHECK (length(token_hash) = 64),
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose      text NOT NULL CHECK (purpose IN ('verify', 'change')),
    email        text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS email_tokens_user_id_idx ON email_tokens (user_id);
CREATE INDEX IF NOT EXISTS email_tokens_expires_at_idx ON email_tokens (expires_at);

-- The audit log: who did what to an account, from where. Never a password, token or
-- cookie. An account's deletion removes its rows (the foreign key cascades, and refuses an
-- event written for it a moment after) and leaves one account_deleted event, whose detail
-- holds the account's id; rows older than AUDIT_RETENTION_DAYS are deleted.
CREATE TABLE IF NOT EXISTS auth_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at   timestamptz NOT NULL DEFAULT now(),
    user_id      bigint REFERENCES users (id) ON DELETE CASCADE, -- NULL: no known account
    event        text NOT NULL,
    detail       text,
    ip           text,
    user_agent   text,
    request_id   text
);
CREATE INDEX IF NOT EXISTS auth_events_user_id_idx ON auth_events (user_id, created_at);
CREATE INDEX IF NOT EXISTS auth_events_created_at_idx ON auth_events (created_at);

-- Two-factor recovery codes: the SHA-256 of each (79 random bits, so no salt or slow hash
-- is needed), shown once at confirmation, deleted when used or replaced.
CREATE TABLE IF NOT EXISTS mfa_recovery_codes (
    code_hash    text PRIMARY KEY CHECK (length(code_hash) = 64),
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS mfa_recovery_codes_user_id_idx ON mfa_recovery_codes (user_id);

-- Chat tokens per UTC day, whose (an account, an anonymous visitor's hashed id, or '' for
-- a chat that kept no history), client address and model: one upsert per answer. The
-- daily budgets count in Redis and are rebuilt from here after a Redis loss. Rows go with
-- their account, and with the cleanup job after AUDIT_RETENTION_DAYS.
CREATE TABLE IF NOT EXISTS chat_usage (
    day          text NOT NULL,                        -- YYYY-MM-DD, UTC
    owner        text NOT NULL,                        -- user:<id> | visitor:<hash> | ''
    user_id      bigint REFERENCES users (id) ON DELETE CASCADE,
    address      text NOT NULL,                        -- IPv6: its IPV6_PREFIX_LENGTH network
    provider     text NOT NULL,
    model        text NOT NULL,
    requests     bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    estimated    bigint NOT NULL,                      -- answers without a usage report
    PRIMARY KEY (day, owner, address, provider, model)
);
CREATE INDEX IF NOT EXISTS chat_usage_user_id_idx ON chat_usage (user_id);
