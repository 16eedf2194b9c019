-- An X.509 authority below an offline root (authority.x509.parent = "external"): the CA certificates between its
-- certificate and the upstream root, concatenated DER, as installed with it. NULL for signet's own roots.
ALTER TABLE authorities ADD COLUMN chain BLOB;
