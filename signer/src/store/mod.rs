//! signet's datastore: the authorities of each trust domain and their life cycle, the bundle's sequence number,
//! the JWT keys SPIRE servers publish, the journal of rotation steps, which token key answers for each KeyManager
//! key id, when each KeyManager namespace was last used (the sweep's arbiter), and the heartbeats of the replicas
//! sharing it.
//!
//! It is an existing engine, never a home-made one, reached through `sqlx` with runtime queries (`sqlx::query`, no
//! compile-time checked macros, so building needs no database):
//!
//! - **SQLite** in the data directory (`sqlite://state.db`) is the embedded default, for one process;
//! - **PostgreSQL** (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`) lets several replicas share one trust domain
//!   (see [`crate::replica`]).
//!
//! The SQL is the same on both (`$N` placeholders, which SQLite reads too); only the schema's spelling differs (BLOB
//! or BYTEA, the journal's key), so the versioned migrations live in a directory per engine (`migrations/sqlite/`,
//! `migrations/postgres/`, embedded and applied at [`Store::open`]; with PostgreSQL the migrator holds an advisory
//! lock, so replicas starting together run them once and the others wait).
//!
//! Every rotation step is one [`Txn`]: the rows it changes, the bundle's new sequence number and a journal line,
//! committed together before the step takes effect anywhere else (see [`crate::ca`]). With PostgreSQL the commit
//! also announces what changed (`NOTIFY` on [`CHANGES_CHANNEL`], delivered with the commit and only if it commits),
//! and three advisory locks coordinate the replicas: the step lock ([`Store::step_lock`]) that every rotation step
//! holds, the schedule lock ([`Store::try_lead`]) held by the one replica that runs the schedule, and the start lock
//! ([`Store::start_lock`]) under which a replica adopts the first authorities. Each is held by a connection of its
//! own, so the database releases it when the holder dies.

use std::path::Path;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Connection as _, Row};

/// A replica whose heartbeat is older than this is not counted as live (see [`crate::replica`]).
pub const LIVE_WINDOW: std::time::Duration = std::time::Duration::from_secs(6);

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
    /// A row names an authority kind or state this version does not know.
    #[error("datastore row is invalid: {0}")]
    UnknownName(#[source] UnknownName),
    /// A published JWT key is stored under another owner.
    #[error("datastore: JWT key {0:?} is stored under another owner")]
    NotOwner(String),
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

/// A name that is not an authority kind or state (as stored, or as given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnknownName {
    /// Not `x509` or `jwt`.
    #[error("unknown authority kind {0:?} (x509 or jwt)")]
    Kind(String),
    /// Not one of the states of [`AuthorityState`].
    #[error("unknown authority state {0:?}")]
    State(String),
}

impl FromStr for AuthorityKind {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "x509" => Ok(Self::X509),
            "jwt" => Ok(Self::Jwt),
            other => Err(UnknownName::Kind(other.to_string())),
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
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        Ok(match s {
            "preparing" => Self::Preparing,
            "prepared" => Self::Prepared,
            "published" => Self::Published,
            "active" => Self::Active,
            "superseded" => Self::Superseded,
            "retired" => Self::Retired,
            other => return Err(UnknownName::State(other.to_string())),
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
    /// X.509 below an offline root: the CA certificates between `certificate` and the upstream root, concatenated
    /// DER (see [`crate::ca::external`]).
    pub chain: Option<Vec<u8>>,
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
    /// The publisher's SPIFFE ID (`""`: stored before owners were recorded; nobody may change it).
    pub owner: String,
}

/// A KeyManager key a SPIRE server generated: which key on the token answers for its key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyManagerRecord {
    /// The caller's namespace (see [`crate::api::keymanager::namespace`]).
    pub namespace: String,
    /// SPIRE's key id.
    pub key_id: String,
    /// The key's label on the token.
    pub label: String,
    /// SubjectPublicKeyInfo DER.
    pub public_key: Vec<u8>,
    /// Unix seconds.
    pub updated_at: i64,
}

/// A KeyManager namespace (one calling SPIRE server) and when it was last used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyManagerNamespace {
    /// The namespace (see [`crate::api::keymanager::namespace`]).
    pub namespace: String,
    /// The SPIRE server's SPIFFE ID (`""` for keys generated before namespaces were recorded).
    pub caller: String,
    /// Its key identifier (`""`: none).
    pub key_identifier: String,
    /// Unix seconds of its last KeyManager call.
    pub last_used_at: i64,
}

/// A join token (Admin.CreateJoinToken), by the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// Lowercase hex SHA-256 of the secret.
    pub token_hash: String,
    /// The only SPIFFE ID the token gets.
    pub spiffe_id: String,
    /// The admin who created it.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// When it was spent (unix seconds), if it was.
    pub used_at: Option<i64>,
}

/// A running replica, as its heartbeat shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// The replica's id (host name and process id, or as configured).
    pub id: String,
    /// The gRPC address it serves.
    pub address: String,
    /// Unix seconds.
    pub started_at: i64,
    /// Unix seconds of its last heartbeat.
    pub seen_at: i64,
    /// The ids of the roots that signed the credentials it serves now (see [`crate::x509::root_id`]),
    /// comma-separated; `None` when it does not report them.
    pub serving_roots: Option<String>,
}

impl ReplicaRecord {
    /// Whether this replica serves a credential of the root `root_id`, or does not say (then it may).
    pub fn may_serve_root(&self, root_id: &str) -> bool {
        self.serving_roots
            .as_deref()
            .is_none_or(|s| s.split(',').any(|r| r == root_id))
    }
}

/// The engines behind a [`Store`].
#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same code on either engine's pool / transaction (the SQL is shared; `$N` placeholders are read by
/// both).
macro_rules! on {
    ($e:expr, $p:ident => $body:expr) => {
        match $e {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

macro_rules! on_tx {
    ($e:expr, $t:ident => $body:expr) => {
        match $e {
            Tx::Sqlite($t) => $body,
            Tx::Postgres($t) => $body,
        }
    };
}

/// The datastore (cheap to clone).
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    /// PostgreSQL: where to open the connections that hold the rotation lock and listen for changes.
    pg: Option<PgConnectOptions>,
}

/// The embedded migrations of the SQLite schema.
static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
/// The embedded migrations of the PostgreSQL schema.
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The PostgreSQL channel every committed change is announced on (the payload says what changed).
pub const CHANGES_CHANNEL: &str = "signet_changes";

/// Advisory-lock keys (PostgreSQL), in signet's own key space (the first 32 bits spell "sgnt").
const LOCK_STEPS: i64 = 0x7367_6e74_0000_0001;
const LOCK_SCHEDULE: i64 = 0x7367_6e74_0000_0002;
const LOCK_START: i64 = 0x7367_6e74_0000_0003;

const COLUMNS: &str = "label, trust_domain, kind, generation, state, token, key_type, public_key, certificate, \
    cross_from_previous, cross_to_previous, kid, not_after, created_at, published_at, activated_at, superseded_at, \
    issued_until, retired_at, destroy_requested_at, destroyed_at, tainted, chain";

/// Reads an authority row of either engine.
fn record<'r, R>(row: &'r R) -> Result<AuthorityRecord, StoreError>
where
    R: Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let kind: String = row.try_get("kind")?;
    let state: String = row.try_get("state")?;
    Ok(AuthorityRecord {
        label: row.try_get("label")?,
        trust_domain: row.try_get("trust_domain")?,
        kind: kind.parse().map_err(StoreError::UnknownName)?,
        generation: row.try_get("generation")?,
        state: state.parse().map_err(StoreError::UnknownName)?,
        token: row.try_get("token")?,
        key_type: row.try_get("key_type")?,
        public_key: row.try_get("public_key")?,
        certificate: row.try_get("certificate")?,
        cross_from_previous: row.try_get("cross_from_previous")?,
        cross_to_previous: row.try_get("cross_to_previous")?,
        chain: row.try_get("chain")?,
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

/// Hides the password of a datastore URL in messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Store {
    /// Opens (creating it if needed) the datastore at `url` and brings its schema up to date. `sqlite://PATH` (a
    /// relative path is taken from `base`), `sqlite::memory:` and `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// (libpq's URL form, with its parameters such as `sslmode`) are understood. With PostgreSQL, replicas starting
    /// together each run the migrations safely: the first takes the migration lock, the others wait for it and
    /// find the schema up to date.
    pub async fn open(url: &str, base: &Path) -> Result<Self, StoreError> {
        let bad = |message: String| StoreError::Url {
            url: redacted(url),
            message,
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)
                .map_err(|e| bad(e.to_string()))?
                .application_name("signet");
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(std::time::Duration::from_secs(10))
                .connect_with(opts.clone())
                .await?;
            POSTGRES_MIGRATOR.run(&pool).await?;
            return Ok(Self {
                pool: Pool::Postgres(pool),
                pg: Some(opts),
            });
        }
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
        } else {
            return Err(bad(
                "use sqlite://PATH (relative to the data directory) or postgres://USER@HOST/DB"
                    .into(),
            ));
        };
        let opts = opts.foreign_keys(true);
        // One connection: SQLite serialises writers anyway, and one connection makes `sqlite::memory:` one database.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool: Pool::Sqlite(pool),
            pg: None,
        })
    }

    /// Opens an existing datastore to look at it, changing nothing: no schema migration, SQLite read-only and never
    /// created (`signet doctor`). Compare [`schema_version`](Self::schema_version) with
    /// [`expected_schema_version`](Self::expected_schema_version) before reading: an older schema is migrated by the
    /// next `signet serve` only.
    pub async fn open_to_inspect(url: &str, base: &Path) -> Result<Self, StoreError> {
        let bad = |message: String| StoreError::Url {
            url: redacted(url),
            message,
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)
                .map_err(|e| bad(e.to_string()))?
                .application_name("signet-doctor");
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(std::time::Duration::from_secs(10))
                .connect_with(opts.clone())
                .await?;
            return Ok(Self {
                pool: Pool::Postgres(pool),
                pg: Some(opts),
            });
        }
        let Some(path) = url.strip_prefix("sqlite://").filter(|p| !p.is_empty()) else {
            return Err(bad("use sqlite://PATH or postgres://USER@HOST/DB".into()));
        };
        let opts = SqliteConnectOptions::new()
            .filename(base.join(path))
            .read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        Ok(Self {
            pool: Pool::Sqlite(pool),
            pg: None,
        })
    }

    /// The schema version this program's migrations bring the datastore to.
    pub fn expected_schema_version(&self) -> i64 {
        let m = match self.pool {
            Pool::Sqlite(_) => &SQLITE_MIGRATOR,
            Pool::Postgres(_) => &POSTGRES_MIGRATOR,
        };
        m.iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// Tries one connection to a PostgreSQL datastore, without the pool's retries (which turn a refused connection
    /// into a bare timeout), so a diagnosis can name the real error (`signet doctor`). SQLite URLs are not probed.
    pub async fn probe(url: &str, timeout: std::time::Duration) -> Result<(), StoreError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Ok(());
        }
        let opts = PgConnectOptions::from_str(url).map_err(|e| StoreError::Url {
            url: redacted(url),
            message: e.to_string(),
        })?;
        match tokio::time::timeout(timeout, PgConnection::connect_with(&opts)).await {
            Ok(Ok(c)) => {
                let _ = c.close().await;
                Ok(())
            }
            Ok(Err(e)) => Err(StoreError::Database(e)),
            Err(_) => Err(StoreError::Url {
                url: redacted(url),
                message: format!("no connection within {} s", timeout.as_secs()),
            }),
        }
    }

    /// The database server's clock (unix seconds) for PostgreSQL, to measure this host's skew against the other
    /// replicas' shared time; `None` for SQLite (its clock is this host's).
    pub async fn database_now(&self) -> Result<Option<f64>, StoreError> {
        match &self.pool {
            Pool::Sqlite(_) => Ok(None),
            Pool::Postgres(p) => {
                let t: f64 =
                    sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8")
                        .fetch_one(p)
                        .await?;
                Ok(Some(t))
            }
        }
    }

    /// Whether several processes can share this datastore (PostgreSQL); SQLite belongs to one process.
    pub fn is_shared(&self) -> bool {
        matches!(self.pool, Pool::Postgres(_))
    }

    /// The engine's name (`sqlite`, `postgres`).
    pub fn engine(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    /// The schema version (the newest migration applied).
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = on!(&self.pool, p => sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(p)
            .await?);
        Ok(v.unwrap_or(0))
    }

    /// Every authority of `trust_domain`, by kind then generation.
    pub async fn authorities(
        &self,
        trust_domain: &str,
    ) -> Result<Vec<AuthorityRecord>, StoreError> {
        let q = format!(
            "SELECT {COLUMNS} FROM authorities WHERE trust_domain = $1 ORDER BY kind, generation"
        );
        on!(&self.pool, p => {
            let rows = sqlx::query(&q).bind(trust_domain).fetch_all(p).await?;
            rows.iter().map(record).collect()
        })
    }

    /// The bundle's sequence number, if one was ever stored.
    pub async fn sequence(&self, trust_domain: &str) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = on!(&self.pool, p => sqlx::query_scalar(
            "SELECT sequence FROM bundle WHERE trust_domain = $1"
        )
        .bind(trust_domain)
        .fetch_optional(p)
        .await?);
        v.map(|v| u64::try_from(v).map_err(|_| StoreError::Corrupt("negative sequence".into())))
            .transpose()
    }

    /// The JWT keys SPIRE servers published.
    pub async fn published_jwt_keys(
        &self,
        trust_domain: &str,
    ) -> Result<Vec<PublishedJwtKey>, StoreError> {
        let q = "SELECT kid, public_key, expires_at, tainted, owner FROM published_jwt_keys \
                 WHERE trust_domain = $1 ORDER BY kid";
        on!(&self.pool, p => {
            let rows = sqlx::query(q).bind(trust_domain).fetch_all(p).await?;
            rows.iter()
                .map(|r| {
                    Ok(PublishedJwtKey {
                        kid: r.try_get("kid")?,
                        public_key: r.try_get("public_key")?,
                        expires_at: r.try_get("expires_at")?,
                        tainted: r.try_get("tainted")?,
                        owner: r.try_get("owner")?,
                    })
                })
                .collect()
        })
    }

    /// The journal of rotation steps, oldest first: (at, step, label).
    pub async fn journal(
        &self,
        trust_domain: &str,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        let q = "SELECT at, step, label FROM rotation_journal WHERE trust_domain = $1 ORDER BY id";
        on!(&self.pool, p => {
            let rows = sqlx::query(q).bind(trust_domain).fetch_all(p).await?;
            rows.iter()
                .map(|r| Ok((r.try_get("at")?, r.try_get("step")?, r.try_get("label")?)))
                .collect()
        })
    }

    /// The KeyManager key `key_id` of `namespace`, if one was generated.
    pub async fn keymanager_key(
        &self,
        namespace: &str,
        key_id: &str,
    ) -> Result<Option<KeyManagerRecord>, StoreError> {
        let q = "SELECT namespace, key_id, label, public_key, updated_at FROM keymanager_keys \
                 WHERE namespace = $1 AND key_id = $2";
        on!(&self.pool, p => {
            let row = sqlx::query(q).bind(namespace).bind(key_id).fetch_optional(p).await?;
            row.map(|r| {
                Ok(KeyManagerRecord {
                    namespace: r.try_get("namespace")?,
                    key_id: r.try_get("key_id")?,
                    label: r.try_get("label")?,
                    public_key: r.try_get("public_key")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .transpose()
        })
    }

    /// The KeyManager key ids of `namespace`.
    pub async fn keymanager_ids(&self, namespace: &str) -> Result<Vec<String>, StoreError> {
        let q = "SELECT key_id FROM keymanager_keys WHERE namespace = $1 ORDER BY key_id";
        Ok(on!(&self.pool, p => sqlx::query_scalar(q).bind(namespace).fetch_all(p).await?))
    }

    /// Records that `namespace` was used at `at` (unix seconds): its row is created, or its last use moved
    /// forward (never back, whatever order replicas write in).
    pub async fn touch_keymanager_namespace(
        &self,
        ns: &KeyManagerNamespace,
    ) -> Result<(), StoreError> {
        let q = "INSERT INTO keymanager_namespaces (namespace, caller, key_identifier, last_used_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (namespace) DO UPDATE SET caller = excluded.caller, \
                 key_identifier = excluded.key_identifier, last_used_at = CASE \
                 WHEN excluded.last_used_at > keymanager_namespaces.last_used_at THEN excluded.last_used_at \
                 ELSE keymanager_namespaces.last_used_at END";
        on!(&self.pool, p => { sqlx::query(q)
            .bind(&ns.namespace)
            .bind(&ns.caller)
            .bind(&ns.key_identifier)
            .bind(ns.last_used_at)
            .execute(p)
            .await?; });
        Ok(())
    }

    /// Records `namespace` as used at `at` unless it is recorded already (keys found on the token at start).
    pub async fn adopt_keymanager_namespace(
        &self,
        namespace: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let q = "INSERT INTO keymanager_namespaces (namespace, caller, key_identifier, last_used_at) \
                 VALUES ($1, '', '', $2) ON CONFLICT (namespace) DO NOTHING";
        on!(&self.pool, p => { sqlx::query(q).bind(namespace).bind(at).execute(p).await?; });
        Ok(())
    }

    /// The namespaces last used before `cutoff` (unix seconds), oldest first.
    pub async fn stale_keymanager_namespaces(
        &self,
        cutoff: i64,
    ) -> Result<Vec<KeyManagerNamespace>, StoreError> {
        let q = "SELECT namespace, caller, key_identifier, last_used_at FROM keymanager_namespaces \
                 WHERE last_used_at < $1 ORDER BY last_used_at, namespace";
        on!(&self.pool, p => {
            let rows = sqlx::query(q).bind(cutoff).fetch_all(p).await?;
            rows.iter()
                .map(|r| Ok(KeyManagerNamespace {
                    namespace: r.try_get("namespace")?,
                    caller: r.try_get("caller")?,
                    key_identifier: r.try_get("key_identifier")?,
                    last_used_at: r.try_get("last_used_at")?,
                }))
                .collect()
        })
    }

    /// Claims the sweep of `namespace`: in one transaction, deletes its row if it is still last used before
    /// `cutoff`, and its keys' records. `Some(key ids)`: this caller won and must destroy the keys on the token;
    /// `None`: it was used since (or another replica swept it), nothing changed. The datastore is the arbiter, so
    /// replicas sweeping at once never both act, and a namespace used meanwhile is kept.
    pub async fn claim_keymanager_sweep(
        &self,
        namespace: &str,
        cutoff: i64,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let mut tx = self.begin().await?;
        let claim = "DELETE FROM keymanager_namespaces WHERE namespace = $1 AND last_used_at < $2";
        let ids = "SELECT key_id FROM keymanager_keys WHERE namespace = $1 ORDER BY key_id";
        let keys = "DELETE FROM keymanager_keys WHERE namespace = $1";
        let won = on_tx!(&mut tx.tx, t => sqlx::query(claim)
            .bind(namespace)
            .bind(cutoff)
            .execute(&mut **t)
            .await?
            .rows_affected());
        if won == 0 {
            return Ok(None);
        }
        let ids: Vec<String> = on_tx!(&mut tx.tx, t => sqlx::query_scalar(ids)
            .bind(namespace)
            .fetch_all(&mut **t)
            .await?);
        on_tx!(&mut tx.tx, t => { sqlx::query(keys).bind(namespace).execute(&mut **t).await?; });
        tx.announce(format!("keymanager-swept {namespace}"));
        tx.commit().await?;
        Ok(Some(ids))
    }

    /// Records this replica's heartbeat and returns the replicas seen within `window_secs` of `now` (this one
    /// included), by id.
    pub async fn heartbeat(
        &self,
        me: &ReplicaRecord,
        window_secs: i64,
    ) -> Result<Vec<ReplicaRecord>, StoreError> {
        let put = "INSERT INTO replicas (id, address, started_at, seen_at, serving_roots) VALUES ($1, $2, $3, $4, $5) \
                   ON CONFLICT (id) DO UPDATE SET address = excluded.address, started_at = excluded.started_at, \
                   seen_at = excluded.seen_at, serving_roots = excluded.serving_roots";
        // Rows of replicas gone for a day are dropped.
        let old = "DELETE FROM replicas WHERE seen_at < $1";
        on!(&self.pool, p => {
            sqlx::query(put)
                .bind(&me.id)
                .bind(&me.address)
                .bind(me.started_at)
                .bind(me.seen_at)
                .bind(&me.serving_roots)
                .execute(p)
                .await?;
            sqlx::query(old).bind(me.seen_at - 86_400).execute(p).await?;
        });
        self.live_replicas(me.seen_at - window_secs).await
    }

    /// The replicas whose last heartbeat is at `since` (Unix seconds) or later, by id.
    pub async fn live_replicas(&self, since: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        let get = "SELECT id, address, started_at, seen_at, serving_roots FROM replicas WHERE seen_at >= $1 \
                   ORDER BY id";
        on!(&self.pool, p => {
            let rows = sqlx::query(get).bind(since).fetch_all(p).await?;
            rows.iter()
                .map(|r| {
                    Ok(ReplicaRecord {
                        id: r.try_get("id")?,
                        address: r.try_get("address")?,
                        started_at: r.try_get("started_at")?,
                        seen_at: r.try_get("seen_at")?,
                        serving_roots: r.try_get("serving_roots")?,
                    })
                })
                .collect()
        })
    }

    /// Stores a new join token.
    pub async fn put_join_token(&self, t: &JoinTokenRecord) -> Result<(), StoreError> {
        let q = "INSERT INTO join_tokens (token_hash, spiffe_id, created_by, created_at, expires_at, used_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)";
        on!(&self.pool, p => { sqlx::query(q)
            .bind(&t.token_hash)
            .bind(&t.spiffe_id)
            .bind(&t.created_by)
            .bind(t.created_at)
            .bind(t.expires_at)
            .bind(t.used_at)
            .execute(p)
            .await?; });
        Ok(())
    }

    /// The join token whose secret hashes to `token_hash`, if there is one.
    pub async fn join_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        let q = "SELECT token_hash, spiffe_id, created_by, created_at, expires_at, used_at FROM join_tokens \
                 WHERE token_hash = $1";
        on!(&self.pool, p => {
            let row = sqlx::query(q).bind(token_hash).fetch_optional(p).await?;
            row.map(|r| {
                Ok(JoinTokenRecord {
                    token_hash: r.try_get("token_hash")?,
                    spiffe_id: r.try_get("spiffe_id")?,
                    created_by: r.try_get("created_by")?,
                    created_at: r.try_get("created_at")?,
                    expires_at: r.try_get("expires_at")?,
                    used_at: r.try_get("used_at")?,
                })
            })
            .transpose()
        })
    }

    /// Spends the join token `token_hash` for `spiffe_id` at `now`: true if this call spent it (it was unspent, for
    /// that ID and not expired), false otherwise. One statement, so two replicas cannot both spend a token.
    pub async fn spend_join_token(
        &self,
        token_hash: &str,
        spiffe_id: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let q = "UPDATE join_tokens SET used_at = $1 WHERE token_hash = $2 AND spiffe_id = $3 \
                 AND used_at IS NULL AND expires_at > $1";
        let n = on!(&self.pool, p => sqlx::query(q)
            .bind(now)
            .bind(token_hash)
            .bind(spiffe_id)
            .execute(p)
            .await?
            .rows_affected());
        // Tokens expired for a day are dropped.
        let old = "DELETE FROM join_tokens WHERE expires_at < $1";
        on!(&self.pool, p => { sqlx::query(old).bind(now - 86_400).execute(p).await?; });
        Ok(n == 1)
    }

    /// Gives back a join token this replica spent but could not issue for (the issuance failed).
    pub async fn unspend_join_token(&self, token_hash: &str) -> Result<(), StoreError> {
        on!(&self.pool, p => { sqlx::query("UPDATE join_tokens SET used_at = NULL WHERE token_hash = $1")
            .bind(token_hash)
            .execute(p)
            .await?; });
        Ok(())
    }

    /// Removes this replica's heartbeat (at a clean stop).
    pub async fn leave(&self, id: &str) -> Result<(), StoreError> {
        on!(&self.pool, p => { sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(id)
            .execute(p)
            .await?; });
        Ok(())
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> Result<Txn, StoreError> {
        Ok(Txn {
            tx: match &self.pool {
                Pool::Sqlite(p) => Tx::Sqlite(p.begin().await?),
                Pool::Postgres(p) => Tx::Postgres(p.begin().await?),
            },
            notify: Vec::new(),
        })
    }

    /// Serialises rotation steps across every process sharing the datastore: held while a step reads the rows,
    /// touches the token and commits (PostgreSQL: a session advisory lock on a connection of its own, released
    /// when the lock is dropped or the process dies). With SQLite the datastore belongs to one process, which
    /// serialises its steps itself: the lock is a no-op.
    pub async fn step_lock(&self) -> Result<DbLock, StoreError> {
        self.lock(LOCK_STEPS).await
    }

    /// Serialises the start of replicas sharing the datastore (adopting the first authorities, generating the first
    /// keys), like [`step_lock`](Self::step_lock).
    pub async fn start_lock(&self) -> Result<DbLock, StoreError> {
        self.lock(LOCK_START).await
    }

    async fn lock(&self, key: i64) -> Result<DbLock, StoreError> {
        let Some(opts) = &self.pg else {
            return Ok(DbLock { conn: None });
        };
        let mut conn = PgConnection::connect_with(opts).await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut conn)
            .await?;
        Ok(DbLock { conn: Some(conn) })
    }

    /// Tries to become the one process that runs the rotation schedule. `Ok(None)`: another holds it. With SQLite
    /// the process is alone and always leads.
    pub async fn try_lead(&self) -> Result<Option<Leadership>, StoreError> {
        let Some(opts) = &self.pg else {
            return Ok(Some(Leadership { conn: None }));
        };
        let mut conn = PgConnection::connect_with(opts).await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_SCHEDULE)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(Leadership { conn: Some(conn) }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Follows the changes other processes commit (PostgreSQL: LISTEN on [`CHANGES_CHANNEL`]): every notification's
    /// payload is sent on the returned channel, and `"resync"` after the listening connection had to be re-made
    /// (changes may have been missed meanwhile). `None` with SQLite, where no other process writes.
    pub fn follow_changes(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        let Pool::Postgres(pool) = &self.pool else {
            return None;
        };
        let pool = pool.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut backoff = std::time::Duration::from_millis(100);
            loop {
                let listener = async {
                    let mut l = PgListener::connect_with(&pool).await?;
                    l.listen(CHANGES_CHANNEL).await?;
                    Ok::<_, sqlx::Error>(l)
                };
                let mut l = match listener.await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "datastore: cannot listen for changes; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                        if tx.is_closed() {
                            return;
                        }
                        continue;
                    }
                };
                backoff = std::time::Duration::from_millis(100);
                if tx.send("resync".into()).await.is_err() {
                    return;
                }
                loop {
                    match l.try_recv().await {
                        Ok(Some(n)) => {
                            if tx.send(n.payload().to_string()).await.is_err() {
                                return;
                            }
                        }
                        // The connection was lost and re-made by the listener: notifications may be missed.
                        Ok(None) => {
                            if tx.send("resync".into()).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "datastore: listening for changes failed; reconnecting");
                            break;
                        }
                    }
                }
            }
        });
        Some(rx)
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        on!(&self.pool, p => p.close().await);
    }
}

/// A lock of [`Store::step_lock`] / [`Store::start_lock`]; released when dropped.
#[derive(Debug)]
pub struct DbLock {
    conn: Option<PgConnection>,
}

impl DbLock {
    /// Releases the lock now (dropping it does too, by closing its connection).
    pub async fn release(mut self) {
        if let Some(c) = self.conn.take() {
            let _ = c.close().await;
        }
    }
}

/// The right to run the rotation schedule ([`Store::try_lead`]); lost when dropped, or when the process or its
/// connection dies.
#[derive(Debug)]
pub struct Leadership {
    conn: Option<PgConnection>,
}

impl Leadership {
    /// Whether the lock is still held (its connection still answers).
    pub async fn still_held(&mut self) -> bool {
        match &mut self.conn {
            None => true,
            Some(c) => c.ping().await.is_ok(),
        }
    }
}

#[derive(Debug)]
enum Tx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// One transaction: a rotation step's rows, sequence and journal line, committed together. With PostgreSQL, the
/// commit also tells every replica what changed ([`Store::follow_changes`]).
#[derive(Debug)]
pub struct Txn {
    tx: Tx,
    notify: Vec<String>,
}

impl Txn {
    /// Announces `what` to the other replicas when (and only if) this transaction commits.
    pub fn announce(&mut self, what: impl Into<String>) {
        let what = what.into();
        if !self.notify.contains(&what) {
            self.notify.push(what);
        }
    }

    /// Inserts a new authority.
    pub async fn insert_authority(&mut self, a: &AuthorityRecord) -> Result<(), StoreError> {
        let q = format!(
            "INSERT INTO authorities ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
             $14, $15, $16, $17, $18, $19, $20, $21, $22, $23)"
        );
        on_tx!(&mut self.tx, t => { sqlx::query(&q)
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
            .bind(&a.chain)
            .execute(&mut **t)
            .await?; });
        self.announce("authorities");
        Ok(())
    }

    /// Writes every mutable column of `a` (found by label).
    pub async fn update_authority(&mut self, a: &AuthorityRecord) -> Result<(), StoreError> {
        let q = "UPDATE authorities SET state = $1, public_key = $2, certificate = $3, cross_from_previous = $4, \
                 cross_to_previous = $5, kid = $6, not_after = $7, published_at = $8, activated_at = $9, \
                 superseded_at = $10, issued_until = $11, retired_at = $12, destroy_requested_at = $13, \
                 destroyed_at = $14, tainted = $15, chain = $16 WHERE label = $17";
        let affected = on_tx!(&mut self.tx, t => sqlx::query(q)
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
            .bind(&a.chain)
            .bind(&a.label)
            .execute(&mut **t)
            .await?
            .rows_affected());
        if affected != 1 {
            return Err(StoreError::Corrupt(format!(
                "no authority labelled {:?}",
                a.label
            )));
        }
        self.announce("authorities");
        Ok(())
    }

    /// Deletes an authority row.
    pub async fn delete_authority(&mut self, label: &str) -> Result<(), StoreError> {
        on_tx!(&mut self.tx, t => { sqlx::query("DELETE FROM authorities WHERE label = $1")
            .bind(label)
            .execute(&mut **t)
            .await?; });
        self.announce("authorities");
        Ok(())
    }

    /// Sets the bundle's sequence number to `max(stored + 1, floor)` and returns it. The row is locked until the
    /// transaction ends, so concurrent changes get distinct, increasing numbers.
    pub async fn bump_sequence(
        &mut self,
        trust_domain: &str,
        floor: u64,
    ) -> Result<u64, StoreError> {
        // Make sure the row exists, then lock it (PostgreSQL: FOR UPDATE; SQLite has one writer at a time).
        let seed = "INSERT INTO bundle (trust_domain, sequence) VALUES ($1, 0) ON CONFLICT (trust_domain) DO NOTHING";
        let read = match self.tx {
            Tx::Sqlite(_) => "SELECT sequence FROM bundle WHERE trust_domain = $1",
            Tx::Postgres(_) => "SELECT sequence FROM bundle WHERE trust_domain = $1 FOR UPDATE",
        };
        let cur: i64 = on_tx!(&mut self.tx, t => {
            sqlx::query(seed).bind(trust_domain).execute(&mut **t).await?;
            sqlx::query_scalar(read).bind(trust_domain).fetch_one(&mut **t).await?
        });
        let next = u64::try_from(cur)
            .unwrap_or(0)
            .saturating_add(1)
            .max(floor)
            .max(1);
        let v = i64::try_from(next).map_err(|_| StoreError::Corrupt("sequence overflow".into()))?;
        on_tx!(&mut self.tx, t => { sqlx::query("UPDATE bundle SET sequence = $1 WHERE trust_domain = $2")
            .bind(v)
            .bind(trust_domain)
            .execute(&mut **t)
            .await?; });
        self.announce("authorities");
        Ok(next)
    }

    /// Inserts a JWT key a SPIRE server published, or updates it if it is already stored under the same owner.
    /// A key id stored under another owner (or under none) is left alone and refused
    /// ([`StoreError::NotOwner`]), so replicas sharing the datastore keep the same rule as the live bundle.
    pub async fn put_published_jwt_key(
        &mut self,
        trust_domain: &str,
        k: &PublishedJwtKey,
    ) -> Result<(), StoreError> {
        let q = "INSERT INTO published_jwt_keys (trust_domain, kid, public_key, expires_at, tainted, owner) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (trust_domain, kid) DO UPDATE SET public_key = excluded.public_key, \
                 expires_at = excluded.expires_at, tainted = excluded.tainted \
                 WHERE published_jwt_keys.owner = excluded.owner AND published_jwt_keys.owner <> ''";
        let n = on_tx!(&mut self.tx, t => sqlx::query(q)
            .bind(trust_domain)
            .bind(&k.kid)
            .bind(&k.public_key)
            .bind(k.expires_at)
            .bind(k.tainted)
            .bind(&k.owner)
            .execute(&mut **t)
            .await?
            .rows_affected());
        if n != 1 {
            return Err(StoreError::NotOwner(k.kid.clone()));
        }
        self.announce("authorities");
        Ok(())
    }

    /// Removes published JWT keys that expired before `now` (0 never expires).
    pub async fn expire_published_jwt_keys(
        &mut self,
        trust_domain: &str,
        now: i64,
    ) -> Result<u64, StoreError> {
        let q = "DELETE FROM published_jwt_keys WHERE trust_domain = $1 AND expires_at <> 0 AND expires_at <= $2";
        let n = on_tx!(&mut self.tx, t => sqlx::query(q)
            .bind(trust_domain)
            .bind(now)
            .execute(&mut **t)
            .await?
            .rows_affected());
        if n > 0 {
            self.announce("authorities");
        }
        Ok(n)
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
        let q = "INSERT INTO rotation_journal (trust_domain, at, step, label, detail) VALUES ($1, $2, $3, $4, $5)";
        on_tx!(&mut self.tx, t => { sqlx::query(q)
            .bind(trust_domain)
            .bind(at)
            .bind(step)
            .bind(label)
            .bind(detail)
            .execute(&mut **t)
            .await?; });
        Ok(())
    }

    /// Records which token key answers for a KeyManager key id (replacing an earlier generation's).
    pub async fn put_keymanager_key(&mut self, k: &KeyManagerRecord) -> Result<(), StoreError> {
        let q = "INSERT INTO keymanager_keys (namespace, key_id, label, public_key, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (namespace, key_id) DO UPDATE SET label = excluded.label, \
                 public_key = excluded.public_key, updated_at = excluded.updated_at";
        on_tx!(&mut self.tx, t => { sqlx::query(q)
            .bind(&k.namespace)
            .bind(&k.key_id)
            .bind(&k.label)
            .bind(&k.public_key)
            .bind(k.updated_at)
            .execute(&mut **t)
            .await?; });
        self.announce(format!("keymanager {} {}", k.namespace, k.key_id));
        Ok(())
    }

    /// Commits, and (PostgreSQL) announces what changed to every replica in the same commit.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        if let Tx::Postgres(t) = &mut self.tx {
            for what in &self.notify {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANGES_CHANNEL)
                    .bind(what)
                    .execute(&mut **t)
                    .await?;
            }
        }
        on_tx!(self.tx, t => t.commit().await?);
        Ok(())
    }
}
