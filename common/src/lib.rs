//! Types shared by the coordinator and the workers of the causal-tracing pipeline: the knowns
//! dataset and its file formats, the experiment spec and the kinds it restores, the sweep's
//! configuration and job ids, storage (object-store URLs), model fingerprints, the Parquet
//! tables, the averaged effects and their plots.
#![warn(missing_docs)]

pub mod barplot;
pub mod dataset;
pub mod dataset_formats;
pub mod donor;
pub mod error;
pub mod experiment;
pub mod fact_texts;
pub mod faults;
pub mod fingerprint;
pub mod flags;
pub mod kinds;
pub mod lineplot;
pub mod metric;
pub mod plot;
pub mod process;
pub mod retry;
pub mod rollup;
pub mod settings;
pub mod storage;
pub mod summaries;
pub mod sweep;
pub mod tables;

pub use error::{Error, Result};
