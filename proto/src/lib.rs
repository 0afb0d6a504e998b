//! The gRPC protocol between the sweep coordinator and its workers: `causal_trace.proto`,
//! compiled at build time with protox (no system protoc).
#![allow(missing_docs, unreachable_pub)]

pub mod auth;
pub mod convert;
pub mod tls;

/// Version 1 of the protocol (generated: not linted).
#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("causal_trace.v1");
}

pub use v1::*;

/// The largest message either side accepts: a calibration job lists every subject of the
/// dataset, which outgrows tonic's 4 MiB default on datasets of ~100k facts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
