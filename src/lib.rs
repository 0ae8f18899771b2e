//! Contrail: the AT Protocol relay firehose, projected into Jetstream v1 JSON events,
//! persisted in an ordered log and served to websocket subscribers.
//!
//! Modules in data-flow order, each importing only those below it (see `DESIGN.md` in the
//! shared folder and the README's architecture section):
//! [`source`] (relay or upstream sockets) → [`transcode`] (pure, in `contrail-core`) →
//! [`sequencer`] → [`log`] → [`hub`] → [`server`], wired together by [`app`]. Beside them:
//! [`config`] (composes each module's settings group), [`metrics`], [`clock`], [`units`],
//! [`rate_limited_log`], [`request`], [`response`]; operator tools in [`inspect`], [`dict`] and [`framefile`], with [`progress`]; [`tail`]
//! (`contrail tail`, a terminal client on the `contrail-client` crate).
#![forbid(unsafe_code)]

pub use contrail_core::{event, options, syntax, transcode, v2};

pub mod app;
pub mod clock;
pub mod config;
pub mod dict;
pub mod framefile;
pub mod hub;
pub mod inspect;
pub mod log;
pub mod metrics;
pub mod mix;
pub mod progress;
pub mod rate_limited_log;
pub mod request;
pub mod response;
pub mod sequencer;
pub mod server;
pub mod source;
pub mod tail;
pub mod units;
pub mod verify;
