//! The shared token: a coordinator that has one lets in only the workers and status calls
//! that present it, hands it to its own local workers, never prints it, and without one
//! refuses to listen beyond loopback.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{
    Proc, args, bin, free_port, manifest, sweep_dir, tiny_sweep_args, tiny_worker_args, wait_until,
};

const TOKEN: &str = "s3cret-0123456789";

fn run_args(out: &Path, listen: &str) -> Vec<String> {
    tiny_sweep_args(out, listen, 4)
}

fn worker_args(port: u16, tag: &str) -> Vec<String> {
    tiny_worker_args(&format!("http://127.0.0.1:{port}"), tag)
}

/// `coordinator status --json` with `env`: its exit status, stdout and stderr.
fn status_with(port: u16, env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(bin("coordinator"))
        .args(["status", "--json", "--coordinator", &format!("http://127.0.0.1:{port}")])
        .envs(env.iter().copied())
        .output()
        .expect("coordinator status runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[test]
fn only_workers_with_the_token_get_in() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
    let out = tmp.path().join("out");
    let port = free_port();
    let mut run = run_args(&out, &format!("127.0.0.1:{port}"));
    run.extend(args(&["--token-file", token_file.to_str().expect("utf8")]));
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    let good = [("CT_TOKEN", TOKEN)];
    wait_until(Duration::from_secs(30), "the coordinator answers", || status_with(port, &good).0);

    let (ok, _, err) = status_with(port, &[]);
    assert!(!ok && err.contains("requires a token"), "status without a token: {err}");
    let (ok, _, err) = status_with(port, &[("CT_TOKEN", "s3cret-guess")]);
    assert!(!ok && err.contains("wrong token"), "status with a wrong token: {err}");

    let mut none = Proc::start(&bin("worker"), &worker_args(port, "none"), tmp.path(), "none");
    assert!(!none.wait(Duration::from_secs(60)).success(), "a worker without the token left");
    assert!(none.stderr().contains("requires a token"), "{}", none.stderr());
    let wrong = [("CT_TOKEN", "s3cret-guess")];
    let mut guess =
        Proc::start_env(&bin("worker"), &worker_args(port, "guess"), &wrong, tmp.path(), "guess");
    assert!(!guess.wait(Duration::from_secs(60)).success(), "a worker with a wrong token left");
    assert!(guess.stderr().contains("wrong token"), "{}", guess.stderr());
    let s = status_with(port, &good).1;
    assert!(s.contains(r#""workers":0"#) && s.contains(r#""jobs_done":0"#), "{s}");

    let mut member =
        Proc::start_env(&bin("worker"), &worker_args(port, "member"), &good, tmp.path(), "member");
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.stderr());
    assert!(member.wait(Duration::from_secs(30)).success(), "worker: {}", member.stderr());
    assert_eq!(manifest(&sweep_dir(&out))["state"], "finished");
    for log in [coordinator.stderr(), member.stderr(), none.stderr(), guess.stderr()] {
        assert!(!log.contains(TOKEN), "a log shows the token: {log}");
    }
}

#[test]
fn local_workers_get_the_token_and_open_addresses_need_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let port = free_port();

    let open = run_args(&out, &format!("0.0.0.0:{port}"));
    let mut refused = Proc::start(&bin("coordinator"), &open, tmp.path(), "open");
    assert!(!refused.wait(Duration::from_secs(30)).success());
    assert!(refused.stderr().contains("no token is set"), "{}", refused.stderr());
    assert!(!out.exists(), "nothing was written by a coordinator that refused to start");

    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let mut run = run_args(&out, "127.0.0.1:0");
    run.extend(args(&["--token-file", token_file.to_str().expect("utf8")]));
    run.extend(args(&["--local-workers", "1", "--worker-bin"]));
    run.push(bin("worker").display().to_string());
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "local");
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.stderr());
    assert_eq!(manifest(&sweep_dir(&out))["state"], "finished");
}
