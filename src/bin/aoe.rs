//! `aoe`: write, plan and analyse Assembly-of-Experts children.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use aoe::cli::{byte_progress, parse_size, RecipeArgs};
use aoe::synth::{Child, Engine, EngineOptions};
use aoe::write::{check_output, write_child, WriteOptions};
use aoe::Result;

/// Assembly of Experts: build child models from fine-tuned siblings of one architecture,
/// tensor by tensor, exact to the bit.
#[derive(Parser)]
#[command(name = "aoe", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write the whole child checkpoint directory to OUT.
    ///
    /// Shards keep the base's headers byte for byte; every other base file is copied; the
    /// recipe is recorded in OUT/aoe_recipe.json. Files are written under temporary names and
    /// renamed when complete. OUT must not be a parent, lie inside one, or be non-empty.
    Write {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Output directory.
        out: PathBuf,
        /// Replace the child's files in a non-empty OUT.
        #[arg(long)]
        force: bool,
        /// Worker threads [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
        /// Memory budget for computed data (e.g. 512M, 1G).
        #[arg(long, default_value = "512M", value_parser = parse_size)]
        memory: usize,
        /// Chunk size in output bytes (for testing; default derived from --memory).
        #[arg(long, hide = true, value_parser = parse_size)]
        chunk_size: Option<usize>,
        /// Where δ statistics are remembered [default: $XDG_CACHE_HOME/aoe].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Say what a recipe will do: per tensor group, tensors and bytes taken from the base,
    /// taken from a donor verbatim, or mixed.
    ///
    /// Deciding δ needs each selected tensor's normalized difference: remembered ones (from
    /// `aoe diff` or earlier runs) are used, the rest are computed.
    Plan {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Worker threads [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
        /// Where δ statistics are remembered [default: $XDG_CACHE_HOME/aoe].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Show what an `aoe-mount` serves: recipe(s), bytes served and computed, cache hits and
    /// misses, computation speed, errors.
    ///
    /// Reads the extended attribute user.aoe.status of the mount's root (nothing is added to
    /// the checkpoint's listing).
    Status {
        /// The mount point.
        mountpoint: PathBuf,
        /// Print the raw JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Write a small built-in model family and mount its λ = 0.5 child: the quickest way to
    /// see aoe-mount at work.
    ///
    /// Two FP8 siblings (with block scales, DeepSeek-V3 layout) of one ancestor are written to
    /// DIR/family once; the child is mounted at DIR/child.
    Demo {
        /// Directory for the family and the mount [default: $XDG_CACHE_HOME/aoe/demo].
        dir: Option<PathBuf>,
    },
    /// Measure every weight's normalized difference to the base: ‖W₁ − Wᵢ‖_F / √numel, on
    /// stored values (FP8 codes without scales) and dequantized values, max over the parents.
    ///
    /// Prints a table (or CSV / JSON) with a per-group summary, optionally plots a layer × group
    /// heatmap and per-group histograms, and fills the statistics cache so that later δ
    /// decisions (write, plan, mount) cost nothing.
    Diff {
        /// Base model M1.
        #[arg(long, value_name = "DIR")]
        base: PathBuf,
        /// Another parent; repeatable.
        #[arg(long = "parent", value_name = "DIR", required = true)]
        parents: Vec<PathBuf>,
        /// Print CSV: name,group,layer,dtype,numel,stored,dequantized.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Also write an SVG with a layer × group heatmap and per-group histograms.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
        /// Metric the plot shows: stored or dequantized.
        #[arg(long, default_value = "stored", value_name = "METRIC")]
        plot_metric: String,
        /// Worker threads [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
        /// Where δ statistics are remembered [default: $XDG_CACHE_HOME/aoe].
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Load the checkpoint directory DIR into a running vLLM server, in place.
    ///
    /// Checks that DIR is a checkpoint of the served architecture, then pauses the server,
    /// reloads (the worker extension's aoe_reload when vLLM runs with --worker-extension-cls
    /// aoe_vllm.SwapExtension, else vLLM's reload_weights), resets the prefix cache and
    /// resumes. Needs VLLM_SERVER_DEV_MODE=1 on the server. A failed reload reloads the
    /// previous weights; the server is always resumed.
    Swap(aoe::commands::live::SwapArgs),
    /// Swap a running vLLM server through the variants of a sweep file, run prompts on each and
    /// record outputs and metrics (OUT/results.jsonl, results.csv, sweep.svg).
    ///
    /// Resumable: variants already in OUT/results.jsonl are skipped.
    Sweep(aoe::commands::live::SweepArgs),
    /// Write a small generated model family (for tests, demos and benchmarks).
    #[command(hide = true)]
    Fixture {
        /// Output directory; siblings go to OUT/m1, OUT/m2, ...
        out: PathBuf,
        /// tiny, demo, or a size per parent such as 4G.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// fp8 or bf16.
        #[arg(long, default_value = "fp8")]
        dtype: String,
        /// Number of siblings.
        #[arg(long, default_value_t = 2)]
        siblings: usize,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also write a BF16 copy of m1 to OUT/m1-bf16.
        #[arg(long)]
        bf16_copy: bool,
        /// Write the full-size DeepSeek-V3 skeleton (sparse files) instead.
        #[arg(long)]
        skeleton: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Swap(a) => aoe::commands::live::swap_main(a).map_err(|e| e.to_string()),
        Cmd::Sweep(a) => aoe::commands::live::sweep_main(a).map_err(|e| e.to_string()),
        cmd => run(cmd).map_err(|e| e.to_string()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aoe: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn threads_or_cores(t: Option<usize>) -> usize {
    t.filter(|&t| t > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn stats_dir(d: Option<PathBuf>) -> Option<PathBuf> {
    d.or_else(aoe::recipe::stats::default_cache_dir)
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Write {
            recipe,
            out,
            force,
            threads,
            memory,
            chunk_size,
            cache_dir,
        } => {
            let recipe = recipe.resolve()?;
            let mut all = vec![recipe.base.clone()];
            all.extend(recipe.parents.iter().cloned());
            check_output(&out, &all, force)?;
            let threads = threads_or_cores(threads);
            // Per thread: the f32 accumulator (4 bytes per element) plus the output chunk.
            let chunk =
                chunk_size.unwrap_or_else(|| (memory / (threads * 6)).clamp(64 << 10, 16 << 20));
            let engine = Engine::open(
                &recipe.base,
                &recipe.parents,
                &EngineOptions {
                    cache_bytes: 0,
                    chunk_bytes: chunk,
                    stats_dir: stats_dir(cache_dir),
                },
            )?;
            let child = Child::new(engine, recipe)?;
            let total: u64 = child.files.iter().map(|f| f.size).sum();
            let pb = byte_progress(total, "writing");
            let _ = PB.set(pb.clone());
            let opts = WriteOptions {
                threads,
                force,
                progress: Some(progress),
                cancel: Some(on_signal()),
            };
            let t = std::time::Instant::now();
            let report = write_child(&child, &out, &opts)?;
            pb.finish_and_clear();
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "aoe: wrote {} files, {:.2} GB ({:.2} GB computed) to {} in {:.1} s ({:.2} GB/s)",
                report.files,
                report.bytes as f64 / 1e9,
                report.computed as f64 / 1e9,
                out.display(),
                secs,
                report.bytes as f64 / 1e9 / secs.max(1e-9)
            );
            Ok(())
        }
        Cmd::Plan {
            recipe,
            json,
            threads,
            cache_dir,
        } => {
            let recipe = recipe.resolve()?;
            let engine = Engine::open(
                &recipe.base,
                &recipe.parents,
                &EngineOptions {
                    cache_bytes: 0,
                    chunk_bytes: 1 << 20,
                    stats_dir: stats_dir(cache_dir),
                },
            )?;
            let child = Child::new(engine, recipe)?;
            let report = aoe::commands::plan::plan_report(&child, threads_or_cores(threads))?;
            if let Err(e) = child.engine.stats.flush() {
                eprintln!("aoe: warning: cannot save δ statistics: {e}");
            }
            let text = if json {
                report.to_json()
            } else {
                report.to_table()
            };
            print!("{text}");
            Ok(())
        }
        Cmd::Status { mountpoint, json } => {
            if json {
                println!("{}", aoe::mount::status::status_json(&mountpoint)?);
            } else {
                print!("{}", aoe::mount::status::status_text(&mountpoint)?);
            }
            Ok(())
        }
        Cmd::Demo { dir } => {
            print!("{}", aoe::commands::demo::demo(dir)?);
            Ok(())
        }
        Cmd::Diff {
            base,
            parents,
            csv,
            json,
            plot,
            plot_metric,
            threads,
            cache_dir,
        } => {
            let metric = aoe::recipe::Metric::parse(&plot_metric)?;
            let engine = Engine::open(
                &base,
                &parents,
                &EngineOptions {
                    cache_bytes: 0,
                    chunk_bytes: 1 << 20,
                    stats_dir: stats_dir(cache_dir),
                },
            )?;
            let (models, stats) = (&engine.models, &engine.stats);
            let total: u64 = models.base().shards.iter().map(|s| s.size).sum();
            let pb = byte_progress(total, "measuring");
            let rows =
                aoe::commands::diff::compute(models, stats, threads_or_cores(threads), &|d, t| {
                    pb.set_length(t);
                    pb.set_position(d);
                })?;
            pb.finish_and_clear();
            if let Err(e) = stats.flush() {
                eprintln!("aoe: warning: cannot save δ statistics: {e}");
            }
            let summary = aoe::commands::diff::summarize(&rows);
            let mut out = std::io::stdout().lock();
            let res = if csv {
                aoe::commands::diff::write_csv(&rows, &mut out)
            } else if json {
                aoe::commands::diff::write_json(&rows, &summary, &mut out)
            } else {
                aoe::commands::diff::write_table(&rows, &summary, &mut out)
            };
            res.map_err(|e| aoe::Error::io("stdout", e))?;
            if let Some(p) = plot {
                let svg = aoe::commands::diff::plot_svg(&rows, metric);
                let tmp = p.with_extension("svg.tmp");
                std::fs::write(&tmp, svg).map_err(|e| aoe::Error::io(&tmp, e))?;
                std::fs::rename(&tmp, &p).map_err(|e| aoe::Error::io(&p, e))?;
            }
            Ok(())
        }
        Cmd::Fixture {
            out,
            preset,
            dtype,
            siblings,
            seed,
            bf16_copy,
            skeleton,
        } => fixture(&out, &preset, &dtype, siblings, seed, bf16_copy, skeleton),
        Cmd::Swap(_) | Cmd::Sweep(_) => unreachable!("handled in main"),
    }
}

static PB: std::sync::OnceLock<indicatif::ProgressBar> = std::sync::OnceLock::new();

fn progress(done: u64, _total: u64) {
    if let Some(pb) = PB.get() {
        pb.set_position(done);
    }
}

fn fixture(
    out: &std::path::Path,
    preset: &str,
    dtype: &str,
    siblings: usize,
    seed: u64,
    bf16_copy: bool,
    skeleton: bool,
) -> Result<()> {
    use aoe::testkit::{FamilySpec, FixtureDType};
    let io = |e| aoe::Error::io(out, e);
    if skeleton {
        return aoe::testkit::write_deepseek_v3_skeleton(out).map_err(io);
    }
    let dt = match dtype {
        "fp8" => FixtureDType::Fp8,
        "bf16" => FixtureDType::Bf16,
        _ => {
            return Err(aoe::Error::BadRecipe {
                reason: format!("--dtype {dtype:?}: use fp8 or bf16"),
            })
        }
    };
    let mut spec = match preset {
        "tiny" => FamilySpec::tiny(dt),
        "demo" => FamilySpec::demo(),
        size => FamilySpec::with_target_bytes(
            dt,
            parse_size(size).map_err(|reason| aoe::Error::BadRecipe { reason })? as u64,
        ),
    };
    spec.siblings = siblings;
    spec.seed = seed;
    let dirs = aoe::testkit::write_family(&spec, out).map_err(io)?;
    if bf16_copy {
        aoe::testkit::write_bf16_copy(&dirs[0], &out.join("m1-bf16")).map_err(io)?;
    }
    for d in dirs {
        println!("{}", d.display());
    }
    Ok(())
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn stop(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGINT, SIGTERM and SIGHUP set a flag the writer checks, so it can remove its temporary files.
fn on_signal() -> &'static std::sync::atomic::AtomicBool {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, stop as *const () as libc::sighandler_t);
    }
    &STOP
}
