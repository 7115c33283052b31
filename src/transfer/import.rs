//! `replisync import`: spaces read back from an export, line by line in batches (constant
//! memory), into spaces that do not exist yet, all in one transaction: all or nothing.

use std::io::{BufRead, Read as _};
use std::path::PathBuf;

use anyhow::Context;

use super::{IMPORT_VERSION_GAP, Line, MAX_IMPORTED_VERSION, Read};
use crate::protocol::{SpaceId, check_key};
use crate::store::{SpaceImport, Store};

/// What to import, and from where.
#[derive(clap::Args, Debug, Clone)]
pub struct ImportArgs {
    /// Import the file's one space under this id (default: every space under its own id).
    #[arg(value_name = "SPACE")]
    pub space: Option<String>,
    /// Read this file instead of standard input.
    #[arg(long, short = 'i', value_name = "FILE")]
    pub input: Option<PathBuf>,
}

/// What an import loaded: spaces, entries, and each space's new version.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    pub spaces: Vec<(String, u64)>,
    pub entries: u64,
}

/// Longest line read: an entry's key and value as one push may write them, and room to spare.
const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// Reads the next line of `input` into `line` (without its newline); `false` at the end. A
/// line longer than `max` bytes ([`MAX_LINE_BYTES`]) is an error, read no further.
fn read_line(input: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> anyhow::Result<bool> {
    line.clear();
    let limit = max as u64 + 1;
    let read = input.by_ref().take(limit).read_until(b'\n', line)?;
    if read == 0 {
        return Ok(false);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > max {
        anyhow::bail!("longer than {max} bytes: not a line of an export");
    }
    Ok(true)
}

/// Entries sent to the database at once, and the most bytes of keys and values a batch holds.
const BATCH_ENTRIES: usize = 2000;
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Loads `args`' input into `store`: every space or none. Refused (nothing written) when a
/// space exists already, the input is cut short or a line is not an export's.
pub async fn import(store: &dyn Store, args: &ImportArgs) -> anyhow::Result<Imported> {
    let rename = match &args.space {
        Some(space) => Some(SpaceId::parse(space).map_err(|e| anyhow::anyhow!("{space:?}: {e}"))?),
        None => None,
    };
    let input: Box<dyn std::io::Read + Send> = match &args.input {
        Some(path) => Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ),
        None => Box::new(std::io::stdin()),
    };
    let input = std::io::BufReader::with_capacity(256 * 1024, input);
    import_from(store, input, rename).await
}

/// Loads the export `input` into `store`, its one space under `rename` when given.
pub async fn import_from(
    store: &dyn Store,
    input: impl BufRead + Send,
    rename: Option<SpaceId>,
) -> anyhow::Result<Imported> {
    let mut import = Importer {
        tx: store.begin_import().await?,
        rename,
        imported: Imported::default(),
    };
    import.read_all(input).await?;
    let Importer { tx, imported, .. } = import;
    anyhow::ensure!(
        !imported.spaces.is_empty(),
        "the input holds no space; nothing imported"
    );
    tx.commit().await?;
    Ok(imported)
}

/// An import under way: its transaction, the id the one space is imported under (if given),
/// and what it loaded so far.
struct Importer {
    tx: Box<dyn SpaceImport>,
    rename: Option<SpaceId>,
    imported: Imported,
}

/// The space being read: its id (as imported), version, and entries so far.
struct Open {
    exported_as: String,
    space: SpaceId,
    version: u64,
    entries: u64,
    batch: Vec<(String, String)>,
    batch_bytes: usize,
}

impl Importer {
    async fn read_all(&mut self, mut input: impl BufRead + Send) -> anyhow::Result<()> {
        let mut open: Option<Open> = None;
        let mut line = Vec::new();
        for number in 1.. {
            if !read_line(&mut input, &mut line, MAX_LINE_BYTES)
                .with_context(|| format!("line {number}"))?
            {
                break;
            }
            let text = std::str::from_utf8(&line)
                .map_err(|_| anyhow::anyhow!("line {number} is not UTF-8"))?;
            if text.trim().is_empty() {
                continue;
            }
            let read = Line::parse(text).map_err(|e| anyhow::anyhow!("line {number}: {e}"))?;
            open = self
                .take(open, read)
                .await
                .map_err(|e| e.context(format!("line {number}")))?;
        }
        if let Some(open) = open {
            anyhow::bail!(
                "the input ends inside space {} (no end line): the export was cut short; nothing imported",
                open.exported_as
            );
        }
        Ok(())
    }

    /// Takes one line, given the space being read; answers the space being read after it.
    async fn take(&mut self, open: Option<Open>, read: Read) -> anyhow::Result<Option<Open>> {
        match (open, read) {
            (None, Read::Header { space, version }) => Ok(Some(self.start(space, version).await?)),
            (Some(mut open), Read::Entry { key, value }) => {
                check_key(&key).map_err(|e| anyhow::anyhow!("space {}: {e}", open.exported_as))?;
                let value = value.to_string();
                open.batch_bytes += key.len() + value.len();
                open.batch.push((key, value));
                open.entries += 1;
                if open.batch.len() >= BATCH_ENTRIES || open.batch_bytes >= BATCH_BYTES {
                    self.flush(&mut open).await?;
                }
                Ok(Some(open))
            }
            (Some(mut open), Read::End { space, entries }) => {
                anyhow::ensure!(
                    space == open.exported_as && entries == open.entries,
                    "the end line says space {space} with {entries} entries, but space {} had {}: the export is damaged; nothing imported",
                    open.exported_as,
                    open.entries
                );
                self.flush(&mut open).await?;
                self.imported.entries += open.entries;
                self.imported
                    .spaces
                    .push((open.space.to_string(), open.version));
                Ok(None)
            }
            (None, _) => anyhow::bail!("expected a space's header line; nothing imported"),
            (Some(open), Read::Header { .. }) => anyhow::bail!(
                "a header inside space {} (no end line before it): the export is damaged; nothing imported",
                open.exported_as
            ),
        }
    }

    /// Creates the space a header line starts.
    async fn start(&mut self, exported_as: String, exported_version: u64) -> anyhow::Result<Open> {
        let space = match &self.rename {
            Some(_) if !self.imported.spaces.is_empty() => anyhow::bail!(
                "the input holds more than one space; import it without a SPACE to keep their ids"
            ),
            Some(space) => space.clone(),
            None => {
                SpaceId::parse(&exported_as).map_err(|e| anyhow::anyhow!("{exported_as:?}: {e}"))?
            }
        };
        let version = exported_version
            .checked_add(IMPORT_VERSION_GAP)
            .filter(|version| *version <= MAX_IMPORTED_VERSION)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "space {exported_as}'s version {exported_version} is too high to import"
                )
            })?;
        let created = self.tx.create_space(&space, version).await?;
        anyhow::ensure!(
            created,
            "space {space} exists in this database already: import only creates spaces (import it under another id, or into another database); nothing imported"
        );
        Ok(Open {
            exported_as,
            space,
            version,
            entries: 0,
            batch: Vec::with_capacity(BATCH_ENTRIES),
            batch_bytes: 0,
        })
    }

    async fn flush(&mut self, open: &mut Open) -> anyhow::Result<()> {
        if open.batch.is_empty() {
            return Ok(());
        }
        let added = self
            .tx
            .insert(&open.space, open.version, &open.batch)
            .await?;
        anyhow::ensure!(
            added == open.batch.len() as u64,
            "space {}: a key appears twice (one of the {} entries read last, or in a line before \
             them): the export is damaged; nothing imported",
            open.exported_as,
            open.batch.len()
        );
        open.batch.clear();
        open.batch_bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::read_line;

    #[test]
    fn lines_are_read_within_their_bound() {
        let mut input: &[u8] = b"abc\n\nabcdef\nlast";
        let mut line = Vec::new();
        let mut read = Vec::new();
        while read_line(&mut input, &mut line, 6).unwrap() {
            read.push(String::from_utf8(line.clone()).unwrap());
        }
        assert_eq!(read, ["abc", "", "abcdef", "last"]);
        let mut long: &[u8] = b"abcdefg\n";
        let error = read_line(&mut long, &mut line, 6).unwrap_err();
        assert!(error.to_string().contains("longer than 6 bytes"), "{error}");
    }
}
