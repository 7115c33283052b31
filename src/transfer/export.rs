//! `replisync export`: spaces written as NDJSON, each from one snapshot of its own, entry by
//! entry as the database streams them (constant memory whatever the space's size).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use futures::TryStreamExt;
use serde_json::value::RawValue;

use super::{End, EntryLine, FORMAT, Header};
use crate::protocol::SpaceId;
use crate::store::Store;

/// What to export, and where.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// The space to export (several may be named).
    #[arg(value_name = "SPACE", required_unless_present = "all")]
    pub spaces: Vec<String>,
    /// Export every space in the database.
    #[arg(long, conflicts_with = "spaces")]
    pub all: bool,
    /// Write to this file instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// What an export wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    pub spaces: u64,
    pub entries: u64,
}

/// Writes the spaces `args` names from `store` to its output.
pub async fn export(store: &dyn Store, args: &ExportArgs) -> anyhow::Result<Exported> {
    let which = if args.all {
        Which::All
    } else {
        let spaces = args
            .spaces
            .iter()
            .map(|space| SpaceId::parse(space).map_err(|e| anyhow::anyhow!("{space:?}: {e}")));
        Which::Named(spaces.collect::<anyhow::Result<Vec<_>>>()?)
    };
    let Some(path) = &args.output else {
        return export_to(store, which, std::io::stdout()).await;
    };
    // Written beside the file and renamed over it once complete: a failed export leaves the
    // file as it was (an earlier backup), never cut short.
    let mut partial = path.clone().into_os_string();
    partial.push(format!(".partial-{}", std::process::id()));
    let partial = PathBuf::from(partial);
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let exported = export_to(store, which, &file).await.and_then(|exported| {
        file.sync_all().context("cannot write the export")?;
        std::fs::rename(&partial, path).with_context(|| {
            format!("cannot rename {} to {}", partial.display(), path.display())
        })?;
        Ok(exported)
    });
    if exported.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    exported
}

/// Which spaces to export.
#[derive(Debug, Clone)]
pub enum Which {
    /// These (each must have been written).
    Named(Vec<SpaceId>),
    /// Every space in the database.
    All,
}

/// Writes `which` spaces of `store` to `out`.
pub async fn export_to(
    store: &dyn Store,
    which: Which,
    out: impl Write + Send,
) -> anyhow::Result<Exported> {
    let (spaces, all) = match which {
        Which::Named(spaces) => (spaces, false),
        Which::All => {
            let ids = store.space_ids().await?;
            let spaces = ids.iter().map(|id| {
                SpaceId::parse(id).map_err(|e| anyhow::anyhow!("stored space {id:?}: {e}"))
            });
            (spaces.collect::<anyhow::Result<Vec<_>>>()?, true)
        }
    };
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
    let mut exported = Exported::default();
    for space in &spaces {
        exported.entries += export_space(store, space, &mut out, all).await?;
        exported.spaces += 1;
    }
    out.flush().context("cannot write the export")?;
    Ok(exported)
}

/// Writes one space: its header, every live entry from one snapshot, its end line. A space
/// never written is an error when named (a typo), skipped by `--all` (none is listed).
async fn export_space(
    store: &dyn Store,
    space: &SpaceId,
    out: &mut impl Write,
    all: bool,
) -> anyhow::Result<u64> {
    let snapshot = store.streamed_pull(space, "", None).await?;
    anyhow::ensure!(
        snapshot.version > 0 || all,
        "space {space} has never been written in this database; nothing to export"
    );
    let header = Header {
        space: space.as_str(),
        version: snapshot.version,
        format: FORMAT,
    };
    write_line(out, &header)?;
    let mut entries = snapshot.entries;
    let mut count = 0;
    while let Some(entry) = entries.try_next().await? {
        let Some(value) = entry.value else { continue };
        let value = RawValue::from_string(value).with_context(|| {
            format!(
                "space {space}: the stored value of {:?} is not JSON",
                entry.key
            )
        })?;
        write_line(
            out,
            &EntryLine {
                key: &entry.key,
                value: &value,
            },
        )?;
        count += 1;
    }
    let end = End {
        end: space.as_str(),
        entries: count,
    };
    write_line(out, &end)?;
    Ok(count)
}

fn write_line(out: &mut impl Write, line: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, line).context("cannot write the export")?;
    out.write_all(b"\n").context("cannot write the export")?;
    Ok(())
}
