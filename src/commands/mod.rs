//! What the `aoe` subcommands compute and print, apart from `write`: the plan report, the
//! difference analysis with its plots, and the demo.

pub mod demo;
pub mod diff;
pub mod plan;
