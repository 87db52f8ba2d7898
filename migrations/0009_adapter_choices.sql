-- 0009: which LoRA adapter the bot serves, as an append-only history.
-- The newest row is the current choice; previous_choice_id points at the choice it replaced,
-- so `doppelbot adapter rollback` walks back one step at a time and nothing is ever lost.
CREATE TABLE adapter_choices (
    choice_id           INTEGER PRIMARY KEY AUTOINCREMENT,
    adapter_path        TEXT NOT NULL,
    adapter_name        TEXT NOT NULL,
    heldout_loss        REAL,
    forced              INTEGER NOT NULL DEFAULT 0,
    reason              TEXT NOT NULL CHECK (reason IN ('use', 'rollback')),
    previous_choice_id  INTEGER REFERENCES adapter_choices (choice_id),
    chosen_at           INTEGER NOT NULL
);
