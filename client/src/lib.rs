//! zbroker's client side: the protocol codecs (shared with the broker's
//! services) and blocking client APIs.
//!
//! - [`byte_queue`]: a byte stream kept as the chunks it arrived in.
//! - [`codec`]: zproto wire types and the `protocol!` declaration macro.
//! - [`zpipes_msg`]: the ZPIPES protocol, declared once.
//! - [`filemq_msg`]: the FILEMQ protocol (v2 wire), declared once.
//! - [`zpipes`]: named-pipe reader and writer clients.
//! - [`filemq`]: a FILEMQ subscriber mirroring published files into an inbox.
//! - [`endpoint`]: broker names and their well-known endpoints.
//! - [`escape`]: how names chosen by a peer are shown and stored.
//! - [`curve`]: CURVE keys, key files and client socket security.
//! - [`size`]: sizes with units (`8MB`, `8MiB`), one parser for every program.
//! - [`log`]: the `--log LEVEL` filter every program shares.
//! - [`allocator`]: malloc thresholds for programs that stream large frames.

pub mod allocator;
pub mod byte_queue;
pub mod codec;
pub mod curve;
pub mod endpoint;
pub mod escape;
pub mod filemq;
pub mod filemq_msg;
pub mod log;
pub mod size;
pub mod zpipes;
pub mod zpipes_msg;

pub use filemq_msg::FilemqMsg;
pub use zpipes_msg::ZpipesMsg;
