//! The key census of `gatehouse keys status`: per sealed column, how many values each key id
//! protects, read from the envelopes' key ids (no value is opened).

use sqlx::PgPool;

use super::{SEALED_COLUMNS, SealedColumn};

/// How many values of one column one key id protects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub column: SealedColumn,
    /// 16 lower-case hex characters; `None` for a value too malformed to carry one.
    pub key_id: Option<String>,
    pub count: i64,
}

/// Per sealed column, how many values each key id protects (ids as found in the envelopes).
pub async fn key_usage(pool: &PgPool) -> Result<Vec<KeyUsage>, sqlx::Error> {
    let mut out = Vec::new();
    for col in SEALED_COLUMNS {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT CASE WHEN length({c}) >= 37 AND get_byte({c}, 0) = 1
                         THEN encode(substring({c} from 2 for 8), 'hex') END AS key_id,
                    count(*)
             FROM {t} WHERE {c} IS NOT NULL GROUP BY 1 ORDER BY 1",
            c = col.column,
            t = col.table,
        )))
        .fetch_all(pool)
        .await?;
        out.extend(rows.into_iter().map(|(key_id, count)| KeyUsage {
            column: col,
            key_id,
            count,
        }));
    }
    Ok(out)
}
