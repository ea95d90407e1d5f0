-- Every accepted message, exactly as received. Rows are never updated;
-- delivery state lives in per-connector queue tables (a later schema).
CREATE TABLE messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order, never reused
    message_id  TEXT    NOT NULL UNIQUE,            -- idempotency key upstream
    received_at REAL    NOT NULL,                   -- unix seconds
    peer        TEXT    NOT NULL,
    control_id  TEXT    NOT NULL,                   -- MSH-10
    msg_type    TEXT    NOT NULL,                   -- MSH-9, e.g. ADT^A01
    sending_app TEXT    NOT NULL,                   -- MSH-3, raw
    sending_fac TEXT    NOT NULL,                   -- MSH-4, raw
    version     TEXT    NOT NULL,                   -- MSH-12
    charset     TEXT,                               -- MSH-18 or the default used
    size        INTEGER NOT NULL,
    sha256      TEXT    NOT NULL,
    ack_code    TEXT    NOT NULL,
    payload     BLOB    NOT NULL
);

CREATE INDEX messages_dedup
    ON messages (control_id, sending_app, sending_fac, sha256, received_at);
CREATE INDEX messages_received_at ON messages (received_at);
