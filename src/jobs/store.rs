//! Where jobs live: SQLite on a file (embedded, one replica) or a
//! PostgreSQL table (shared by replicas). One table, the same statements
//! (`$N` parameters, read as `?N` by SQLite), the same rows.
//!
//! Every write that ends a job is conditional on the job not having ended
//! yet (`state IN ('queued','running')`), so a cancel and a finish racing
//! each other end it once.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::sync::RwLock;

use super::State;
use crate::config::JobStore;

/// Overrides `jobs.store.postgres.url` when set (a password from a Secret).
pub const DATABASE_URL_ENV: &str = "SDGATE_JOBS_DATABASE_URL";

/// Spend of one caller on one service in one UTC hour.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UsageRow {
    pub service: String,
    pub tenant: String,
    /// The hour's start, in Unix seconds.
    pub hour: i64,
    pub spend: Spend,
}

/// What a caller spent: requests admitted, pod time (GPU microseconds),
/// images its generations made (as the pods' answers report them) and
/// checkpoint loads its requests caused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spend {
    pub requests: i64,
    pub gpu_us: i64,
    pub images: i64,
    pub loads: i64,
}

impl std::ops::AddAssign for Spend {
    fn add_assign(&mut self, other: Self) {
        self.requests += other.requests;
        self.gpu_us += other.gpu_us;
        self.images += other.images;
        self.loads += other.loads;
    }
}

/// One job's row, without its request and result bodies.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub id: String,
    pub service: String,
    /// Who may read and cancel it (a hash of its session, key or address).
    pub owner: String,
    pub state: State,
    pub created_us: i64,
    pub started_us: Option<i64>,
    pub finished_us: Option<i64>,
    /// When a finished job is deleted.
    pub expires_us: Option<i64>,
    /// Runs started (a lost run is retried once).
    pub attempts: i64,
    /// The pod it runs or ran on.
    pub pod: Option<String>,
    pub error: Option<String>,
    pub webhook: Option<String>,
    /// `pending`, `delivered` or `failed` (with the reason).
    pub webhook_state: Option<String>,
    pub result_status: Option<i64>,
    /// The pod's answer headers, as a JSON array of [name, value].
    pub result_headers: Option<String>,
    pub request_bytes: i64,
    pub result_bytes: i64,
}

/// A new job: its row and its request (the head as JSON, the body).
pub struct New {
    pub row: Row,
    pub head: String,
    pub body: Vec<u8>,
}

/// How a job ended.
pub struct Ending {
    pub state: State,
    pub finished_us: i64,
    pub expires_us: i64,
    pub error: Option<String>,
    pub status: Option<i64>,
    pub headers: Option<String>,
    pub body: Option<Vec<u8>>,
    pub webhook_state: Option<String>,
}

/// Counts of one service's jobs in one state, and the oldest one's creation.
#[derive(Clone, Debug, PartialEq)]
pub struct Count {
    pub service: String,
    pub state: State,
    pub jobs: i64,
    pub oldest_us: i64,
}

#[derive(Clone)]
enum Value {
    I64(i64),
    OptI64(Option<i64>),
    Text(String),
    OptText(Option<String>),
    Bytes(Vec<u8>),
    OptBytes(Option<Vec<u8>>),
}

/// The store: SQLite or PostgreSQL.
#[derive(Clone)]
pub struct Store {
    engine: Arc<Engine>,
}

enum Engine {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres { config: String, table: String, client: RwLock<Option<Arc<tokio_postgres::Client>>> },
}

const COLUMNS: &str = "id, service, owner, state, created_us, started_us, finished_us, expires_us, attempts, pod, \
     error, webhook, webhook_state, result_status, result_headers, request_bytes, result_bytes";

impl Store {
    /// Opens the store (creating its table), or says why it cannot.
    pub async fn open(config: &JobStore) -> Result<Self> {
        let engine = match config {
            JobStore::File(path) => {
                let path = path.clone();
                let connection = tokio::task::spawn_blocking(move || -> Result<rusqlite::Connection> {
                    let connection = rusqlite::Connection::open(&path)
                        .with_context(|| format!("jobs.store.file: cannot open {}", path.display()))?;
                    // Durable at each commit; readers do not wait for writers.
                    connection.pragma_update(None, "journal_mode", "WAL")?;
                    connection.pragma_update(None, "synchronous", "FULL")?;
                    connection.busy_timeout(std::time::Duration::from_secs(5))?;
                    Ok(connection)
                })
                .await??;
                Engine::Sqlite(Mutex::new(connection))
            }
            JobStore::Postgres(pg) => {
                Engine::Postgres { config: pg.url.clone(), table: pg.table.clone(), client: RwLock::new(None) }
            }
        };
        let store = Self { engine: Arc::new(engine) };
        // PostgreSQL's table is made at each connection (sdgate starts
        // without its database; jobs answer 503 until it is there).
        if let Engine::Sqlite(_) = &*store.engine {
            let [jobs, index, usage, columns @ ..] = schema("jobs", "BLOB");
            for statement in [jobs, index, usage] {
                store.execute(&statement, vec![]).await.context("jobs store: cannot create its table")?;
            }
            for statement in columns {
                // "duplicate column name" where the table has it already.
                let _ = store.execute(&statement, vec![]).await;
            }
            store.execute(&columns_check("jobs"), vec![]).await.context("jobs store: cannot add the usage columns")?;
        }
        Ok(store)
    }

    pub fn engine_name(&self) -> &'static str {
        match &*self.engine {
            Engine::Sqlite(_) => "sqlite",
            Engine::Postgres { .. } => "postgres",
        }
    }

    /// The table's name, quoted (a validated name that may still be a
    /// reserved word).
    fn table(&self) -> String {
        match &*self.engine {
            Engine::Sqlite(_) => "\"jobs\"".into(),
            Engine::Postgres { table, .. } => format!("\"{table}\""),
        }
    }

    pub async fn insert(&self, job: New) -> Result<()> {
        let r = job.row;
        let sql = format!(
            "INSERT INTO {} ({COLUMNS}, head, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
             $15, $16, $17, $18, $19)",
            self.table()
        );
        let values = vec![
            Value::Text(r.id),
            Value::Text(r.service),
            Value::Text(r.owner),
            Value::Text(r.state.as_str().into()),
            Value::I64(r.created_us),
            Value::OptI64(r.started_us),
            Value::OptI64(r.finished_us),
            Value::OptI64(r.expires_us),
            Value::I64(r.attempts),
            Value::OptText(r.pod),
            Value::OptText(r.error),
            Value::OptText(r.webhook),
            Value::OptText(r.webhook_state),
            Value::OptI64(r.result_status),
            Value::OptText(r.result_headers),
            Value::I64(r.request_bytes),
            Value::I64(r.result_bytes),
            Value::Text(job.head),
            Value::Bytes(job.body),
        ];
        self.execute(&sql, values).await.map(drop)
    }

    pub async fn get(&self, id: &str) -> Result<Option<Row>> {
        let sql = format!("SELECT {COLUMNS} FROM {} WHERE id = $1", self.table());
        Ok(self.rows(&sql, vec![Value::Text(id.into())]).await?.into_iter().next())
    }

    /// A job's request: its head (JSON) and body.
    pub async fn request(&self, id: &str) -> Result<Option<(String, Vec<u8>)>> {
        let sql = format!("SELECT head, body FROM {} WHERE id = $1", self.table());
        let id = id.to_string();
        match &*self.engine {
            Engine::Sqlite(connection) => {
                let sql = sqlite_sql(&sql);
                self.blocking(connection, move |c| {
                    let mut statement = c.prepare_cached(&sql)?;
                    let mut rows = statement.query([id])?;
                    Ok(match rows.next()? {
                        Some(row) => Some((row.get(0)?, row.get(1)?)),
                        None => None,
                    })
                })
                .await
            }
            Engine::Postgres { .. } => {
                let client = self.postgres().await?;
                let row = timed(client.query_opt(&sql, &[&id])).await?;
                row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?))).transpose()
            }
        }
    }

    /// A finished job's result body.
    pub async fn result_body(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let sql = format!("SELECT result_body FROM {} WHERE id = $1", self.table());
        let id = id.to_string();
        match &*self.engine {
            Engine::Sqlite(connection) => {
                let sql = sqlite_sql(&sql);
                self.blocking(connection, move |c| {
                    let mut statement = c.prepare_cached(&sql)?;
                    let mut rows = statement.query([id])?;
                    Ok(match rows.next()? {
                        Some(row) => row.get::<_, Option<Vec<u8>>>(0)?,
                        None => None,
                    })
                })
                .await
            }
            Engine::Postgres { .. } => {
                let client = self.postgres().await?;
                let row = timed(client.query_opt(&sql, &[&id])).await?;
                Ok(row.map(|row| row.try_get::<_, Option<Vec<u8>>>(0)).transpose()?.flatten())
            }
        }
    }

    /// The job took a pod: `running` (a queued job only).
    pub async fn set_running(&self, id: &str, pod: &str, started_us: i64) -> Result<bool> {
        let sql = format!(
            "UPDATE {} SET state = 'running', pod = $2, started_us = $3, attempts = attempts + 1 \
             WHERE id = $1 AND state = 'queued'",
            self.table()
        );
        let values = vec![Value::Text(id.into()), Value::Text(pod.into()), Value::I64(started_us)];
        Ok(self.execute(&sql, values).await? == 1)
    }

    /// Ends a job that has not ended yet; false if it had.
    pub async fn finish(&self, id: &str, ending: Ending) -> Result<bool> {
        let sql = format!(
            "UPDATE {} SET state = $2, finished_us = $3, expires_us = $4, error = $5, result_status = $6, \
             result_headers = $7, result_body = $8, result_bytes = $9, webhook_state = $10 \
             WHERE id = $1 AND state IN ('queued', 'running')",
            self.table()
        );
        let bytes = ending.body.as_ref().map_or(0, |b| b.len() as i64);
        let values = vec![
            Value::Text(id.into()),
            Value::Text(ending.state.as_str().into()),
            Value::I64(ending.finished_us),
            Value::I64(ending.expires_us),
            Value::OptText(ending.error),
            Value::OptI64(ending.status),
            Value::OptText(ending.headers),
            Value::OptBytes(ending.body),
            Value::I64(bytes),
            Value::OptText(ending.webhook_state),
        ];
        Ok(self.execute(&sql, values).await? == 1)
    }

    /// A running job goes back to the queue (its run was lost).
    pub async fn requeue(&self, id: &str) -> Result<bool> {
        let sql = format!(
            "UPDATE {} SET state = 'queued', pod = NULL, started_us = NULL WHERE id = $1 AND state = 'running'",
            self.table()
        );
        Ok(self.execute(&sql, vec![Value::Text(id.into())]).await? == 1)
    }

    pub async fn set_webhook_state(&self, id: &str, state: &str) -> Result<()> {
        let sql = format!("UPDATE {} SET webhook_state = $2 WHERE id = $1", self.table());
        self.execute(&sql, vec![Value::Text(id.into()), Value::Text(state.into())]).await.map(drop)
    }

    /// Jobs not ended, oldest first.
    pub async fn unfinished(&self) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE state IN ('queued', 'running') ORDER BY created_us, id",
            self.table()
        );
        self.rows(&sql, vec![]).await
    }

    /// Ended jobs whose webhook is still to be sent.
    pub async fn webhooks_pending(&self) -> Result<Vec<Row>> {
        let sql =
            format!("SELECT {COLUMNS} FROM {} WHERE webhook_state = 'pending' ORDER BY finished_us", self.table());
        self.rows(&sql, vec![]).await
    }

    /// Jobs, newest first: of one owner (of one service) or all.
    pub async fn list(&self, owner: Option<(&str, &str)>, limit: i64) -> Result<Vec<Row>> {
        match owner {
            Some((service, owner)) => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM {} WHERE service = $1 AND owner = $2 ORDER BY created_us DESC LIMIT $3",
                    self.table()
                );
                self.rows(&sql, vec![Value::Text(service.into()), Value::Text(owner.into()), Value::I64(limit)]).await
            }
            None => {
                let sql = format!("SELECT {COLUMNS} FROM {} ORDER BY created_us DESC LIMIT $1", self.table());
                self.rows(&sql, vec![Value::I64(limit)]).await
            }
        }
    }

    /// Jobs in `state`, newest first.
    pub async fn list_in_state(&self, state: State, limit: i64) -> Result<Vec<Row>> {
        let sql = format!("SELECT {COLUMNS} FROM {} WHERE state = $1 ORDER BY created_us DESC LIMIT $2", self.table());
        self.rows(&sql, vec![Value::Text(state.as_str().into()), Value::I64(limit)]).await
    }

    /// Jobs by service and state, with the oldest one's creation.
    pub async fn counts(&self) -> Result<Vec<Count>> {
        let sql = format!(
            "SELECT service, state, COUNT(*), MIN(created_us) FROM {} GROUP BY service, state ORDER BY service, state",
            self.table()
        );
        let read = |service: String, state: String, jobs: i64, oldest: i64| {
            State::parse(&state).map(|state| Count { service, state, jobs, oldest_us: oldest })
        };
        match &*self.engine {
            Engine::Sqlite(connection) => {
                let sql = sqlite_sql(&sql);
                self.blocking(connection, move |c| {
                    let mut statement = c.prepare_cached(&sql)?;
                    let rows =
                        statement.query_map([], |row| Ok(read(row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?;
                    Ok(rows.filter_map(|row| row.ok().flatten()).collect())
                })
                .await
            }
            Engine::Postgres { .. } => {
                let client = self.postgres().await?;
                let rows = timed(client.query(&sql, &[])).await?;
                Ok(rows
                    .iter()
                    .filter_map(|row| {
                        read(row.try_get(0).ok()?, row.try_get(1).ok()?, row.try_get(2).ok()?, row.try_get(3).ok()?)
                    })
                    .collect())
            }
        }
    }

    /// Bytes all kept jobs hold (requests and results).
    pub async fn total_bytes(&self) -> Result<i64> {
        let sql =
            format!("SELECT CAST(COALESCE(SUM(request_bytes + result_bytes), 0) AS BIGINT) FROM {}", self.table());
        match &*self.engine {
            Engine::Sqlite(connection) => {
                let sql = sqlite_sql(&sql);
                self.blocking(connection, move |c| Ok(c.query_row(&sql, [], |row| row.get(0))?)).await
            }
            Engine::Postgres { .. } => {
                let client = self.postgres().await?;
                Ok(timed(client.query_one(&sql, &[])).await?.try_get(0)?)
            }
        }
    }

    /// Adds spend.
    pub async fn add_usage(&self, rows: &[UsageRow]) -> Result<()> {
        let table = self.usage_table();
        let sql = format!(
            "INSERT INTO {table} AS u (service, tenant, hour, requests, gpu_us, images, loads) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (service, tenant, hour) DO UPDATE SET \
             requests = u.requests + excluded.requests, gpu_us = u.gpu_us + excluded.gpu_us, \
             images = u.images + excluded.images, loads = u.loads + excluded.loads"
        );
        for row in rows {
            let values = vec![
                Value::Text(row.service.clone()),
                Value::Text(row.tenant.clone()),
                Value::I64(row.hour),
                Value::I64(row.spend.requests),
                Value::I64(row.spend.gpu_us),
                Value::I64(row.spend.images),
                Value::I64(row.spend.loads),
            ];
            self.execute(&sql, values).await?;
        }
        Ok(())
    }

    /// Spend from the UTC hour `since` (Unix seconds) on, oldest first.
    pub async fn usage_since(&self, since: i64) -> Result<Vec<UsageRow>> {
        let sql = format!(
            "SELECT service, tenant, hour, requests, gpu_us, images, loads FROM {} WHERE hour >= $1 \
             ORDER BY hour, service, tenant",
            self.usage_table()
        );
        match &*self.engine {
            Engine::Sqlite(connection) => {
                let sql = sqlite_sql(&sql);
                self.blocking(connection, move |c| {
                    let mut statement = c.prepare_cached(&sql)?;
                    let rows = statement.query_map([since], |row| {
                        let spend = Spend {
                            requests: row.get(3)?,
                            gpu_us: row.get(4)?,
                            images: row.get(5)?,
                            loads: row.get(6)?,
                        };
                        Ok(UsageRow { service: row.get(0)?, tenant: row.get(1)?, hour: row.get(2)?, spend })
                    })?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Engine::Postgres { .. } => {
                let client = self.postgres().await?;
                let rows = timed(client.query(&sql, &[&since])).await?;
                rows.iter()
                    .map(|row| {
                        let spend = Spend {
                            requests: row.try_get(3)?,
                            gpu_us: row.try_get(4)?,
                            images: row.try_get(5)?,
                            loads: row.try_get(6)?,
                        };
                        Ok(UsageRow { service: row.try_get(0)?, tenant: row.try_get(1)?, hour: row.try_get(2)?, spend })
                    })
                    .collect()
            }
        }
    }

    fn usage_table(&self) -> String {
        match &*self.engine {
            Engine::Sqlite(_) => "\"jobs_usage\"".into(),
            Engine::Postgres { table, .. } => format!("\"{table}_usage\""),
        }
    }

    /// Deletes ended jobs past their expiry; how many.
    pub async fn expire(&self, now_us: i64) -> Result<u64> {
        let sql = format!(
            "DELETE FROM {} WHERE expires_us < $1 AND state NOT IN ('queued', 'running') \
             AND (webhook_state IS NULL OR webhook_state <> 'pending')",
            self.table()
        );
        self.execute(&sql, vec![Value::I64(now_us)]).await
    }

    async fn rows(&self, sql: &str, values: Vec<Value>) -> Result<Vec<Row>> {
        match &*self.engine {
            Engine::Sqlite(connection) => {
                let sql = sqlite_sql(sql);
                self.blocking(connection, move |c| {
                    let mut statement = c.prepare_cached(&sql)?;
                    let params = sqlite_params(&values);
                    let rows = statement.query_map(rusqlite::params_from_iter(params.iter()), |row| {
                        Ok((
                            Row {
                                id: row.get(0)?,
                                service: row.get(1)?,
                                owner: row.get(2)?,
                                state: State::Queued,
                                created_us: row.get(4)?,
                                started_us: row.get(5)?,
                                finished_us: row.get(6)?,
                                expires_us: row.get(7)?,
                                attempts: row.get(8)?,
                                pod: row.get(9)?,
                                error: row.get(10)?,
                                webhook: row.get(11)?,
                                webhook_state: row.get(12)?,
                                result_status: row.get(13)?,
                                result_headers: row.get(14)?,
                                request_bytes: row.get(15)?,
                                result_bytes: row.get(16)?,
                            },
                            row.get::<_, String>(3)?,
                        ))
                    })?;
                    let mut out = Vec::new();
                    for row in rows {
                        let (mut row, state) = row?;
                        row.state = State::parse(&state).context("jobs store: a row with an unknown state")?;
                        out.push(row);
                    }
                    Ok(out)
                })
                .await
            }
            Engine::Postgres { .. } => {
                let client = self.postgres().await?;
                let params = postgres_params(&values);
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
                let rows = timed(client.query(sql, &refs)).await?;
                rows.iter()
                    .map(|row| {
                        let state: String = row.try_get(3)?;
                        Ok(Row {
                            id: row.try_get(0)?,
                            service: row.try_get(1)?,
                            owner: row.try_get(2)?,
                            state: State::parse(&state).context("jobs store: a row with an unknown state")?,
                            created_us: row.try_get(4)?,
                            started_us: row.try_get(5)?,
                            finished_us: row.try_get(6)?,
                            expires_us: row.try_get(7)?,
                            attempts: row.try_get(8)?,
                            pod: row.try_get(9)?,
                            error: row.try_get(10)?,
                            webhook: row.try_get(11)?,
                            webhook_state: row.try_get(12)?,
                            result_status: row.try_get(13)?,
                            result_headers: row.try_get(14)?,
                            request_bytes: row.try_get(15)?,
                            result_bytes: row.try_get(16)?,
                        })
                    })
                    .collect()
            }
        }
    }

    /// Runs a statement; the rows it changed.
    async fn execute(&self, sql: &str, values: Vec<Value>) -> Result<u64> {
        match &*self.engine {
            Engine::Sqlite(connection) => {
                let sql = sqlite_sql(sql);
                self.blocking(connection, move |c| {
                    let params = sqlite_params(&values);
                    let mut statement = c.prepare_cached(&sql)?;
                    Ok(statement.execute(rusqlite::params_from_iter(params.iter()))? as u64)
                })
                .await
            }
            Engine::Postgres { .. } => {
                let client = self.postgres().await?;
                let params = postgres_params(&values);
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
                timed(client.execute(sql, &refs)).await
            }
        }
    }

    /// SQLite's calls are blocking: on tokio's blocking threads, one at a time.
    async fn blocking<T: Send + 'static>(
        &self,
        _connection: &Mutex<rusqlite::Connection>,
        call: impl FnOnce(&rusqlite::Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || match &*engine {
            Engine::Sqlite(connection) => call(&crate::error::lock(connection)),
            Engine::Postgres { .. } => anyhow::bail!("not SQLite"),
        })
        .await
        .context("jobs store: the SQLite call panicked")?
        .context("jobs store (SQLite)")
    }

    /// The PostgreSQL client, connected again if its connection ended.
    async fn postgres(&self) -> Result<Arc<tokio_postgres::Client>> {
        let Engine::Postgres { config, client, table } = &*self.engine else {
            anyhow::bail!("not PostgreSQL");
        };
        if let Some(client) = client.read().await.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let mut slot = client.write().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        // The URL with a password comes from the environment (a Secret).
        let url = std::env::var(DATABASE_URL_ENV).unwrap_or_else(|_| config.clone());
        let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
        let (fresh, connection) = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
            .await
            .context("jobs.store.postgres: no connection within 10 s")?
            .context("jobs.store.postgres: cannot connect")?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "jobs store: the PostgreSQL connection ended");
            }
        });
        let [jobs, index, usage, columns @ ..] = schema(table, "BYTEA");
        for statement in [jobs, index, usage] {
            // Two replicas may create it at once: the loser's error is
            // harmless if the table is there after.
            if let Err(error) = fresh.batch_execute(&statement).await {
                let there = fresh.query_opt(&format!("SELECT 1 FROM \"{table}\" LIMIT 1"), &[]).await.is_ok();
                if !there {
                    return Err(anyhow::Error::new(error).context("jobs store: cannot create its table"));
                }
            }
        }
        for statement in columns {
            // "already exists" where the table has it.
            let _ = fresh.batch_execute(&statement).await;
        }
        fresh.batch_execute(&columns_check(table)).await.context("jobs store: cannot add the usage columns")?;
        let fresh = Arc::new(fresh);
        *slot = Some(fresh.clone());
        Ok(fresh)
    }
}

/// The longest a PostgreSQL call may take (a partition must not hang the
/// job API, the runner or a stop).
const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A PostgreSQL call within [`STORE_TIMEOUT`].
async fn timed<T>(call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T> {
    tokio::time::timeout(STORE_TIMEOUT, call)
        .await
        .context("jobs store: PostgreSQL did not answer within 10 s")?
        .context("jobs store")
}

/// The table and its index.
fn schema(table: &str, blob: &str) -> [String; 5] {
    // PostgreSQL adds a column only if missing; SQLite cannot say so (its
    // error is ignored).
    let exists = if blob == "BYTEA" { "IF NOT EXISTS " } else { "" };
    [
        format!(
            "CREATE TABLE IF NOT EXISTS \"{table}\" (id TEXT PRIMARY KEY, service TEXT NOT NULL, owner TEXT NOT NULL, \
             state TEXT NOT NULL, created_us BIGINT NOT NULL, started_us BIGINT, finished_us BIGINT, \
             expires_us BIGINT, attempts BIGINT NOT NULL, pod TEXT, error TEXT, webhook TEXT, webhook_state TEXT, \
             result_status BIGINT, result_headers TEXT, request_bytes BIGINT NOT NULL, result_bytes BIGINT NOT NULL, \
             head TEXT NOT NULL, body {blob} NOT NULL, result_body {blob})"
        ),
        format!("CREATE INDEX IF NOT EXISTS \"{table}_by_state\" ON \"{table}\" (state, created_us)"),
        // Spend per service, caller and UTC hour (see proxy::tenants).
        format!(
            "CREATE TABLE IF NOT EXISTS \"{table}_usage\" (service TEXT NOT NULL, tenant TEXT NOT NULL, \
             hour BIGINT NOT NULL, requests BIGINT NOT NULL, gpu_us BIGINT NOT NULL, \
             images BIGINT NOT NULL DEFAULT 0, loads BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (service, tenant, hour))"
        ),
        // Columns a table made before them lacks (an error where they are
        // there is ignored; `columns_check` then says they are).
        format!("ALTER TABLE \"{table}_usage\" ADD COLUMN {exists}images BIGINT NOT NULL DEFAULT 0"),
        format!("ALTER TABLE \"{table}_usage\" ADD COLUMN {exists}loads BIGINT NOT NULL DEFAULT 0"),
    ]
}

/// A statement that fails unless the usage table has the columns added
/// after it was first made.
fn columns_check(table: &str) -> String {
    format!("UPDATE \"{table}_usage\" SET images = images, loads = loads WHERE 1 = 0")
}

/// `$N` parameters as SQLite's numbered `?N`.
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

fn sqlite_params(values: &[Value]) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value as V;
    values
        .iter()
        .map(|value| match value.clone() {
            Value::I64(v) => V::Integer(v),
            Value::OptI64(v) => v.map_or(V::Null, V::Integer),
            Value::Text(v) => V::Text(v),
            Value::OptText(v) => v.map_or(V::Null, V::Text),
            Value::Bytes(v) => V::Blob(v),
            Value::OptBytes(v) => v.map_or(V::Null, V::Blob),
        })
        .collect()
}

fn postgres_params(values: &[Value]) -> Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> {
    values
        .iter()
        .map(|value| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
            match value.clone() {
                Value::I64(v) => Box::new(v),
                Value::OptI64(v) => Box::new(v),
                Value::Text(v) => Box::new(v),
                Value::OptText(v) => Box::new(v),
                Value::Bytes(v) => Box::new(v),
                Value::OptBytes(v) => Box::new(v),
            }
        })
        .collect()
}
