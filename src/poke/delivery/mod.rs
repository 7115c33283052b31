//! Delivery of pokes to a remote service (Pusher's HTTP API, a socket.io cluster's Redis): the
//! [`Transport`] each service implements, and the [`Poker`] that queues, coalesces and retries.

mod options;
mod queue;
mod transport;
mod worker;

pub use options::{PokerOptions, PokerStats};
pub use transport::{Sent, Transport};
pub use worker::Poker;
