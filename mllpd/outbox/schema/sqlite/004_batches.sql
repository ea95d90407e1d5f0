-- HL7 batches: which batch (BHS-11) a message came in, and its 1-based
-- position there; NULL for a message sent on its own.
ALTER TABLE messages ADD COLUMN batch_control_id TEXT;
ALTER TABLE messages ADD COLUMN batch_position INTEGER;
ALTER TABLE audit_log ADD COLUMN batch_control_id TEXT;

-- The trail shows the batch too (a view's columns are fixed when it is made).
DROP VIEW audit;
CREATE VIEW audit AS
    SELECT received_at, peer, client_subject, pod, message_id, control_id, msg_type,
           size, sha256, ack_code, NULL AS rule, connectors, batch_control_id
    FROM messages
    UNION ALL
    SELECT received_at, peer, client_subject, pod, message_id, control_id, msg_type,
           size, sha256, ack_code, rule, connectors, batch_control_id
    FROM audit_log;

CREATE TRIGGER audit_view_immutable INSTEAD OF UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit records are immutable');
END;
