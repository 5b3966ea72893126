//! aoe: Assembly of Experts. Synthesizes child checkpoints from sibling models, exact to the bit.
//!
//! Data flows one way, and the folders are its stages: [`model`] (checkpoints, dtypes, mmaps) →
//! [`recipe`] (recipes, groups, plans, δ statistics) → [`kernels`] (codecs and mixes) →
//! [`synth`] (the engine, unit layouts, children, chunk cache, prefetch) → [`write`] (a child on
//! disk) and [`mount`] (filesystem logic, FUSE adapter, daemon) → [`commands`] (reports, diff,
//! demo) → [`cli`]. The binding semantics are in `docs/semantics.md`.

pub mod cli;
pub mod commands;
pub mod error;
pub mod kernels;
pub mod model;
pub mod mount;
pub mod recipe;
pub mod synth;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod write;

pub use error::{Error, Result};
