-- 0007: the responder's bookkeeping. How long each generation took (status and benchmarks
-- report it) and an index for the hourly caps, which count recent sends on every reply.
ALTER TABLE replies ADD COLUMN generation_ms INTEGER;
CREATE INDEX replies_status_sent_at ON replies (status, sent_at);
