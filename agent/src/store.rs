//! The agent's durable state, in SQLite (`<state_dir>/netpulse.db`): every
//! check result (kept `history_days`), and the job queue.
//!
//! Writes that fail (a full disk, say) are logged once per kind of failure
//! and dropped; the agent goes on counting and serving, and the store
//! recovers by itself when writes succeed again.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(
        "store {path}: schema version {found} was written by a newer netpulse (this one knows up to {known}); move the file aside or run the newer agent"
    )]
    Newer {
        path: PathBuf,
        found: i64,
        known: usize,
    },
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The job queue's rows are the API's jobs: one type for both.
pub use crate::api_types::{Job, JobState};

/// A state as the `jobs` table stores it (`JobState::as_str`); anything
/// else reads as interrupted.
fn parse_state(s: &str) -> JobState {
    match s {
        "pending" => JobState::Pending,
        "running" => JobState::Running,
        "done" => JobState::Done,
        "failed" => JobState::Failed,
        _ => JobState::Interrupted,
    }
}

/// One stored check result.
#[derive(Debug, Clone, Serialize)]
pub struct ResultRow {
    pub at_ms: i64,
    pub ok: bool,
    pub duration_ms: f64,
    pub error: Option<String>,
    /// Why it failed, in one line, and `evidence.cause` (its word).
    pub explanation: Option<String>,
    pub cause: Option<String>,
}

/// A down → up interval (`end_ms` None: still down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incident {
    pub check: String,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
    pub error: Option<String>,
    pub explanation: Option<String>,
}

pub struct Store {
    conn: Mutex<Connection>,
    /// Results not yet written: `flush` writes them in one transaction
    /// (the agent does every second), so a busy schedule costs one commit
    /// a second, not one per result.
    pending: Mutex<Vec<(String, ResultRow)>>,
    path: PathBuf,
    /// The last write error logged, so a full disk is logged once.
    failing: Mutex<Option<String>>,
    /// `summary` per check, computed when asked and kept until the check's
    /// next result is written (or `SUMMARY_TTL`): the status page, the API
    /// and every viewer then share one scan of a check's week of results.
    summaries: Mutex<HashMap<String, (Instant, Summary)>>,
}

/// A check's uptime over 24 h and 7 d and its incidents of the last 7 d.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub uptime_24h: Option<f64>,
    pub uptime_7d: Option<f64>,
    pub incidents: Vec<Incident>,
}

/// How long a summary stands without new results (its windows slide).
const SUMMARY_TTL: Duration = Duration::from_secs(60);

/// Results held in memory at most, waiting for a write to succeed.
const MAX_PENDING: usize = 100_000;

/// The schema, one migration per version: `MIGRATIONS[i]` takes a store
/// from `user_version` i to i + 1. Append a migration to change the schema;
/// never edit one that has shipped. Version 1 is the schema from before
/// the store was versioned (hence `IF NOT EXISTS`: such a store, at
/// version 0, already has it).
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

/// Version 2: each failed result's explanation and cause.
const SCHEMA_V2: &str = "
ALTER TABLE results ADD COLUMN explanation TEXT;
ALTER TABLE results ADD COLUMN cause TEXT;
";

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    check_name TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS results_by_check ON results (check_name, at_ms);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    arg TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
";

/// Brings the store's schema to the newest version this agent knows, one
/// migration per transaction; refuses a store from a newer agent.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > MIGRATIONS.len() as i64 {
        return Err(StoreError::Newer {
            path: path.to_path_buf(),
            found,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        info!(store = %path.display(), version = i + 1, "store schema migrated");
    }
    Ok(())
}

impl Store {
    /// Opens (creating) `<dir>/netpulse.db`. Jobs a previous agent left
    /// running are marked interrupted; pending ones stay queued.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("netpulse.db");
        let open = |path: &Path| -> Result<Connection, rusqlite::Error> {
            std::fs::create_dir_all(dir)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            let c = Connection::open(path)?;
            c.busy_timeout(Duration::from_secs(5))?;
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.pragma_update(None, "synchronous", "NORMAL")?;
            Ok(c)
        };
        let mut conn = open(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        migrate(&mut conn, &path)?;
        let n = conn.execute(
            "UPDATE jobs SET state = 'interrupted', finished_ms = ?1 WHERE state = 'running'",
            params![now_ms()],
        )?;
        if n > 0 {
            warn!(
                jobs = n,
                "jobs running when the agent stopped are marked interrupted"
            );
        }
        Ok(Store {
            conn: Mutex::new(conn),
            pending: Mutex::new(Vec::new()),
            path,
            failing: Mutex::new(None),
            summaries: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs a failed write once (until writes succeed again).
    fn wrote<T>(&self, what: &str, r: Result<T, rusqlite::Error>) -> Option<T> {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(v) => {
                if failing.take().is_some() {
                    info!(store = %self.path.display(), "store writes work again");
                }
                Some(v)
            }
            Err(e) => {
                let msg = e.to_string();
                if failing.as_deref() != Some(msg.as_str()) {
                    warn!(
                        store = %self.path.display(),
                        error = %msg,
                        "store write failed ({what}); going on without it, retrying with each write"
                    );
                    *failing = Some(msg);
                }
                None
            }
        }
    }

    /// Whether the last write failed.
    pub fn failing(&self) -> bool {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Queues a result for the next `flush`. Bounded: while the disk
    /// refuses writes, results beyond `MAX_PENDING` are dropped (counting
    /// and checking go on).
    pub fn add_result(&self, check: &str, row: &ResultRow) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() < MAX_PENDING {
            p.push((check.to_string(), row.clone()));
        }
    }

    /// Writes the queued results in one transaction; on failure they stay
    /// queued for the next try.
    pub fn flush(&self) {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return;
        }
        let mut conn = self.conn();
        let r = (|| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO results (check_name, at_ms, ok, duration_ms, error, explanation, cause) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                for (check, row) in &batch {
                    st.execute(params![
                        check,
                        row.at_ms,
                        row.ok,
                        row.duration_ms,
                        row.error,
                        row.explanation,
                        row.cause
                    ])?;
                }
            }
            tx.commit()
        })();
        drop(conn);
        if r.is_ok() {
            let mut cache = self.summaries();
            for (check, _) in &batch {
                cache.remove(check);
            }
        }
        if self.wrote("check results", r).is_none() {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let room = MAX_PENDING.saturating_sub(p.len());
            let mut back: Vec<_> = batch.into_iter().take(room).collect();
            back.append(&mut p);
            *p = back;
        }
    }

    /// Deletes results older than `keep`.
    pub fn prune(&self, keep: Duration) {
        self.flush();
        let cutoff = now_ms() - keep.as_millis() as i64;
        let r = self
            .conn()
            .execute("DELETE FROM results WHERE at_ms < ?1", params![cutoff]);
        self.summaries().clear();
        self.wrote("pruning history", r);
    }

    fn summaries(&self) -> MutexGuard<'_, HashMap<String, (Instant, Summary)>> {
        self.summaries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Uptime over 24 h and 7 d and the incidents of 7 d of `check`,
    /// computed once per new result (see `summaries`).
    pub fn summary(&self, check: &str) -> Summary {
        self.flush();
        if let Some((at, s)) = self.summaries().get(check)
            && at.elapsed() < SUMMARY_TTL
        {
            return s.clone();
        }
        let now = now_ms();
        let (day, week) = (now - 86_400_000, now - 7 * 86_400_000);
        let s = Summary {
            uptime_24h: self.uptime(check, day),
            uptime_7d: self.uptime(check, week),
            incidents: self.incidents(check, week),
        };
        self.summaries()
            .insert(check.to_string(), (Instant::now(), s.clone()));
        s
    }

    /// Share of successful results of `check` since `since_ms` (None:
    /// no results in that window).
    pub fn uptime(&self, check: &str, since_ms: i64) -> Option<f64> {
        self.flush();
        self.conn()
            .query_row(
                "SELECT avg(ok) FROM results WHERE check_name = ?1 AND at_ms >= ?2",
                params![check, since_ms],
                |r| r.get::<_, Option<f64>>(0),
            )
            .ok()
            .flatten()
    }

    /// The latest `limit` results of `check`, newest first.
    pub fn recent(&self, check: &str, limit: usize) -> Vec<ResultRow> {
        self.flush();
        let conn = self.conn();
        let Ok(mut st) = conn.prepare(
            "SELECT at_ms, ok, duration_ms, error, explanation, cause FROM results WHERE check_name = ?1 ORDER BY at_ms DESC, id DESC LIMIT ?2",
        ) else {
            return Vec::new();
        };
        st.query_map(params![check, limit as i64], |r| {
            Ok(ResultRow {
                at_ms: r.get(0)?,
                ok: r.get(1)?,
                duration_ms: r.get(2)?,
                error: r.get(3)?,
                explanation: r.get(4)?,
                cause: r.get(5)?,
            })
        })
        .map(|rows| rows.flatten().collect())
        .unwrap_or_default()
    }

    /// Down → up intervals of `check` since `since_ms`, oldest first.
    pub fn incidents(&self, check: &str, since_ms: i64) -> Vec<Incident> {
        self.flush();
        let conn = self.conn();
        let Ok(mut st) = conn.prepare(
            "SELECT at_ms, ok, error, explanation FROM results WHERE check_name = ?1 AND at_ms >= ?2 ORDER BY at_ms, id",
        ) else {
            return Vec::new();
        };
        type Row = (i64, bool, Option<String>, Option<String>);
        let rows: Vec<Row> = st
            .query_map(params![check, since_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map(|rows| rows.flatten().collect())
            .unwrap_or_default();
        let mut out: Vec<Incident> = Vec::new();
        for (at, ok, error, explanation) in rows {
            match (ok, out.last_mut()) {
                (false, Some(open)) if open.end_ms.is_none() => {}
                (false, _) => out.push(Incident {
                    check: check.to_string(),
                    start_ms: at,
                    end_ms: None,
                    error,
                    explanation,
                }),
                (true, Some(open)) if open.end_ms.is_none() => open.end_ms = Some(at),
                (true, _) => {}
            }
        }
        out
    }

    // --- jobs --------------------------------------------------------------

    /// Queues a job; its id, or None if the store cannot write.
    pub fn enqueue(&self, kind: &str, arg: &str) -> Option<i64> {
        let conn = self.conn();
        let r = conn
            .execute(
                "INSERT INTO jobs (kind, arg, state, created_ms) VALUES (?1, ?2, 'pending', ?3)",
                params![kind, arg, now_ms()],
            )
            .map(|_| conn.last_insert_rowid());
        drop(conn);
        self.wrote("queueing a job", r)
    }

    /// Records a job the agent runs itself (a capture a failing check
    /// started), already running, so no worker claims it.
    pub fn record_running(&self, kind: &str, arg: &str) -> Option<i64> {
        let conn = self.conn();
        let now = now_ms();
        let r = conn
            .execute(
                "INSERT INTO jobs (kind, arg, state, created_ms, started_ms) VALUES (?1, ?2, 'running', ?3, ?3)",
                params![kind, arg, now],
            )
            .map(|_| conn.last_insert_rowid());
        drop(conn);
        self.wrote("recording a job", r)
    }

    /// Takes the oldest pending job, marking it running.
    pub fn claim(&self) -> Option<Job> {
        let conn = self.conn();
        let id: Option<i64> = conn
            .query_row(
                "UPDATE jobs SET state = 'running', started_ms = ?1 WHERE id = (SELECT id FROM jobs WHERE state = 'pending' ORDER BY id LIMIT 1) RETURNING id",
                params![now_ms()],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten();
        drop(conn);
        self.job(id?)
    }

    pub fn finish(&self, id: i64, ok: bool, result: &serde_json::Value) {
        let state = if ok { JobState::Done } else { JobState::Failed };
        let r = self.conn().execute(
            "UPDATE jobs SET state = ?1, finished_ms = ?2, result = ?3 WHERE id = ?4",
            params![state.as_str(), now_ms(), result.to_string(), id],
        );
        self.wrote("finishing a job", r);
    }

    pub fn job(&self, id: i64) -> Option<Job> {
        self.conn()
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                params![id],
                job_row,
            )
            .optional()
            .ok()
            .flatten()
    }

    /// The newest `limit` jobs, newest first.
    pub fn jobs(&self, limit: usize) -> Vec<Job> {
        let conn = self.conn();
        let Ok(mut st) = conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?1"
        )) else {
            return Vec::new();
        };
        st.query_map(params![limit as i64], job_row)
            .map(|rows| rows.flatten().collect())
            .unwrap_or_default()
    }
}

const JOB_COLUMNS: &str = "id, kind, arg, state, created_ms, started_ms, finished_ms, result";

fn job_row(r: &rusqlite::Row) -> rusqlite::Result<Job> {
    let result: Option<String> = r.get(7)?;
    Ok(Job {
        id: r.get(0)?,
        kind: r.get(1)?,
        arg: r.get(2)?,
        state: parse_state(&r.get::<_, String>(3)?),
        created_ms: r.get(4)?,
        started_ms: r.get(5)?,
        finished_ms: r.get(6)?,
        result: result.and_then(|s| serde_json::from_str(&s).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_is_versioned_and_a_newer_store_is_refused() {
        let d = tmp("version");
        {
            let s = Store::open(&d).unwrap();
            let v: i64 = s
                .conn()
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(v, MIGRATIONS.len() as i64);
        }
        // A store from before the schema had a version (version 1's
        // tables, at version 0): kept, upgraded.
        {
            std::fs::remove_file(d.join("netpulse.db")).unwrap();
            let c = Connection::open(d.join("netpulse.db")).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.execute(
                "INSERT INTO jobs (kind, arg, state, created_ms) VALUES ('check', 'x', 'done', 1)",
                [],
            )
            .unwrap();
        }
        let s = Store::open(&d).unwrap();
        assert_eq!(s.jobs(10).len(), 1);
        drop(s);
        // One from a newer agent: refused, naming both versions.
        Connection::open(d.join("netpulse.db"))
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&d)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("schema version 99")
                && err.contains(&format!("knows up to {}", MIGRATIONS.len())),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("netpulse-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn uptime_and_incidents_from_results() {
        let d = tmp("uptime");
        let s = Store::open(&d).unwrap();
        let t0 = now_ms() - 10_000;
        for (i, ok) in [true, true, false, false, true, false].iter().enumerate() {
            s.add_result(
                "web",
                &ResultRow {
                    at_ms: t0 + i as i64 * 1000,
                    ok: *ok,
                    duration_ms: 1.0,
                    error: (!ok).then(|| format!("e{i}")),
                    explanation: (!ok).then(|| format!("x{i}")),
                    cause: (!ok).then(|| "refused".into()),
                },
            );
        }
        assert_eq!(s.uptime("web", t0), Some(0.5));
        assert_eq!(s.uptime("other", t0), None);
        let inc = s.incidents("web", t0);
        assert_eq!(
            inc,
            [
                Incident {
                    check: "web".into(),
                    start_ms: t0 + 2000,
                    end_ms: Some(t0 + 4000),
                    error: Some("e2".into()),
                    explanation: Some("x2".into()),
                },
                Incident {
                    check: "web".into(),
                    start_ms: t0 + 5000,
                    end_ms: None,
                    error: Some("e5".into()),
                    explanation: Some("x5".into()),
                },
            ]
        );
        let last = &s.recent("web", 2)[0];
        assert_eq!(
            (
                last.at_ms,
                last.explanation.as_deref(),
                last.cause.as_deref()
            ),
            (t0 + 5000, Some("x5"), Some("refused"))
        );
        // The summary is the same, and a new result is in the next one.
        let sum = s.summary("web");
        assert_eq!((sum.uptime_7d, &sum.incidents[..]), (Some(0.5), &inc[..]));
        s.add_result(
            "web",
            &ResultRow {
                at_ms: t0 + 6000,
                ok: true,
                duration_ms: 1.0,
                error: None,
                explanation: None,
                cause: None,
            },
        );
        let sum = s.summary("web");
        assert_eq!(sum.uptime_7d, Some(4.0 / 7.0));
        assert_eq!(sum.incidents[1].end_ms, Some(t0 + 6000));
        s.prune(Duration::from_millis(3000));
        assert!(s.recent("web", 10).len() < 6);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn jobs_survive_a_restart_and_running_ones_are_interrupted() {
        let d = tmp("jobs");
        let s = Store::open(&d).unwrap();
        let a = s.enqueue("check", "web").unwrap();
        let b = s.enqueue("check", "db").unwrap();
        let claimed = s.claim().unwrap();
        assert_eq!((claimed.id, claimed.state), (a, JobState::Running));
        drop(s);
        let s = Store::open(&d).unwrap();
        assert_eq!(s.job(a).unwrap().state, JobState::Interrupted);
        let next = s.claim().unwrap();
        assert_eq!(next.id, b);
        s.finish(b, true, &serde_json::json!({"ok": true}));
        let done = s.job(b).unwrap();
        assert_eq!(done.state, JobState::Done);
        assert_eq!(done.result, Some(serde_json::json!({"ok": true})));
        assert!(s.claim().is_none());
        let _ = std::fs::remove_dir_all(&d);
    }
}
