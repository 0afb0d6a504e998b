//! Object storage end to end: a real S3 server (s3s-fs, started on 127.0.0.1 by the test)
//! holds the model, the dataset and the results. A sweep that reads and writes only
//! `s3://` URLs, then `coordinator aggregate` on `s3://`, give the same sweep id and the
//! same numbers as the same sweep written to a local folder (whose inputs come over HTTP).

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::{Proc, args, bin, duckdb_cli, free_port, knowns_path, smollm2_path, wait_until};
use object_store::ObjectStoreExt;

const BUCKET: &str = "causal-trace";
const KEY_ID: &str = "AKIACAUSALTRACE";
const SECRET: &str = "causal-trace-test-secret";

/// An s3s-fs server over a folder; buckets are its subfolders.
struct S3 {
    _server: Proc,
    port: u16,
}

impl S3 {
    fn start(dir: &Path) -> Self {
        let bin = std::env::var("CT_S3S_FS").map(PathBuf::from).unwrap_or_else(|_| {
            panic!("CT_S3S_FS is unset: run scripts/test.sh, or set it to the output of scripts/fetch-s3-server.sh")
        });
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join(BUCKET)).expect("bucket folder");
        let port = free_port();
        let server = Proc::start(
            &bin,
            &args(&[
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                KEY_ID,
                "--secret-key",
                SECRET,
                root.to_str().expect("utf8"),
            ]),
            dir,
            "s3s-fs",
        );
        wait_until(Duration::from_secs(30), "the S3 server", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { _server: server, port }
    }

    /// The standard AWS variables that point object_store (ours) at this server.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// Uploads `file` to `key` through the S3 API.
    fn put(&self, key: &str, file: &Path) {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{}", self.port))
            .with_allow_http(true)
            .with_bucket_name(BUCKET)
            .with_access_key_id(KEY_ID)
            .with_secret_access_key(SECRET)
            .with_region("us-east-1")
            .build()
            .expect("S3 client");
        let bytes = std::fs::read(file).expect("read upload");
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime
            .block_on(store.put(&object_store::path::Path::from(key), bytes.into()))
            .unwrap_or_else(|e| panic!("uploading {key}: {e}"));
    }
}

/// Runs `coordinator` with `a` and the S3 variables; returns its stdout.
fn coordinator(a: &[String], env: &[(&'static str, String)], dir: &Path, tag: &str) -> String {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut proc = Proc::start_env(&bin("coordinator"), a, &env, dir, tag);
    assert!(proc.wait(Duration::from_secs(240)).success(), "{tag}: {}", proc.stderr());
    proc.stdout()
}

fn sweep_args(knowns: &str, model: &str, out: &str) -> Vec<String> {
    let mut a = args(&["run", "--knowns", knowns, "--model", model, "--out", out]);
    a.extend(args(&[
        "--local-workers",
        "2",
        "--worker-threads",
        "1",
        "--worker-bin",
        bin("worker").to_str().expect("utf8"),
        "--samples",
        "2",
        "--kinds",
        "hidden,mlp",
        "--layers-per-job",
        "10",
        "--flush-secs",
        "0.3",
    ]));
    a
}

fn sweep_id(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("sweep ").and_then(|r| r.split_whitespace().next()))
        .unwrap_or_else(|| panic!("no sweep id in {stdout}"))
        .to_string()
}

/// summary.csv as (kind, category, layer) → (aie, std, n).
fn summary(dir: &Path) -> Vec<(String, f64, f64, u64)> {
    let text = std::fs::read_to_string(dir.join("summary.csv")).expect("summary.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).expect(name);
    let (kind, category, layer) = (col("kind"), col("category"), col("layer"));
    let (aie, std, n) = (col("aie"), col("std"), col("n"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let num = |i: usize| f[i].parse::<f64>().expect("number");
            (format!("{} {} {}", f[kind], f[category], f[layer]), num(aie), num(std), num(n) as u64)
        })
        .collect()
}

#[test]
fn a_sweep_in_s3_equals_the_same_sweep_on_disk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let s3 = S3::start(tmp.path());
    // SmolLM2 (the aggregate needs facts the model predicts): Goebbels → Berlin, which it
    // predicts, and The Eiffel Tower's record 0, which it may not.
    let model = smollm2_path();
    s3.put("models/SmolLM2-135M-Instruct.Q4_1.gguf", &model);
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(knowns_path()).expect("knowns"))
            .expect("knowns json");
    let dataset = tmp.path().join("two.json");
    let chosen = [records[78].clone(), records[0].clone()];
    std::fs::write(&dataset, serde_json::to_string(&chosen).expect("json")).expect("write");
    s3.put("data/two.json", &dataset);
    let mut env = s3.env();
    env.push(("CT_MODEL_CACHE", tmp.path().join("cache").display().to_string()));

    let remote = sweep_args(
        &format!("s3://{BUCKET}/data/two.json"),
        &format!("s3://{BUCKET}/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &format!("s3://{BUCKET}/sweeps"),
    );
    let id = sweep_id(&coordinator(&remote, &env, tmp.path(), "s3-sweep"));
    let in_bucket = tmp.path().join("s3").join(BUCKET).join("sweeps").join(&id);
    assert!(in_bucket.join("manifest.json").is_file(), "the sweep went to the S3 server");
    assert!(in_bucket.join("_journal").read_dir().expect("journal").count() >= 2);
    let cached = tmp.path().join("cache").read_dir().map_or(0, |d| d.count());
    assert!(cached >= 1, "the workers copied the model from S3 into their cache");

    // The same sweep into a local folder, reading its inputs over plain HTTP (the https://
    // path of object_store's HTTP store, without TLS).
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::copy(&dataset, www.join("two.json")).expect("copy dataset");
    std::os::unix::fs::symlink(&model, www.join("SmolLM2-135M-Instruct.Q4_1.gguf")).expect("link");
    let http_port = free_port();
    let _http = Proc::start(
        Path::new("python3"),
        &args(&[
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            www.to_str().expect("utf8"),
            &http_port.to_string(),
        ]),
        tmp.path(),
        "http",
    );
    wait_until(Duration::from_secs(30), "the HTTP server", || {
        std::net::TcpStream::connect(("127.0.0.1", http_port)).is_ok()
    });
    let local_out = tmp.path().join("local");
    let local = sweep_args(
        &format!("http://127.0.0.1:{http_port}/two.json"),
        &format!("http://127.0.0.1:{http_port}/SmolLM2-135M-Instruct.Q4_1.gguf"),
        local_out.to_str().expect("utf8"),
    );
    let cache = [("CT_MODEL_CACHE", tmp.path().join("cache-http").display().to_string())];
    let local_id = sweep_id(&coordinator(&local, &cache, tmp.path(), "local-sweep"));
    assert_eq!(id, local_id, "the same dataset, model and settings: the same sweep");

    let agg_s3 = tmp.path().join("agg-s3");
    let from_s3 = args(&["aggregate", "--results", &format!("s3://{BUCKET}/sweeps/{id}")]);
    let mut a = from_s3.clone();
    a.extend(args(&["--out", agg_s3.to_str().expect("utf8")]));
    coordinator(&a, &env, tmp.path(), "aggregate-s3");
    let agg_local = tmp.path().join("agg-local");
    let results = local_out.join(&id);
    let a = args(&[
        "aggregate",
        "--results",
        results.to_str().expect("utf8"),
        "--out",
        agg_local.to_str().expect("utf8"),
    ]);
    coordinator(&a, &[], tmp.path(), "aggregate-local");

    // Workers compute deterministically, so the rows are the same; the sums may run in
    // another order (rows arrive in other files), hence 1e-9 rather than bit equality.
    let (s3_rows, local_rows) = (summary(&agg_s3), summary(&agg_local));
    assert!(!s3_rows.is_empty());
    assert_eq!(s3_rows.len(), local_rows.len());
    for (a, b) in s3_rows.iter().zip(&local_rows) {
        assert_eq!((&a.0, a.3), (&b.0, b.3), "same cells, same counts");
        assert!((a.1 - b.1).abs() <= 1e-9 && (a.2 - b.2).abs() <= 1e-9, "{a:?} vs {b:?}");
    }

    // The DuckDB shell reads the sweep straight from S3 (httpfs, pinned and loaded from its
    // file) and from the folder, with the same numbers.
    let secret = format!(
        "CREATE SECRET (TYPE s3, KEY_ID '{KEY_ID}', SECRET '{SECRET}', REGION 'us-east-1', \
         ENDPOINT '127.0.0.1:{}', URL_STYLE 'path', USE_SSL false)",
        s3.port
    );
    let ate = |results: &str, extra: &[&str]| {
        let mut a = args(extra);
        a.extend(args(&["-cmd", &format!("SET VARIABLE results = '{results}'")]));
        a.extend(args(&["-c", ".read queries/ate.sql"]));
        duckdb_cli(&a)
    };
    let over_s3 = ate(&format!("s3://{BUCKET}/sweeps/{id}"), &["-cmd", &secret]);
    let over_folder = ate(results.to_str().expect("utf8"), &[]);
    assert_eq!(over_s3.as_array().map(Vec::len), Some(2), "hidden and mlp: {over_s3}");
    same_rows(&over_s3, &over_folder, 1e-9);

    // A file no commit names (a flush that crashed before its commit, or one in progress) is
    // not read: the rows and the answer stay the same.
    let folder = results.to_str().expect("utf8");
    let rows = || {
        duckdb_cli(&args(&[
            "-cmd",
            &format!("SET VARIABLE results = '{folder}'"),
            "-cmd",
            ".read queries/facts.sql",
            "-c",
            "SELECT count(*) AS n FROM traces",
        ]))
    };
    let before = rows();
    assert!(before[0]["n"].as_u64() > Some(0), "{before}");
    let kind = results.join("traces/kind=hidden");
    let first = kind.read_dir().expect("traces").next().expect("a file").expect("entry").path();
    std::fs::copy(&first, kind.join("part-99999999.parquet")).expect("copy");
    assert_eq!(rows(), before, "an uncommitted file was read");
    same_rows(&ate(folder, &[]), &over_folder, 0.0);
}

/// Two query results with the same rows, numbers within `tolerance`.
fn same_rows(a: &serde_json::Value, b: &serde_json::Value, tolerance: f64) {
    let (ra, rb) = (a.as_array().expect("rows"), b.as_array().expect("rows"));
    assert_eq!(ra.len(), rb.len(), "{a} vs {b}");
    for (x, y) in ra.iter().zip(rb) {
        let (x, y) = (x.as_object().expect("row"), y.as_object().expect("row"));
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (k, v) in x {
            match (v.as_f64(), y[k].as_f64()) {
                (Some(p), Some(q)) => assert!((p - q).abs() <= tolerance, "{k}: {p} vs {q}"),
                _ => assert_eq!(v, &y[k], "{k}"),
            }
        }
    }
}
