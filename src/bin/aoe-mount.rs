//! `aoe-mount`: serve an Assembly-of-Experts child through FUSE, synthesized as it is read.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use aoe::cli::{parse_size, RecipeArgs};
use aoe::mount::daemon::{self, MountConfig, Ready};
use aoe::mount::fs::{read_sweep, Fs, FsOptions, MountEngineOptions};
use aoe::mount::table;
use aoe::synth::prefetch::PrefetchConfig;
use aoe::Result;

/// Mount a child model read-only: a directory that looks exactly like a checkpoint (config,
/// tokenizer, index, *.safetensors shards with the base's headers), whose tensor bytes are
/// computed from the parents when they are read. Nothing is written to disk.
#[derive(Parser)]
#[command(
    name = "aoe-mount",
    version,
    after_help = "\
Parents configured once:
  Put {\"base\": \"/models/V3-0324\", \"parents\": [\"/models/R1\"]} in ~/.config/aoe/config.json
  ($XDG_CONFIG_HOME/aoe/config.json), or set AOE_BASE=DIR and AOE_PARENTS=DIR1:DIR2; flags
  override both. Then:  aoe-mount --lambda 0.5 /mnt/child

Examples:
  aoe-mount --base /models/V3-0324 --parent /models/R1 --lambda 0.5 /mnt/child
  vllm serve /mnt/child --tensor-parallel-size 8
  aoe-mount --base V3 --parent R1 --subset experts --lambda 1 /mnt/chimera   # R1T Chimera
  aoe-mount --variants --base V3 --parent R1 /mnt/aoe
  ls /mnt/aoe/lambda=0.6,subset=experts,delta=1.5/
  aoe status /mnt/child
  aoe-mount --unmount /mnt/child

Variants (--variants): every directory of the root is a variant named by its recipe: keys as the
flags (lambda, weights, delta, subset, metric, allow-extrapolation), joined with ',';
weights as weights=0.2:0.3:0.5; a subset union as subset=experts+router. Looking up a valid
name creates it at once; an invalid name gets ENOENT and a log line saying why. Recipe flags
given with --variants are defaults for every variant. The bytes under a path never change.
At most --max-variants variants made by lookup are live: one more forgets the least recently
used one with no open file (named again, it is made again, with the same bytes).

The daemon logs to $XDG_CACHE_HOME/aoe/aoe-mount.log (or --log FILE); SIGINT or SIGTERM
unmounts it and exits. `aoe-mount --unmount` (or umount) also clears a mount whose daemon died.
`aoe status MOUNTPOINT` reads the extended attribute user.aoe.status of the mount's root."
)]
struct Args {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Where to mount: an existing directory that is not a mount point.
    mountpoint: PathBuf,
    /// Mount a root of variants named by their recipes instead of one child.
    #[arg(long)]
    variants: bool,
    /// With --variants: variants to list from the start, a JSON object mapping names to recipes
    /// (objects with the fields of aoe_recipe.json, or strings in variant-name syntax).
    #[arg(long, value_name = "FILE")]
    sweep: Option<PathBuf>,
    /// With --variants: variants made by lookup kept live at once; one more forgets the least
    /// recently used one with no open file (its cached chunks go; named again, it is made
    /// again). Bounds the daemon's memory however many names are tried. --sweep variants
    /// are not counted and never forgotten.
    #[arg(long, default_value_t = aoe::mount::fs::DEFAULT_MAX_VARIANTS, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_variants: usize,
    /// Memory for computed chunks (e.g. 512M, 2G).
    #[arg(long, default_value = "2G", value_parser = parse_size, value_name = "SIZE")]
    cache_size: usize,
    /// Threads answering reads [default: the cores, between 4 and 16].
    #[arg(long)]
    threads: Option<usize>,
    /// Let other users read the mount (otherwise only the mounting user can).
    #[arg(long)]
    allow_other: bool,
    /// Stay attached: serve until interrupted, logging to stderr.
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Unmount MOUNTPOINT (also clears a mount whose daemon died) and exit.
    #[arg(long)]
    unmount: bool,
    /// Where δ statistics are remembered [default: $XDG_CACHE_HOME/aoe].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The daemon's log file [default: $XDG_CACHE_HOME/aoe/aoe-mount.log].
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// read_ahead_kb set on the mount after mounting (0 keeps the kernel's 128). A mmap fault
    /// reads this much around it: 16 MiB keeps 16 requests of 1 MiB in flight, which measured
    /// 1.6x faster than 1 MiB for a safetensors load.
    #[arg(long, default_value_t = 16384, value_name = "KB")]
    read_ahead_kb: u32,
    /// Compute ahead of sequential readers, within the tensor being read [default: on with 4 or
    /// more cores; with fewer, prefetch threads compete with the reader and measured slower].
    #[arg(long, conflicts_with = "no_prefetch")]
    prefetch: bool,
    /// Do not compute ahead of sequential readers.
    #[arg(long)]
    no_prefetch: bool,
    /// Chunk size in output bytes (for testing; default derived from --cache-size).
    #[arg(long, hide = true, value_parser = parse_size)]
    chunk_size: Option<usize>,
}

fn main() -> ExitCode {
    // Large buffers come from mmap and go back to the system when freed (pooled buffers are
    // reused instead), and few malloc arenas: keeps the daemon's RSS near the cache budget.
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aoe-mount: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.unmount {
        let msg = table::unmount(&args.mountpoint)?;
        eprintln!("aoe-mount: {msg}");
        return Ok(());
    }
    let mnt = table::check_mountpoint(&args.mountpoint)?;
    let eng = MountEngineOptions {
        cache_bytes: args.cache_size,
        chunk_bytes: args.chunk_size,
        stats_dir: args
            .cache_dir
            .clone()
            .or_else(aoe::recipe::stats::default_cache_dir),
    };
    let log_file = args
        .log
        .clone()
        .or_else(|| aoe::recipe::stats::default_cache_dir().map(|d| d.join("aoe-mount.log")))
        .unwrap_or_else(|| PathBuf::from("/tmp/aoe-mount.log"));
    let mut opts = FsOptions::for_current_user(&mnt, args.cache_size);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.no_prefetch || (cores < 4 && !args.prefetch) {
        opts.prefetch = PrefetchConfig::disabled();
    }
    if !args.foreground {
        opts.log_file = Some(log_file.clone());
    }
    opts.max_variants = args.max_variants;
    // Open and validate the parents and the recipe(s) before mounting anything.
    let fs = if args.variants || args.sweep.is_some() {
        let sweep = match &args.sweep {
            Some(p) => read_sweep(p)?,
            None => Vec::new(),
        };
        Fs::variants(args.recipe.spec()?, sweep, &eng, opts)?
    } else {
        Fs::single(args.recipe.resolve()?, &eng, opts)?
    };
    let threads = args
        .threads
        .filter(|&t| t > 0)
        .unwrap_or_else(daemon::default_threads);
    let cfg = MountConfig {
        mountpoint: mnt.clone(),
        threads,
        prefetch_threads: (threads / 2).clamp(1, 8),
        allow_other: args.allow_other,
        read_ahead_kb: args.read_ahead_kb,
    };
    if args.foreground {
        return daemon::serve(fs, &cfg, &mut Ready::foreground());
    }
    let pid = daemon::spawn_daemon(fs, &cfg, &log_file)?;
    eprintln!(
        "aoe-mount: mounted at {} (daemon pid {pid}, log {})",
        mnt.display(),
        log_file.display()
    );
    Ok(())
}
