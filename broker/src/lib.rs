//! The zbroker daemon as a library: the reactor that hosts services on ZeroMQ
//! sockets, and the configuration it runs from. The `zbroker` binary is a
//! thin command line over it; the bench harness embeds it.

pub mod config;
pub mod error;
pub mod exit;
pub mod memory;
mod passes;
mod peers;
pub mod reactor;
mod timers;
pub mod worker;
