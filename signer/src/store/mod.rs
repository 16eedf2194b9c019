//! signet's datastore: the authorities of each trust domain and their life cycle, the bundle's sequence number, the
//! JWT keys SPIRE servers publish, and the journal of rotation steps.
//!
//! It is an existing engine, never a home-made one: SQLite in the data directory (`state.db`) is the embedded
//! default, reached through `sqlx` with runtime queries (`sqlx::query`, no compile-time checked macros, so building
//! needs no database). The schema is versioned by embedded migrations (`migrations/sqlite/`, applied at
//! [`Store::open`]). The SQL is kept to what PostgreSQL also accepts so the same [`Store`] can later serve several
//! replicas; only the column type of binary data differs between the two, which is why migrations live in a
//! directory per engine.
//!
//! Every rotation step is one [`Txn`]: the rows it changes, the bundle's new sequence number and a journal line,
//! committed together before the step takes effect anywhere else (see [`crate::ca`]).

use std::path::Path;
use std::str::FromStr;

use sqlx::Row as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// A datastore failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The datastore URL is not usable.
    #[error("datastore {url:?}: {message}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The database failed.
    #[error("datastore: {0}")]
    Database(#[from] sqlx::Error),
    /// A schema migration failed.
    #[error("datastore migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row holds something this version cannot read.
    #[error("datastore row is invalid: {0}")]
    Corrupt(String),
}

/// What an authority is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthorityKind {
    /// An X.509 root.
    X509,
    /// A JWT signing key.
    Jwt,
}

impl AuthorityKind {
    /// The name stored and shown (`x509`, `jwt`).
    pub fn name(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }
}

impl FromStr for AuthorityKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "x509" => Ok(Self::X509),
            "jwt" => Ok(Self::Jwt),
            other => Err(format!("unknown authority kind {other:?} (x509 or jwt)")),
        }
    }
}

/// Where an authority is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AuthorityState {
    /// The prepare step is journalled; the key may or may not be on the token yet.
    Preparing,
    /// Key on the token, certificate made; not in the bundle.
    Prepared,
    /// In the bundle, not signing yet.
    Published,
    /// Signing.
    Active,
    /// No longer signing; still in the bundle because what it signed may still be valid.
    Superseded,
    /// Out of the bundle. Its key may still be on the token (until destroyed).
    Retired,
}

impl AuthorityState {
    /// The name stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            Self::Preparing => "preparing",
            Self::Prepared => "prepared",
            Self::Published => "published",
            Self::Active => "active",
            Self::Superseded => "superseded",
            Self::Retired => "retired",
        }
    }

    /// Whether an authority in this state is in the bundle.
    pub fn in_bundle(self) -> bool {
        matches!(self, Self::Published | Self::Active | Self::Superseded)
    }
}

impl FromStr for AuthorityState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "preparing" => Self::Preparing,
            "prepared" => Self::Prepared,
            "published" => Self::Published,
            "active" => Self::Active,
            "superseded" => Self::Superseded,
            "retired" => Self::Retired,
            other => return Err(format!("unknown authority state {other:?}")),
        })
    }
}

/// One authority row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityRecord {
    /// The key's label on the token (unique).
    pub label: String,
    /// The trust domain.
    pub trust_domain: String,
    /// X.509 root or JWT key.
    pub kind: AuthorityKind,
    /// 1, 2, ... per trust domain and kind.
    pub generation: i64,
    /// Where it is in its life.
    pub state: AuthorityState,
    /// The token's name.
    pub token: String,
    /// The key type's configuration name (`ec-p256`, ...).
    pub key_type: String,
    /// SubjectPublicKeyInfo DER (once the key exists).
    pub public_key: Option<Vec<u8>>,
    /// X.509: the self-signed root.
    pub certificate: Option<Vec<u8>>,
    /// X.509: this root's key certified by the previous root (old -> new).
    pub cross_from_previous: Option<Vec<u8>>,
    /// X.509: the previous root's key certified by this root (new -> old).
    pub cross_to_previous: Option<Vec<u8>>,
    /// JWT: the key id.
    pub kid: Option<String>,
    /// Unix seconds.
    pub not_after: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub published_at: Option<i64>,
    /// Unix seconds.
    pub activated_at: Option<i64>,
    /// Unix seconds.
    pub superseded_at: Option<i64>,
    /// Nothing this authority signed is valid after this (unix seconds).
    pub issued_until: Option<i64>,
    /// Unix seconds.
    pub retired_at: Option<i64>,
    /// The destroy step is journalled (unix seconds).
    pub destroy_requested_at: Option<i64>,
    /// The key is gone from the token (unix seconds).
    pub destroyed_at: Option<i64>,
    /// Marked compromised: relying parties (SPIRE) move off it at once.
    pub tainted: bool,
}

/// A JWT key a SPIRE server published through `PublishJWTKeyAndSubscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedJwtKey {
    /// `kid`.
    pub kid: String,
    /// SubjectPublicKeyInfo DER.
    pub public_key: Vec<u8>,
    /// Unix seconds; 0: never.
    pub expires_at: i64,
    /// Tainted by its owner.
    pub tainted: bool,
}

/// The datastore (cheap to clone).
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

/// The embedded migrations of the SQLite schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const COLUMNS: &str = "label, trust_domain, kind, generation, state, token, key_type, public_key, certificate, \
    cross_from_previous, cross_to_previous, kid, not_after, created_at, published_at, activated_at, superseded_at, \
    issued_until, retired_at, destroy_requested_at, destroyed_at, tainted";

fn record(row: &sqlx::sqlite::SqliteRow) -> Result<AuthorityRecord, StoreError> {
    let kind: String = row.try_get("kind")?;
    let state: String = row.try_get("state")?;
    Ok(AuthorityRecord {
        label: row.try_get("label")?,
        trust_domain: row.try_get("trust_domain")?,
        kind: kind.parse().map_err(StoreError::Corrupt)?,
        generation: row.try_get("generation")?,
        state: state.parse().map_err(StoreError::Corrupt)?,
        token: row.try_get("token")?,
        key_type: row.try_get("key_type")?,
        public_key: row.try_get("public_key")?,
        certificate: row.try_get("certificate")?,
        cross_from_previous: row.try_get("cross_from_previous")?,
        cross_to_previous: row.try_get("cross_to_previous")?,
        kid: row.try_get("kid")?,
        not_after: row.try_get("not_after")?,
        created_at: row.try_get("created_at")?,
        published_at: row.try_get("published_at")?,
        activated_at: row.try_get("activated_at")?,
        superseded_at: row.try_get("superseded_at")?,
        issued_until: row.try_get("issued_until")?,
        retired_at: row.try_get("retired_at")?,
        destroy_requested_at: row.try_get("destroy_requested_at")?,
        destroyed_at: row.try_get("destroyed_at")?,
        tainted: row.try_get("tainted")?,
    })
}

impl Store {
    /// Opens (creating it if needed) the datastore at `url` and brings its schema up to date. `sqlite://PATH` (a
    /// relative path is taken from `base`) and `sqlite::memory:` are understood.
    pub async fn open(url: &str, base: &Path) -> Result<Self, StoreError> {
        let bad = |message: String| StoreError::Url {
            url: url.to_string(),
            message,
        };
        let opts = if url == "sqlite::memory:" {
            SqliteConnectOptions::from_str(url)?
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(bad("the path is empty".into()));
            }
            let path = base.join(path);
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // Every committed step must survive a crash of the machine, not only of the process.
                .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Err(bad(
                "PostgreSQL is not built into this version yet: use sqlite://state.db".into(),
            ));
        } else {
            return Err(bad(
                "use sqlite://PATH (relative to the data directory)".into()
            ));
        };
        let opts = opts.foreign_keys(true);
        // One connection: SQLite serialises writers anyway, and one connection makes `sqlite::memory:` one database.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// The schema version (the newest migration applied).
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// Every authority of `trust_domain`, by kind then generation.
    pub async fn authorities(
        &self,
        trust_domain: &str,
    ) -> Result<Vec<AuthorityRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM authorities WHERE trust_domain = ? ORDER BY kind, generation"
        ))
        .bind(trust_domain)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    /// The bundle's sequence number, if one was ever stored.
    pub async fn sequence(&self, trust_domain: &str) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT sequence FROM bundle WHERE trust_domain = ?")
                .bind(trust_domain)
                .fetch_optional(&self.pool)
                .await?;
        v.map(|v| u64::try_from(v).map_err(|_| StoreError::Corrupt("negative sequence".into())))
            .transpose()
    }

    /// The JWT keys SPIRE servers published.
    pub async fn published_jwt_keys(
        &self,
        trust_domain: &str,
    ) -> Result<Vec<PublishedJwtKey>, StoreError> {
        let rows = sqlx::query(
            "SELECT kid, public_key, expires_at, tainted FROM published_jwt_keys WHERE trust_domain = ? \
             ORDER BY kid",
        )
        .bind(trust_domain)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PublishedJwtKey {
                    kid: r.try_get("kid")?,
                    public_key: r.try_get("public_key")?,
                    expires_at: r.try_get("expires_at")?,
                    tainted: r.try_get("tainted")?,
                })
            })
            .collect()
    }

    /// The journal of rotation steps, oldest first: (at, step, label).
    pub async fn journal(
        &self,
        trust_domain: &str,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, step, label FROM rotation_journal WHERE trust_domain = ? ORDER BY id",
        )
        .bind(trust_domain)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("at")?, r.try_get("step")?, r.try_get("label")?)))
            .collect()
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> Result<Txn, StoreError> {
        Ok(Txn {
            tx: self.pool.begin().await?,
        })
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// One transaction: a rotation step's rows, sequence and journal line, committed together.
#[derive(Debug)]
pub struct Txn {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
}

impl Txn {
    /// Inserts a new authority.
    pub async fn insert_authority(&mut self, a: &AuthorityRecord) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO authorities ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
             ?, ?)"
        ))
        .bind(&a.label)
        .bind(&a.trust_domain)
        .bind(a.kind.name())
        .bind(a.generation)
        .bind(a.state.name())
        .bind(&a.token)
        .bind(&a.key_type)
        .bind(&a.public_key)
        .bind(&a.certificate)
        .bind(&a.cross_from_previous)
        .bind(&a.cross_to_previous)
        .bind(&a.kid)
        .bind(a.not_after)
        .bind(a.created_at)
        .bind(a.published_at)
        .bind(a.activated_at)
        .bind(a.superseded_at)
        .bind(a.issued_until)
        .bind(a.retired_at)
        .bind(a.destroy_requested_at)
        .bind(a.destroyed_at)
        .bind(a.tainted)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Writes every mutable column of `a` (found by label).
    pub async fn update_authority(&mut self, a: &AuthorityRecord) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE authorities SET state = ?, public_key = ?, certificate = ?, cross_from_previous = ?, \
             cross_to_previous = ?, kid = ?, not_after = ?, published_at = ?, activated_at = ?, superseded_at = ?, \
             issued_until = ?, retired_at = ?, destroy_requested_at = ?, destroyed_at = ?, tainted = ? \
             WHERE label = ?",
        )
        .bind(a.state.name())
        .bind(&a.public_key)
        .bind(&a.certificate)
        .bind(&a.cross_from_previous)
        .bind(&a.cross_to_previous)
        .bind(&a.kid)
        .bind(a.not_after)
        .bind(a.published_at)
        .bind(a.activated_at)
        .bind(a.superseded_at)
        .bind(a.issued_until)
        .bind(a.retired_at)
        .bind(a.destroy_requested_at)
        .bind(a.destroyed_at)
        .bind(a.tainted)
        .bind(&a.label)
        .execute(&mut *self.tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Corrupt(format!(
                "no authority labelled {:?}",
                a.label
            )));
        }
        Ok(())
    }

    /// Deletes an authority row.
    pub async fn delete_authority(&mut self, label: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM authorities WHERE label = ?")
            .bind(label)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Sets the bundle's sequence number to `max(stored + 1, floor)` and returns it.
    pub async fn bump_sequence(
        &mut self,
        trust_domain: &str,
        floor: u64,
    ) -> Result<u64, StoreError> {
        let cur: Option<i64> =
            sqlx::query_scalar("SELECT sequence FROM bundle WHERE trust_domain = ?")
                .bind(trust_domain)
                .fetch_optional(&mut *self.tx)
                .await?;
        let next = match cur {
            Some(c) => u64::try_from(c).unwrap_or(0).saturating_add(1).max(floor),
            None => floor.max(1),
        };
        let v = i64::try_from(next).map_err(|_| StoreError::Corrupt("sequence overflow".into()))?;
        sqlx::query(
            "INSERT INTO bundle (trust_domain, sequence) VALUES (?, ?) \
             ON CONFLICT (trust_domain) DO UPDATE SET sequence = excluded.sequence",
        )
        .bind(trust_domain)
        .bind(v)
        .execute(&mut *self.tx)
        .await?;
        Ok(next)
    }

    /// Inserts or replaces a JWT key a SPIRE server published.
    pub async fn put_published_jwt_key(
        &mut self,
        trust_domain: &str,
        k: &PublishedJwtKey,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO published_jwt_keys (trust_domain, kid, public_key, expires_at, tainted) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (trust_domain, kid) DO UPDATE SET public_key = excluded.public_key, \
             expires_at = excluded.expires_at, tainted = excluded.tainted",
        )
        .bind(trust_domain)
        .bind(&k.kid)
        .bind(&k.public_key)
        .bind(k.expires_at)
        .bind(k.tainted)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Removes published JWT keys that expired before `now` (0 never expires).
    pub async fn expire_published_jwt_keys(
        &mut self,
        trust_domain: &str,
        now: i64,
    ) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "DELETE FROM published_jwt_keys WHERE trust_domain = ? AND expires_at <> 0 AND expires_at <= ?",
        )
        .bind(trust_domain)
        .bind(now)
        .execute(&mut *self.tx)
        .await?;
        Ok(r.rows_affected())
    }

    /// Appends a journal line.
    pub async fn journal(
        &mut self,
        trust_domain: &str,
        at: i64,
        step: &str,
        label: &str,
        detail: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO rotation_journal (trust_domain, at, step, label, detail) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(trust_domain)
        .bind(at)
        .bind(step)
        .bind(label)
        .bind(detail)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}
