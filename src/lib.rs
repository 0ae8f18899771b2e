//! Contrail: the AT Protocol relay firehose, projected into Jetstream v1 JSON events,
//! persisted in an ordered log and served to websocket subscribers.
//!
//! Data flows through the modules in this order (see `DESIGN.md` in the shared folder):
//! [`relay`] → [`transcode`] → [`sequencer`] → [`store`] → [`hub`] → [`server`]/[`public`],
//! wired together by [`app`]; [`config`] and [`metrics`] serve them all.

pub mod app;
pub mod config;
pub mod dict;
pub mod event;
pub mod framefile;
pub mod hub;
pub mod inspect;
pub mod memlog;
pub mod metrics;
pub mod public;
pub mod relay;
pub mod sequencer;
pub mod server;
pub mod status_page;
pub mod store;
pub mod syntax;
pub mod transcode;
pub mod upstream;
pub mod util;
