-- Fewer pages per commit. Each B-tree a commit touches costs at least one
-- page in the WAL, fsync'd before AA: the old layout touched eight per
-- message (messages, three of its indexes, an audit row and its two indexes,
-- and sqlite_sequence), about 34 KB of WAL for a 1 KB message.
--
-- * A stored message's audit record lives in its own row (its peer, client
--   subject, pod, ACK code and connectors); `audit_log` keeps only the
--   records of messages that are not in `messages`: refused, resent
--   duplicates, and messages deleted with mllp-cli. The `audit` view shows
--   both, as the one trail it always was.
-- * Duplicate detection looks up one integer (`dedup_key`, the first 8 bytes
--   of the payload's SHA-256) and checks the fields.
-- * No AUTOINCREMENT on messages (nothing refers to messages.id), and no
--   received_at index: retention walks messages in id order, which is
--   arrival order, and stops at the first one inside the window.
--
-- foreign_keys is off while migrations run, so dropping the old table does
-- not cascade into deliveries.
CREATE TABLE messages_slim (
    id             INTEGER PRIMARY KEY,                -- arrival order
    message_id     TEXT    NOT NULL UNIQUE,            -- idempotency key upstream
    received_at    REAL    NOT NULL,                   -- unix seconds
    peer           TEXT    NOT NULL,
    client_subject TEXT,                               -- TLS client certificate subject
    pod            TEXT,
    control_id     TEXT    NOT NULL,                   -- MSH-10
    msg_type       TEXT    NOT NULL,                   -- MSH-9, e.g. ADT^A01
    sending_app    TEXT    NOT NULL,                   -- MSH-3, raw
    sending_fac    TEXT    NOT NULL,                   -- MSH-4, raw
    version        TEXT    NOT NULL,                   -- MSH-12
    charset        TEXT,                               -- MSH-18 or the default used
    size           INTEGER NOT NULL,
    sha256         TEXT    NOT NULL,
    ack_code       TEXT    NOT NULL,
    connectors     TEXT    NOT NULL DEFAULT '',        -- routed to, comma-separated
    dedup_key      INTEGER NOT NULL,
    payload        BLOB    NOT NULL
);

INSERT INTO messages_slim (
    id, message_id, received_at, peer, client_subject, pod, control_id, msg_type,
    sending_app, sending_fac, version, charset, size, sha256, ack_code, connectors,
    dedup_key, payload
)
SELECT
    m.id, m.message_id, m.received_at, m.peer, a.client_subject, a.pod, m.control_id,
    m.msg_type, m.sending_app, m.sending_fac, m.version, m.charset, m.size, m.sha256,
    m.ack_code, COALESCE(a.connectors, ''),
    mllp_dedup_key(m.sha256), m.payload
FROM messages m
LEFT JOIN audit a ON a.id = (
    SELECT MIN(first.id) FROM audit first WHERE first.message_id = m.message_id
);

-- The record each stored message now carries itself.
DELETE FROM audit WHERE id IN (
    SELECT MIN(a.id) FROM audit a JOIN messages m ON m.message_id = a.message_id
    GROUP BY a.message_id
);

DROP TABLE messages;
ALTER TABLE messages_slim RENAME TO messages;
CREATE INDEX messages_dedup ON messages (dedup_key);

CREATE TRIGGER messages_immutable BEFORE UPDATE ON messages
BEGIN
    SELECT RAISE(ABORT, 'audit records are immutable');
END;

DROP TRIGGER audit_immutable;
DROP INDEX audit_message;
ALTER TABLE audit RENAME TO audit_log;
CREATE INDEX audit_log_message ON audit_log (message_id);

CREATE TRIGGER audit_log_immutable BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit records are immutable');
END;

CREATE VIEW audit AS
    SELECT received_at, peer, client_subject, pod, message_id, control_id, msg_type,
           size, sha256, ack_code, NULL AS rule, connectors
    FROM messages
    UNION ALL
    SELECT received_at, peer, client_subject, pod, message_id, control_id, msg_type,
           size, sha256, ack_code, rule, connectors
    FROM audit_log;

CREATE TRIGGER audit_view_immutable INSTEAD OF UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit records are immutable');
END;
