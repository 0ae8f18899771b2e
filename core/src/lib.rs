//! Contrail's pure core: everything that turns bytes into events and decides who gets them,
//! with no I/O, no clock and no RocksDB, so the service, the fuzz targets and the client crate
//! share it and build it in seconds.
//!
//! - [`transcode`]: a relay frame → Jetstream v1 events (DAG-CBOR, CAR, CIDs, JSON rendering).
//! - [`event`]: one event's JSON, encoded once, with the metadata filters read.
//! - [`syntax`]: AT Protocol identifier syntax (NSID, DID, record key, TID, datetime).
//! - [`options`]: the `/subscribe` query, `options_update` and the [`options::Filter`].
//! - [`v2`]: Jetstream v2's wire (`subscribeEvents`): messages and parameters.
//! - [`verify`]: Sync 1.1 verification: keys, signed commits, the MST inversion proof.
//! - [`labels`]: the macro that declares a metric-label enum once.
#![forbid(unsafe_code)]

#[macro_use]
pub mod labels;
pub mod event;
pub mod options;
pub mod syntax;
pub mod transcode;
pub mod v2;
pub mod verify;
