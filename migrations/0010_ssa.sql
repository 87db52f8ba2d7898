-- 0010: SSA labelling. A batch samples validation contexts; each (context, source) pair is an
-- item posted blind as a card in Saved Messages; the owner's two marks are its label.
CREATE TABLE ssa_batches (
    batch_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset      TEXT NOT NULL,
    seed         INTEGER NOT NULL,
    n_contexts   INTEGER NOT NULL,
    sources      TEXT NOT NULL DEFAULT '[]',
    created_at   INTEGER NOT NULL
);

CREATE TABLE ssa_items (
    item_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id         INTEGER NOT NULL REFERENCES ssa_batches (batch_id) ON DELETE CASCADE,
    context_key      TEXT NOT NULL,
    source           TEXT NOT NULL,
    position         INTEGER NOT NULL,
    context          TEXT NOT NULL DEFAULT '[]',
    model_input      TEXT NOT NULL,
    reply            TEXT NOT NULL,
    card_message_id  INTEGER UNIQUE,
    posted_at        INTEGER,
    UNIQUE (batch_id, context_key, source)
);
CREATE INDEX ssa_items_batch_position ON ssa_items (batch_id, position);

CREATE TABLE ssa_labels (
    item_id      INTEGER PRIMARY KEY REFERENCES ssa_items (item_id) ON DELETE CASCADE,
    sensible     INTEGER NOT NULL,
    specific     INTEGER NOT NULL,
    raw          TEXT NOT NULL,
    labelled_at  INTEGER NOT NULL
);
