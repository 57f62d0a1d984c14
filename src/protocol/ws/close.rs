//! Close codes, in one place: the [`CloseCode`] type, the name of every code
//! the gateway sends or acts on (PROTOCOL.md §2), which codes may appear on
//! the wire, and the reason text the server sends with its own closes.

/// A WebSocket close code (RFC 6455 §7.4). The codec reads and writes the
/// raw `u16` of the wire; everything above it names codes through this
/// type's constants, one name per code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(u16);

impl CloseCode {
    /// 1000: the purpose of the connection is fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the server is shutting down.
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: the peer broke RFC 6455.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: a binary message (the protocol is JSON text only).
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1006: never sent. Internally: drop the socket without a close frame
    /// (it failed, or the peer vanished).
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: text that is not UTF-8.
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: policy — too many bad messages in a row, or a heartbeat that
    /// went unanswered for two intervals.
    pub const POLICY: CloseCode = CloseCode(1008);
    /// 1009: a client message over the limit.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1011: a bug or failure on our side.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1012 ("service restart"): a hot upgrade could not carry this
    /// connection over (a wss connection, one in the middle of a replay);
    /// the client reconnects and resumes with `after`.
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// 1013 ("try again later"): a slow consumer, whose send queue passed
    /// its limit.
    pub const SLOW_CONSUMER: CloseCode = CloseCode(1013);
    /// 4003: the connection's API key was revoked, or its session signed out.
    pub const KEY_REVOKED: CloseCode = CloseCode(4003);

    /// The code `code`, whatever it is (a peer's, checked elsewhere).
    pub const fn new(code: u16) -> CloseCode {
        CloseCode(code)
    }

    /// The code as it goes on the wire.
    pub const fn get(self) -> u16 {
        self.0
    }

    /// Whether this code may appear in a close frame on the wire (see
    /// [`is_valid_close_code`]).
    pub fn is_sendable(self) -> bool {
        is_valid_close_code(self.0)
    }

    /// The reason text the server sends when it closes with this code on
    /// its own initiative (a close request: slow consumer, revoked key,
    /// shutdown, heartbeat). The server's only requested 1008 is the
    /// heartbeat's: too many bad messages closes with its own reason,
    /// straight from the connection code.
    pub fn server_reason(self) -> &'static str {
        match self {
            CloseCode::GOING_AWAY => "server shutting down",
            CloseCode::SLOW_CONSUMER => "slow consumer",
            CloseCode::KEY_REVOKED => "key revoked",
            CloseCode::POLICY => "heartbeat timeout",
            CloseCode::SERVICE_RESTART => "service restart",
            _ => "",
        }
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        code.0
    }
}

impl PartialEq<u16> for CloseCode {
    fn eq(&self, other: &u16) -> bool {
        self.0 == *other
    }
}

/// Whether `code` may appear in a close frame on the wire (RFC 6455 §7.4 and
/// the IANA registry): 1000-1003 and 1007-1014 are assigned, 1004 is
/// reserved, 1005/1006/1015 are for local reporting only, below 1000 and
/// 1016-2999 are unassigned, 3000-4999 belong to libraries and applications,
/// and 5000 and above do not exist.
pub fn is_valid_close_code(code: impl Into<u16>) -> bool {
    matches!(code.into(), 1000..=1003 | 1007..=1014 | 3000..=4999)
}
