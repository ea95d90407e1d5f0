-- Ordered lanes: every queue row carries its message's order key (`lane`,
-- 8 bytes of a hash; see mllpd.rules.lane_key). A connector with `lanes: N`
-- delivers rows of different keys in parallel and rows of one key in order.
--
-- The queue index gains the key instead of a second index beside it: the
-- relay's head read skips rows of busy keys on the index alone, and a
-- commit still touches one queue index page per connector.
--
-- Rows still to deliver get the default key (sending application and
-- patient id) of their message; delivered rows keep 0.
ALTER TABLE deliveries ADD COLUMN lane INTEGER NOT NULL DEFAULT 0;

UPDATE deliveries SET lane = (
    SELECT mllp_default_lane(m.payload, m.charset)
    FROM messages m WHERE m.message_id = deliveries.message_id
) WHERE state != 'delivered';

DROP INDEX deliveries_queue;
CREATE INDEX deliveries_queue ON deliveries (connector, state, seq, lane);
