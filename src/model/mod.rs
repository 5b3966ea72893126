//! The parents as they are on disk: element types, validated safetensors headers and index
//! files, mmaps of the shards, and the guard that keeps a shrinking parent from crashing us.

pub mod checkpoint;
pub mod dtype;
pub(crate) mod guard;
pub mod models;
