-- The shared outbox of a cluster of mllpd replicas. Sized for the receive
-- path: a stored message is one messages row (its audit record included)
-- plus one deliveries row per connector it was routed to.

-- Every accepted message, exactly as received, with its audit record.
-- Rows are never updated except to retire a dedup_key (see below).
CREATE TABLE messages (
    message_id     text             PRIMARY KEY,        -- idempotency key upstream
    -- 8 bytes of a hash of MSH-10, MSH-3, MSH-4 and the payload's SHA-256
    -- (mllpd.outbox.dedup_key, as in SQLite): one integer per message for cross-replica duplicate detection,
    -- always verified against the row's own columns. NULL when dedup is
    -- off, or once a later message past the dedup window took the key.
    dedup_key      bigint,
    received_at    double precision NOT NULL,           -- unix seconds
    peer           text             NOT NULL,
    client_subject text,                                -- TLS client certificate subject
    pod            text,                                -- the replica that received it
    control_id     text             NOT NULL,           -- MSH-10
    msg_type       text             NOT NULL,           -- MSH-9
    sending_app    text             NOT NULL,           -- MSH-3, raw
    sending_fac    text             NOT NULL,           -- MSH-4, raw
    version        text             NOT NULL,           -- MSH-12
    charset        text,
    size           integer          NOT NULL,
    sha256         text             NOT NULL,
    ack_code       text             NOT NULL,
    connectors     text             NOT NULL,           -- routed to, comma-separated
    payload        bytea            NOT NULL,
    batch_control_id text,                              -- BHS-11, when it came in a batch
    batch_position   integer                            -- 1-based, in that batch
);

-- Unique: two replicas storing the same message at once store it once.
CREATE UNIQUE INDEX messages_dedup ON messages (dedup_key);
-- Retention sweeps by arrival time; rows arrive in time order, so a BRIN
-- index (a few pages for millions of rows) is enough.
CREATE INDEX messages_received_at ON messages USING brin (received_at);

-- Per-connector FIFO queues and dead-letter queues. Workers read a queue
-- by state in seq order (never "seq > the last one seen": seqs from
-- concurrent transactions become visible out of order).
CREATE TABLE deliveries (
    seq          bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   text    NOT NULL REFERENCES messages (message_id) ON DELETE CASCADE,
    connector    text    NOT NULL,
    state        text    NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'in_flight', 'delivered', 'dead')),
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    next_attempt double precision NOT NULL DEFAULT 0,
    updated_at   double precision NOT NULL
);

-- Only undelivered rows: delivered ones leave the index as they are vacuumed.
CREATE INDEX deliveries_queue ON deliveries (connector, seq)
    WHERE state IN ('pending', 'in_flight', 'dead');
CREATE INDEX deliveries_message ON deliveries (message_id);

-- Audit records of messages not in `messages`: refused (AE/AR),
-- duplicates (message_id names the stored original), and messages deleted
-- with mllp-cli. No content.
CREATE TABLE audit_log (
    id             bigint           GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at    double precision NOT NULL,
    peer           text             NOT NULL,
    client_subject text,
    pod            text,
    message_id     text,
    control_id     text             NOT NULL,
    msg_type       text             NOT NULL,
    size           integer          NOT NULL,
    sha256         text             NOT NULL,
    ack_code       text             NOT NULL,
    rule           text,
    connectors     text             NOT NULL,
    batch_control_id text
);

CREATE INDEX audit_log_received_at ON audit_log USING brin (received_at);

CREATE FUNCTION mllpd_audit_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are immutable';
END;
$$;

CREATE TRIGGER audit_log_immutable BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION mllpd_audit_immutable();

-- The whole trail, as one (as in the SQLite outbox).
CREATE VIEW audit AS
    SELECT received_at, peer, client_subject, pod, message_id, control_id, msg_type,
           size, sha256, ack_code, NULL::text AS rule, connectors, batch_control_id
    FROM messages
    UNION ALL
    SELECT received_at, peer, client_subject, pod, message_id, control_id, msg_type,
           size, sha256, ack_code, rule, connectors, batch_control_id
    FROM audit_log;

-- Work done once for the whole cluster: the last backlog count (read by
-- every replica for MLLP_MAX_OUTBOX and metrics) and the last sweep.
CREATE TABLE cluster_state (
    id          integer          PRIMARY KEY CHECK (id = 1),
    messages    bigint           NOT NULL DEFAULT 0,
    size        bigint           NOT NULL DEFAULT 0,
    depths      jsonb            NOT NULL DEFAULT '[]',
    counted_at  double precision NOT NULL DEFAULT 0,
    pruned_at   double precision NOT NULL DEFAULT 0
);
INSERT INTO cluster_state (id) VALUES (1);
