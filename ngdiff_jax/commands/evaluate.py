"""``ngdiff eval``: evaluate a saved model on TOFU or MUSE and write its result JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

HELP = ("Evaluate a saved model on TOFU or MUSE with open-unlearning's metrics, or on lm-eval tasks; write a "
        "result JSON.")

HEADLINE = {
    "tofu": ("forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_ROUGE", "privleak"),
    "muse": ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak"),
}

#: ``--robustness relearn``'s defaults (``--relearn-steps``, ``--relearn-lr``)
RELEARN_STEPS, RELEARN_LR = 10, 1e-5

#: Metrics every evaluation has (the others need --retain-eval): None here means NaN scores.
REQUIRED = {
    "tofu": ("model_utility", "forget_Q_A_ROUGE", "forget_Q_A_Prob"),
    "muse": ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ngdiff_jax.commands.argtypes import positive_int

    parser.add_argument(
        "--model", required=True, help="saved model dir (HF layout, as save_pretrained writes) or hub id."
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir or hub id (default: --model).")
    parser.add_argument("--benchmark", choices=("tofu", "muse", "lm-eval"), default="tofu",
                        help="tofu / muse (open-unlearning's metrics) or lm-eval (lm-evaluation-harness tasks, "
                             "--tasks; the optional extra lm-eval).")  # fmt: skip
    parser.add_argument("--tasks", default=None,
                        help="lm-eval: comma-separated task or group names (their data from the local cache only).")
    parser.add_argument("--lm-eval-include", default=None,
                        help="lm-eval: a folder of task YAMLs to add (e.g. a task on local JSONL files).")
    parser.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (task default).")
    parser.add_argument(
        "--robustness", default=None,
        help="TOFU: also measure the forget answers after changes that bring hidden knowledge back: 'all' or a "
        "comma-separated subset of relearn,bf16,int8,int4,paraphrase,formats (docs/METRICS.md); adds "
        "robust_* aggregates.",
    )  # fmt: skip
    parser.add_argument("--relearn-steps", type=positive_int, default=None,
                        help="--robustness relearn: fine-tuning steps on half the forget rows "
                             f"(default {RELEARN_STEPS}).")  # fmt: skip
    parser.add_argument("--relearn-lr", type=float, default=None,
                        help=f"--robustness relearn: Adam's rate (default {RELEARN_LR:g}).")
    parser.add_argument("--data", default=None, help="benchmark folder (default ../shared/data/tofu or muse_news).")
    parser.add_argument(
        "--forget-split", default=None,
        help="TOFU forget split (forget01/05/10); default: the one the model was unlearned on "
        "(its ngdiff_format.json), else forget10.",
    )  # fmt: skip
    parser.add_argument(
        "--format", default=None,
        help="prompt format: a preset in configs/formats (open-unlearning, smollm2-instruct, llama2-chat, ...) "
        "or a YAML file; default: the format saved beside the model (ngdiff_format.json), else `default`.",
    )  # fmt: skip
    parser.add_argument(
        "--allow-format-change", action="store_true",
        help="evaluate with --format even though the model was trained with another format.",
    )  # fmt: skip
    parser.add_argument(
        "--retain-eval", default=None,
        help="result JSON of the retain model (ours or open-unlearning's *_EVAL.json) for forget_quality/privleak.",
    )  # fmt: skip
    parser.add_argument(
        "--reference-model", default=None,
        help="model dir of the mia_reference attack (open-unlearning: the retain model); without it that "
        "attack is left out.",
    )  # fmt: skip
    parser.add_argument(
        "--mia-attacks", default=None,
        help="comma-separated MIA attacks (loss,zlib,reference,min_k,min_k_plus_plus,gradnorm; default all "
        "but gradnorm, which takes a backward pass per sample, for TOFU; min_k only for MUSE, as open-unlearning; "
        "min_k always runs: privleak is built on it).",
    )  # fmt: skip
    for which, default in (("forget", "closer_to_1_better"), ("utility", "true_better")):
        parser.add_argument(
            f"--{which}-truth-ratio", default=default, choices=("closer_to_1_better", "true_better", "prob_mean"),
            help=f"TOFU: aggregator of the {which} truth ratio (default {default}; docs/METRICS.md).",
        )  # fmt: skip
    parser.add_argument("--out", default=None, help="result JSON to write (default eval_results/<name>.json).")
    parser.add_argument("--name", default=None, help="model name in the result/report (default: model dir name).")
    parser.add_argument("--role", choices=("method", "target", "retain"), default=None,
                        help="mark the target / retain model for the report.")  # fmt: skip
    parser.add_argument("--step", type=int, default=None, help="training step of this checkpoint (trajectories).")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help="TOFU answer length (default 200); MUSE VerbMem length (default 128).")  # fmt: skip
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="only the first N rows of every split (quick check).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="parameter and compute dtype of the evaluated model (logits and scores stay float32); "
                             "default the backend's: float32 on CPU, bfloat16 on GPU/TPU (as open-unlearning "
                             "evaluates).")  # fmt: skip
    parser.add_argument("--scan-layers", choices=("true", "false"), default=None,
                        help="run the decoder blocks as one scan over stacked weights (one block compiled, not one "
                             "per layer; the same scores); default the backend's (`Backend.eval_scan_layers`).")


def _dtype(name: str | None):
    import jax.numpy as jnp

    from ngdiff_jax.backends import for_platform

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name or for_platform().compute]


def _scan_layers(flag: str | None) -> bool | None:
    """`from_pretrained`'s ``scan_layers``: the flag, else the backend's default where the model's
    blocks allow it (``None``)."""
    from ngdiff_jax.backends import for_platform

    if flag is None:
        return None if for_platform().eval_scan_layers else False
    return flag == "true"


def run(args) -> int:
    name = args.name or Path(str(args.model).rstrip("/")).name
    out = Path(args.out) if args.out else Path("eval_results") / f"{name}.json"
    from ngdiff_jax.data import read_format as _read_format
    from ngdiff_jax.training.validation import validate_eval

    try:
        _saved = _read_format(args.model) if Path(str(args.model)).is_dir() else None
    except (OSError, ValueError):
        _saved = None  # reported by resolve_format below
    # every input checked before the model is loaded or anything is evaluated (exit code 2)
    validate_eval(args, args.forget_split or (_saved or {}).get("forget_split") or "forget10")
    with _result_lock(out):
        return _load_and_evaluate(args, name, out)


def _load_and_evaluate(args, name: str, out: Path) -> int:
    from transformers import AutoTokenizer

    from ngdiff_jax.evaluation.tofu import DEFAULT_MIA_ATTACKS, MIA_ATTACKS
    from ngdiff_jax.models import from_pretrained

    attacks = DEFAULT_MIA_ATTACKS
    if args.mia_attacks is not None:
        attacks = tuple(a.strip() for a in args.mia_attacks.split(",") if a.strip())
        bad = [a for a in attacks if a not in MIA_ATTACKS]
        if bad:
            print(f"error: --mia-attacks: unknown {bad}; choose from {','.join(MIA_ATTACKS)}.", file=sys.stderr)
            return 2
    try:
        dt = _dtype(args.dtype)
        scan = _scan_layers(args.scan_layers)
        model = from_pretrained(args.model, dtype=dt, param_dtype=dt, scan_layers=scan)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        # the reference model in the evaluated model's dtype (open-unlearning evaluates both alike)
        reference_model = (from_pretrained(args.reference_model, dtype=dt, param_dtype=dt, scan_layers=scan)
                           if args.reference_model else None)  # fmt: skip
    except (OSError, ValueError) as e:
        print(f"error: cannot load model/tokenizer from {args.model} (or --reference-model): {e}", file=sys.stderr)
        return 2
    from ngdiff_jax.data import load_format, read_format
    from ngdiff_jax.training.data_assembly import resolve_format

    try:
        spec = load_format(args.format) if args.format else None
        spec = resolve_format(spec, str(args.model), allow_change=args.allow_format_change, what="--format")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    saved = read_format(args.model) if Path(str(args.model)).is_dir() else None
    forget_split = args.forget_split or (saved or {}).get("forget_split") or "forget10"
    meta = {"model": str(args.model), "format": spec.to_dict(), "forget_split": forget_split}
    if args.role:
        meta["role"] = args.role
    if args.step is not None:
        meta["step"] = args.step
    return _evaluate(args, model, tokenizer, reference_model, spec, forget_split, meta, attacks, name, out)


@contextlib.contextmanager
def _result_lock(out: Path):
    """Hold an exclusive lock on ``.<out>.lock`` while evaluating: a second ``ngdiff eval`` into the
    same ``--out`` stops at once instead of one result silently replacing the other."""
    import fcntl

    from ngdiff_jax.errors import OutputDirBusy

    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirBusy(f"--out {out}: another ngdiff eval is writing this result now; wait for it or "
                                "pass another --out.") from None  # fmt: skip
        yield
        with contextlib.suppress(OSError):
            os.unlink(lock)
    finally:
        os.close(fd)


def _evaluate(args, model, tokenizer, reference_model, spec, forget_split, meta, attacks, name, out) -> int:
    from ngdiff_jax.data import QAFormatter

    if args.benchmark == "lm-eval":
        return _evaluate_lm_eval(args, model, tokenizer, meta, name, out)
    if args.benchmark == "tofu":
        from ngdiff_jax.evaluation.tofu import TOFU_MAX_NEW_TOKENS, evaluate_tofu

        result = evaluate_tofu(
            model, tokenizer, args.data, forget_split=forget_split, formatter=QAFormatter(tokenizer, spec=spec),
            retain_reference=args.retain_eval, batch_size=args.batch_size,
            max_new_tokens=TOFU_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
            limit=args.limit, name=name, meta=meta,
            reference_model=reference_model, mia_attacks=attacks,
            forget_truth_ratio=args.forget_truth_ratio, utility_truth_ratio=args.utility_truth_ratio,
        )  # fmt: skip
    else:
        from ngdiff_jax.evaluation.muse import VERBMEM_MAX_NEW_TOKENS, evaluate_muse

        result = evaluate_muse(
            model, tokenizer, args.data, retain_reference=args.retain_eval, batch_size=args.batch_size,
            verbmem_max_new_tokens=VERBMEM_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
            limit=args.limit,
            name=name, meta=meta, reference_model=reference_model,
            mia_attacks=("min_k",) if args.mia_attacks is None else attacks,
        )  # fmt: skip
    if args.robustness:
        _add_robustness(args, model, tokenizer, spec, forget_split, result)
    path = result.save(out)
    missing = [k for k in REQUIRED[args.benchmark] if result.aggregates.get(k) is None]
    if missing:
        print(f"error: {', '.join(missing)} came out NaN or empty for {args.model} (result kept in {path}): the "
              "model's scores are not finite; check its weights and --dtype (bfloat16 overflow).",
              file=sys.stderr)  # fmt: skip
        return 1
    summary = {k: result.aggregates.get(k) for k in HEADLINE[args.benchmark]}
    summary["compile_s"] = result.timings.get("total_compile_s")
    summary["run_s"] = result.timings.get("total_run_s")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    def counted(v):  # a count, or a dict of counts per phase: only what is not zero
        return {p: n for p, n in v.items() if n} if isinstance(v, dict) else v

    cuts = {k: counted(result.meta[k]) for k in ("truncated_examples", "truncated_prompts", "knowmem_prompts_cut")
            if counted(result.meta.get(k))}  # fmt: skip
    if cuts:
        print(f"warning: inputs cut to fit the context / open-unlearning's limits: {cuts} (meta of {path})",
              file=sys.stderr)  # fmt: skip
    return 0


def _evaluate_lm_eval(args, model, tokenizer, meta, name, out) -> int:
    """lm-eval's tasks (`ngdiff_jax.integrations.lm_harness`) into our result JSON."""
    from ngdiff_jax.integrations.lm_harness import evaluate_lm_eval

    tasks = [t.strip() for t in str(args.tasks).split(",") if t.strip()]
    meta = {k: v for k, v in meta.items() if k not in ("format", "forget_split")}  # TOFU's prompt format: unused
    result = evaluate_lm_eval(model, tokenizer, tasks, include_path=args.lm_eval_include, num_fewshot=args.num_fewshot,
                              limit=args.limit, batch_size=args.batch_size, name=name, meta=meta)  # fmt: skip
    path = result.save(out)
    missing = sorted(k for k, v in result.aggregates.items() if v is None and not k.endswith("_stderr"))
    if not result.aggregates or missing:
        print(f"error: lm-eval gave no finite value for {', '.join(missing) or 'any metric'} of {args.model} (result "
              f"kept in {path}); check the model's weights and --dtype.", file=sys.stderr)  # fmt: skip
        return 1
    print(json.dumps({k: v for k, v in result.aggregates.items() if not k.endswith("_stderr")}, indent=2))
    print(f"wrote {path}")
    return 0


def _add_robustness(args, model, tokenizer, spec, forget_split, result) -> None:
    """The robustness checks (`ngdiff_jax.evaluation.robustness`) on the forget split's rows, into
    ``result``: ``robust_*`` aggregates and the whole record under ``meta["robustness"]``."""
    from ngdiff_jax.data import QAFormatter, load_tofu
    from ngdiff_jax.evaluation.robustness import parse_checks, robustness_aggregates, robustness_checks
    from ngdiff_jax.evaluation.tofu import TOFU_MAX_NEW_TOKENS
    from ngdiff_jax.paths import shared_data_dir

    rows = load_tofu(f"{forget_split}_perturbed", args.data or shared_data_dir() / "tofu")
    rows = rows[: args.limit] if args.limit else rows
    rec = robustness_checks(
        model, tokenizer, rows, QAFormatter(tokenizer, spec=spec), checks=parse_checks(args.robustness),
        relearn_steps=args.relearn_steps or RELEARN_STEPS, relearn_lr=args.relearn_lr or RELEARN_LR,
        batch_size=args.batch_size,
        max_new_tokens=TOFU_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
    )  # fmt: skip
    result.aggregates.update(robustness_aggregates(rec))
    result.meta["robustness"] = rec
