//! Why a subscriber's connection ended: each [`CloseReason`] (declared with its metric label in
//! `metrics`) gets its websocket close code and text here. No close code is written anywhere
//! else.

pub use crate::metrics::CloseReason;

impl CloseReason {
    /// The close frame to send, if one can still be sent: (code, fixed text). Reasons whose
    /// text depends on the message (invalid options, bad JSON) pass their own text to the
    /// session's `close`.
    pub fn frame(self) -> Option<(u16, &'static str)> {
        match self {
            // RFC 6455 §7.4.1: 1000 normal, 1001 going away, 1002 protocol error, 1007 bad
            // data, 1008 policy, 1009 too big, 1011 server error, 1013 try again later.
            CloseReason::ClientClosed => Some((1000, "")),
            CloseReason::Shutdown => Some((1001, "server shutting down")),
            CloseReason::TooSlow => Some((1008, "consumer too slow")),
            CloseReason::PingTimeout => Some((1008, "no response to pings")),
            CloseReason::InvalidOptions => Some((1008, "invalid options")),
            CloseReason::BadMessage => Some((1007, "bad message")),
            CloseReason::MessageTooBig => Some((1009, "message too big")),
            CloseReason::UnexpectedMessage => Some((1008, "unexpected data message")),
            CloseReason::PingFlood => Some((1008, "too many pings")),
            CloseReason::MessageFlood => Some((1008, "too many messages")),
            // 1013 Try Again Later (IANA's registry): the server, not the request, is short.
            CloseReason::FilterBudget => Some((1013, "filter memory budget full; try again later")),
            CloseReason::MessageBudget => Some((1013, "client message memory budget full; try again later")),
            CloseReason::ReplayBudget => Some((1013, "replay memory budget full; try again later")),
            CloseReason::ProtocolError => Some((1002, "protocol error")),
            CloseReason::Internal => Some((1011, "internal error")),
            // The socket is broken or stuck: nothing more can be written.
            CloseReason::WriteTimeout | CloseReason::WriteError | CloseReason::ReadError => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_rfc_6455() {
        assert_eq!(CloseReason::Shutdown.frame(), Some((1001, "server shutting down")));
        assert_eq!(CloseReason::TooSlow.frame().unwrap().0, 1008);
        assert_eq!(CloseReason::BadMessage.frame().unwrap().0, 1007);
        assert_eq!(CloseReason::MessageTooBig.frame().unwrap().0, 1009);
        assert_eq!(CloseReason::WriteError.frame(), None);
        assert_eq!(CloseReason::FilterBudget.frame().unwrap().0, 1013);
        assert_eq!(CloseReason::MessageFlood.frame(), Some((1008, "too many messages")));
        assert_eq!(CloseReason::MessageBudget.frame().unwrap().0, 1013);
        assert_eq!(CloseReason::ProtocolError.frame().unwrap().0, 1002);
        assert_eq!(CloseReason::ReplayBudget.frame().unwrap().0, 1013);
        assert_eq!(CloseReason::ALL.len(), 18);
    }
}
