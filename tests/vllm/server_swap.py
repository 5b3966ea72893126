"""Swap a running vLLM OpenAI server from checkpoint A to B over HTTP and compare its tokens with
a fresh server on B.

Usage: server_swap.py A B [--method aoe|vllm] [--strategy lazy|eager] [--max-tokens N]
                      [--prompts JSON] [--fp8-reference]

Starts `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 (VLLM_SERVER_DEV_MODE=1, the
CPU settings of DESIGN §7, `--worker-extension-cls aoe_vllm.SwapExtension`) on A, generates,
swaps with

    POST /pause?mode=wait
    POST /collective_rpc {"method": "aoe_reload", "args": [B]}      (--method aoe)
         /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": B}}  (vllm)
    POST /reset_prefix_cache
    POST /resume

generates again, stops it, starts a fresh server on B and generates.  Each generation sends the
prompts twice: all at once (concurrent requests, batched by the scheduler) and one after the
other.  Prints one JSON object: the server command line, start-to-healthy seconds, the seconds of
every swap step, the tokens, and whether swapped == fresh.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.join(HERE, "..", "..", "python")
DEFAULT_PROMPTS = [
    [5, 17, 33, 2, 99],
    [100, 200, 300],
    [7, 7, 7, 7, 7, 7, 7, 7],
    [400, 3, 250, 99, 12, 480, 61],
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, port: int, strategy: str, fp8_reference: bool = False) -> list[str]:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--host", "127.0.0.1", "--port", str(port),
        "--skip-tokenizer-init", "--enforce-eager", "--max-model-len", "256",
        "--dtype", "bfloat16", "--seed", "0",
        "--compilation-config", json.dumps({"custom_ops": ["all", "-rotary_embedding"]}),
        "--worker-extension-cls",
        "fp8_reference.Fp8ReferenceSwapExtension" if fp8_reference else "aoe_vllm.SwapExtension",
    ]
    if strategy == "eager":
        cmd += ["--safetensors-load-strategy", "eager"]
    return cmd


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_SERVER_DEV_MODE="1", VLLM_MLA_DISABLE="1", VLLM_CPU_KVCACHE_SPACE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(PYTHON_DIR), HERE, env.get("PYTHONPATH", "")])
    return env


def post(url: str, body: object | None = None, timeout: float = 600) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Server:
    """A vLLM OpenAI server child process; `stop()` (or leaving the `with`) ends it."""

    def __init__(self, model: str, strategy: str, log: str, fp8_reference: bool = False,
                 port: int | None = None):
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = server_command(model, self.port, strategy, fp8_reference)
        self.log = open(log, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=server_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 600:
                self.stop()
                raise RuntimeError(f"vLLM server not healthy after 600 s; see {log}")
            time.sleep(0.5)
        self.start_seconds = time.perf_counter() - t0

    def complete(self, prompt: list[int], max_tokens: int) -> list[int]:
        status, body = post(self.base + "/v1/completions", {
            "model": self.cmd[self.cmd.index("--model") + 1], "prompt": prompt,
            "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True,
        })
        if status != 200:
            raise RuntimeError(f"completion failed ({status}): {body[:500]!r}")
        return list(json.loads(body)["choices"][0]["token_ids"])

    def generate(self, prompts: list[list[int]], max_tokens: int) -> dict[str, list[list[int]]]:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
            batched = list(ex.map(lambda p: self.complete(p, max_tokens), prompts))
        one_by_one = [self.complete(p, max_tokens) for p in prompts]
        return {"concurrent": batched, "sequential": one_by_one}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def swap(server: Server, new: str, method: str) -> dict[str, object]:
    """The four HTTP steps; returns each step's seconds and answers."""
    if method == "aoe":
        rpc = {"method": "aoe_reload", "args": [new]}
    else:
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": new}}
    steps: dict[str, object] = {}
    t_all = time.perf_counter()
    for name, path, body in [("pause", "/pause?mode=wait", None), ("reload", "/collective_rpc", rpc),
                             ("reset_prefix_cache", "/reset_prefix_cache", None),
                             ("resume", "/resume", None)]:
        t = time.perf_counter()
        status, answer = post(server.base + path, body)
        steps[name] = {"seconds": round(time.perf_counter() - t, 4), "status": status,
                       "answer": answer.decode(errors="replace")[:300]}
        if status != 200:
            raise RuntimeError(f"{path} failed ({status}): {answer[:500]!r}")
    steps["total_seconds"] = round(time.perf_counter() - t_all, 4)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--method", choices=["aoe", "vllm"], default="aoe")
    ap.add_argument("--strategy", choices=["lazy", "eager"], default="lazy")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--prompts")
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--fp8-reference", action="store_true",
                    help="worker extension fp8_reference.Fp8ReferenceSwapExtension (CPUs without AMX)")
    args = ap.parse_args()
    prompts = json.loads(args.prompts) if args.prompts else DEFAULT_PROMPTS
    out: dict[str, object] = {"a": args.a, "b": args.b, "method": args.method,
                              "strategy": args.strategy}
    with Server(args.a, args.strategy, os.path.join(args.log_dir, "aoe-vllm-server-a.log"),
                args.fp8_reference) as s:
        out["command"] = " ".join(s.cmd)
        out["start_seconds_a"] = round(s.start_seconds, 2)
        out["tokens_a"] = s.generate(prompts, args.max_tokens)
        out["swap"] = swap(s, args.b, args.method)
        out["tokens_swapped"] = s.generate(prompts, args.max_tokens)
    with Server(args.b, args.strategy, os.path.join(args.log_dir, "aoe-vllm-server-b.log"),
                args.fp8_reference) as s:
        out["start_seconds_b"] = round(s.start_seconds, 2)
        out["tokens_fresh_b"] = s.generate(prompts, args.max_tokens)
    sw, fr = out["tokens_swapped"], out["tokens_fresh_b"]
    out["swapped_equals_fresh"] = sw == fr
    out["concurrent_equals_sequential"] = {
        k: out[k]["concurrent"] == out[k]["sequential"]  # type: ignore[index]
        for k in ("tokens_a", "tokens_swapped", "tokens_fresh_b")
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
