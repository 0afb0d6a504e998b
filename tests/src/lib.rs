//! Helpers for the end-to-end tests: the real `coordinator` and `worker` binaries as
//! processes on 127.0.0.1, the fixtures, readers for a sweep's tables, and a headless
//! browser ([`browser`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod browser;

use bytes::Bytes;
use common::tables::{ErrorRow, FactSummary, TraceRow, read_errors, read_facts, read_traces};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A committed fixture.
pub fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(rel)
}

/// ROME's knowns dataset beside the checkout (or `CT_KNOWNS`).
pub fn knowns_path() -> PathBuf {
    let path = std::env::var("CT_KNOWNS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("../shared/data/known_1000.json"));
    assert!(
        path.is_file(),
        "{} is missing: set CT_KNOWNS to known_1000.json (scripts/fetch-knowns.sh finds or fetches it)",
        path.display()
    );
    path
}

/// SmolLM2's GGUF (fetched by scripts/fetch-model.sh; never skipped when absent).
pub fn smollm2_path() -> PathBuf {
    let path = std::env::var("CT_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|_| {
        let base = std::env::var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache")
        });
        base.join("causal-trace/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.is_file(), "{} is missing: run scripts/fetch-model.sh", path.display());
    path
}

/// The folder holding the workspace's binaries, built once per test process (cargo builds
/// a package's own binaries for its tests only, and these live in other packages).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> → target/<profile>
        let dir = exe.parent().and_then(Path::parent).expect("target dir").to_path_buf();
        let mut build = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        build.current_dir(repo_root()).args([
            "build",
            "-p",
            "coordinator",
            "-p",
            "worker",
            "--bins",
        ]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("cargo build runs");
        assert!(status.success(), "building the coordinator and worker binaries failed");
        dir
    })
}

/// The path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A child process whose stderr goes to a log file, killed when dropped.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its stderr.
    pub log: PathBuf,
    /// Its stdout.
    pub out: PathBuf,
}

impl Proc {
    /// Starts `bin` with `args`, logging into `dir/<tag>.{err,out}`.
    pub fn start(bin: &Path, args: &[String], dir: &Path, tag: &str) -> Self {
        Self::start_env(bin, args, &[], dir, tag)
    }

    /// `start` with extra environment variables.
    pub fn start_env(
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
        dir: &Path,
        tag: &str,
    ) -> Self {
        let mut with_log = vec![("RUST_LOG", "info")];
        with_log.extend(env.iter().copied());
        Self::spawn(bin, args, &with_log, dir, tag)
    }

    /// `start` as a user runs it: no `RUST_LOG`, so the binary's own default applies.
    pub fn start_default_log(bin: &Path, args: &[String], dir: &Path, tag: &str) -> Self {
        Self::spawn(bin, args, &[], dir, tag)
    }

    fn spawn(bin: &Path, args: &[String], env: &[(&str, &str)], dir: &Path, tag: &str) -> Self {
        let log = dir.join(format!("{tag}.err"));
        let out = dir.join(format!("{tag}.out"));
        let child = Command::new(bin)
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Self { child, log, out }
    }

    /// Waits for the exit status, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {limit:?}; stderr:\n{}",
                    self.log.display(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `coordinator status --json`, if the coordinator answers.
pub fn status(port: u16) -> Option<serde_json::Value> {
    let output = Command::new(bin("coordinator"))
        .args(["status", "--json", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

/// A sweep's tables, read back.
#[derive(Debug, Default)]
pub struct Tables {
    /// `facts`.
    pub facts: Vec<FactSummary>,
    /// `traces`, all kinds.
    pub traces: Vec<TraceRow>,
    /// `errors`.
    pub errors: Vec<ErrorRow>,
    /// The Parquet files read.
    pub files: Vec<PathBuf>,
}

fn parquet_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            parquet_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(path);
        }
    }
}

/// Reads every table of the sweep folder `dir`.
pub fn read_tables(dir: &Path) -> Tables {
    let mut tables = Tables::default();
    for table in ["facts", "traces", "errors"] {
        let mut files = Vec::new();
        parquet_files(&dir.join(table), &mut files);
        files.sort();
        for file in files {
            let bytes = Bytes::from(std::fs::read(&file).expect("read parquet"));
            match table {
                "facts" => tables.facts.extend(read_facts(&bytes).expect("facts file")),
                "traces" => tables.traces.extend(read_traces(&bytes).expect("traces file")),
                _ => tables.errors.extend(read_errors(&bytes).expect("errors file")),
            }
            tables.files.push(file);
        }
    }
    tables
}

/// The single sweep folder under `out`.
pub fn sweep_dir(out: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(out)
        .expect("out exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "one sweep folder in {}: {dirs:?}", out.display());
    dirs[0].clone()
}

impl Tables {
    /// Asserts every (fact, kind, token, layer) row appears exactly once and that the traced
    /// facts have exactly T × L × kinds rows; returns the row count.
    pub fn assert_exactly_once(&self, n_layers: u32, kinds: usize) -> usize {
        let mut seen = HashSet::new();
        for r in &self.traces {
            assert!(seen.insert((r.known_id, r.kind, r.token, r.layer)), "duplicate row {r:?}");
        }
        let facts: HashSet<u64> = self.facts.iter().map(|f| f.known_id).collect();
        assert_eq!(facts.len(), self.facts.len(), "a fact has two facts rows");
        let expected: usize = self
            .facts
            .iter()
            .filter(|f| f.traced)
            .map(|f| f.n_tokens * n_layers as usize * kinds)
            .sum();
        assert_eq!(self.traces.len(), expected, "Σ T × L × kinds over traced facts");
        expected
    }

    /// Asserts every (fact, kind, token, layer, head) row appears exactly once and that each
    /// traced fact has exactly its traced tokens × L (× H for a kind with a head axis) rows
    /// of every kind, as its `facts` row records them; returns the row count.
    pub fn assert_each_row_once(&self, kinds: &[common::kinds::Kind]) -> usize {
        let mut seen = HashSet::new();
        for r in &self.traces {
            let key = (r.known_id, r.kind, r.token, r.layer, r.head);
            assert!(seen.insert(key), "duplicate row {r:?}");
            assert_eq!(r.head.is_some(), r.kind.has_heads(), "{r:?}");
        }
        let mut expected = 0;
        for f in self.facts.iter().filter(|f| f.traced) {
            for kind in kinds {
                let g = common::kinds::Geometry {
                    n_layers: f.n_layers as usize,
                    n_heads: f.n_heads as usize,
                };
                let want = f.traced_tokens.len() * kind.cells_per_token(g);
                let got =
                    self.traces.iter().filter(|r| r.known_id == f.known_id && r.kind == *kind);
                assert_eq!(got.count(), want, "fact {} {kind}", f.known_id);
                expected += want;
            }
        }
        assert_eq!(self.traces.len(), expected, "no rows of facts or kinds not asked for");
        expected
    }

    /// The scores of one fact, per kind name, as T rows of L.
    pub fn table(
        &self,
        known_id: u64,
        n_tokens: usize,
        n_layers: usize,
    ) -> BTreeMap<String, Vec<Vec<f32>>> {
        let mut out: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
        for r in self.traces.iter().filter(|r| r.known_id == known_id) {
            let table = out
                .entry(r.kind.name().to_string())
                .or_insert_with(|| vec![vec![f32::NAN; n_layers]; n_tokens]);
            table[r.token as usize][r.layer as usize] = r.score;
        }
        out
    }
}

/// The manifest of a sweep folder.
pub fn manifest(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest is JSON")
}

/// Args as owned strings.
pub fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// `coordinator run --knowns K --model M --out O` and `extra`.
pub fn run_args(knowns: &Path, model: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let mut a = args(&["run", "--knowns"]);
    a.extend([path(knowns), "--model".into(), path(model), "--out".into(), path(out)]);
    a.extend(args(extra));
    a
}

/// `coordinator run` over the first `limit` known facts on the tiny Llama fixture, with
/// small settings (every fact traced, 2 samples, window 3, commits every 0.3 s, 3 s of
/// linger for the workers to hear "finished"), listening on `listen`.
pub fn tiny_sweep_args(out: &Path, listen: &str, limit: u32) -> Vec<String> {
    let limit = limit.to_string();
    let mut a = run_args(
        &knowns_path(),
        &fixture("tiny/llama"),
        out,
        &["--listen", listen, "--limit", &limit],
    );
    a.extend(args(&["--correctness", "none", "--samples", "2", "--window", "3"]));
    a.extend(args(&["--flush-secs", "0.3", "--linger-secs", "3"]));
    a
}

/// `worker serve` with one thread on the tiny Llama fixture, against `url`, named `tag`.
pub fn tiny_worker_args(url: &str, tag: &str) -> Vec<String> {
    let mut a = args(&["serve", "--coordinator", url, "--model"]);
    a.push(fixture("tiny/llama").display().to_string());
    a.extend(args(&["--threads", "1", "--name", tag]));
    a
}

/// `coordinator aggregate --results dir --out out` plus `extra`; returns what it printed.
pub fn aggregate(dir: &Path, out: &Path, extra: &[&str]) -> String {
    let output = Command::new(bin("coordinator"))
        .args(["aggregate", "--results"])
        .arg(dir)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("aggregate runs");
    assert!(output.status.success(), "aggregate: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs the DuckDB shell that scripts/fetch-duckdb-cli.sh fetched (`CT_DUCKDB_CLI`: the
/// folder of its wrapper) in the repository root with `-json` and `args`; returns the rows of
/// the last statement (each statement that returns something, `CREATE SECRET` too, prints
/// its own JSON array).
pub fn duckdb_cli(args: &[String]) -> serde_json::Value {
    let dir = std::env::var("CT_DUCKDB_CLI")
        .expect("CT_DUCKDB_CLI: run scripts/test.sh (it fetches the shell with scripts/fetch-duckdb-cli.sh)");
    let output = Command::new(Path::new(&dir).join("duckdb"))
        .current_dir(repo_root())
        .arg("-json")
        .args(args)
        .output()
        .expect("the duckdb shell runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !stdout.contains("Error"),
        "duckdb {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut last = None;
    for value in serde_json::Deserializer::from_str(&stdout).into_iter::<serde_json::Value>() {
        last = Some(value.unwrap_or_else(|e| panic!("duckdb printed {stdout:?}: {e}")));
    }
    last.unwrap_or_else(|| panic!("duckdb printed no rows: {stdout:?}"))
}

/// Runs `queries/<name>.sql` over the sweep folder `dir` through DuckDB (tools/duckdb_queries.py
/// with the package scripts/fetch-duckdb.sh fetched), with `facts` = `correct` or `all`;
/// returns `{name: [rows]}`.
pub fn duckdb_queries(dir: &Path, facts: &str, names: &[&str]) -> serde_json::Value {
    duckdb_queries_with(dir, &["--facts", facts], names)
}

/// [`duckdb_queries`] with the tool's options as given (`--facts F`, `--metric M`,
/// `--scale S`, `--recovery R`, `--floor F`: queries/facts.sql's variables).
pub fn duckdb_queries_with(dir: &Path, options: &[&str], names: &[&str]) -> serde_json::Value {
    let output = duckdb_command(dir, options, names);
    assert!(output.status.success(), "duckdb: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("json")
}

/// tools/duckdb_queries.py run as [`duckdb_queries_with`] runs it, its output as it is (for
/// a query expected to fail).
pub fn duckdb_command(dir: &Path, options: &[&str], names: &[&str]) -> std::process::Output {
    let pythonpath = std::env::var("CT_DUCKDB_PYTHONPATH")
        .expect("CT_DUCKDB_PYTHONPATH: run scripts/test.sh (it fetches DuckDB with scripts/fetch-duckdb.sh)");
    Command::new(std::env::var("CT_PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(repo_root().join("tools/duckdb_queries.py"))
        .args(options)
        .arg(dir)
        .args(names)
        .env("PYTHONPATH", pythonpath)
        .output()
        .expect("python runs")
}

/// The rows of a CSV the aggregate wrote, as maps from column to text.
pub fn read_csv(path: &Path) -> Vec<BTreeMap<String, String>> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|_| panic!("{} missing", path.display()));
    let mut lines = text.lines();
    let header: Vec<String> =
        lines.next().unwrap_or_default().split(',').map(String::from).collect();
    lines
        .map(|line| header.iter().cloned().zip(line.split(',').map(String::from)).collect())
        .collect()
}

/// The jobs a worker's log (its stderr at `info`) shows it computing and not yet handed in,
/// failed or released: the jobs in flight when the log was read. A worker logs `computing`
/// with the job's id as it starts one and `handed in`, `failed` or `released` as it ends it.
pub fn jobs_in_flight(log: &str) -> Vec<String> {
    let mut open: Vec<String> = Vec::new();
    for line in log.lines() {
        let Some(job) = line.split_whitespace().find_map(|w| w.strip_prefix("job=")) else {
            continue;
        };
        let job = job.trim_matches('"').to_string();
        if line.contains("computing") {
            open.retain(|j| *j != job);
            open.push(job);
        } else if ["handed in", "failed", "released", "no longer wanted"]
            .iter()
            .any(|end| line.contains(end))
        {
            open.retain(|j| *j != job);
        }
    }
    open
}
