//! TLS (rustls): a coordinator with a certificate serves only TLS; a worker that trusts its
//! CA runs the sweep, one that speaks plaintext gets nowhere, and with a client CA the
//! coordinator also turns away workers without a certificate of that CA (mTLS). Certificates
//! are made by the test (rcgen).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::{
    Proc, args, bin, free_port, manifest, sweep_dir, tiny_sweep_args, tiny_worker_args, wait_until,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM
/// files in `dir`: (ca, server cert, server key, client cert, client key).
fn certificates(dir: &Path) -> [PathBuf; 5] {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let cert =
            CertificateParams::new(names).expect("params").signed_by(&key, &ca).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client, client_key) = leaf(vec!["worker".into()]);
    let files =
        ["ca.pem", "server.pem", "server.key", "client.pem", "client.key"].map(|n| dir.join(n));
    for (path, pem) in files.iter().zip([ca.pem(), server, server_key, client, client_key]) {
        std::fs::write(path, pem).expect("write PEM");
    }
    files
}

fn coordinator_args(out: &Path, port: u16, tls: &[&Path]) -> Vec<String> {
    let mut a = tiny_sweep_args(out, &format!("127.0.0.1:{port}"), 3);
    for (flag, path) in ["--tls-cert", "--tls-key", "--tls-client-ca"].iter().zip(tls) {
        a.push((*flag).to_string());
        a.push(path.display().to_string());
    }
    a
}

fn worker(url: &str, tls: &[(&str, &Path)], dir: &Path, tag: &str) -> Proc {
    let mut a = tiny_worker_args(url, tag);
    a.extend(args(&["--give-up-secs", "4"]));
    for (flag, path) in tls {
        a.push((*flag).to_string());
        a.push(path.display().to_string());
    }
    Proc::start(&bin("worker"), &a, dir, tag)
}

fn status_ok(url: &str, tls: &[(&str, &Path)]) -> bool {
    let mut c = Command::new(bin("coordinator"));
    c.args(["status", "--json", "--coordinator", url]);
    for (flag, path) in tls {
        c.arg(flag).arg(path);
    }
    c.output().is_ok_and(|o| o.status.success())
}

#[test]
fn workers_that_trust_the_ca_run_the_sweep_and_plaintext_gets_nowhere() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let [ca, cert, key, ..] = certificates(tmp.path());
    let out = tmp.path().join("out");
    let port = free_port();
    let run = coordinator_args(&out, port, &[&cert, &key]);
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    let https = format!("https://127.0.0.1:{port}");
    let trust = [("--tls-ca", ca.as_path())];
    wait_until(Duration::from_secs(30), "a TLS status", || status_ok(&https, &trust));
    assert!(!status_ok(&format!("http://127.0.0.1:{port}"), &[]), "plaintext status");
    assert!(!status_ok(&https, &[]), "a status that does not trust the test CA");

    let mut plain = worker(&format!("http://127.0.0.1:{port}"), &[], tmp.path(), "plain");
    assert!(!plain.wait(Duration::from_secs(60)).success(), "a plaintext worker gave up");
    let mut good = worker(&https, &trust, tmp.path(), "good");
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.stderr());
    assert!(good.wait(Duration::from_secs(30)).success(), "{}", good.stderr());
    assert_eq!(manifest(&sweep_dir(&out))["state"], "finished");
}

#[test]
fn with_a_client_ca_only_workers_with_its_certificate_get_in() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let [ca, cert, key, client, client_key] = certificates(tmp.path());
    let out = tmp.path().join("out");
    let port = free_port();
    let run = coordinator_args(&out, port, &[&cert, &key, &ca]);
    let mut coordinator = Proc::start(&bin("coordinator"), &run, tmp.path(), "coordinator");
    let https = format!("https://127.0.0.1:{port}");
    let member = [("--tls-ca", ca.as_path()), ("--tls-cert", &client), ("--tls-key", &client_key)];
    wait_until(Duration::from_secs(30), "an mTLS status", || status_ok(&https, &member));
    assert!(!status_ok(&https, &[("--tls-ca", ca.as_path())]), "no client certificate");

    let mut anonymous = worker(&https, &[("--tls-ca", ca.as_path())], tmp.path(), "anonymous");
    assert!(!anonymous.wait(Duration::from_secs(60)).success(), "no client certificate");
    let mut good = worker(&https, &member, tmp.path(), "member");
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.stderr());
    assert!(good.wait(Duration::from_secs(30)).success(), "{}", good.stderr());
    assert_eq!(manifest(&sweep_dir(&out))["state"], "finished");
}

#[test]
fn bad_tls_files_stop_the_coordinator_before_it_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        .expect("write");
    let out = tmp.path().join("out");
    let run = coordinator_args(&out, free_port(), &[&junk, &tmp.path().join("missing.key")]);
    let mut c = Proc::start(&bin("coordinator"), &run, tmp.path(), "bad");
    assert!(!c.wait(Duration::from_secs(30)).success());
    assert!(
        c.stderr().contains("--tls-key") && c.stderr().contains("missing.key"),
        "{}",
        c.stderr()
    );
    assert!(!out.exists(), "nothing written");
}
