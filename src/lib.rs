//! Contrail: the AT Protocol relay firehose, projected into Jetstream v1 JSON events,
//! persisted in an ordered log and served to websocket subscribers.
//!
//! Data flows through the modules in this order (see `DESIGN.md` in the shared folder):
//! `relay` → `transcode` → `sequencer` → `store` → `hub` → `server`.

pub mod event;
pub mod framefile;
pub mod inspect;
pub mod sequencer;
pub mod syntax;
pub mod transcode;
