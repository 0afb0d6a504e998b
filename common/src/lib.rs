//! Types shared by the coordinator and the workers of the causal-tracing pipeline: the knowns
//! dataset and its file formats, the trace settings both sides name, the sweep's
//! configuration and job ids, storage (object-store URLs), model fingerprints, the Parquet
//! tables, and heatmaps.
#![warn(missing_docs)]

pub mod dataset;
pub mod dataset_formats;
pub mod error;
pub mod faults;
pub mod fingerprint;
pub mod flags;
pub mod lineplot;
pub mod plot;
pub mod process;
pub mod retry;
pub mod rollup;
pub mod settings;
pub mod storage;
pub mod sweep;
pub mod tables;

pub use error::{Error, Result};
