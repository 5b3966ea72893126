//! The command-line side of `aoe swap` and `aoe sweep`: arguments, the progress bar and what
//! is printed. The work is in [`crate::commands::swap`] and [`crate::commands::sweep`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::commands::swap::{swap, SwapOptions};
use crate::commands::sweep::{sweep, Event, Marker, SweepOptions};
use crate::commands::vllm::{LiveResult, Vllm};
use crate::live_err;

/// `aoe swap` arguments.
#[derive(Args, Debug)]
pub struct SwapArgs {
    /// The vLLM server, e.g. http://127.0.0.1:8000.
    #[arg(long, value_name = "URL")]
    pub vllm: String,
    /// The checkpoint directory to load (config.json and safetensors).
    pub dir: PathBuf,
    /// Timeout of the pause and of the reload, in seconds.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub timeout: f64,
}

/// `aoe sweep` arguments.
#[derive(Args, Debug)]
pub struct SweepArgs {
    /// The vLLM server, e.g. http://127.0.0.1:8000.
    #[arg(long, value_name = "URL")]
    pub vllm: String,
    /// The root of an `aoe-mount --variants` mount; variant NAME is ROOT/NAME.
    #[arg(long, value_name = "ROOT")]
    pub variants: PathBuf,
    /// The sweep file (JSON: variant name → recipe, as `aoe-mount --sweep` reads).
    #[arg(long, value_name = "FILE")]
    pub sweep: PathBuf,
    /// Prompts, JSONL: {"prompt": TEXT or [TOKEN IDS], "expect"?: TEXT or [IDS],
    /// "max_tokens"?: N}.
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    /// Output directory: results.jsonl (appended), results.csv, sweep.svg.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Count the outputs whose text contains this string.
    #[arg(long, value_name = "STR", conflicts_with = "marker_token")]
    pub marker: Option<String>,
    /// Count the outputs whose token ids contain this id.
    #[arg(long, value_name = "ID")]
    pub marker_token: Option<u64>,
    /// Tokens per prompt (unless the prompt gives max_tokens).
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub max_tokens: u64,
    /// Generate max-tokens tokens whatever the model emits.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Timeout of each reload, in seconds.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub timeout: f64,
    /// Timeout of each completion, in seconds.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub completion_timeout: f64,
}

fn secs(s: f64, what: &str) -> LiveResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| live_err!("--{what} {s}: not a duration"))
}

/// Runs `aoe swap`.
pub fn swap_main(a: SwapArgs) -> LiveResult<()> {
    let v = Vllm::new(&a.vllm);
    let opts = SwapOptions {
        reload_timeout: secs(a.timeout, "timeout")?,
        previous: None,
    };
    let r = swap(&v, &a.dir, None, &opts)?;
    print!("{}", r.text());
    Ok(())
}

fn bar(len: u64) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} completions, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

/// Runs `aoe sweep`: the progress bar on stderr, the summary table on stdout; an error at the
/// end when a variant failed.
pub fn sweep_main(a: SweepArgs) -> LiveResult<()> {
    let marker = match (a.marker, a.marker_token) {
        (Some(s), _) => Some(Marker::Text(s)),
        (None, Some(t)) => Some(Marker::Token(t)),
        (None, None) => None,
    };
    let o = SweepOptions {
        url: a.vllm,
        root: a.variants,
        sweep: a.sweep,
        prompts: a.prompts,
        out: a.out,
        marker,
        max_tokens: a.max_tokens,
        ignore_eos: a.ignore_eos,
        reload_timeout: secs(a.timeout, "timeout")?,
        completion_timeout: secs(a.completion_timeout, "completion-timeout")?,
    };
    let mut pb: Option<ProgressBar> = None;
    let report = sweep(&o, &mut |e| match e {
        Event::Skipped(names) => eprintln!(
            "aoe sweep: skipping {} variant(s) already in {}: {}",
            names.len(),
            o.out.join("results.jsonl").display(),
            names.join(", ")
        ),
        Event::Begin { variants, prompts } => {
            if variants > 0 {
                eprintln!("aoe sweep: {variants} variant(s) × {prompts} prompt(s)");
                pb = Some(bar((variants * prompts) as u64));
            }
        }
        Event::Swapping(name) => {
            if let Some(pb) = &pb {
                pb.set_message(name.to_string());
            }
        }
        Event::PromptDone => {
            if let Some(pb) = &pb {
                pb.inc(1);
            }
        }
        Event::VariantDone(name, err) => {
            let line = match err {
                None => format!("aoe sweep: {name}: done"),
                Some(e) => format!("aoe sweep: {name}: FAILED: {e}"),
            };
            match &pb {
                Some(pb) => pb.println(line),
                None => eprintln!("{line}"),
            }
        }
    })?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    print!("{}", report.table());
    println!(
        "results: {} (csv, svg alongside)",
        o.out.join("results.jsonl").display()
    );
    if !report.failed.is_empty() {
        return Err(live_err!(
            "{} of the variants failed: {} (recorded in results.jsonl; run again to retry them)",
            report.failed.len(),
            report.failed.join(", ")
        ));
    }
    Ok(())
}
