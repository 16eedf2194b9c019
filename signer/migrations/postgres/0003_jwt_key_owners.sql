-- Every JWT key a SPIRE server publishes belongs to its publisher (the caller's SPIFFE ID): only the owner may
-- publish it again, change its expiry or taint it. Keys stored before this migration have no recorded owner ('');
-- nobody may change them, and they leave the bundle when they expire.

ALTER TABLE published_jwt_keys ADD COLUMN owner TEXT NOT NULL DEFAULT '';
