//! zbroker's client side: blocking client APIs over the wire of
//! `zbroker-proto`, and what the programs share.
//!
//! - [`zpipes`]: named-pipe reader and writer clients.
//! - [`filemq`]: a FILEMQ subscriber mirroring published files into an inbox.
//! - [`endpoint`]: broker names and their well-known endpoints.
//! - [`curve`]: CURVE keys, key files and client socket security.
//! - [`size`]: sizes with units (`8MB`, `8MiB`), one parser for every program.
//! - [`log`]: the `--log LEVEL` filter every program shares.
//!
//! Inside, `link` is the one connection to a broker that every client is
//! built on (socket, monitor, handshake, disconnects, heartbeat clock).

//! - [`allocator`]: malloc thresholds for programs that stream large frames.

pub mod allocator;
pub mod curve;
pub mod endpoint;
pub mod filemq;
mod link;
pub mod log;
pub mod size;
pub mod zpipes;
