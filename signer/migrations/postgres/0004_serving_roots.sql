-- Which roots signed the credentials each replica serves now (its own server and admin X509-SVIDs): the roots'
-- ids (SubjectKeyIdentifier in hex), comma-separated. `retire` of a root is refused while a live replica reports
-- it. NULL: a replica that does not report it (an older version), which also holds `retire` back.
ALTER TABLE replicas ADD COLUMN serving_roots TEXT;
