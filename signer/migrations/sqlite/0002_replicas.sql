-- Which key on the token answers for each KeyManager key id (so that every replica sharing the datastore finds the
-- key another one generated), and the heartbeats of the replicas sharing the datastore.

CREATE TABLE keymanager_keys (
    namespace  TEXT   NOT NULL,  -- the calling SPIRE server's namespace
    key_id     TEXT   NOT NULL,  -- SPIRE's key id
    label      TEXT   NOT NULL,  -- the key's label on the token
    public_key BLOB   NOT NULL,  -- SubjectPublicKeyInfo DER
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, key_id)
);

CREATE TABLE replicas (
    id         TEXT   NOT NULL PRIMARY KEY,
    address    TEXT   NOT NULL,  -- the gRPC address it serves
    started_at BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL   -- its last heartbeat (unix seconds)
);
