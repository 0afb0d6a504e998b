//! Broken model files give errors that name the file and the tensor or field.

use std::path::{Path, PathBuf};

use candle_core::Device;
use worker::{LoadOptions, load_model};

use crate::gguf_roundtrip::write_gguf;
use crate::util::fixture;

/// A copy of a tiny fixture folder that a test may break.
fn copy_fixture(name: &str, into: &Path) -> PathBuf {
    let dst = into.join(name);
    std::fs::create_dir_all(&dst).expect("mkdir");
    for entry in std::fs::read_dir(fixture(&format!("tiny/{name}"))).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
    dst
}

fn load_err(path: &Path) -> String {
    match load_model(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but is broken", path.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).expect("write");
}

#[test]
fn missing_files_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert!(load_err(&tmp.path().join("nothing")).contains("the model path does not exist"));
    let dir = copy_fixture("gpt2", tmp.path());
    std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors") && err.contains("missing file"), "{err}");
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    assert!(load_err(&dir).contains("config.json"));
}

#[test]
fn truncated_safetensors_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = copy_fixture("llama", tmp.path());
    let weights = dir.join("model.safetensors");
    let len = std::fs::metadata(&weights).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let err = load_err(&dir);
    assert!(
        err.contains(&weights.display().to_string())
            && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn corrupt_safetensors_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The header's JSON spoiled in place: the file keeps its length, so only parsing notices.
    let dir = copy_fixture("llama", &tmp.path().join("a"));
    let weights = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("read");
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&weights, &bytes).expect("write");
    let err = load_err(&dir);
    assert!(
        err.contains(&weights.display().to_string())
            && err.contains("not a valid safetensors file"),
        "{err}"
    );

    // Something else under the weights' name.
    let dir = copy_fixture("llama", &tmp.path().join("b"));
    let weights = dir.join("model.safetensors");
    std::fs::write(&weights, b"not weights").expect("write");
    let err = load_err(&dir);
    assert!(
        err.contains(&weights.display().to_string())
            && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn missing_tensor_and_wrong_shape_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = copy_fixture("gpt2", tmp.path());
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
    let removed =
        tensors.keys().find(|k| k.ends_with("h.1.mlp.c_fc.weight")).cloned().expect("tensor");
    tensors.remove(&removed);
    candle_core::safetensors::save(&tensors, &path).expect("save");
    let err = load_err(&dir);
    assert!(
        err.contains(&format!("missing tensor `{removed}`")) && err.contains("model.safetensors"),
        "{err}"
    );

    let dir = copy_fixture("qwen2", &tmp.path().join("b"));
    edit_config(&dir, |c| c["vocab_size"] = 300.into());
    let err = load_err(&dir);
    assert!(
        err.contains("tensor `model.embed_tokens.weight` has shape [256, 32], expected [300, 32]")
            && err.contains(&dir.join("model.safetensors").display().to_string()),
        "{err}"
    );

    // The config promises a layer the weights do not have: the first tensor of that layer is
    // named, not a shape error or a panic further in.
    let dir = copy_fixture("llama", &tmp.path().join("c"));
    edit_config(&dir, |c| c["num_hidden_layers"] = 4.into());
    let err = load_err(&dir);
    assert!(
        err.contains("missing tensor `model.layers.3.")
            && err.contains(&dir.join("model.safetensors").display().to_string()),
        "{err}"
    );
}

type ConfigEdit = fn(&mut serde_json::Value);

#[test]
fn bad_configs_name_the_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, ConfigEdit, &str); 4] = [
        ("llama", |c| c["model_type"] = "mamba".into(), "unknown architecture \"mamba\""),
        ("llama", |c| c["num_key_value_heads"] = 3.into(), "field `num_key_value_heads`"),
        (
            "llama",
            |c| c["rope_parameters"]["rope_type"] = "proportional".into(),
            "field `rope_parameters.rope_type`",
        ),
        ("gpt2", |c| c["n_embd"] = "wide".into(), "field `n_embd`"),
    ];
    for (i, (name, edit, expected)) in cases.into_iter().enumerate() {
        let dir = copy_fixture(name, &tmp.path().join(i.to_string()));
        edit_config(&dir, edit);
        let err = load_err(&dir);
        assert!(
            err.contains("config.json") && err.contains(expected),
            "{err} should say {expected:?}"
        );
    }
}

#[test]
fn truncated_or_foreign_gguf_is_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("tiny.gguf");
    write_gguf(&fixture("tiny/qwen2"), &path);
    let bytes = std::fs::read(&path).expect("read");

    // Cut inside the tensor data: the header reads, a tensor does not.
    let cut = tmp.path().join("cut-data.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).expect("write");
    let err = load_err(&cut);
    assert!(err.contains("cut-data.gguf: not a valid GGUF file: tensor `"), "{err}");

    // Cut inside the header.
    let cut = tmp.path().join("cut-header.gguf");
    std::fs::write(&cut, &bytes[..200]).expect("write");
    let err = load_err(&cut);
    assert!(err.contains("cut-header.gguf: not a valid GGUF file"), "{err}");

    // Not a GGUF at all.
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").expect("write");
    assert!(load_err(&junk).contains("junk.gguf: not a valid GGUF file"));
}

/// `bytes` with every `from` replaced by `to`, which must have the same length so that the GGUF
/// header's string lengths and offsets still hold; panics if `from` does not occur.
fn replace_same_length(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let mut found = false;
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            found = true;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(found, "{:?} not in the file", String::from_utf8_lossy(from));
    out
}

#[test]
fn foreign_architecture_and_bad_metadata_in_gguf_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("tiny.gguf");
    write_gguf(&fixture("tiny/qwen2"), &path);
    let bytes = std::fs::read(&path).expect("read");

    // An architecture the engine does not implement; the keys are renamed with it, so the file
    // is a consistent GGUF of an unknown model.
    let path = tmp.path().join("foreign.gguf");
    std::fs::write(&path, replace_same_length(&bytes, b"qwen2", b"qwenx")).expect("write");
    let err = load_err(&path);
    assert!(
        err.contains(&path.display().to_string()) && err.contains("unknown architecture \"qwenx\""),
        "{err}"
    );

    // A required key missing.
    let path = tmp.path().join("no-blocks.gguf");
    std::fs::write(&path, replace_same_length(&bytes, b"qwen2.block_count", b"qwen2.block_counx"))
        .expect("write");
    let err = load_err(&path);
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("field `qwen2.block_count`: missing"),
        "{err}"
    );

    // No architecture at all.
    let path = tmp.path().join("no-arch.gguf");
    std::fs::write(
        &path,
        replace_same_length(&bytes, b"general.architecture", b"general.architecturx"),
    )
    .expect("write");
    let err = load_err(&path);
    assert!(
        err.contains(&path.display().to_string())
            && err.contains("field `general.architecture`: missing"),
        "{err}"
    );
}
