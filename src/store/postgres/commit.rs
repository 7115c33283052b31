//! The statement that writes one space's push group on Postgres, and the column arrays that its
//! UNNESTs (and the batch's) take.

use std::sync::LazyLock;

use sqlx::PgConnection;

use crate::protocol::SpaceId;
use crate::store::pg_functions::COMMIT_PUSH_GROUP;
use crate::store::{ClientWrite, EntryWrite, PushChanges, StoreError, to_i64};

static COMMIT_PUSH_GROUP_SQL: LazyLock<String> = LazyLock::new(|| COMMIT_PUSH_GROUP.call_sql());

/// Writes one space's push group on `conn`: one round trip for every write, and for the commit
/// too outside a transaction (the call is its own). A concurrent writer makes it fail with a
/// serialization failure, writing nothing (see the migration that defines the function).
pub(super) async fn commit_group(
    conn: &mut PgConnection,
    space: &SpaceId,
    changes: PushChanges,
    activity_granularity: i64,
) -> Result<(), StoreError> {
    let clients = client_columns(changes.clients.iter())?;
    let entries = entry_columns(changes.entries.into_iter())?;
    let (new_group_ids, new_group_users): (Vec<String>, Vec<String>) = changes
        .new_client_groups
        .into_iter()
        .map(|group| (group.id, group.user_id))
        .unzip();
    // The binds are COMMIT_PUSH_GROUP's arguments, in order.
    sqlx::query(COMMIT_PUSH_GROUP_SQL.as_str())
        .bind(space.as_str())
        .bind(to_i64(changes.version)?)
        .bind(to_i64(changes.read_version)?)
        .bind(changes.active_at)
        .bind(&new_group_ids)
        .bind(&new_group_users)
        .bind(&changes.active_client_groups)
        .bind(activity_granularity)
        .bind(&clients.ids)
        .bind(&clients.groups)
        .bind(&clients.last_mutation_ids)
        .bind(&clients.versions)
        .bind(&entries.keys)
        .bind(&entries.values)
        .bind(&entries.versions)
        .execute(conn)
        .await?;
    Ok(())
}

/// The clients a push group writes, as the column arrays that UNNEST takes.
#[derive(Default)]
pub(super) struct ClientColumns {
    pub(super) ids: Vec<String>,
    pub(super) groups: Vec<String>,
    pub(super) last_mutation_ids: Vec<i64>,
    pub(super) versions: Vec<i64>,
}

pub(super) fn client_columns<'a>(
    clients: impl Iterator<Item = &'a ClientWrite>,
) -> Result<ClientColumns, StoreError> {
    let mut columns = ClientColumns::default();
    for ClientWrite { client, version } in clients {
        columns.ids.push(client.id.clone());
        columns.groups.push(client.client_group_id.clone());
        columns
            .last_mutation_ids
            .push(to_i64(client.last_mutation_id)?);
        columns.versions.push(to_i64(*version)?);
    }
    Ok(columns)
}

/// The entries a push group writes, as the column arrays that UNNEST takes.
#[derive(Default)]
pub(super) struct EntryColumns {
    pub(super) keys: Vec<String>,
    pub(super) values: Vec<Option<String>>,
    pub(super) versions: Vec<i64>,
}

pub(super) fn entry_columns(
    entries: impl Iterator<Item = EntryWrite>,
) -> Result<EntryColumns, StoreError> {
    let mut columns = EntryColumns::default();
    for entry in entries {
        columns.keys.push(entry.key);
        columns.values.push(entry.value);
        columns.versions.push(to_i64(entry.version)?);
    }
    Ok(columns)
}
