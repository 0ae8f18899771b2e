//! The websocket and HTTP client: shared with the client crate, which owns it
//! (`contrail_client::transport`), so the relay reader, the replica link and `contrail tail`
//! connect the same way.

pub use contrail_client::transport::*;
