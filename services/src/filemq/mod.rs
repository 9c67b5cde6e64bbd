//! The FILEMQ service (spec `FILEMQ.md` §5–§14 with the fixes of §20).

pub mod disk;
pub mod work;
