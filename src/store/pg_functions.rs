//! The SQL functions the Postgres store calls, each described once: its name and the arguments
//! its caller binds, in order. The statements are built from these, and a test checks them.

/// A call of one SQL function: its name, and each argument as the function names it, with its
/// SQL type, in the order the caller binds them.
#[derive(Debug)]
pub struct SqlCall {
    pub name: &'static str,
    pub args: &'static [(&'static str, &'static str)],
}

impl SqlCall {
    /// `SELECT * FROM name($1, …, $n)`: the rows the function returns.
    pub fn select_sql(&self) -> String {
        format!("SELECT * FROM {}({})", self.name, self.placeholders())
    }

    /// `SELECT name($1, …, $n)`: the call, for what it does (its result is not read).
    pub fn call_sql(&self) -> String {
        format!("SELECT {}({})", self.name, self.placeholders())
    }

    /// `$1, $2, …`: one parameter per argument.
    fn placeholders(&self) -> String {
        let params: Vec<String> = (1..=self.args.len()).map(|n| format!("${n}")).collect();
        params.join(", ")
    }
}

/// What a push's first read binds, locked or not: its space, its client groups, its clients.
const READ_GROUPS_ARGS: &[(&str, &str)] = &[
    ("push_space", "text"),
    ("push_client_groups", "text[]"),
    ("push_client_ids", "text[]"),
];

/// A push's first read of one space, which `LOCK_SPACE_AND_READ_GROUPS` runs after the lock
/// (unlocked pushes read through `READ_GROUPS_OF_SPACES`).
pub const READ_GROUPS: SqlCall = SqlCall {
    name: "replisync_read_groups",
    args: READ_GROUPS_ARGS,
};

/// A locked push's first read (`PgPushTx::client_state`, locked).
pub const LOCK_SPACE_AND_READ_GROUPS: SqlCall = SqlCall {
    name: "replisync_lock_space_and_read_groups",
    args: READ_GROUPS_ARGS,
};

/// The first reads of several optimistic pushes, to any spaces, in one statement
/// (`postgres::reads`).
pub const READ_GROUPS_OF_SPACES: SqlCall = SqlCall {
    name: "replisync_read_groups_of_spaces",
    args: &[
        ("spaces", "text[]"),
        ("push_client_groups", "text[]"),
        ("push_client_ids", "text[]"),
    ],
};

/// `READ_GROUPS_OF_SPACES` and, in the same snapshot, the entries the pushes' mutations are
/// likely to read (`postgres::reads`).
pub const READ_GROUPS_AND_ENTRIES_OF_SPACES: SqlCall = SqlCall {
    name: "replisync_read_groups_and_entries_of_spaces",
    args: &[
        ("spaces", "text[]"),
        ("push_client_groups", "text[]"),
        ("push_client_ids", "text[]"),
        ("entry_spaces", "text[]"),
        ("entry_keys", "text[]"),
    ],
};

/// A push group's writes (`PgPushTx::commit`).
pub const COMMIT_PUSH_GROUP: SqlCall = SqlCall {
    name: "replisync_commit_push_group",
    args: &[
        ("push_space", "text"),
        ("new_version", "bigint"),
        ("read_version", "bigint"),
        ("active_at", "bigint"),
        ("new_group_ids", "text[]"),
        ("new_group_users", "text[]"),
        ("active_groups", "text[]"),
        ("granularity", "bigint"),
        ("client_ids", "text[]"),
        ("client_groups", "text[]"),
        ("client_lmids", "bigint[]"),
        ("client_versions", "bigint[]"),
        ("entry_keys", "text[]"),
        ("entry_values", "text[]"),
        ("entry_versions", "bigint[]"),
    ],
};

/// A batch of push groups to several spaces (`postgres::batch`): each space with its versions,
/// then every row of the groups' writes with its space.
pub const COMMIT_PUSH_BATCH: SqlCall = SqlCall {
    name: "replisync_commit_push_batch",
    args: &[
        ("spaces", "text[]"),
        ("new_versions", "bigint[]"),
        ("read_versions", "bigint[]"),
        ("active_at", "bigint"),
        ("new_group_spaces", "text[]"),
        ("new_group_ids", "text[]"),
        ("new_group_users", "text[]"),
        ("active_group_spaces", "text[]"),
        ("active_groups", "text[]"),
        ("granularity", "bigint"),
        ("client_spaces", "text[]"),
        ("client_ids", "text[]"),
        ("client_groups", "text[]"),
        ("client_lmids", "bigint[]"),
        ("client_versions", "bigint[]"),
        ("entry_spaces", "text[]"),
        ("entry_keys", "text[]"),
        ("entry_values", "text[]"),
        ("entry_versions", "bigint[]"),
    ],
};

/// Every SQL function the Postgres store calls. `tests/sync/sql_functions.rs` compares each
/// description with the migrated database's `pg_proc` (argument names and types, in order, and
/// the set of `replisync_` functions), so a change to the Rust side or a migration alone fails.
pub const CALLS: &[SqlCall] = &[
    READ_GROUPS,
    LOCK_SPACE_AND_READ_GROUPS,
    READ_GROUPS_OF_SPACES,
    READ_GROUPS_AND_ENTRIES_OF_SPACES,
    COMMIT_PUSH_GROUP,
    COMMIT_PUSH_BATCH,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_statement_calls_its_function_with_one_parameter_per_argument() {
        assert_eq!(
            READ_GROUPS.select_sql(),
            "SELECT * FROM replisync_read_groups($1, $2, $3)"
        );
        assert_eq!(
            LOCK_SPACE_AND_READ_GROUPS.select_sql(),
            "SELECT * FROM replisync_lock_space_and_read_groups($1, $2, $3)"
        );
        assert_eq!(
            COMMIT_PUSH_GROUP.call_sql(),
            "SELECT replisync_commit_push_group($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        );
    }
}
