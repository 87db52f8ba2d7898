-- 0012: transcripts of voice and round-video notes, one row per note, keyed like messages.
-- The message keeps its media kind and its caption in `text`; what the note said lives here,
-- so a transcript is always marked as one and never merged into typed text.
-- status: pending (known, not transcribed yet), done (text may be empty), failed (retried up
-- to a few attempts), too_long (over the duration/size limit), unavailable (no audio, e.g. a
-- Desktop export without its files). duration_s/size_bytes come from Telegram or the export
-- before any download; file_path is a local copy (Desktop export) when there is one.
CREATE TABLE transcripts (
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
    PRIMARY KEY (chat_id, message_id)
) WITHOUT ROWID;
CREATE INDEX transcripts_status ON transcripts (status);
