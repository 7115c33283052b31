//! What the Postgres and SQLite stores do alike: statements that both databases accept, run on
//! either one's connection, and the conversions of stored rows into the store's records.

use async_stream::try_stream;
use futures::TryStreamExt;
use futures::stream::BoxStream;
use sqlx::database::HasStatementCache;
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Transaction, Type};

use super::{ClientGroupRecord, EntryChange, PullSnapshot, StoreError, to_i64, to_u64};
use crate::protocol::SpaceId;

// The statements here number their parameters `$1`, `$2`, ...: Postgres's own style, and one
// that SQLite reads as named parameters which sqlx binds by their number (see the test below).

/// A space's version and compacted version, a client group's space and user, and whether
/// garbage collection removed the group (a count, 0 or 1).
type SpaceAndGroup = (
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    i64,
);

/// Reads a streamed pull in `tx`, which must see one snapshot from its first read to its end: the
/// space's version, the client group and its clients now, then the entries as the stream is read.
/// `since: None` reads a first pull (every client of the group, every live entry); `Some(cookie)`
/// what changed after the cookie (deletions included), or the whole space again when the cookie
/// is older than the space's compacted version. The stream commits `tx` once it has
/// yielded the last entry.
pub(super) async fn streamed_pull<DB>(
    mut tx: Transaction<'static, DB>,
    space: &SpaceId,
    client_group_id: &str,
    since: Option<u64>,
) -> Result<PullSnapshot, StoreError>
where
    DB: Database + HasStatementCache,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    SpaceAndGroup: for<'r> FromRow<'r, DB::Row>,
    (String, i64): for<'r> FromRow<'r, DB::Row>,
    (String, Option<String>): for<'r> FromRow<'r, DB::Row>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    let (version, compacted, space_id, user_id, collected): SpaceAndGroup = sqlx::query_as(
        "SELECT (SELECT version FROM replisync_spaces WHERE id = $1),
                (SELECT compacted_version FROM replisync_spaces WHERE id = $1),
                g.space_id, g.user_id,
                (SELECT count(*) FROM replisync_collected_client_groups WHERE id = $2)
         FROM (SELECT 1) AS one
         LEFT JOIN replisync_client_groups g ON g.id = $2",
    )
    .bind(space.as_str())
    .bind(client_group_id)
    .fetch_one(&mut *tx)
    .await?;
    // A cookie older than the compacted version may miss deletions: the whole space instead.
    let reset =
        since.is_some_and(|cookie| to_i64(cookie).is_ok_and(|c| c < compacted.unwrap_or(0)));
    // -1 when every client and entry counts (versions start at 1).
    let after = match since {
        Some(cookie) if !reset => to_i64(cookie)?,
        _ => -1,
    };
    let changed_clients = sqlx::query_as::<_, (String, i64)>(
        "SELECT id, last_mutation_id FROM replisync_clients
         WHERE client_group_id = $1 AND last_modified_version > $2",
    )
    .bind(client_group_id)
    .bind(after)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|(id, lmid)| Ok((id, to_lmid(lmid)?)))
    .collect::<Result<_, StoreError>>()?;
    Ok(PullSnapshot {
        version: to_space_version(version)?,
        reset,
        client_group: stored_client_group(client_group_id, space_id.zip(user_id)),
        client_group_collected: collected > 0,
        changed_clients,
        entries: entries_after(tx, space.as_str().to_owned(), after),
    })
}

/// Streams the entries of `space_id` changed after version `after` from `tx` (only live ones
/// for a first pull, `after` = -1; deletions as `None` otherwise), then commits it.
fn entries_after<DB>(
    mut tx: Transaction<'static, DB>,
    space_id: String,
    after: i64,
) -> BoxStream<'static, Result<EntryChange, StoreError>>
where
    DB: Database + HasStatementCache,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    (String, Option<String>): for<'r> FromRow<'r, DB::Row>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    Box::pin(try_stream! {
        {
            // A first pull skips deletions: the client has nothing to delete after `clear`.
            let mut rows = sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT key, CASE WHEN deleted THEN NULL ELSE value END FROM replisync_entries
                 WHERE space_id = $1 AND version > $2 AND ($2 >= 0 OR NOT deleted)",
            )
            .bind(space_id.as_str())
            .bind(after)
            .fetch(&mut *tx);
            while let Some((key, value)) = rows.try_next().await? {
                yield EntryChange { key, value };
            }
        }
        tx.commit().await?;
    })
}

/// A space holding a tombstone written before `deleted_before`, if any: the next one compaction
/// works on.
pub(super) async fn space_with_old_tombstones<DB>(
    conn: &mut DB::Connection,
    deleted_before: i64,
) -> Result<Option<String>, StoreError>
where
    DB: Database + HasStatementCache,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    (String,): for<'r> FromRow<'r, DB::Row>,
{
    Ok(sqlx::query_scalar(
        "SELECT space_id FROM replisync_entries WHERE deleted AND changed_at < $1 LIMIT 1",
    )
    .bind(deleted_before)
    .fetch_optional(conn)
    .await?)
}

/// Forgets at most `batch` of the removed client groups collected before `collected_before`;
/// returns how many it forgot.
pub(super) async fn forget_collected_groups<DB>(
    conn: &mut DB::Connection,
    collected_before: i64,
    batch: usize,
) -> Result<usize, StoreError>
where
    DB: Database + HasStatementCache,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    (String,): for<'r> FromRow<'r, DB::Row>,
{
    let ids: Vec<String> = sqlx::query_scalar(
        "DELETE FROM replisync_collected_client_groups
         WHERE id IN (SELECT id FROM replisync_collected_client_groups
                      WHERE collected_at < $1 LIMIT $2)
         RETURNING id",
    )
    .bind(collected_before)
    .bind(to_i64(batch as u64)?)
    .fetch_all(conn)
    .await?;
    Ok(ids.len())
}

/// The live value (json text) of `key` in `space`, `None` if absent or deleted.
pub(super) async fn entry<DB>(
    conn: &mut DB::Connection,
    space: &SpaceId,
    key: &str,
) -> Result<Option<String>, StoreError>
where
    DB: Database + HasStatementCache,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    (Option<String>,): for<'r> FromRow<'r, DB::Row>,
{
    let value: Option<Option<String>> = sqlx::query_scalar(
        "SELECT value FROM replisync_entries WHERE space_id = $1 AND key = $2 AND NOT deleted",
    )
    .bind(space.as_str())
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(value.flatten())
}

/// At most `limit` live entries of `space` after `start` (from it, unless `exclusive`), in the
/// order of the keys' UTF-8 bytes: SQLite's BINARY collation and Postgres's `COLLATE "C"` (the
/// key column's) both compare bytes, which for UTF-8 is code point order.
pub(super) async fn scan_entries<DB>(
    conn: &mut DB::Connection,
    space: &SpaceId,
    start: &str,
    exclusive: bool,
    limit: usize,
) -> Result<Vec<(String, String)>, StoreError>
where
    DB: Database + HasStatementCache,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    (String, Option<String>): for<'r> FromRow<'r, DB::Row>,
{
    let sql = if exclusive {
        "SELECT key, value FROM replisync_entries
         WHERE space_id = $1 AND key > $2 AND NOT deleted ORDER BY key LIMIT $3"
    } else {
        "SELECT key, value FROM replisync_entries
         WHERE space_id = $1 AND key >= $2 AND NOT deleted ORDER BY key LIMIT $3"
    };
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(sql)
        .bind(space.as_str())
        .bind(start)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter()
        .map(|(key, value)| match value {
            Some(value) => Ok((key, value)),
            None => Err(StoreError::Corrupt(format!(
                "live entry {key:?} has no value"
            ))),
        })
        .collect()
}

/// A client group from its stored columns `(id, space_id, user_id)`.
pub(super) fn client_group_record(
    (id, space_id, user_id): (String, String, String),
) -> ClientGroupRecord {
    ClientGroupRecord {
        id,
        space_id,
        user_id,
    }
}

/// The client group `id`, given its stored `(space_id, user_id)` if it is stored.
pub(super) fn stored_client_group(
    id: &str,
    columns: Option<(String, String)>,
) -> Option<ClientGroupRecord> {
    columns.map(|(space_id, user_id)| client_group_record((id.to_owned(), space_id, user_id)))
}

/// A stored space version; a space never written (no row) is at version 0.
pub(super) fn to_space_version(version: Option<i64>) -> Result<u64, StoreError> {
    to_u64(version.unwrap_or(0), "space version")
}

/// A stored client's last mutation id.
pub(super) fn to_lmid(last_mutation_id: i64) -> Result<u64, StoreError> {
    to_u64(last_mutation_id, "last_mutation_id")
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqlitePool;

    /// The shared statements rely on SQLite binding `$N` to the N-th argument, in any order and
    /// however often it is used.
    #[tokio::test]
    async fn sqlite_binds_numbered_dollar_parameters_by_number() {
        let pool = SqlitePool::connect("sqlite::memory:").await.unwrap();
        let row: (String, String, i64) = sqlx::query_as("SELECT $2 || $1, $1, $3 + $3")
            .bind("a")
            .bind("b")
            .bind(20_i64)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(row, ("ba".to_owned(), "a".to_owned(), 40));
    }
}
