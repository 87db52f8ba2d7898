-- 0001: the first schema. Times are UTC unix seconds. Chat ids are Telethon's marked peer ids.
-- Booleans are INTEGER 0/1. JSON columns hold arrays of message ids.

-- The owner's own Telegram account (one row).
CREATE TABLE account (
    user_id     INTEGER PRIMARY KEY,
    first_name  TEXT,
    last_name   TEXT,
    username    TEXT,
    phone       TEXT,
    updated_at  INTEGER NOT NULL
);

-- Everyone and everything we have messages with: users, bots, groups, channels.
CREATE TABLE peers (
    peer_id     INTEGER PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('user', 'bot', 'group', 'channel')),
    first_name  TEXT,
    last_name   TEXT,
    title       TEXT,
    username    TEXT,
    is_bot      INTEGER NOT NULL DEFAULT 0,
    is_deleted  INTEGER NOT NULL DEFAULT 0,
    is_contact  INTEGER NOT NULL DEFAULT 0,
    is_self     INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX peers_username ON peers (username COLLATE NOCASE);

-- Every message of every exported/seen chat, keyed by (chat, message id) so re-runs upsert.
CREATE TABLE messages (
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
    PRIMARY KEY (chat_id, message_id)
) WITHOUT ROWID;
CREATE INDEX messages_chat_date ON messages (chat_id, date);

-- Per-chat export progress: the newest id stored, the oldest id reached going back, and
-- whether the walk back reached the start of the history (or the date floor).
CREATE TABLE export_cursors (
    chat_id             INTEGER PRIMARY KEY,
    newest_message_id   INTEGER NOT NULL DEFAULT 0,
    oldest_message_id   INTEGER,
    history_complete    INTEGER NOT NULL DEFAULT 0,
    server_total        INTEGER,
    last_run_at         INTEGER,
    last_error          TEXT
);

-- Replies the bot produced: the lifecycle of each answer, from queued to sent/dropped/failed.
CREATE TABLE replies (
    reply_id             INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id              INTEGER NOT NULL,
    status               TEXT NOT NULL CHECK (status IN (
                             'queued', 'generating', 'awaiting_review', 'sending',
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
    sent_at              INTEGER
);
CREATE INDEX replies_chat_status ON replies (chat_id, status);
CREATE INDEX replies_review_message ON replies (review_message_id);

-- Reactions on messages: the current state per emoji (replaced, never appended).
CREATE TABLE reactions (
    chat_id     INTEGER NOT NULL,
    message_id  INTEGER NOT NULL,
    emoji       TEXT NOT NULL,
    count       INTEGER NOT NULL DEFAULT 1,
    by_owner    INTEGER NOT NULL DEFAULT 0,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (chat_id, message_id, emoji)
) WITHOUT ROWID;

-- The owner's verdicts on drafts (and takeover corrections), with the texts involved.
CREATE TABLE review_verdicts (
    verdict_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    reply_id    INTEGER NOT NULL REFERENCES replies (reply_id) ON DELETE CASCADE,
    verdict     TEXT NOT NULL CHECK (verdict IN (
                    'approved', 'corrected', 'rejected', 'regenerated', 'expired', 'takeover')),
    draft_text  TEXT NOT NULL,
    final_text  TEXT,
    created_at  INTEGER NOT NULL
);
CREATE INDEX review_verdicts_reply ON review_verdicts (reply_id);

-- Per-chat overrides (reply mode) and global bot state (the pause kill switch).
CREATE TABLE chat_settings (
    chat_id     INTEGER PRIMARY KEY,
    reply_mode  TEXT CHECK (reply_mode IN ('auto', 'review', 'off')),
    updated_at  INTEGER NOT NULL
);
CREATE TABLE bot_state (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);

-- Facts about the owner, and their embeddings cached per embedding model.
CREATE TABLE facts (
    fact_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    text        TEXT NOT NULL,
    text_hash   TEXT NOT NULL UNIQUE,
    source      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE fact_embeddings (
    model       TEXT NOT NULL,
    text_hash   TEXT NOT NULL,
    dim         INTEGER NOT NULL,
    vector      BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (model, text_hash)
) WITHOUT ROWID;

-- Fine-tuning runs and the adapters they produced.
CREATE TABLE training_runs (
    run_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    method        TEXT NOT NULL CHECK (method IN ('sft', 'feedback', 'dpo')),
    status        TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed', 'interrupted')),
    base_model    TEXT NOT NULL,
    run_dir       TEXT NOT NULL UNIQUE,
    adapter_path  TEXT,
    dataset_hash  TEXT,
    params        TEXT NOT NULL DEFAULT '{}',
    metrics       TEXT NOT NULL DEFAULT '{}',
    started_at    INTEGER NOT NULL,
    finished_at   INTEGER
);
