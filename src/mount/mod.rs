//! `aoe-mount`: the filesystem logic (no FUSE types), the fuser adapter and the daemon's life.

pub mod daemon;
pub mod fs;
pub mod fuse;
pub mod status;
pub mod table;
