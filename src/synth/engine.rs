//! The engine: the opened parents and everything shared by the children built from them
//! (δ statistics, the chunk cache, the unit index).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, OnceLock};

use crate::error::Result;
use crate::model::models::Models;
use crate::recipe::plan::UnitIndex;
use crate::recipe::stats::StatsStore;
use crate::synth::cache::ChunkCache;
use crate::synth::child::{Child, ChildFile};

/// How an engine is built.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Byte budget of the chunk cache.
    pub cache_bytes: usize,
    /// Target chunk size in output bytes.
    pub chunk_bytes: usize,
    /// Where δ statistics are remembered.
    pub stats_dir: Option<PathBuf>,
}

/// The parents and everything shared by the children built from them.
pub struct Engine {
    /// Base and parents, opened and validated.
    pub models: Models,
    /// δ statistics, shared by every child.
    pub stats: StatsStore,
    /// Computed chunks, shared by every child.
    pub cache: ChunkCache,
    /// Target chunk size in output bytes.
    pub chunk_bytes: usize,
    pub(crate) next_variant: AtomicU32,
    units: OnceLock<Arc<UnitIndex>>,
    files: OnceLock<Vec<ChildFile>>,
}

impl Engine {
    /// Opens and validates the models of `base` and `parents` and wraps them in an engine:
    /// the one way every command gets from directories to children.
    pub fn open(base: &Path, parents: &[PathBuf], opts: &EngineOptions) -> Result<Arc<Engine>> {
        let models = Models::open(base, parents)?;
        Ok(Arc::new(Engine::new(
            models,
            opts.stats_dir.as_deref(),
            opts.cache_bytes,
            opts.chunk_bytes,
        )))
    }

    /// Wraps opened models with a statistics store and a chunk cache of `cache_bytes`.
    pub fn new(
        models: Models,
        stats_dir: Option<&Path>,
        cache_bytes: usize,
        chunk_bytes: usize,
    ) -> Engine {
        let stats = StatsStore::new(&models, stats_dir);
        Engine {
            models,
            stats,
            cache: ChunkCache::new(cache_bytes),
            chunk_bytes: chunk_bytes.max(1),
            next_variant: AtomicU32::new(0),
            units: OnceLock::new(),
            files: OnceLock::new(),
        }
    }

    /// The base's units, indexed once and shared by every child.
    pub fn unit_index(&self) -> Arc<UnitIndex> {
        self.units
            .get_or_init(|| Arc::new(UnitIndex::new(&self.models)))
            .clone()
    }

    /// The base's files as every child lists them (without `aoe_recipe.json`), listed and
    /// stat'ed once and shared by every child.
    pub fn base_files(&self) -> Result<&[ChildFile]> {
        if let Some(f) = self.files.get() {
            return Ok(f);
        }
        let files = Child::base_files(self)?;
        Ok(self.files.get_or_init(|| files))
    }
}
