-- HL7 batches: which batch (BHS-11) a message came in, and its 1-based
-- position there; NULL for a message sent on its own.
ALTER TABLE messages ADD COLUMN batch_control_id TEXT;
ALTER TABLE messages ADD COLUMN batch_position INTEGER;
ALTER TABLE audit ADD COLUMN batch_control_id TEXT;
