//! A push group's writes on SQLite as one text of statements, run in one call to the writer's
//! thread (each call is a hop between threads, which a group's writes would otherwise pay one
//! statement at a time).
//!
//! Parameters are positional (`?`), bound in the order they appear across the call's statements:
//! SQLite numbers each statement's own, and sqlx binds a call's arguments statement after
//! statement. A group too large for one call's parameters is written in several, in order.

use sqlx::Sqlite;
use sqlx::sqlite::{SqliteArguments, SqliteConnection};

use crate::store::{ClientWrite, PushChanges, StoreError, to_i64};

/// Parameters in one call at most: well under SQLite's limit (32,766).
const MAX_PARAMS: usize = 8_000;
/// Rows in one `INSERT` at most.
const ROWS_PER_STATEMENT: usize = 200;
/// Calls with more entries than this are not kept as prepared statements: their texts rarely
/// come again.
const CACHED_UP_TO_ENTRIES: usize = 8;

/// What the writes are wrapped in: a member of a shared transaction writes inside a savepoint
/// (opened by its first call, released by its last), one alone writes directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wrap {
    Savepoint,
    Direct,
}

/// The savepoint a member's write opens, and how to undo it.
const OPEN_SAVEPOINT: &str = "SAVEPOINT push_group;\n";
const RELEASE_SAVEPOINT: &str = "RELEASE push_group;\n";
pub(super) const UNDO_SAVEPOINT: &str = "ROLLBACK TO push_group; RELEASE push_group";

/// The message of the error a client upsert raises when the id belongs to another client group
/// (it sets a NOT NULL column to NULL, which stops the call before anything after it runs).
const CLAIMED_CLIENT: &str = "NOT NULL constraint failed: replisync_clients.last_mutation_id";

/// Writes `changes` to `space` (stored groups in `stale` get their activity moved), wrapped as
/// `wrap` says. A client id another group claimed meanwhile (a push of another space in the same
/// transaction) is a conflict: the push runs again.
pub(super) async fn write_changes(
    conn: &mut SqliteConnection,
    space: &str,
    changes: &PushChanges,
    stale: &[String],
    activity_granularity: i64,
    wrap: Wrap,
) -> Result<(), StoreError> {
    let calls = plan(space, changes, stale, activity_granularity, wrap)?;
    for call in calls {
        let cached = call.entries <= CACHED_UP_TO_ENTRIES;
        let query = sqlx::query_with::<Sqlite, _>(sqlx::AssertSqlSafe(call.sql), call.args)
            .persistent(cached);
        if let Err(error) = query.execute(&mut *conn).await {
            return Err(claimed_client_conflict(error));
        }
    }
    Ok(())
}

/// A client id claimed by another group is a conflict; any other error is the database's.
fn claimed_client_conflict(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.message() == CLAIMED_CLIENT => {
            StoreError::Conflict("a client id was claimed by another client group".into())
        }
        _ => error.into(),
    }
}

/// One call: its statements and their arguments.
struct Call {
    sql: String,
    args: SqliteArguments,
    entries: usize,
}

impl Call {
    fn new() -> Call {
        Call {
            sql: String::new(),
            args: SqliteArguments::default(),
            entries: 0,
        }
    }

    /// Binds `value` as the next parameter (the next `?` in the text).
    fn bind<'q, T: sqlx::Encode<'q, Sqlite> + sqlx::Type<Sqlite>>(
        &mut self,
        value: T,
    ) -> Result<(), StoreError> {
        sqlx::Arguments::add(&mut self.args, value)
            .map_err(|error| StoreError::Database(error.to_string()))
    }

    /// Parameters bound so far.
    fn params(&self) -> usize {
        sqlx::Arguments::len(&self.args)
    }
}

/// `count` rows of `width` placeholders each: `(?, ?), (?, ?)`.
fn rows(count: usize, width: usize) -> String {
    let row = format!("({})", vec!["?"; width].join(", "));
    vec![row; count].join(", ")
}

/// The calls that write `changes`, in order.
fn plan(
    space: &str,
    changes: &PushChanges,
    stale: &[String],
    activity_granularity: i64,
    wrap: Wrap,
) -> Result<Vec<Call>, StoreError> {
    let now = changes.active_at;
    let mut calls = Vec::new();
    let mut call = Call::new();
    if wrap == Wrap::Savepoint {
        call.sql.push_str(OPEN_SAVEPOINT);
    }
    for ids in stale.chunks(ROWS_PER_STATEMENT) {
        call = room_for(&mut calls, call, ids.len() + 3);
        call.bind(now)?;
        for id in ids {
            call.bind(id.as_str())?;
        }
        call.bind(now)?;
        call.bind(activity_granularity)?;
        call.sql.push_str(&format!(
            "UPDATE replisync_client_groups SET last_active = ?
             WHERE id IN ({}) AND last_active < ? - ?;\n",
            vec!["?"; ids.len()].join(", ")
        ));
    }
    for groups in changes.new_client_groups.chunks(ROWS_PER_STATEMENT) {
        call = room_for(&mut calls, call, 4 * groups.len());
        for group in groups {
            call.bind(group.id.as_str())?;
            call.bind(space)?;
            call.bind(group.user_id.as_str())?;
            call.bind(now)?;
        }
        call.sql.push_str(&format!(
            "INSERT INTO replisync_client_groups (id, space_id, user_id, last_active)
             VALUES {};\n",
            rows(groups.len(), 4)
        ));
    }
    for clients in changes.clients.chunks(ROWS_PER_STATEMENT) {
        call = room_for(&mut calls, call, 4 * clients.len());
        for ClientWrite { client, version } in clients {
            call.bind(client.id.as_str())?;
            call.bind(client.client_group_id.as_str())?;
            call.bind(to_i64(client.last_mutation_id)?)?;
            call.bind(to_i64(*version)?)?;
        }
        // A client of another group is refused with an error (CLAIMED_CLIENT), not skipped:
        // nothing after it in the call runs.
        call.sql.push_str(&format!(
            "INSERT INTO replisync_clients
                 (id, client_group_id, last_mutation_id, last_modified_version)
             VALUES {}
             ON CONFLICT (id) DO UPDATE
                 SET last_mutation_id = iif(
                         replisync_clients.client_group_id = excluded.client_group_id,
                         excluded.last_mutation_id, NULL),
                     last_modified_version = excluded.last_modified_version;\n",
            rows(clients.len(), 4)
        ));
    }
    for entries in changes.entries.chunks(ROWS_PER_STATEMENT) {
        call = room_for(&mut calls, call, 6 * entries.len());
        for entry in entries {
            call.bind(space)?;
            call.bind(entry.key.as_str())?;
            call.bind(entry.value.as_deref())?;
            call.bind(entry.value.is_none())?;
            call.bind(to_i64(entry.version)?)?;
            call.bind(now)?;
        }
        call.entries += entries.len();
        call.sql.push_str(&format!(
            "INSERT INTO replisync_entries (space_id, key, value, deleted, version, changed_at)
             VALUES {}
             ON CONFLICT (space_id, key) DO UPDATE
                 SET value = excluded.value,
                     deleted = excluded.deleted,
                     version = excluded.version,
                     changed_at = excluded.changed_at;\n",
            rows(entries.len(), 6)
        ));
    }
    call.bind(space)?;
    call.bind(to_i64(changes.version)?)?;
    call.sql.push_str(
        "INSERT INTO replisync_spaces (id, version) VALUES (?, ?)
         ON CONFLICT (id) DO UPDATE SET version = excluded.version;\n",
    );
    if wrap == Wrap::Savepoint {
        call.sql.push_str(RELEASE_SAVEPOINT);
    }
    calls.push(call);
    Ok(calls)
}

/// `call` if it has room for `params` more parameters, else a new one (`call` goes to `calls`).
fn room_for(calls: &mut Vec<Call>, call: Call, params: usize) -> Call {
    if call.params() + params <= MAX_PARAMS {
        return call;
    }
    calls.push(call);
    Call::new()
}

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    use super::super::SqliteStore;
    use super::*;
    use crate::store::{ClientGroupRecord, ClientRecord, EntryWrite};

    /// A migrated database file, and a connection to it.
    async fn database() -> (tempfile::TempDir, SqliteConnection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replisync.db");
        SqliteStore::open(&path, 1)
            .await
            .unwrap()
            .migrate()
            .await
            .unwrap();
        let conn = SqliteConnection::connect(path.to_str().unwrap())
            .await
            .unwrap();
        (dir, conn)
    }

    /// A group's changes: client `c` of group `g` (new when `new_group`) at mutation 1, and
    /// `entries` keys.
    fn changes(group: &str, new_group: bool, entries: usize) -> PushChanges {
        PushChanges {
            version: 1,
            read_version: 0,
            active_at: 1_000,
            new_client_groups: new_group
                .then(|| ClientGroupRecord {
                    id: group.into(),
                    space_id: "s".into(),
                    user_id: "u".into(),
                })
                .into_iter()
                .collect(),
            active_client_groups: vec![],
            clients: vec![ClientWrite {
                client: ClientRecord {
                    id: "c".into(),
                    client_group_id: group.into(),
                    last_mutation_id: 1,
                },
                version: 1,
            }],
            entries: (0..entries)
                .map(|n| EntryWrite {
                    key: format!("k{n:05}"),
                    value: Some(n.to_string()),
                    version: 1,
                })
                .collect(),
        }
    }

    async fn count(conn: &mut SqliteConnection, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(conn)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_group_too_large_for_one_call_is_written_whole_in_several() {
        let (_dir, mut conn) = database().await;
        let large = changes("g", true, 3_000);
        let calls = plan("s", &large, &[], 60, Wrap::Direct).unwrap();
        assert_eq!(
            calls.len(),
            3,
            "18,000 entry parameters in calls of at most 8,000"
        );
        write_changes(&mut conn, "s", &large, &[], 60, Wrap::Direct)
            .await
            .unwrap();
        let entries = "SELECT count(*) FROM replisync_entries WHERE space_id = 's'";
        assert_eq!(count(&mut conn, entries).await, 3_000);
        let version = "SELECT version FROM replisync_spaces WHERE id = 's'";
        assert_eq!(count(&mut conn, version).await, 1);
    }

    #[tokio::test]
    async fn a_client_of_another_group_is_a_conflict_and_the_savepoint_holds_the_rest_back() {
        let (_dir, mut conn) = database().await;
        write_changes(
            &mut conn,
            "s",
            &changes("g", true, 1),
            &[],
            60,
            Wrap::Direct,
        )
        .await
        .unwrap();
        sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
        let claim = changes("other", true, 2);
        let refused = write_changes(&mut conn, "s", &claim, &[], 60, Wrap::Savepoint).await;
        assert!(
            matches!(refused, Err(StoreError::Conflict(_))),
            "{refused:?}"
        );
        sqlx::raw_sql(UNDO_SAVEPOINT)
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::raw_sql("COMMIT").execute(&mut conn).await.unwrap();
        let owner =
            "SELECT count(*) FROM replisync_clients WHERE id = 'c' AND client_group_id = 'g'";
        assert_eq!(
            count(&mut conn, owner).await,
            1,
            "the client keeps its group"
        );
        let groups = "SELECT count(*) FROM replisync_client_groups WHERE id = 'other'";
        assert_eq!(
            count(&mut conn, groups).await,
            0,
            "the refused group wrote nothing"
        );
        let entries = "SELECT count(*) FROM replisync_entries";
        assert_eq!(count(&mut conn, entries).await, 1);
    }
}
