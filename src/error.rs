//! One error type for the library: one variant per failure, each naming the file and tensor.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading parents, recipes and writing children.
#[allow(missing_docs)] // each variant is documented; its fields say what they name (path, tensor, reason)
#[derive(Debug)]
pub enum Error {
    /// An I/O error on a named path.
    Io { path: PathBuf, source: io::Error },
    /// A checkpoint directory that does not exist or is not a directory.
    NotADirectory { path: PathBuf },
    /// A directory without `model.safetensors.index.json` or `model.safetensors`.
    NoCheckpoint { path: PathBuf },
    /// The index file is not valid JSON of the expected shape.
    BadIndex { path: PathBuf, reason: String },
    /// The index names a shard that is not a plain file name inside the checkpoint directory.
    BadShardName { path: PathBuf, shard: String },
    /// A safetensors header that fails validation.
    BadHeader { path: PathBuf, reason: String },
    /// A tensor in a header that fails validation (dtype, shape, offsets).
    BadTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// A tensor the index routes to a shard that does not hold it.
    IndexMismatch {
        path: PathBuf,
        tensor: String,
        shard: String,
    },
    /// The same tensor name in two shards.
    DuplicateTensor { path: PathBuf, tensor: String },
    /// A tensor of the base that a parent lacks.
    MissingTensor { parent: PathBuf, tensor: String },
    /// Shapes that differ between base and a parent.
    ShapeMismatch {
        parent: PathBuf,
        tensor: String,
        base: Vec<usize>,
        other: Vec<usize>,
    },
    /// A dtype aoe cannot mix, met where mixing is required.
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// A recipe that is invalid as written.
    BadRecipe { reason: String },
    /// The number of weights does not match the number of models.
    WeightCount {
        expected: usize,
        got: usize,
        context: String,
    },
    /// A NaN or infinite weight.
    NonFiniteWeight { context: String },
    /// Weights outside [0, 1] or not summing to 1 without `--allow-extrapolation`.
    NonConvexWeights { weights: Vec<f64>, context: String },
    /// A subset name that is not a group, `full` or `re:REGEX`.
    UnknownSubset { name: String },
    /// A regular expression that does not compile.
    BadRegex { pattern: String, reason: String },
    /// An output directory that would overwrite or sit inside a parent, or is not empty.
    BadOutput { path: PathBuf, reason: String },
    /// A parent file that changed under a mount (shrunk, vanished).
    ParentChanged { path: PathBuf, tensor: String },
    /// A file name that is not part of the child.
    NoSuchFile { name: String },
    /// Stopped by a signal.
    Interrupted,
    /// Worker threads that could not be started.
    Threads { reason: String },
    /// A mount daemon that failed before serving (its own error, as it reported it).
    Daemon { mountpoint: PathBuf, reason: String },
    /// A subset (or its mixable part) that selects no tensor, or a δ that keeps every
    /// selected tensor the base's: the child would silently be the base.
    EmptySelection {
        /// What was asked, e.g. `subset experts` or `delta 9 over subset full`.
        asked: String,
        /// The base's groups with their tensor counts.
        groups: Vec<(String, usize)>,
    },
    /// A per-tensor rule whose pattern matches no selected weight.
    UnusedRule { pattern: String },
    /// A broken internal invariant: a bug in aoe, never the user's input.
    Internal { what: String },
    /// An error met by another thread computing the same chunk, shared with every waiter.
    Shared(std::sync::Arc<Error>),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Error::*;
        match self {
            Io { path, source } => write!(f, "{}: {}", path.display(), source),
            NotADirectory { path } => write!(f, "{}: not a directory", path.display()),
            NoCheckpoint { path } => write!(
                f,
                "{}: not a checkpoint (no model.safetensors.index.json or model.safetensors)",
                path.display()
            ),
            BadIndex { path, reason } => {
                write!(f, "{}: malformed index: {}", path.display(), reason)
            }
            BadShardName { path, shard } => write!(
                f,
                "{}: index names shard {:?}, which is not a file name in this directory",
                path.display(),
                shard
            ),
            BadHeader { path, reason } => {
                write!(
                    f,
                    "{}: malformed safetensors header: {}",
                    path.display(),
                    reason
                )
            }
            BadTensor {
                path,
                tensor,
                reason,
            } => {
                write!(f, "{}: tensor {}: {}", path.display(), tensor, reason)
            }
            IndexMismatch {
                path,
                tensor,
                shard,
            } => write!(
                f,
                "{}: index routes tensor {} to {}, which does not hold it",
                path.display(),
                tensor,
                shard
            ),
            DuplicateTensor { path, tensor } => {
                write!(
                    f,
                    "{}: tensor {} appears in more than one shard",
                    path.display(),
                    tensor
                )
            }
            MissingTensor { parent, tensor } => {
                write!(
                    f,
                    "{}: tensor {} is missing (the base has it)",
                    parent.display(),
                    tensor
                )
            }
            ShapeMismatch {
                parent,
                tensor,
                base,
                other,
            } => write!(
                f,
                "{}: tensor {} has shape {:?}, the base has {:?}",
                parent.display(),
                tensor,
                other,
                base
            ),
            UnsupportedDtype {
                path,
                tensor,
                dtype,
            } => write!(
                f,
                "{}: tensor {}: dtype {} cannot be interpolated",
                path.display(),
                tensor,
                dtype
            ),
            BadRecipe { reason } => write!(f, "bad recipe: {reason}"),
            WeightCount {
                expected,
                got,
                context,
            } => write!(
                f,
                "{context}: {got} weights given, {expected} needed (one per model, base first)"
            ),
            NonFiniteWeight { context } => write!(f, "{context}: weights must be finite numbers"),
            NonConvexWeights { weights, context } => write!(
                f,
                "{context}: weights {weights:?} are not convex (each in [0, 1], summing to 1); \
                 pass --allow-extrapolation for task arithmetic"
            ),
            UnknownSubset { name } => write!(
                f,
                "unknown subset {name:?}: use full, experts, shared-experts, router, norms, \
                 attention, dense-mlp, embeddings, other, or re:REGEX"
            ),
            BadRegex { pattern, reason } => write!(f, "bad regex {pattern:?}: {reason}"),
            BadOutput { path, reason } => write!(f, "{}: {}", path.display(), reason),
            ParentChanged { path, tensor } => write!(
                f,
                "{}: changed while in use (tensor {} lies beyond the end of the file)",
                path.display(),
                tensor
            ),
            NoSuchFile { name } => write!(f, "{name}: no such file in the child"),
            Shared(e) => e.fmt(f),
            Interrupted => write!(f, "interrupted; temporary files removed"),
            Threads { reason } => write!(f, "cannot start threads: {reason}"),
            Daemon { mountpoint, reason } => write!(f, "{}: {}", mountpoint.display(), reason),
            EmptySelection { asked, groups } => {
                let g: Vec<String> = groups.iter().map(|(n, c)| format!("{n} {c}")).collect();
                write!(
                    f,
                    "{asked} selects nothing to mix: the child would be the base's copy (tensors \
                     per group in the base: {}); pass --allow-empty to accept that",
                    g.join(", ")
                )
            }
            UnusedRule { pattern } => write!(
                f,
                "rule {pattern:?} matches no selected weight; fix its pattern or the subset"
            ),
            Internal { what } => write!(f, "internal error (a bug in aoe): {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Shared(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}
