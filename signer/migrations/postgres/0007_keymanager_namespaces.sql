-- The KeyManager namespaces (one per calling SPIRE server: its SPIFFE ID and, when it gives one, its key
-- identifier) and when each was last used, shared by every replica: the sweep destroys the keys of a namespace
-- nobody used for its configured window, and the datastore decides which replica does it.

CREATE TABLE keymanager_namespaces (
    namespace      TEXT   NOT NULL PRIMARY KEY,  -- as in keymanager_keys
    caller         TEXT   NOT NULL,              -- the SPIRE server's SPIFFE ID ('' for keys older than this table)
    key_identifier TEXT   NOT NULL,              -- its key identifier ('' : none)
    last_used_at   BIGINT NOT NULL               -- unix seconds of its last KeyManager call
);

-- Keys generated before this table: their namespaces count as used now, so they get the whole window.
INSERT INTO keymanager_namespaces (namespace, caller, key_identifier, last_used_at)
    SELECT namespace, '', '', CAST(EXTRACT(EPOCH FROM now()) AS BIGINT) FROM keymanager_keys GROUP BY namespace;
