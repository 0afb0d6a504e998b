//! The error type of the `common` crate.

/// What can go wrong in shared code: reading files and datasets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A figure could not be drawn or written.
    #[error("cannot draw {path}: {message}")]
    Plot {
        /// The file being written.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A dataset as a whole is malformed (per-record problems are not errors; see
    /// [`crate::dataset::Knowns::errors`]).
    #[error("dataset {source_name}: {message}")]
    Dataset {
        /// Where the dataset came from.
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// An object store could not be opened, read or written, and trying again will not help
    /// (a bad URL, a missing object, no permission).
    #[error("storage: {0}")]
    Storage(String),
    /// An object-store operation failed in a way a later try may not: the store was
    /// unreachable, timed out or answered with a server error, after the store's own
    /// retries. See [`crate::retry`].
    #[error("storage: {0}")]
    StorageTransient(String),
    /// An experiment's settings do not make an experiment (or do not fit the model).
    #[error("{setting}: {message}")]
    Experiment {
        /// The setting at fault, as its flag names it (`--window`).
        setting: String,
        /// Why.
        message: String,
    },
    /// A Parquet table could not be written or read.
    #[error("parquet {what}: {message}")]
    Parquet {
        /// The table or file.
        what: String,
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// Whether a later try may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::StorageTransient(_))
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
