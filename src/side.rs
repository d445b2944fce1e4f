//! The two ends of a relayed connection. Every module says `client` and `backend`, and
//! `client_to_backend` / `backend_to_client` for the directions between them.

/// One end of a relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The browser or other WebSocket client that connected to wsgate.
    Client,
    /// The backend wsgate connected to on the client's behalf.
    Backend,
}

impl Side {
    /// Both sides, client first: the order of every per-side array.
    pub const BOTH: [Side; 2] = [Side::Client, Side::Backend];

    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }

    /// The index of this side in per-side arrays (client 0, backend 1).
    pub fn idx(self) -> usize {
        self as usize
    }

    /// The direction of bytes this side sends: `client_to_backend` for the client.
    pub fn direction_from(self) -> &'static str {
        match self {
            Side::Client => "client_to_backend",
            Side::Backend => "backend_to_client",
        }
    }
}
