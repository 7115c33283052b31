//! The floor: the SQL work of a one-increment push, straight through the Postgres store (the
//! same statements, in the same order), with the same clients, spaces and concurrency.

use std::sync::Arc;

use replisync::protocol::SpaceId;
use replisync::store::postgres::PgStore;
use replisync::store::{
    ClientGroupRecord, ClientRecord, ClientWrite, EntryWrite, PushChanges, Store,
};

use crate::load::{PushFigures, client_name, drive_clients, group_name, space_name};

/// Run in the same run and at the same concurrency as a push workload, it makes replisync's
/// throughput readable as a ratio that means the same on any machine.
pub(crate) async fn floor_workload(
    store: &Arc<PgStore>,
    name: &str,
    clients: usize,
    spaces: usize,
    total_pushes: usize,
) -> anyhow::Result<PushFigures> {
    let (store, name) = (store.clone(), name.to_owned());
    drive_clients(clients, spaces, 1, total_pushes, move |job| {
        let store = store.clone();
        let space = space_name(&name, job.space);
        let client = client_name(&name, job);
        async move { floor_push(&*store, &space, &client, job.first_id).await }
    })
    .await
}

/// What a push of one `increment` of `counter-0` does in the database.
async fn floor_push(store: &dyn Store, space: &str, client: &str, id: u64) -> anyhow::Result<()> {
    let space = SpaceId::parse(space).map_err(anyhow::Error::msg)?;
    let group_id = group_name(client);
    let mut tx = store.begin_locked_push(&space).await?;
    let state = tx
        .client_state(std::slice::from_ref(&group_id), &[client.to_owned()], &[])
        .await?;
    let new_group = state.groups.is_empty();
    let key = "counter-0";
    let current: i64 = tx
        .entry(key)
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let changes = PushChanges {
        version: state.space_version + 1,
        read_version: state.space_version,
        active_at: replisync::store::unix_now(),
        new_client_groups: new_group
            .then(|| ClientGroupRecord {
                id: group_id.clone(),
                space_id: space.as_str().to_owned(),
                user_id: "anonymous".into(),
            })
            .into_iter()
            .collect(),
        active_client_groups: (!new_group).then(|| group_id.clone()).into_iter().collect(),
        clients: vec![ClientWrite {
            client: ClientRecord {
                id: client.to_owned(),
                client_group_id: group_id,
                last_mutation_id: id,
            },
            version: state.space_version + 1,
        }],
        entries: vec![EntryWrite {
            key: key.into(),
            value: Some((current + 1).to_string()),
            version: state.space_version + 1,
        }],
    };
    tx.commit(changes).await?;
    Ok(())
}
