//! Embedding replisync in your own program with a mutator written in Rust (`cargo run --example
//! custom_mutators [ADDRESS]`): serves on 127.0.0.1:8080 from a SQLite file, with the built-in
//! `set`, `delete` and `increment`, your `addTodo`, and, when APP_MUTATORS_JS names a module,
//! its JavaScript mutators too.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use replisync::mutators::js::{JsLimits, JsMutators};
use replisync::mutators::{MutationError, Mutator, Mutators, WriteTx};
use replisync::startup::{App, serve, shutdown_signal};
use replisync::store::sqlite::SqliteStore;
use serde_json::{Value, json};

/// `addTodo {id: string, title: string}`: a todo at `todo/<id>`, owned by the user who pushed
/// it. The title rule is enforced here, on the server, whatever the client checked.
struct AddTodo;

#[async_trait]
impl Mutator for AddTodo {
    async fn apply(&self, tx: &mut WriteTx<'_>, args: &Value) -> Result<(), MutationError> {
        let field = |name: &str| {
            args[name]
                .as_str()
                .ok_or_else(|| MutationError::InvalidArgs(format!("`{name}` must be a string")))
        };
        let (id, title) = (field("id")?, field("title")?);
        if title.chars().count() > 100 {
            return Err(MutationError::Rejected(
                "a title has at most 100 characters".into(),
            ));
        }
        let key = format!("todo/{id}");
        if tx.has(&key).await? {
            return Err(MutationError::Rejected(format!("{key} exists already")));
        }
        let todo = json!({"id": id, "title": title, "done": false, "owner": tx.user_id()});
        tx.put(key, todo)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let address = std::env::args().nth(1).unwrap_or("127.0.0.1:8080".into());

    let store = SqliteStore::open(Path::new("replisync-data/example.db"), 4).await?;
    store.migrate().await?;

    let mut mutators = Mutators::builtin().register("addTodo", AddTodo);
    if let Some(module) = std::env::var_os("APP_MUTATORS_JS") {
        let js = JsMutators::load(Path::new(&module), JsLimits::default())?;
        mutators = js.register(mutators);
    }

    let app = App::builder().mutators(mutators).build(Arc::new(store));
    let listener = tokio::net::TcpListener::bind(&address).await?;
    serve(listener, app, shutdown_signal()).await
}
