-- The trust domain's authorities (X.509 roots and JWT signing keys), their life cycle, the bundle's sequence number,
-- the JWT keys SPIRE servers publish, and the journal of rotation steps: the PostgreSQL spelling of the SQLite schema
-- (BYTEA for binary data, an identity column for the journal's order).

CREATE TABLE authorities (
    label                TEXT    NOT NULL PRIMARY KEY, -- the key's label on the token
    trust_domain         TEXT    NOT NULL,
    kind                 TEXT    NOT NULL,             -- 'x509' or 'jwt'
    generation           BIGINT  NOT NULL,             -- 1, 2, ... per trust domain and kind
    state                TEXT    NOT NULL,             -- preparing, prepared, published, active, superseded, retired
    token                TEXT    NOT NULL,
    key_type             TEXT    NOT NULL,
    public_key           BYTEA,                         -- SubjectPublicKeyInfo DER
    certificate          BYTEA,                         -- x509: the self-signed root (DER)
    cross_from_previous  BYTEA,                         -- x509: this root's key certified by the previous root
    cross_to_previous    BYTEA,                         -- x509: the previous root's key certified by this root
    kid                  TEXT,                         -- jwt: the key id
    not_after            BIGINT,                       -- unix seconds
    created_at           BIGINT  NOT NULL,
    published_at         BIGINT,
    activated_at         BIGINT,
    superseded_at        BIGINT,
    issued_until         BIGINT,                       -- nothing it signed is valid after this
    retired_at           BIGINT,
    destroy_requested_at BIGINT,
    destroyed_at         BIGINT,
    tainted              BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE INDEX authorities_by_domain ON authorities (trust_domain, kind, generation);

CREATE TABLE bundle (
    trust_domain TEXT   NOT NULL PRIMARY KEY,
    sequence     BIGINT NOT NULL
);

CREATE TABLE published_jwt_keys (
    trust_domain TEXT    NOT NULL,
    kid          TEXT    NOT NULL,
    public_key   BYTEA   NOT NULL,
    expires_at   BIGINT  NOT NULL,
    tainted      BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (trust_domain, kid)
);

CREATE TABLE rotation_journal (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    trust_domain TEXT    NOT NULL,
    at           BIGINT  NOT NULL,
    step         TEXT    NOT NULL,
    label        TEXT    NOT NULL,
    detail       TEXT    NOT NULL DEFAULT ''
);
