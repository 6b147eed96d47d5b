//! `gatehouse keys reindex`: rewrites every blind index under the current `SECRET_KEY`, in
//! the per-tenant form (see `security::blind_index`).
//!
//! The indexed values are sealed, so each row's value is opened with the keyring, its index
//! recomputed and written with the form it was computed in (`*_index_form`). Work goes in
//! keyset-paginated batches (`id > last ORDER BY id LIMIT n FOR UPDATE`), one transaction
//! each: a crash loses at most the batch in flight, and running the command again continues
//! where it stopped, since rows whose form is already current are not selected. A row that
//! is locked by a message being stored waits for it rather than being skipped.
//!
//! Conversations are unique per tenant and index. Two conversations of one customer (made
//! before this command existed, when a changed `SECRET_KEY` silently broke the lookups) map
//! to the same new index: the one with the most recent message keeps it, the other is
//! retired (its index becomes its own id, which no lookup computes, and its form
//! `retired`); its messages stay where they are. The summary counts them.
//!
//! Users' emails are stored in clear (unique, case-normalized), so they have no blind index.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::conversations::{CUSTOMER_NUMBER_DOMAIN, FROM_NUMBER_DOMAIN};
use crate::security::blind_index::{BlindIndex, RETIRED_FORM};
use crate::security::keyring::{Keyring, aad};

/// One blind-indexed column.
#[derive(Debug, Clone, Copy)]
struct Column {
    table: &'static str,
    /// The sealed value, AAD `"{table}.{sealed}:{id}"`.
    sealed: &'static str,
    index: &'static str,
    form: &'static str,
    domain: &'static str,
    /// Whether `(tenant_id, index)` is unique.
    unique: bool,
}

const COLUMNS: &[Column] = &[
    Column {
        table: "conversations",
        sealed: "customer_number",
        index: "customer_number_index",
        form: "customer_number_index_form",
        domain: CUSTOMER_NUMBER_DOMAIN,
        unique: true,
    },
    Column {
        table: "messages",
        sealed: "from_number",
        index: "from_number_index",
        form: "from_number_index_form",
        domain: FROM_NUMBER_DOMAIN,
        unique: false,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum ReindexError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// How much to do.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Rows per transaction (≥ 1).
    pub batch_size: usize,
    /// Stop after about this many rows (whole batches); `None` runs to completion.
    pub limit: Option<u64>,
}

/// Where a run is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Rows rewritten (retired duplicates included) in this run.
    pub done: u64,
    /// Rows not current when the run started (raised if more appear).
    pub total: u64,
    /// Duplicate conversations retired.
    pub retired: u64,
    /// Rows whose sealed value no configured key opens (left as they are).
    pub unreadable: u64,
    /// Whether every selected row was visited (false when stopped by the limit).
    pub complete: bool,
    pub elapsed: Duration,
}

impl Progress {
    /// Rows per second so far.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        }
    }

    /// Estimated time left at the current rate.
    pub fn eta(&self) -> Option<Duration> {
        let left = self.total.saturating_sub(self.done + self.unreadable);
        if left == 0 {
            return Some(Duration::ZERO);
        }
        let rate = self.rate();
        (rate > 0.0).then(|| Duration::from_secs_f64(left as f64 / rate))
    }

    /// One line: `done/total`, rate, ETA.
    pub fn line(&self) -> String {
        let eta = self
            .eta()
            .map_or_else(|| "?".to_owned(), |d| format!("{}s", d.as_secs()));
        format!(
            "{}/{} rows, {:.0} rows/s, ETA {eta}",
            self.done,
            self.total.max(self.done),
            self.rate()
        )
    }
}

/// Rows of every indexed column whose form is not current (retired ones excluded).
pub async fn pending(pool: &PgPool, index: &BlindIndex) -> Result<u64, ReindexError> {
    let mut total = 0u64;
    for col in COLUMNS {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {t} WHERE {f} IS NULL OR ({f} <> $1 AND {f} <> $2)",
            t = col.table,
            f = col.form
        )))
        .bind(index.form())
        .bind(RETIRED_FORM)
        .fetch_one(pool)
        .await?;
        total += u64::try_from(n).unwrap_or(0);
    }
    Ok(total)
}

/// Rewrites every blind index under `index`'s current key; calls `report` after each batch.
pub async fn run(
    pool: &PgPool,
    keyring: &Keyring,
    index: &BlindIndex,
    options: Options,
    mut report: impl FnMut(&Progress),
) -> Result<Progress, ReindexError> {
    let started = Instant::now();
    let mut progress = Progress {
        total: pending(pool, index).await?,
        ..Progress::default()
    };
    let batch = options.batch_size.max(1);
    for col in COLUMNS {
        let mut last = Uuid::nil();
        loop {
            if options.limit.is_some_and(|limit| progress.done >= limit) {
                progress.elapsed = started.elapsed();
                return Ok(progress);
            }
            let Some(next) =
                batch_once(pool, keyring, index, col, last, batch, &mut progress).await?
            else {
                break;
            };
            last = next;
            progress.total = progress.total.max(progress.done + progress.unreadable);
            progress.elapsed = started.elapsed();
            report(&progress);
        }
    }
    progress.complete = true;
    progress.elapsed = started.elapsed();
    Ok(progress)
}

/// One transaction: the next `batch` rows after `last` that are not current. Returns the
/// last id visited, or `None` when there are none left.
async fn batch_once(
    pool: &PgPool,
    keyring: &Keyring,
    index: &BlindIndex,
    col: &Column,
    last: Uuid,
    batch: usize,
    progress: &mut Progress,
) -> Result<Option<Uuid>, ReindexError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(Uuid, Uuid, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, tenant_id, {s} FROM {t}
         WHERE id > $1 AND ({f} IS NULL OR ({f} <> $2 AND {f} <> $3))
         ORDER BY id LIMIT $4 FOR UPDATE",
        s = col.sealed,
        t = col.table,
        f = col.form
    )))
    .bind(last)
    .bind(index.form())
    .bind(RETIRED_FORM)
    .bind(i64::try_from(batch).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await?;
    let Some(&(next, _, _)) = rows.last() else {
        tx.commit().await?;
        return Ok(None);
    };
    for (id, tenant, sealed) in rows {
        let value = match keyring.open(&sealed, &aad(col.table, col.sealed, &id.to_string())) {
            Ok(value) => value,
            Err(_) => {
                tracing::warn!(table = col.table, row.id = %id, "sealed value does not open");
                progress.unreadable += 1;
                continue;
            }
        };
        let new_index = index
            .compute_for_tenant(col.domain, tenant, &value)
            .to_vec();
        if col.unique {
            let holder: Option<(Uuid, Option<OffsetDateTime>)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, last_message_at FROM {t}
                     WHERE tenant_id = $1 AND {i} = $2 AND id <> $3 FOR UPDATE",
                    t = col.table,
                    i = col.index
                )))
                .bind(tenant)
                .bind(&new_index)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some((holder, holder_last)) = holder {
                let mine: Option<OffsetDateTime> =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT last_message_at FROM {t} WHERE id = $1",
                        t = col.table
                    )))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
                // The conversation with the most recent message keeps the index.
                let retire = if mine > holder_last { holder } else { id };
                retire_row(&mut tx, col, retire).await?;
                progress.retired += 1;
                if retire == id {
                    progress.done += 1;
                    continue;
                }
            }
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {t} SET {i} = $2, {f} = $3 WHERE id = $1",
            t = col.table,
            i = col.index,
            f = col.form
        )))
        .bind(id)
        .bind(&new_index)
        .bind(index.form())
        .execute(&mut *tx)
        .await?;
        progress.done += 1;
    }
    tx.commit().await?;
    Ok(Some(next))
}

/// Takes a duplicate conversation out of every lookup: its index becomes its own id (16
/// bytes, never a 32-byte HMAC, unique because the id is).
async fn retire_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    col: &Column,
    id: Uuid,
) -> Result<(), ReindexError> {
    tracing::warn!(table = col.table, row.id = %id, "duplicate retired by keys reindex");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {t} SET {i} = $2, {f} = $3, updated_at = now() WHERE id = $1",
        t = col.table,
        i = col.index,
        f = col.form
    )))
    .bind(id)
    .bind(id.as_bytes().to_vec())
    .bind(RETIRED_FORM)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reports_rate_and_eta() {
        let p = Progress {
            done: 50,
            total: 150,
            elapsed: Duration::from_secs(5),
            ..Progress::default()
        };
        assert!((p.rate() - 10.0).abs() < 1e-9);
        assert_eq!(p.eta(), Some(Duration::from_secs(10)));
        assert_eq!(p.line(), "50/150 rows, 10 rows/s, ETA 10s");
        let none = Progress::default();
        assert_eq!(none.eta(), Some(Duration::ZERO));
        let stalled = Progress {
            total: 3,
            ..Progress::default()
        };
        assert_eq!(stalled.eta(), None);
        assert_eq!(stalled.line(), "0/3 rows, 0 rows/s, ETA ?");
    }
}
