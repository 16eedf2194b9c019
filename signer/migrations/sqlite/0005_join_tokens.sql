-- One-time join tokens (Admin.CreateJoinToken): a client's first credential for one SPIFFE ID. Only the SHA-256 of
-- the secret is kept; every replica sharing the datastore can spend a token, once.

CREATE TABLE join_tokens (
    token_hash TEXT   NOT NULL PRIMARY KEY,  -- lowercase hex SHA-256 of the secret
    spiffe_id  TEXT   NOT NULL,              -- the only ID the token gets
    created_by TEXT   NOT NULL,              -- the admin's SPIFFE ID
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,              -- unix seconds
    used_at    BIGINT                        -- when it was spent; NULL while unspent
);
