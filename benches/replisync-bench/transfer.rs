//! `replisync export` and `replisync import` of big spaces (`--only transfer`): a space of
//! 100,000 and one of 1,000,000 entries (JSON objects of 150 to 225 bytes, 180 on average)
//! exported to a file, and that file imported under another id into an empty database, each
//! command timed from process start to exit, with its peak resident size and CPU time (GNU
//! time); on Postgres, then on the embedded SQLite store.
//!
//! The spaces are filled by importing a generated export file (the fastest way in, untimed),
//! then the database is settled (VACUUM ANALYZE, CHECKPOINT) before each timed command.

use std::ffi::OsStr;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use crate::database::{drop_side_database, entry_rows, fresh_side_database, settle};
use crate::report::{Report, TransferRow, median};
use crate::server::{Database, cli_command};
use crate::workloads::Bench;

/// The spaces' sizes (divided by 4 with --quick).
const SIZES: [usize; 2] = [100_000, 1_000_000];

/// No command the workload runs may take longer than this; past it, it is killed.
const COMMAND_DEADLINE: Duration = Duration::from_secs(600);

/// GNU time, which reports the peak resident size and CPU time of the command it runs.
const GNU_TIME: &str = "/usr/bin/time";
/// The line GNU time writes last on stderr: maximum resident set size in KB, user and system
/// CPU seconds.
const TIME_MARK: &str = "replisync-bench-time:";
const TIME_FORMAT: &str = "replisync-bench-time: %M %U %S";

/// The id each import gives its space.
const COPY: &str = "transfer-copy";

/// Where a transfer workload's spaces are: the benchmark's Postgres database and a fresh side
/// database per import, or SQLite files in a temporary directory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    Postgres,
    Sqlite,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Postgres => "Postgres",
            Store::Sqlite => "SQLite",
        }
    }
}

/// A database a command runs against, owned.
enum Target {
    Postgres(String),
    Sqlite(PathBuf),
}

impl Target {
    fn database(&self) -> Database<'_> {
        match self {
            Target::Postgres(url) => Database::Postgres(url),
            Target::Sqlite(file) => Database::SqliteFile(file),
        }
    }

    /// Settles a Postgres database before a measurement (SQLite: nothing to do).
    async fn settle(&self) -> anyhow::Result<()> {
        match self {
            Target::Postgres(url) => settle(url).await,
            Target::Sqlite(_) => Ok(()),
        }
    }
}

/// One command's process, start to exit.
struct Measured {
    wall: Duration,
    /// From GNU time, when installed.
    peak_rss_mb: Option<f64>,
    cpu_s: Option<f64>,
    /// What it wrote on stderr (GNU time's line taken out).
    stderr: String,
}

/// The rounds of one command on one store and size.
#[derive(Default)]
struct Rounds {
    walls: Vec<f64>,
    peaks: Vec<f64>,
    cpus: Vec<f64>,
}

impl Rounds {
    fn add(&mut self, run: &Measured) {
        self.walls.push(run.wall.as_secs_f64());
        self.peaks.extend(run.peak_rss_mb);
        self.cpus.extend(run.cpu_s);
    }

    fn row(
        mut self,
        store: Store,
        command: &'static str,
        entries: usize,
        file_mb: f64,
    ) -> TransferRow {
        let wall_s = median(&mut self.walls);
        let peak_rss_mb = (!self.peaks.is_empty()).then(|| median(&mut self.peaks));
        let cpu_s = (!self.cpus.is_empty()).then(|| median(&mut self.cpus));
        TransferRow {
            store: store.name(),
            command,
            entries,
            file_mb,
            rounds: self.walls.len(),
            wall_s,
            wall_s_rounds: self.walls,
            entries_per_second: entries as f64 / wall_s,
            peak_rss_mb,
            peak_rss_mb_rounds: self.peaks,
            cpu_s,
        }
    }
}

impl Bench {
    /// For each size: a generated file imported into the benchmark's database as the source
    /// space, then `self.repeat` rounds of its export (timed) and of the import of that export
    /// into an empty database (timed); on Postgres, then on SQLite.
    pub(crate) async fn transfer_workloads(&self, report: &mut Report) -> anyhow::Result<()> {
        let timed = Path::new(GNU_TIME).exists();
        if !timed {
            eprintln!(
                "{GNU_TIME} is not installed: peak RSS and CPU time of export and import not measured"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("replisync-bench-transfer-")
            .tempdir()?;
        for entries in SIZES.map(|n| n / self.scale) {
            let space = format!("transfer-{entries}");
            let generated = dir.path().join("generated.ndjson");
            let value_bytes = write_generated(&generated, &space, entries)?;
            eprintln!(
                "transfer: generated {entries} entries, values of {value_bytes:.0} bytes on average"
            );
            for store in [Store::Postgres, Store::Sqlite] {
                let source = match store {
                    Store::Postgres => Target::Postgres(self.database_url.clone()),
                    Store::Sqlite => {
                        Target::Sqlite(dir.path().join(format!("source-{entries}.db")))
                    }
                };
                let fill = self
                    .run_cli(&source, "import", &[], &generated, false)
                    .await?;
                ensure_imported(&fill, entries)?;
                let (export, import) = self
                    .transfer_rounds(store, &source, &space, entries, dir.path(), timed)
                    .await?;
                report.add_transfer_row(export);
                report.add_transfer_row(import);
                if let Target::Sqlite(file) = &source {
                    remove_sqlite(file);
                }
            }
            let _ = std::fs::remove_file(&generated);
        }
        drop_side_database(&self.admin_url, "import").await?;
        Ok(())
    }

    /// `self.repeat` rounds of: the export of `space` (of `entries` entries) in `source` to a
    /// file, then its import into an empty database; answers the export's row and the import's.
    async fn transfer_rounds(
        &self,
        store: Store,
        source: &Target,
        space: &str,
        entries: usize,
        dir: &Path,
        timed: bool,
    ) -> anyhow::Result<(TransferRow, TransferRow)> {
        let file = dir.join("export.ndjson");
        let (mut exports, mut imports) = (Rounds::default(), Rounds::default());
        let mut file_bytes = 0;
        for round in 0..self.repeat {
            source.settle().await?;
            let export = self
                .run_cli(source, "export", &[OsStr::new(space)], &file, timed)
                .await?;
            ensure!(
                export
                    .stderr
                    .contains(&format!("exported 1 spaces, {entries} entries")),
                "the export of {space} did not report {entries} entries: {}",
                export.stderr
            );
            file_bytes = check_export_file(&file, space, entries)?;
            exports.add(&export);

            let target = match store {
                Store::Postgres => {
                    Target::Postgres(fresh_side_database(&self.admin_url, "import").await?)
                }
                Store::Sqlite => Target::Sqlite(dir.join(format!("target-r{round}.db"))),
            };
            self.run_cli(&target, "migrate", &[], Path::new(""), false)
                .await?;
            target.settle().await?;
            let import = self
                .run_cli(&target, "import", &[OsStr::new(COPY)], &file, timed)
                .await?;
            ensure_imported(&import, entries)?;
            if let Target::Postgres(url) = &target {
                let rows = entry_rows(url, COPY).await?;
                ensure!(
                    rows == (entries as i64, 0),
                    "the import said {entries} entries, but the database holds {rows:?} (rows, tombstones)"
                );
            }
            imports.add(&import);
            if let Target::Sqlite(file) = &target {
                remove_sqlite(file);
            }
        }
        let _ = std::fs::remove_file(&file);
        let file_mb = file_bytes as f64 / 1_048_576.0;
        Ok((
            exports.row(store, "export", entries, file_mb),
            imports.row(store, "import", entries, file_mb),
        ))
    }

    /// Runs `replisync <command> <args>` against `target`, with `-o file` (export) or `-i file`
    /// (import), under GNU time when `timed`; fails unless it exits successfully within
    /// COMMAND_DEADLINE.
    async fn run_cli(
        &self,
        target: &Target,
        command: &str,
        args: &[&OsStr],
        file: &Path,
        timed: bool,
    ) -> anyhow::Result<Measured> {
        let program = if timed {
            let mut time = Command::new(GNU_TIME);
            time.args(["-f", TIME_FORMAT]).arg(&self.server_binary);
            time
        } else {
            Command::new(&self.server_binary)
        };
        let mut cli = cli_command(program, target.database());
        cli.arg(command).args(args);
        match command {
            "export" => cli.arg("-o").arg(file),
            "import" => cli.arg("-i").arg(file),
            _ => &mut cli,
        };
        // Its own process group, so that a command past its deadline is killed with GNU time.
        cli.process_group(0);
        let mut cli = tokio::process::Command::from(cli);
        cli.kill_on_drop(true);
        let started = Instant::now();
        let child = cli
            .spawn()
            .with_context(|| format!("cannot run replisync {command}"))?;
        let group = child.id();
        let output = match tokio::time::timeout(COMMAND_DEADLINE, child.wait_with_output()).await {
            Ok(output) => output?,
            Err(_) => {
                if let Some(group) = group {
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{group}")])
                        .status();
                }
                bail!("replisync {command} ran for more than {COMMAND_DEADLINE:?}: killed");
            }
        };
        let wall = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let (time_lines, lines): (Vec<&str>, Vec<&str>) =
            stderr.lines().partition(|line| line.starts_with(TIME_MARK));
        let stderr = lines.join("\n");
        ensure!(
            output.status.success(),
            "replisync {command} failed ({}): {stderr}",
            output.status
        );
        let (peak_rss_mb, cpu_s) = match time_lines.last() {
            Some(line) => {
                let figures: Vec<f64> = line[TIME_MARK.len()..]
                    .split_whitespace()
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("GNU time's line {line:?}"))?;
                let [kb, user, system] = figures[..] else {
                    bail!("GNU time's line {line:?} is not `KB user system`");
                };
                (Some(kb / 1024.0), Some(user + system))
            }
            None if timed => bail!("GNU time did not report on replisync {command}: {stderr}"),
            None => (None, None),
        };
        Ok(Measured {
            wall,
            peak_rss_mb,
            cpu_s,
            stderr,
        })
    }
}

/// Fails unless `import` said it imported one space of `entries` entries.
fn ensure_imported(import: &Measured, entries: usize) -> anyhow::Result<()> {
    ensure!(
        import
            .stderr
            .contains(&format!("imported 1 spaces, {entries} entries")),
        "the import did not report {entries} entries: {}",
        import.stderr
    );
    Ok(())
}

/// Removes a SQLite database file and its write-ahead log and shared memory files.
fn remove_sqlite(file: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut path = file.as_os_str().to_owned();
        path.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(path));
    }
}

/// The export `file` ends with `space`'s end line counting `entries`; answers its size in bytes.
fn check_export_file(file: &Path, space: &str, entries: usize) -> anyhow::Result<u64> {
    let mut f = std::fs::File::open(file)?;
    let bytes = f.metadata()?.len();
    let tail_start = bytes.saturating_sub(4096);
    f.seek(SeekFrom::Start(tail_start))?;
    let mut tail = String::new();
    f.read_to_string(&mut tail)?;
    let last = tail.lines().last().unwrap_or_default();
    let end: Value = serde_json::from_str(last).with_context(|| format!("last line {last:?}"))?;
    ensure!(
        end == json!({"end": space, "entries": entries}),
        "the export of {space} ends with {last:?}, not its end line with {entries} entries"
    );
    Ok(bytes)
}

/// Writes an export file of space `space` holding `entries` to-do items; answers the mean size
/// of their values (JSON text) in bytes.
fn write_generated(path: &Path, space: &str, entries: usize) -> anyhow::Result<f64> {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let header = json!({"space": space, "version": 1, "format": "replisync-space/1"});
    writeln!(out, "{header}")?;
    let mut value_bytes = 0usize;
    for i in 0..entries {
        let value = todo_item(i).to_string();
        value_bytes += value.len();
        writeln!(out, r#"{{"key":"todo/{i:08}","value":{value}}}"#)?;
    }
    writeln!(out, "{}", json!({"end": space, "entries": entries}))?;
    out.flush()?;
    Ok(value_bytes as f64 / entries.max(1) as f64)
}

const WORDS: [&str; 16] = [
    "review",
    "quarterly",
    "report",
    "draft",
    "budget",
    "call",
    "customer",
    "fix",
    "login",
    "page",
    "update",
    "release",
    "notes",
    "plan",
    "team",
    "offsite",
];

/// To-do item `i`: a JSON object of 150 to 225 bytes (180 on average), its title 2
/// to 9 words drawn from `i`.
fn todo_item(i: usize) -> Value {
    let mut bits = (i as u64)
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let words = 2 + (bits >> 61) as usize;
    let title: Vec<&str> = (0..words)
        .map(|_| {
            bits = bits.rotate_left(4);
            WORDS[(bits & 15) as usize]
        })
        .collect();
    json!({
        "id": format!("t{i:08}"),
        "title": title.join(" "),
        "done": i.is_multiple_of(3),
        "priority": i % 5,
        "owner": format!("user-{}", i % 1000),
        "tags": ["work", format!("q{}", i % 4 + 1)],
        "createdAt": format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + i % 28, i % 24, i % 60),
        "order": (i * 7919) % 1_000_003,
    })
}
