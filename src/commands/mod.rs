//! What the `aoe` subcommands compute and print, apart from `write`: the plan report, the
//! difference analysis with its plots, and the demo.

#[cfg(feature = "testkit")]
pub mod demo;
pub mod diff;
pub mod plan;
