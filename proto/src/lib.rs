//! The wire of zbroker's services, and nothing else: no sockets, no files,
//! no clocks. The broker's services and the clients both speak through it.
//!
//! - [`codec`]: the zproto conventions (field types) and `protocol!`, which
//!   turns one declaration of a protocol into its message type, encoder,
//!   decoder, size bounds and test strategies.
//! - [`zpipes`]: the ZPIPES protocol and our trailer extension.
//! - [`filemq`]: the FILEMQ protocol, its `hash` ceilings, its generations
//!   and our `X-*` extension keys.
//! - [`filemq_ext`]: what our FILEMQ extensions say beside the keys:
//!   capability bits (the OHAI / OHAI-OK trailer), entry attributes and
//!   the cache value that carries them, the rule for a symlink's target.
//! - [`exclude`]: gitignore-style exclude patterns (`X-EXCLUDE`), bounded.
//! - [`vpath`]: FILEMQ's virtual paths, one set of rules.
//! - [`digest`]: SHA-1 digests as FILEMQ writes them.
//! - [`escape`]: how a name a peer chose is shown and stored in line files.
//! - [`transfer`]: a stream moved under credit and verified at its end
//!   (chunks, offsets, resume, SHA-1), for every service that moves files.
//! - [`byte_queue`]: a ZPIPES byte stream kept as the chunks it came in.
//!
//! `docs/protocol/` describes both protocols in prose.

pub mod byte_queue;
pub mod codec;
pub mod digest;
pub mod escape;
pub mod exclude;
pub mod filemq;
pub mod filemq_ext;
pub mod transfer;
pub mod vpath;
pub mod zpipes;

/// For the strategies `protocol!` generates in other crates.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub use proptest;

pub use filemq::FilemqMsg;
pub use zpipes::ZpipesMsg;
