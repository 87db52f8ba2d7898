-- foreign_keys: off
-- 0011: quiet hours and the hourly caps postpone a reply instead of dropping it. A deferred
-- reply waits until `not_before` (when the window opens), then is generated again from the
-- chat's history at that time. SQLite cannot change a CHECK constraint in place, so the table
-- is rebuilt (the runner keeps foreign keys off meanwhile, so review_verdicts keep their rows,
-- and checks every reference before it commits).
CREATE TABLE replies_new (
    reply_id             INTEGER PRIMARY KEY AUTOINCREMENT,
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
INSERT INTO replies_new (reply_id, chat_id, status, mode, trigger_message_id,
    context_message_ids, prompt, draft_text, final_text, error, model_id, adapter_id,
    review_message_id, sent_message_ids, created_at, updated_at, generated_at, sent_at,
    generation_ms)
SELECT reply_id, chat_id, status, mode, trigger_message_id, context_message_ids, prompt,
    draft_text, final_text, error, model_id, adapter_id, review_message_id, sent_message_ids,
    created_at, updated_at, generated_at, sent_at, generation_ms
FROM replies;
-- AUTOINCREMENT never reuses an id, not even one whose row is gone: carry the counter over.
UPDATE sqlite_sequence SET seq = max(seq, coalesce(
    (SELECT seq FROM sqlite_sequence WHERE name = 'replies'), 0)) WHERE name = 'replies_new';
INSERT INTO sqlite_sequence (name, seq)
SELECT 'replies_new', seq FROM sqlite_sequence WHERE name = 'replies'
    AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'replies_new');
DROP TABLE replies;
ALTER TABLE replies_new RENAME TO replies;
CREATE INDEX replies_chat_status ON replies (chat_id, status);
CREATE INDEX replies_review_message ON replies (review_message_id);
CREATE INDEX replies_status_sent_at ON replies (status, sent_at);

-- The owner's message that gave a verdict (a reply to a card), so an answer seen again after a
-- restart is recognised as already acted on.
ALTER TABLE review_verdicts ADD COLUMN source_message_id INTEGER;
