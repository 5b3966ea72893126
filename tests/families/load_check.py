#!/usr/bin/env python3
"""Loads checkpoint directories with transformers on CPU and prints one JSON line per directory:
{"dir": D, "missing": [...], "unexpected": [...], "mismatched": [...]} or {"dir": D, "error": "..."}.

Usage: load_check.py DIR...   (needs torch + transformers: the vLLM venv)
MXFP4 checkpoints (quantization_config.quant_method == "mxfp4") go through transformers' MXFP4
quantizer, which on CPU dequantizes to BF16 and needs the accelerate package.
"""

import json
import os
import sys


def main(dirs):
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for d in dirs:
        row = {"dir": d}
        try:
            with open(os.path.join(d, "config.json")) as f:
                quant = json.load(f).get("quantization_config", {}).get("quant_method")
            if quant == "mxfp4":
                try:
                    import accelerate  # noqa: F401
                except ImportError:
                    raise RuntimeError("transformers' MXFP4 loader needs the accelerate package, "
                                       "which this Python does not have")
            _, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
            for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
                row[k.split("_")[0]] = sorted(str(x) for x in info.get(k, []))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
