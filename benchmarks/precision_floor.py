"""How far a full prefill moves from itself when it runs in bf16: the floor under the
answer-agreement and top-1 targets (issue 12).

Users serve in bf16 on a GPU (``dtype=auto``), and there a full prefill is "full-prefill
quality". This CPU computes in fp32 (bf16 matmuls run at ~1.4 GFLOP/s here), so the script
emulates bf16 numerics on fp32 kernels the way a bf16 GPU forward rounds: weights rounded to
bf16; every matmul's input and output rounded to bf16 (fp32 accumulation in between, as
cuBLAS does); RMSNorm outputs, RoPE outputs (the cached K, and Q) and each layer's output
(the residual stream) rounded to bf16; softmax statistics stay fp32, as in the attention
kernels. Not rounded, unlike a real bf16 forward: the residual sum between the attention and
the MLP of a layer, and the SiLU product (only its matmul rounds it), so the emulation is, if
anything, closer to fp32 than a real bf16 forward is.

For each example the same request runs twice, greedy, to the task's answer length: a full
prefill in fp32 (the eval's reference) and the same full prefill in emulated bf16. It reports
the first-token KL(fp32 || bf16), top-1 agreement, the answer agreement (F1 or Rouge-L of the
bf16 answer against the fp32 one, as ``eval`` scores ``*_vs_full``) and the gold metric of
each, with 90% bootstrap intervals. With ``--run`` and ``--method``, that method's rows of an
eval run on the same examples are set beside it (and the run's fp32 full answers are checked
to be the ones computed here).

    .venv/bin/python benchmarks/precision_floor.py --dataset musique --limit 50 \\
        --run runs/sel9 --method 'blend[qa,qkvd]-kv+probe30@0.1:L0=0.15,L4'

With ``--blend SPEC`` (eval grammar), that blend also runs in emulated bf16, first token
only, over chunks precomputed in emulated bf16: its KL and top-1 against the bf16 full prefill
(what a bf16 server compares), beside the same blend's in fp32 against the fp32 full prefill.

``--validate N`` checks the emulation first: on the first N tokens of each of the first
``--limit`` prompts it runs a plain prefill three ways, fp32, emulated bf16 and the model really
loaded in bf16 (slow on this CPU: keep N and the limit small), and prints the next-token KL of
each against the others.

    .venv/bin/python benchmarks/precision_floor.py --dataset musique --limit 3 --validate 256
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from quality_args import dataset_parser, engine_and_dataset
from tqdm import tqdm

import cacheblend.model.runner as runner_module
from cacheblend.engine import Engine, GenerateRequest
from cacheblend.eval.datasets import TASK_METRIC
from cacheblend.eval.methods import parse_method
from cacheblend.eval.metrics import (
    METRICS,
    bootstrap_interval,
    first_token_kl,
    mean_of,
    top1_agreement,
)
from cacheblend.eval.prompts import PROMPTS, answer_text, build_segments
from cacheblend.model.loader import load_model
from cacheblend.model.rope import RopeTable
from cacheblend.request import SamplingParams


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def _runner_tensors(runner) -> list[torch.Tensor]:
    tensors = [runner.embed_tokens, runner.final_norm, runner.lm_head]
    for layer in runner.layers:
        tensors += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    unique = {t.data_ptr(): t for t in tensors}  # a tied lm_head is the embedding
    return list(unique.values())


@contextlib.contextmanager
def emulated_bf16(engine: Engine):
    """Everything the engine's runner computes inside is rounded as a bf16 forward rounds it
    (module docstring); the fp32 weights come back on exit."""
    runner = engine.runner
    tensors = [t.data for t in _runner_tensors(runner)]
    saved = [t.clone() for t in tensors]
    for t in tensors:
        t.copy_(bf16(t))
    functional = types.SimpleNamespace(**{name: getattr(F, name) for name in dir(F)
                                          if not name.startswith("__")})
    functional.linear = lambda x, w, b=None: bf16(F.linear(bf16(x), w, b))
    originals = (runner_module.F, runner_module.rms_norm, runner_module.ModelRunner.finish_layer,
                 RopeTable.apply, RopeTable.apply_range)
    norm, finish, apply, apply_range = originals[1:]
    runner_module.F = functional
    runner_module.rms_norm = lambda x, w, eps: bf16(norm(x, w, eps))
    runner_module.ModelRunner.finish_layer = lambda self, *a: bf16(finish(self, *a))
    RopeTable.apply = lambda self, x, positions: bf16(apply(self, x, positions))
    RopeTable.apply_range = lambda self, x, start: bf16(apply_range(self, x, start))
    try:
        yield
    finally:
        (runner_module.F, runner_module.rms_norm, runner_module.ModelRunner.finish_layer,
         RopeTable.apply, RopeTable.apply_range) = originals
        for t, fp32 in zip(tensors, saved):
            t.copy_(fp32)


def first_token(engine: Engine, segments, spec) -> torch.Tensor:
    """``spec``'s first-token logits over chunks precomputed in the current numerics (the store
    is emptied before and after: entries of the other precision carry the same key)."""
    engine.store.clear()
    blend = spec.request_blend(engine)
    engine.generate(GenerateRequest(segments=segments, method="reuse", blend=blend,
                                    sampling=SamplingParams(max_tokens=1)))  # precompute
    logits = engine.generate(GenerateRequest(segments=segments, method=spec.method, blend=blend,
                                             sampling=SamplingParams(max_tokens=1))).first_logits
    engine.store.clear()
    return logits


def validate(engine: Engine, dataset, tokens: int) -> None:
    """fp32, emulated bf16 and real bf16 plain prefills of each prompt's first ``tokens``."""
    real = load_model(device="cpu", dtype="bf16").runner()
    for example in dataset.examples:
        ids = torch.tensor(build_segments(engine.prompts, example).ids[:tokens])
        with torch.inference_mode():
            fp32 = engine.runner.prefill(ids)[0]
            with emulated_bf16(engine):
                emulated = engine.runner.prefill(ids)[0]
            bf16_logits = real.prefill(ids)[0]
        print(f"{example.id}, {ids.shape[0]} tokens: KL(fp32 || emulated bf16) "
              f"{first_token_kl(fp32, emulated):.5f}, KL(fp32 || real bf16) "
              f"{first_token_kl(fp32, bf16_logits):.5f}, KL(real bf16 || emulated) "
              f"{first_token_kl(bf16_logits, emulated):.5f}")


def eval_rows(run: Path, dataset: str, method: str) -> dict[str, dict]:
    path = run / dataset / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["example"]: r for r in rows if r.get("method") == method}


def interval(values: list[float]) -> str:
    low, high = bootstrap_interval(mean_of, values)
    return f"{mean_of(values):.3f} [{low:.3f}, {high:.3f}]"


def main() -> None:
    parser = dataset_parser(__doc__)
    parser.add_argument("--run", type=Path, help="an eval --out directory on the same examples")
    parser.add_argument("--method", help="the label of that run's method to set beside it")
    parser.add_argument("--out", type=Path, help="write the per-example rows here (jsonl)")
    parser.add_argument("--validate", type=int, metavar="N",
                        help="only check the emulation against a real bf16 prefill of N tokens")
    parser.add_argument("--first-token-only", action="store_true",
                        help="no answers: the first token's KL and top-1 only")
    parser.add_argument("--blend", help="a blend spec to compare with full in both precisions")
    args = parser.parse_args()
    engine, dataset = engine_and_dataset(args)
    spec = parse_method(args.blend) if args.blend else None
    if args.validate:
        validate(engine, dataset, args.validate)
        return
    prompt = PROMPTS[dataset.kind]
    metric = TASK_METRIC[dataset.kind]
    score = METRICS[metric]
    tokens = 1 if args.first_token_only else prompt.max_tokens
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0,
                              min_tokens=min(prompt.min_tokens, tokens))
    decode = not args.first_token_only
    rows = []
    for example in tqdm(dataset.examples, desc=f"{dataset.name} fp32 / bf16", unit="example"):
        segments = build_segments(engine.prompts, example)
        request = GenerateRequest(segments=segments, method="full", sampling=sampling)
        fp32 = engine.generate(request)
        blended = {"fp32": first_token(engine, segments, spec)} if spec else {}
        with emulated_bf16(engine):
            low = engine.generate(request)
            if spec:
                blended["bf16"] = first_token(engine, segments, spec)
        row = {"example": example.id,
               "kl_first_token": first_token_kl(fp32.first_logits, low.first_logits),
               "top1_agreement": top1_agreement(fp32.first_logits, low.first_logits)}
        if decode:
            reference = answer_text(example.kind, fp32.text)
            answer = answer_text(example.kind, low.text)
            row.update({f"{metric}_vs_full": score(answer, [reference]),
                        f"{metric}_fp32": score(reference, example.answers),
                        f"{metric}_bf16": score(answer, example.answers),
                        "answer_fp32": fp32.text, "answer_bf16": low.text})
        for precision, logits in blended.items():
            reference = fp32.first_logits if precision == "fp32" else low.first_logits
            row[f"blend_kl_{precision}"] = first_token_kl(reference, logits)
            row[f"blend_top1_{precision}"] = top1_agreement(reference, logits)
        rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(rows, dataset.name, metric if decode else None, spec, args)


def report(rows: list[dict], name: str, metric: str | None, spec, args) -> None:
    """Prints the means with their intervals, then a JSON summary."""
    keys = ["kl_first_token", "top1_agreement"] + ([f"{metric}_vs_full"] if metric else [])
    print(f"{name}, {len(rows)} examples: full prefill in emulated bf16 against fp32")
    for key in keys:
        print(f"  {key} {interval([r[key] for r in rows])}")
    if metric:
        print(f"  gold {metric}: fp32 {interval([r[f'{metric}_fp32'] for r in rows])}, "
              f"bf16 {interval([r[f'{metric}_bf16'] for r in rows])}")
    summary = {"dataset": name, "n": len(rows), "metric": metric}
    summary.update({key: mean_of([r[key] for r in rows]) for key in keys})
    if spec:
        for precision in ("fp32", "bf16"):
            kl = [r[f"blend_kl_{precision}"] for r in rows]
            top1 = [r[f"blend_top1_{precision}"] for r in rows]
            print(f"  {spec.label} in {precision} against full in {precision}: first-token KL "
                  f"{interval(kl)}, top-1 {interval(top1)}")
            summary[f"blend_kl_{precision}"] = mean_of(kl)
        diff = [r["blend_kl_bf16"] - r["blend_kl_fp32"] for r in rows]
        low, high = bootstrap_interval(mean_of, diff)
        print(f"  its KL in bf16 minus in fp32: {mean_of(diff):+.4f} [{low:+.4f}, {high:+.4f}]")
    if args.run and args.method:
        method = eval_rows(args.run, name, args.method)
        full = eval_rows(args.run, name, "full")
        common = [r for r in rows if r["example"] in method]
        if metric:
            same = sum(full.get(r["example"], {}).get("answer") == r["answer_fp32"]
                       for r in common)
            summary["method_full_answers_equal"] = same
            print(f"  (the run's fp32 full answers equal these on {same}/{len(common)})")
        print(f"  {args.method} in {args.run} on the same {len(common)} examples:")
        for key in keys:
            values = [method[r["example"]][key] for r in common
                      if method[r["example"]].get(key) is not None]
            print(f"    {key} {interval(values)}")
            summary[f"method_{key}"] = mean_of(values)
    print(json.dumps(summary))

if __name__ == "__main__":
    main()
