//! The engine's error type: every variant names the file, tensor or field it is about.

use std::path::PathBuf;

/// What can go wrong while loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model needs is not there.
    #[error("missing file {path}: {why}")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// Why it was needed.
        why: String,
    },
    /// A file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A weights file is truncated or corrupt.
    #[error("{path}: not a valid {format} file: {message}")]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// `safetensors`, `GGUF`, `JSON`, …
        format: &'static str,
        /// What the parser said.
        message: String,
    },
    /// The configuration (config.json or GGUF metadata) is missing a field or has a bad value.
    #[error("{source_name}: field `{field}`: {message}")]
    Config {
        /// config.json or the GGUF file.
        source_name: String,
        /// The field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The model's architecture is not one the engine implements.
    #[error("{source_name}: unknown architecture {name:?} (supported: {supported})")]
    UnknownArchitecture {
        /// config.json or the GGUF file.
        source_name: String,
        /// The architecture it names.
        name: String,
        /// What the engine knows.
        supported: &'static str,
    },
    /// A tensor the architecture needs is absent from the weights.
    #[error("{source_name}: missing tensor `{tensor}`")]
    MissingTensor {
        /// The weights file(s).
        source_name: String,
        /// The tensor's name as the checkpoint spells it.
        tensor: String,
    },
    /// A tensor has a shape other than the configuration implies.
    #[error("{source_name}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The weights file.
        source_name: String,
        /// The tensor's name.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },
    /// A tokenizer could not be built or used.
    #[error("tokenizer from {source_name}: {message}")]
    Tokenizer {
        /// Where the tokenizer came from.
        source_name: String,
        /// What went wrong.
        message: String,
    },
    /// A forward request asks for something the model cannot do (bad layer, token, row, shape).
    #[error("invalid request: {0}")]
    Request(String),
    /// A fact cannot be traced as given (e.g. its subject is not in its prompt).
    #[error("{0}")]
    Trace(String),
    /// An error inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Returns early with [`Error::Request`].
macro_rules! bail_request {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Request(format!($($arg)*)))
    };
}
pub(crate) use bail_request;
