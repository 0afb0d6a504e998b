//! Types shared by the coordinator and the workers of the causal-tracing pipeline.
//!
//! For now: the knowns dataset ([`dataset`]), heatmaps ([`plot`]) and the error type. The sweep configuration,
//! the Parquet schema and storage come with the pipeline.
#![warn(missing_docs)]

pub mod dataset;
pub mod error;
pub mod plot;

pub use error::{Error, Result};
