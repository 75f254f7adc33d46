"""The study's inputs: the training splits and TOFU subset written beside the benchmark, epochs as
steps, and the target and retain models trained on them."""

from __future__ import annotations

from pathlib import Path

from ngdiff_jax.demo.config import TRAIN_SPLITS, DemoConfig
from ngdiff_jax.training.config_schema import DataConfig


def write_training_splits(
    tofu_dir: Path, forget_split: str, general_repeats: int
) -> dict[str, str]:
    """``demo_target_train`` / ``demo_retain_train``: QA rows plus the general-knowledge questions."""
    from ngdiff_jax.data import RETAIN_FOR_FORGET, load_tofu, write_jsonl

    if general_repeats < 0:
        raise ValueError(f"train.general_repeats must be >= 0, got {general_repeats}.")
    if forget_split not in RETAIN_FOR_FORGET:
        raise ValueError(
            f"benchmark.forget_split must be one of {sorted(RETAIN_FOR_FORGET)}, got {forget_split!r}."
        )
    general = [
        {"question": r["question"], "answer": r["answer"]}
        for split in ("world_facts", "real_authors")
        for r in load_tofu(split, tofu_dir)
    ]
    splits = TRAIN_SPLITS
    sources = {"target": "full", "retain": RETAIN_FOR_FORGET[forget_split]}
    for role, name in splits.items():
        rows = [
            {"question": r["question"], "answer": r["answer"]}
            for r in load_tofu(sources[role], tofu_dir)
        ]
        write_jsonl(tofu_dir / f"{name}.json", rows + general * general_repeats)
    return splits


def write_tofu_subset(cfg: DemoConfig, dest: Path) -> dict[str, str]:
    """The real-TOFU study's files in ``dest``: training splits (forget authors + the first
    ``retain_authors`` retain authors; retain authors alone), the forget split, and the
    evaluation splits cut to ``eval_rows`` rows (``retain_perturbed`` keeps only questions of
    trained retain authors, spread evenly over them)."""
    from ngdiff_jax.data import HOLDOUT_FOR_FORGET, RETAIN_FOR_FORGET, load_tofu, write_jsonl
    from ngdiff_jax.training.data_assembly import resolve_source

    b = cfg.benchmark
    if b.forget_split not in RETAIN_FOR_FORGET:
        raise ValueError(
            f"benchmark.forget_split must be one of {sorted(RETAIN_FOR_FORGET)}, got {b.forget_split!r}."
        )
    src = resolve_source(b.source)
    full = load_tofu("full", src)
    forget = load_tofu(b.forget_split, src)
    forget_q = {r["question"] for r in forget}
    retain_pool = [r for r in full if r["question"] not in forget_q]
    n_retain = len(retain_pool) if b.retain_authors is None else 20 * b.retain_authors
    if n_retain < 20 or n_retain > len(retain_pool):
        raise ValueError(
            f"benchmark.retain_authors={b.retain_authors}: choose 1..{len(retain_pool) // 20} (20 questions each)."
        )
    retain = retain_pool[:n_retain]
    qa = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731
    dest.mkdir(parents=True, exist_ok=True)
    write_jsonl(dest / f"{TRAIN_SPLITS['target']}.json", qa(retain + forget))
    write_jsonl(dest / f"{TRAIN_SPLITS['retain']}.json", qa(retain))
    write_jsonl(dest / f"{b.forget_split}.json", forget)

    def cut(rows):
        if b.eval_rows is None or len(rows) <= b.eval_rows:
            return rows
        step = len(rows) / b.eval_rows
        return [rows[int(i * step)] for i in range(b.eval_rows)]

    trained = {r["question"] for r in retain}
    retain_eval = [r for r in load_tofu("retain_perturbed", src) if r["question"] in trained]
    if not retain_eval:
        raise ValueError(
            "none of TOFU's retain_perturbed questions (its first 20 authors) is among the trained retain "
            "authors; benchmark.retain_authors must be >= 1."
        )
    write_jsonl(dest / "retain_perturbed.json", cut(retain_eval))
    first = lambda rows, n=b.eval_rows: rows if n is None else rows[:n]  # noqa: E731
    n_forget = b.eval_rows if b.forget_eval_rows is None else b.forget_eval_rows
    write_jsonl(dest / f"{b.forget_split}_perturbed.json",
                first(load_tofu(f"{b.forget_split}_perturbed", src), n_forget))  # fmt: skip
    holdout = HOLDOUT_FOR_FORGET[b.forget_split]
    write_jsonl(dest / f"{holdout}.json", first(load_tofu(holdout, src), n_forget))
    for split in ("real_authors_perturbed", "world_facts_perturbed"):
        write_jsonl(dest / f"{split}.json", first(load_tofu(split, src)))
    return dict(TRAIN_SPLITS)


def train_steps(cfg: DemoConfig, role: str) -> int:
    t = cfg.train
    return t.retain_steps if role == "retain" and t.retain_steps is not None else t.steps


def _epochs_to_steps(epochs: float, rows: int, batch_size: int) -> int:
    """Steps of ``epochs`` passes over ``rows`` rows at ``batch_size`` per step (the last batch of
    an epoch may be short, as the Trainer's: ``ceil(rows / batch)`` steps per epoch)."""
    import math

    return max(1, round(epochs * math.ceil(rows / batch_size)))


def resolve_epochs(cfg: DemoConfig, tofu_dir: Path, train_splits: dict) -> DemoConfig:
    """``cfg`` with ``train.epochs`` / ``unlearn.epochs`` turned into step counts of this data."""
    import dataclasses

    from ngdiff_jax.data import load_tofu

    if cfg.train.epochs is not None:
        n = {role: len(load_tofu(split, tofu_dir)) for role, split in train_splits.items()}
        t = cfg.train
        train = dataclasses.replace(t, steps=_epochs_to_steps(t.epochs, n["target"], t.batch_size), epochs=None,
                                    retain_steps=_epochs_to_steps(t.epochs, n["retain"], t.batch_size))  # fmt: skip
        cfg = dataclasses.replace(cfg, train=train)
    if cfg.unlearn.epochs is not None:
        u = cfg.unlearn
        rows = len(load_tofu(cfg.benchmark.forget_split, tofu_dir))
        steps = _epochs_to_steps(u.epochs, rows, u.batch_size)
        cfg = dataclasses.replace(cfg, unlearn=dataclasses.replace(u, steps=steps, epochs=None))
    return cfg


def data_config(spec, **fields) -> DataConfig:
    return DataConfig(
        batch_size=spec.batch_size, max_length=spec.max_length, buckets=spec.buckets, **fields
    )


def train_model(
    cfg: DemoConfig, role: str, split: str, tofu_dir: Path, tok_dir: Path | None, out: Path, progress: bool
):
    from ngdiff_jax.training import run_finetune
    from ngdiff_jax.training.config_schema import FinetuneConfig, RunConfig

    ft = FinetuneConfig(
        model=None if cfg.model_path else cfg.model,
        model_path=cfg.model_path,
        tokenizer=None if tok_dir is None else str(tok_dir),
        data=data_config(cfg.train, source=str(tofu_dir), split=split),
        format=cfg.format,
        optim=cfg.train.optim,
        precision=cfg.train.precision,
        run=RunConfig(
            output_dir=str(out / "runs" / role),
            steps=train_steps(cfg, role),
            seed=cfg.seed,
            micro_batches=cfg.train.micro_batches,
            remat=cfg.train.remat,
            checkpoint_every=0,
            log_every=10,
            progress=progress,
        ),
    )
    _, summary = run_finetune(ft)
    return summary
