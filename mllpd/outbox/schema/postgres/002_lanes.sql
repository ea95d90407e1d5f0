-- Ordered lanes: every queue row carries its message's order key (`lane`,
-- 8 bytes of a hash; see mllpd.rules.lane_key). A connector with `lanes: N`
-- delivers rows of different keys in parallel and rows of one key in order.
--
-- Rows queued before this version keep key 0: on a connector with more
-- than one lane they are one key among the others, still in queue order
-- (the SQLite migration computes their keys; PostgreSQL has no HL7 parser).
ALTER TABLE deliveries ADD COLUMN lane bigint NOT NULL DEFAULT 0;

-- The queue index gains the key, so the relay's read can leave out rows of
-- busy keys from the index entries.
DROP INDEX deliveries_queue;
CREATE INDEX deliveries_queue ON deliveries (connector, seq, lane)
    WHERE state IN ('pending', 'in_flight', 'dead');
