//! aoe: Assembly of Experts. Synthesizes child checkpoints from sibling models, exact to the bit.
//!
//! Data flows one way: [`checkpoint`] → [`recipe`] / [`plan`] → [`kernels`] → [`synth`] →
//! [`cache`] → fs → FUSE adapter → CLI. [`write`] materializes a child on disk.

pub mod cache;
pub mod checkpoint;
pub mod cli;
pub mod diff;
pub mod dtype;
pub mod error;
pub mod fixture;
pub mod fs;
pub mod fuse;
pub mod guard;
pub mod kernels;
pub mod models;
pub mod plan;
pub mod prefetch;
pub mod recipe;
pub mod report;
pub mod stats;
pub mod synth;
pub mod write;

pub use error::{Error, Result};
