-- Per-connector FIFO queues and dead-letter queues: one row per (message,
-- connector) that the message was routed to, written in the same transaction
-- as the message. seq is the queue order; a replay re-queues a dead row at
-- the tail with a new seq.
CREATE TABLE deliveries (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   TEXT    NOT NULL REFERENCES messages (message_id) ON DELETE CASCADE,
    connector    TEXT    NOT NULL,
    state        TEXT    NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'in_flight', 'delivered', 'dead')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    next_attempt REAL    NOT NULL DEFAULT 0,  -- unix seconds
    updated_at   REAL    NOT NULL             -- unix seconds of the last change
);

CREATE INDEX deliveries_queue ON deliveries (connector, state, seq);
CREATE INDEX deliveries_message ON deliveries (message_id);

-- One immutable record per received message, accepted or not: when, from
-- whom, what, and what was decided. No content.
CREATE TABLE audit (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at    REAL    NOT NULL,
    peer           TEXT    NOT NULL,
    client_subject TEXT,                 -- TLS client certificate subject
    pod            TEXT,
    message_id     TEXT,                 -- the stored message (NULL when not stored)
    control_id     TEXT    NOT NULL,
    msg_type       TEXT    NOT NULL,
    size           INTEGER NOT NULL,
    sha256         TEXT    NOT NULL,
    ack_code       TEXT    NOT NULL,
    rule           TEXT,                 -- the rule that rejected it
    connectors     TEXT    NOT NULL      -- routed to, comma-separated; '' for none
);

CREATE INDEX audit_received_at ON audit (received_at);
CREATE INDEX audit_message ON audit (message_id);

CREATE TRIGGER audit_immutable BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit records are immutable');
END;
