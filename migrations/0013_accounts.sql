-- foreign_keys: off
-- 0013: several own Telegram accounts in one database. Private-chat message ids are counted per
-- account, so (chat id, message id) is not unique across accounts: every table holding one
-- account's history or bot state gets an `account_id` first in its key. The single `account`
-- row becomes account 1, named 'default', and every existing row belongs to it. The tables are
-- rebuilt (a key cannot change in place); the runner keeps foreign keys off meanwhile, so
-- review verdicts and SSA labels keep their rows, and checks every reference before it commits.
-- Shared by all accounts (one doppelganger): facts and embeddings, training runs, adapter
-- choices, SSA batches and labels.

-- Own accounts: the name is what `--account NAME` says; the Telegram user is known once logged
-- in (or once a Desktop export says who it is). One Telegram user is one account.
CREATE TABLE accounts (
    account_id  INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    user_id     INTEGER UNIQUE,
    first_name  TEXT,
    last_name   TEXT,
    username    TEXT,
    phone       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
INSERT INTO accounts (account_id, name, created_at, updated_at)
VALUES (1, 'default', CAST(strftime('%s', 'now') AS INTEGER),
        CAST(strftime('%s', 'now') AS INTEGER));
-- `account` was keyed by user id and read newest first: its newest row is who the default is.
UPDATE accounts SET (user_id, first_name, last_name, username, phone, updated_at) = (
    SELECT user_id, first_name, last_name, username, phone, updated_at FROM account
    ORDER BY updated_at DESC, user_id DESC LIMIT 1)
WHERE account_id = 1 AND EXISTS (SELECT 1 FROM account);
DROP TABLE account;

CREATE TABLE peers_new (
    account_id  INTEGER NOT NULL REFERENCES accounts (account_id),
    peer_id     INTEGER NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('user', 'bot', 'group', 'channel')),
    first_name  TEXT,
    last_name   TEXT,
    title       TEXT,
    username    TEXT,
    is_bot      INTEGER NOT NULL DEFAULT 0,
    is_deleted  INTEGER NOT NULL DEFAULT 0,
    is_contact  INTEGER NOT NULL DEFAULT 0,
    is_self     INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, peer_id)
);
INSERT INTO peers_new (account_id, peer_id, kind, first_name, last_name, title, username, is_bot,
    is_deleted, is_contact, is_self, updated_at)
SELECT 1, peer_id, kind, first_name, last_name, title, username, is_bot, is_deleted, is_contact,
    is_self, updated_at FROM peers;
DROP TABLE peers;
ALTER TABLE peers_new RENAME TO peers;
CREATE INDEX peers_username ON peers (account_id, username COLLATE NOCASE);

CREATE TABLE messages_new (
    account_id          INTEGER NOT NULL REFERENCES accounts (account_id),
    chat_id             INTEGER NOT NULL,
    message_id          INTEGER NOT NULL,
    sender_id           INTEGER,
    is_outgoing         INTEGER NOT NULL DEFAULT 0,
    date                INTEGER NOT NULL,
    edit_date           INTEGER,
    text                TEXT NOT NULL DEFAULT '',
    reply_to_message_id INTEGER,
    is_forwarded        INTEGER NOT NULL DEFAULT 0,
    forwarded_from      TEXT,
    media_kind          TEXT,
    sticker_emoji       TEXT,
    grouped_id          INTEGER,
    service_action      TEXT,
    PRIMARY KEY (account_id, chat_id, message_id)
) WITHOUT ROWID;
INSERT INTO messages_new (account_id, chat_id, message_id, sender_id, is_outgoing, date,
    edit_date, text, reply_to_message_id, is_forwarded, forwarded_from, media_kind,
    sticker_emoji, grouped_id, service_action)
SELECT 1, chat_id, message_id, sender_id, is_outgoing, date, edit_date, text,
    reply_to_message_id, is_forwarded, forwarded_from, media_kind, sticker_emoji, grouped_id,
    service_action FROM messages ORDER BY chat_id, message_id;
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;
CREATE INDEX messages_chat_date ON messages (account_id, chat_id, date);

CREATE TABLE export_cursors_new (
    account_id          INTEGER NOT NULL REFERENCES accounts (account_id),
    chat_id             INTEGER NOT NULL,
    newest_message_id   INTEGER NOT NULL DEFAULT 0,
    oldest_message_id   INTEGER,
    history_complete    INTEGER NOT NULL DEFAULT 0,
    server_total        INTEGER,
    last_run_at         INTEGER,
    last_error          TEXT,
    PRIMARY KEY (account_id, chat_id)
);
INSERT INTO export_cursors_new (account_id, chat_id, newest_message_id, oldest_message_id,
    history_complete, server_total, last_run_at, last_error)
SELECT 1, chat_id, newest_message_id, oldest_message_id, history_complete, server_total,
    last_run_at, last_error FROM export_cursors;
DROP TABLE export_cursors;
ALTER TABLE export_cursors_new RENAME TO export_cursors;

-- Reply ids stay global (review verdicts point at them); the account says whose bot made it.
CREATE TABLE replies_new (
    reply_id             INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id           INTEGER NOT NULL REFERENCES accounts (account_id),
    chat_id              INTEGER NOT NULL,
    status               TEXT NOT NULL CHECK (status IN (
                             'queued', 'deferred', 'generating', 'awaiting_review', 'sending',
                             'sent', 'dropped', 'failed', 'expired')),
    mode                 TEXT NOT NULL CHECK (mode IN ('auto', 'review', 'off')),
    trigger_message_id   INTEGER NOT NULL,
    context_message_ids  TEXT NOT NULL DEFAULT '[]',
    prompt               TEXT,
    draft_text           TEXT,
    final_text           TEXT,
    error                TEXT,
    model_id             TEXT,
    adapter_id           TEXT,
    review_message_id    INTEGER,
    sent_message_ids     TEXT NOT NULL DEFAULT '[]',
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    generated_at         INTEGER,
    sent_at              INTEGER,
    generation_ms        INTEGER,
    not_before           INTEGER
);
INSERT INTO replies_new (reply_id, account_id, chat_id, status, mode, trigger_message_id,
    context_message_ids, prompt, draft_text, final_text, error, model_id, adapter_id,
    review_message_id, sent_message_ids, created_at, updated_at, generated_at, sent_at,
    generation_ms, not_before)
SELECT reply_id, 1, chat_id, status, mode, trigger_message_id, context_message_ids, prompt,
    draft_text, final_text, error, model_id, adapter_id, review_message_id, sent_message_ids,
    created_at, updated_at, generated_at, sent_at, generation_ms, not_before
FROM replies;
-- AUTOINCREMENT never reuses an id, not even one whose row is gone: carry the counter over.
UPDATE sqlite_sequence SET seq = max(seq, coalesce(
    (SELECT seq FROM sqlite_sequence WHERE name = 'replies'), 0)) WHERE name = 'replies_new';
INSERT INTO sqlite_sequence (name, seq)
SELECT 'replies_new', seq FROM sqlite_sequence WHERE name = 'replies'
    AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'replies_new');
DROP TABLE replies;
DELETE FROM sqlite_sequence WHERE name = 'replies';
ALTER TABLE replies_new RENAME TO replies;
CREATE INDEX replies_chat_status ON replies (account_id, chat_id, status);
CREATE INDEX replies_review_message ON replies (account_id, review_message_id);
CREATE INDEX replies_status_sent_at ON replies (account_id, status, sent_at);

CREATE TABLE reactions_new (
    account_id  INTEGER NOT NULL REFERENCES accounts (account_id),
    chat_id     INTEGER NOT NULL,
    message_id  INTEGER NOT NULL,
    emoji       TEXT NOT NULL,
    count       INTEGER NOT NULL DEFAULT 1,
    by_owner    INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, chat_id, message_id, emoji)
) WITHOUT ROWID;
INSERT INTO reactions_new (account_id, chat_id, message_id, emoji, count, by_owner, updated_at)
SELECT 1, chat_id, message_id, emoji, count, by_owner, updated_at FROM reactions;
DROP TABLE reactions;
ALTER TABLE reactions_new RENAME TO reactions;

CREATE TABLE chat_settings_new (
    account_id  INTEGER NOT NULL REFERENCES accounts (account_id),
    chat_id     INTEGER NOT NULL,
    reply_mode  TEXT CHECK (reply_mode IN ('auto', 'review', 'off')),
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, chat_id)
);
INSERT INTO chat_settings_new (account_id, chat_id, reply_mode, updated_at)
SELECT 1, chat_id, reply_mode, updated_at FROM chat_settings;
DROP TABLE chat_settings;
ALTER TABLE chat_settings_new RENAME TO chat_settings;

-- The pause switch, runtime mode, health, catch-up and Saved Messages position of each
-- account's bot: two accounts' bots run (and are paused) independently.
CREATE TABLE bot_state_new (
    account_id  INTEGER NOT NULL REFERENCES accounts (account_id),
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, key)
);
INSERT INTO bot_state_new (account_id, key, value, updated_at)
SELECT 1, key, value, updated_at FROM bot_state;
DROP TABLE bot_state;
ALTER TABLE bot_state_new RENAME TO bot_state;

CREATE TABLE transcripts_new (
    account_id   INTEGER NOT NULL REFERENCES accounts (account_id),
    chat_id      INTEGER NOT NULL,
    message_id   INTEGER NOT NULL,
    status       TEXT NOT NULL CHECK (status IN (
                     'pending', 'done', 'failed', 'too_long', 'unavailable')),
    text         TEXT NOT NULL DEFAULT '',
    language     TEXT,
    model        TEXT,
    duration_s   REAL,
    size_bytes   INTEGER,
    file_path    TEXT,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    seconds      REAL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (account_id, chat_id, message_id)
) WITHOUT ROWID;
INSERT INTO transcripts_new (account_id, chat_id, message_id, status, text, language, model,
    duration_s, size_bytes, file_path, error, attempts, seconds, created_at, updated_at)
SELECT 1, chat_id, message_id, status, text, language, model, duration_s, size_bytes,
    file_path, error, attempts, seconds, created_at, updated_at FROM transcripts;
DROP TABLE transcripts;
ALTER TABLE transcripts_new RENAME TO transcripts;
CREATE INDEX transcripts_status ON transcripts (account_id, status);

-- An SSA card is a message in the Saved Messages of the account that posted it: its id is
-- unique within that account only. `account_id` is set together with `card_message_id`.
CREATE TABLE ssa_items_new (
    item_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id         INTEGER NOT NULL REFERENCES ssa_batches (batch_id) ON DELETE CASCADE,
    context_key      TEXT NOT NULL,
    source           TEXT NOT NULL,
    position         INTEGER NOT NULL,
    context          TEXT NOT NULL DEFAULT '[]',
    model_input      TEXT NOT NULL,
    reply            TEXT NOT NULL,
    account_id       INTEGER REFERENCES accounts (account_id),
    card_message_id  INTEGER,
    posted_at        INTEGER,
    UNIQUE (batch_id, context_key, source),
    UNIQUE (account_id, card_message_id),
    CHECK ((account_id IS NULL) = (card_message_id IS NULL))
);
INSERT INTO ssa_items_new (item_id, batch_id, context_key, source, position, context,
    model_input, reply, account_id, card_message_id, posted_at)
SELECT item_id, batch_id, context_key, source, position, context, model_input, reply,
    CASE WHEN card_message_id IS NULL THEN NULL ELSE 1 END, card_message_id, posted_at
FROM ssa_items;
UPDATE sqlite_sequence SET seq = max(seq, coalesce(
    (SELECT seq FROM sqlite_sequence WHERE name = 'ssa_items'), 0)) WHERE name = 'ssa_items_new';
INSERT INTO sqlite_sequence (name, seq)
SELECT 'ssa_items_new', seq FROM sqlite_sequence WHERE name = 'ssa_items'
    AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'ssa_items_new');
DROP TABLE ssa_items;
DELETE FROM sqlite_sequence WHERE name = 'ssa_items';
ALTER TABLE ssa_items_new RENAME TO ssa_items;
CREATE INDEX ssa_items_batch_position ON ssa_items (batch_id, position);
