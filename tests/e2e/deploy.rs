//! deploy/ checked statically (it cannot be run here: no Docker engine, no cluster): every
//! kustomize overlay renders and validates against the Kubernetes schemas, no container runs
//! as root or without limits, hadolint passes, and every flag the manifests and Dockerfiles
//! pass to our binaries is one they accept. The checks live in deploy/check.py; this test
//! runs it with the tools scripts/fetch-deploy-tools.sh installs (scripts/test.sh does).

use e2e::{bin, repo_root};

#[test]
fn manifests_and_dockerfiles_pass_the_deploy_checks() {
    let tools = std::env::var("CT_DEPLOY_TOOLS").unwrap_or_else(|_| {
        panic!("CT_DEPLOY_TOOLS is unset: run scripts/test.sh, or set it to the output of scripts/fetch-deploy-tools.sh")
    });
    let tools = std::path::Path::new(&tools).join("bin");
    let output = std::process::Command::new(tools.join("python"))
        .arg(repo_root().join("deploy/check.py"))
        .arg("--coordinator")
        .arg(bin("coordinator"))
        .arg("--worker")
        .arg(bin("worker"))
        .arg("--hadolint")
        .arg(tools.join("hadolint"))
        .output()
        .expect("deploy/check.py runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("3 overlays") && stdout.contains("0 problems"), "{stdout}");
}
