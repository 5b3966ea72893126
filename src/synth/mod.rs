//! Synthesis: the bytes of any range of any file of a child checkpoint.
//!
//! A child's shards have the base's headers, so every tensor sits at the base's offset. A read
//! maps its range onto tensors; each tensor piece comes from the base, from a donor verbatim,
//! or from computed chunks (for FP8, whole 128-row bands, since a block scale spans 128 rows).
//! [`layout`] is the one rule for which; everything that reads a child asks it.

pub mod cache;
pub(crate) mod child;
mod compute;
mod engine;
pub mod layout;
pub mod prefetch;

pub use child::Child;
pub(crate) use child::FileKind;
pub use engine::{Engine, EngineOptions};
pub(crate) use layout::TensorBytes;
