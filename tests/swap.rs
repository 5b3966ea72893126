//! `aoe swap` and `aoe sweep` against a real vLLM OpenAI server (CPU build) on 127.0.0.1,
//! serving variants of a real `aoe-mount --variants` mount of a tiny BF16 DeepSeek-V3 family
//! (tests/vllm/make_family.py). No mocks: the only stand-in is, for the "development endpoints
//! disabled" case, a listener that answers 404 to everything, as a server without
//! VLLM_SERVER_DEV_MODE does on /pause and /collective_rpc.
//!
//! Needs the vLLM venv: set `AOE_VLLM_PYTHON` to its python (`scripts/vllm-venv` creates
//! .venv-vllm; `AOE_VLLM_PYTHON=$PWD/.venv-vllm/bin/python scripts/test`). Two vLLM starts in
//! all (~45 s each on 2 cores): the served one, and a fresh one for the reference tokens.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const AOE: &str = env!("CARGO_BIN_EXE_aoe");
const AOE_MOUNT: &str = env!("CARGO_BIN_EXE_aoe-mount");

fn python() -> String {
    std::env::var("AOE_VLLM_PYTHON").unwrap_or_else(|_| {
        panic!(
            "AOE_VLLM_PYTHON is unset: set it to the python of the vLLM venv (scripts/vllm-venv \
             creates .venv-vllm; then `AOE_VLLM_PYTHON=$PWD/.venv-vllm/bin/python scripts/test`)"
        )
    })
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `aoe`/`aoe-mount` with caches under `scratch` and no configured parents.
fn aoe(bin: &str, scratch: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("XDG_CACHE_HOME", scratch.join("cache"))
        .env("XDG_CONFIG_HOME", scratch.join("no-config"))
        .env_remove("AOE_BASE")
        .env_remove("AOE_PARENTS")
        .stdin(Stdio::null())
        .output()
        .expect("run aoe")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed: {}", text(&o));
    String::from_utf8(o.stdout).expect("UTF-8")
}

/// A failed run whose stderr contains `want`.
fn fails_with(o: Output, want: &str, what: &str) {
    assert!(!o.status.success(), "{what} succeeded: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(want),
        "{what}: stderr lacks {want:?}: {}",
        text(&o)
    );
    eprintln!("{what}: {}", err.trim());
}

/// A live `aoe-mount --variants` root; `Drop` unmounts in every outcome.
struct Mount {
    mnt: PathBuf,
    scratch: PathBuf,
}

impl Mount {
    fn variants(scratch: &Path, base: &Path, parent: &Path) -> Mount {
        let mnt = scratch.join("variants");
        std::fs::create_dir_all(&mnt).unwrap();
        let m = Mount {
            mnt: mnt.clone(),
            scratch: scratch.to_path_buf(),
        };
        let log = scratch.join("mount.log");
        ok(
            aoe(
                AOE_MOUNT,
                scratch,
                &[
                    "--variants",
                    "--base",
                    s(base),
                    "--parent",
                    s(parent),
                    "--log",
                    s(&log),
                    s(&mnt),
                ],
            ),
            "aoe-mount --variants",
        );
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = aoe(AOE_MOUNT, &self.scratch, &["--unmount", s(&self.mnt)]);
        let _ = Command::new("umount")
            .args(["-l", s(&self.mnt)])
            .stderr(Stdio::null())
            .status();
    }
}

/// A vLLM OpenAI server child process in its own process group; `Drop` kills the group (also
/// on panic).
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Server {
    fn start(model: &Path, log: &Path) -> Server {
        let port = free_port();
        let logf = std::fs::File::create(log).expect("server log");
        let child = Command::new(python())
            .args([
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                s(model),
            ])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--skip-tokenizer-init",
                "--enforce-eager",
                "--max-model-len",
                "256",
            ])
            .args(["--dtype", "bfloat16", "--seed", "0"])
            .args([
                "--compilation-config",
                r#"{"custom_ops": ["all", "-rotary_embedding"]}"#,
            ])
            .args(["--worker-extension-cls", "aoe_vllm.SwapExtension"])
            .env("VLLM_SERVER_DEV_MODE", "1")
            .env("VLLM_MLA_DISABLE", "1")
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .env("PYTHONPATH", repo().join("python"))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .process_group(0)
            .spawn()
            .expect("start vLLM");
        let mut srv = Server {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log: log.to_path_buf(),
        };
        let t = Instant::now();
        loop {
            if let Some(st) = srv.child.try_wait().unwrap() {
                panic!("vLLM exited ({st}) before healthy; log: {}", srv.log_tail());
            }
            if get(&format!("{}/health", srv.url)).is_some_and(|(c, _)| c == 200) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(600),
                "vLLM not healthy after 600 s; log: {}",
                srv.log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!(
            "vLLM on {} healthy after {:.1} s",
            model.display(),
            t.elapsed().as_secs_f64()
        );
        srv
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn model(&self) -> String {
        let (_, body) = get(&format!("{}/v1/models", self.url)).expect("/v1/models");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["data"][0]["id"].as_str().unwrap().to_string()
    }

    /// Greedy tokens of every prompt, one request after the other, as the sweep sends them.
    fn generate(&self, prompts: &[Value], max_tokens: &[u64]) -> Vec<Vec<u64>> {
        let model = self.model();
        prompts
            .iter()
            .zip(max_tokens)
            .map(|(p, &n)| {
                let body = json!({"model": model, "prompt": p, "max_tokens": n,
                                  "temperature": 0.0, "seed": 0, "ignore_eos": false,
                                  "return_token_ids": true});
                let (code, answer) =
                    post(&format!("{}/v1/completions", self.url), &body).expect("completion");
                assert_eq!(code, 200, "completion failed: {answer}");
                let v: Value = serde_json::from_str(&answer).unwrap();
                v["choices"][0]["token_ids"]
                    .as_array()
                    .expect("token_ids")
                    .iter()
                    .map(|t| t.as_u64().unwrap())
                    .collect()
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-pid, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

fn get(url: &str) -> Option<(u16, String)> {
    let mut r = agent().get(url).call().ok()?;
    let code = r.status().as_u16();
    Some((code, r.body_mut().read_to_string().unwrap_or_default()))
}

fn post(url: &str, body: &Value) -> Option<(u16, String)> {
    let mut r = agent()
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.body_mut().read_to_string().unwrap_or_default()))
}

/// Something on a port that answers every request with 404 (the development endpoints of a
/// vLLM started without VLLM_SERVER_DEV_MODE=1 do); serves until the test process ends.
fn answers_404() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut r = BufReader::new(c);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let _ = r.get_mut().write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
                  Content-Length: 22\r\nConnection: close\r\n\r\n{\"detail\":\"Not Found\"}",
            );
        }
    });
    url
}

#[test]
fn swap_refuses_unreachable_servers_and_servers_without_dev_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let fam = tmp.path().join("fixture");
    ok(
        aoe(
            AOE,
            tmp.path(),
            &["fixture", s(&fam), "--preset", "tiny", "--dtype", "bf16"],
        ),
        "aoe fixture",
    );
    let dir = fam.join("m1");
    let url = format!("http://127.0.0.1:{}", free_port());
    fails_with(
        aoe(AOE, tmp.path(), &["swap", "--vllm", &url, s(&dir)]),
        "cannot reach vLLM",
        "swap to an unreachable URL",
    );
    fails_with(
        aoe(
            AOE,
            tmp.path(),
            &["swap", "--vllm", &answers_404(), s(&dir)],
        ),
        "VLLM_SERVER_DEV_MODE=1",
        "swap on a server without dev mode",
    );
    fails_with(
        aoe(AOE, tmp.path(), &["swap", "--vllm", &url, s(tmp.path())]),
        "not a checkpoint",
        "swap to a non-checkpoint",
    );
}

#[test]
fn swap_and_sweep_on_a_real_vllm_server() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path();
    let fam = scratch.join("family");
    let out = Command::new(python())
        .arg(repo().join("tests/vllm/make_family.py"))
        .arg(&fam)
        .args(["--dtype", "bf16"])
        .output()
        .expect("make_family.py");
    ok(out, "make_family.py");
    let (base, parent) = (fam.join("base"), fam.join("parent"));
    // Another architecture: aoe's own tiny DeepSeek-V3 fixture, with other dims.
    let other = scratch.join("other");
    ok(
        aoe(
            AOE,
            scratch,
            &["fixture", s(&other), "--preset", "tiny", "--dtype", "bf16"],
        ),
        "aoe fixture",
    );
    let not_ck = scratch.join("not-a-checkpoint");
    std::fs::create_dir_all(&not_ck).unwrap();
    std::fs::write(not_ck.join("config.json"), "{}").unwrap();

    let mount = Mount::variants(scratch, &base, &parent);
    let root = mount.mnt.clone();
    let prompts = [
        json!([5, 17, 33, 2, 99]),
        json!([100, 200, 300]),
        json!([7, 7, 7, 7, 7, 7, 7, 7]),
        json!([400, 3, 250, 99, 12, 480, 61]),
    ];
    let max_tokens = [16u64, 16, 8, 16];

    let srv = Server::start(&root.join("lambda=0"), &scratch.join("server-a.log"));
    let tokens0 = srv.generate(&prompts, &max_tokens);
    let swap = |dir: &Path| aoe(AOE, scratch, &["swap", "--vllm", &srv.url, s(dir)]);

    // Refused before pausing; the server still serves the same tokens.
    fails_with(
        swap(&not_ck),
        "not a checkpoint",
        "swap to a non-checkpoint",
    );
    fails_with(
        swap(&other.join("m1")),
        "not the served architecture",
        "swap to another architecture",
    );
    assert_eq!(
        srv.generate(&prompts, &max_tokens),
        tokens0,
        "the refused swaps changed the served model"
    );

    // λ = 1 through the mount.
    let said = ok(swap(&root.join("lambda=1")), "aoe swap to lambda=1");
    eprintln!("{said}");
    assert!(said.contains("method: aoe_reload"), "{said}");
    assert!(
        said.contains("checked: ") && said.contains("tensor names"),
        "{said}"
    );
    let tokens1 = srv.generate(&prompts, &max_tokens);
    assert_ne!(tokens1, tokens0, "λ = 0 and λ = 1 generate the same tokens");

    // The sweep: 3 variants × 4 prompts, in the file's order (not the names' order).
    let sweep_file = scratch.join("sweep.json");
    std::fs::write(
        &sweep_file,
        r#"{"lambda=0.5": {"lambda": 0.5}, "lambda=0": {"lambda": 0}, "lambda=1": {"lambda": 1}}"#,
    )
    .unwrap();
    let prompts_file = scratch.join("prompts.jsonl");
    let mut jsonl = String::new();
    for (i, (p, n)) in prompts.iter().zip(max_tokens).enumerate() {
        let mut line = json!({"prompt": p});
        if n != 16 {
            line["max_tokens"] = json!(n);
        }
        if i == 0 {
            line["expect"] = json!(tokens1[0]);
        }
        jsonl += &format!("{line}\n");
    }
    std::fs::write(&prompts_file, jsonl).unwrap();
    let marker = tokens1[1][0].to_string();
    let results = scratch.join("results");
    let sweep = || {
        aoe(
            AOE,
            scratch,
            &[
                "sweep",
                "--vllm",
                &srv.url,
                "--variants",
                s(&root),
                "--sweep",
                s(&sweep_file),
                "--prompts",
                s(&prompts_file),
                "--out",
                s(&results),
                "--marker-token",
                &marker,
                "--max-tokens",
                "16",
            ],
        )
    };
    let t = Instant::now();
    let table = ok(sweep(), "aoe sweep");
    eprintln!("aoe sweep: {:.1} s\n{table}", t.elapsed().as_secs_f64());
    let lines = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let recs: Vec<Value> = lines(&results.join("results.jsonl"))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = recs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["lambda=0.5", "lambda=0", "lambda=1"]);
    for r in &recs {
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["outputs"].as_array().unwrap().len(), 4, "{r}");
        assert!(r["swap_seconds"].as_f64().unwrap() > 0.0);
        assert!(r["generation_seconds"].as_f64().unwrap() > 0.0);
        assert_eq!(r["method"], "aoe_reload");
    }
    assert_eq!(recs[0]["recipe"], json!({"lambda": 0.5}));
    assert_eq!(recs[2]["metrics"]["x"], json!(1.0));
    assert_eq!(recs[2]["metrics"]["exact_match"], json!(1.0));
    assert_eq!(recs[1]["metrics"]["exact_match"], json!(0.0));
    let csv = lines(&results.join("results.csv"));
    assert_eq!(csv.len(), 4, "{csv:?}");
    assert!(csv[0].starts_with("name,lambda,"), "{csv:?}");
    assert!(csv[1].starts_with("lambda=0.5,0.5,4,"), "{csv:?}");
    assert!(csv[3].starts_with("lambda=1,1.0,4,"), "{csv:?}");
    let svg = std::fs::read_to_string(results.join("sweep.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("mean output tokens"));
    assert!(svg.contains("exact-match rate") && svg.contains("marker share"));

    // Resumable: a second run skips every variant and appends nothing.
    let again = sweep();
    let err = String::from_utf8_lossy(&again.stderr).to_string();
    ok(again, "aoe sweep, again");
    assert!(err.contains("skipping 3 variant(s)"), "{err}");
    assert_eq!(lines(&results.join("results.jsonl")).len(), 3);

    // Each variant's sweep tokens equal a one-off generation after `aoe swap` to it.
    let mut swapped = Vec::new();
    for r in &recs {
        let name = r["name"].as_str().unwrap();
        ok(swap(&root.join(name)), "aoe swap");
        let got = srv.generate(&prompts, &max_tokens);
        let want: Vec<Vec<u64>> = r["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                o["token_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(got, want, "{name}: sweep tokens != tokens after aoe swap");
        swapped.push(got);
    }
    assert_eq!(swapped[1], tokens0, "λ = 0 after swaps != λ = 0 at start");
    assert_eq!(swapped[2], tokens1);
    assert_ne!(swapped[0], tokens0);
    assert_ne!(swapped[0], tokens1);
    drop(srv);

    // A fresh server on the parent (λ = 1 is the parent's bytes) generates the swapped tokens.
    let fresh = Server::start(&parent, &scratch.join("server-b.log"));
    assert_eq!(
        fresh.generate(&prompts, &max_tokens),
        tokens1,
        "swapped to λ = 1 != fresh server on the parent"
    );
    drop(fresh);
    drop(mount);
    eprintln!(
        "swap_and_sweep_on_a_real_vllm_server: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
