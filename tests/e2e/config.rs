//! Bad configuration is answered before anything is written: each bad flag, URL or file
//! stops `coordinator run` with a message naming the flag (and the value or file), and the
//! output folder is never created. A model the workers cannot load stops the sweep with the
//! workers' own error instead of waiting for workers forever.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{Proc, args, bin, fixture, knowns_path, manifest, sweep_dir};

/// `coordinator run` on the tiny model with `flags` replacing or adding to the defaults
/// (clap refuses a flag given twice, so a default is dropped when `flags` sets it).
fn run_args(out: &Path, flags: &[&str]) -> Vec<String> {
    let knowns = knowns_path().display().to_string();
    let model = fixture("tiny/llama").display().to_string();
    let out = out.display().to_string();
    let defaults = [
        ("--knowns", knowns.as_str()),
        ("--model", model.as_str()),
        ("--out", out.as_str()),
        ("--listen", "127.0.0.1:0"),
        ("--limit", "2"),
    ];
    let mut a = args(&["run"]);
    for (flag, value) in defaults {
        if !flags.contains(&flag) {
            a.extend(args(&[flag, value]));
        }
    }
    a.extend(args(flags));
    a
}

#[test]
fn bad_configuration_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broken = tmp.path().join("broken.json");
    std::fs::write(&broken, "[{\"known_id\": 1, \"subject\": ").expect("write");
    let broken = broken.display().to_string();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--samples", "0"], &["--samples: must be at least 1"]),
        (&["--window", "0"], &["--window: must be at least 1"]),
        (&["--kinds", "hidden,foo"], &["--kinds", "unknown kind \"foo\"", "severed_mlp"]),
        (&["--kinds", "hidden,mlp,hidden"], &["--kinds: hidden is named twice"]),
        (&["--tokens", "last,subject"], &["--tokens", "unknown token role \"subject\""]),
        (&["--seed", "7"], &["--seed: applies to --seed-mode per-fact only"]),
        (
            &["--kinds", "severed_mlp", "--replace"],
            &["--replace: severed_mlp with --seed-mode rome"],
        ),
        (&["--kinds", "severed_attn", "--noise", "u2"], &["--noise: severed_attn", "Gaussian"]),
        (&["--noise=-1"], &["--noise", "must be finite and >= 0"]),
        (&["--seed-mode", "x"], &["--seed-mode", "unknown seed mode \"x\""]),
        (&["--correctness", "x"], &["--correctness", "unknown correctness \"x\""]),
        (&["--layers-per-job", "0"], &["--layers-per-job must be at least 1"]),
        (&["--dtype", "f64"], &["--dtype f64: expected f32, f16 or bf16"]),
        (&["--lease-secs", "0"], &["--lease-secs", "must be positive"]),
        (&["--storage-give-up-secs", "NaN"], &["--storage-give-up-secs must not be negative"]),
        (&["--sweep-id", "a/b"], &["--sweep-id \"a/b\""]),
        (&["--out", "ftp://example.com/out"], &["--out ftp://example.com/out", "scheme ftp"]),
        (&["--knowns", "s4://bucket/k.json"], &["--knowns s4://bucket/k.json", "scheme s4"]),
        (&["--knowns", "http://[::1/k.json"], &["--knowns http://[::1/k.json", "bad URL"]),
        (&["--model", "no/such/model"], &["--model no/such/model"]),
        (&["--knowns", &broken], &[&broken, "not a JSON array", "line 1 column 28"]),
    ];
    for (i, (flags, expected)) in cases.iter().enumerate() {
        let out = tmp.path().join(format!("out-{i}"));
        let output = Command::new(bin("coordinator"))
            .args(run_args(&out, flags))
            .current_dir(tmp.path())
            .output()
            .expect("the coordinator runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?} was accepted");
        for text in *expected {
            assert!(stderr.contains(text), "{flags:?}: {text:?} not in:\n{stderr}");
        }
        assert!(!out.exists(), "{flags:?}: the output folder was created");
    }
    // A URL with a scheme nobody opens never became a local folder.
    assert!(!tmp.path().join("ftp:").exists());
}

#[test]
fn a_model_the_workers_cannot_load_stops_the_sweep_with_their_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The tiny model with its weights cut short: the coordinator only fingerprints the
    // files, the workers fail to load them.
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).expect("mkdir");
    for entry in std::fs::read_dir(fixture("tiny/llama")).expect("fixture").flatten() {
        std::fs::copy(entry.path(), model.join(entry.file_name())).expect("copy");
    }
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("weights");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("truncate");

    let out = tmp.path().join("out");
    let model_flag = model.display().to_string();
    let mut a = run_args(&out, &["--model", &model_flag]);
    a.extend(args(&["--local-workers", "2", "--worker-threads", "1", "--worker-bin"]));
    a.push(bin("worker").display().to_string());
    let mut coordinator = Proc::start(&bin("coordinator"), &a, tmp.path(), "coordinator");
    assert!(!coordinator.wait(Duration::from_secs(120)).success(), "the sweep cannot run");
    let log = coordinator.stderr();
    assert!(log.contains("not a valid safetensors file"), "the workers' error: {log}");
    assert!(log.contains("every local worker has stopped"), "{log}");
    assert_eq!(manifest(&sweep_dir(&out))["state"], "failed");
}
