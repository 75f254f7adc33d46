"""lm-evaluation-harness on ngdiff-jax models: the ``ngdiff`` model type.

`NgdiffLM` is an ``lm_eval`` model (``lm_eval.api.model.TemplateLM``) backed by our JAX model
and evaluation engine: ``loglikelihood`` and ``loglikelihood_rolling`` run through
`ngdiff_jax.evaluation.scoring.Scorer` (batched, few compiled shapes, a context shared by several
continuations encoded once, as TOFU's answers are), ``generate_until`` through
`ngdiff_jax.evaluation.generation.generate_texts` (batched greedy decoding with a KV cache).
Importing this module registers it as ``ngdiff``::

    ngdiff-lm-eval --model ngdiff --model_args pretrained=DIR --tasks arc_easy   # lm_eval's CLI
    ngdiff eval --benchmark lm-eval --tasks arc_easy --model DIR                 # our result JSON

or from Python, ``lm_eval.simple_evaluate(model=NgdiffLM(pretrained=DIR), tasks=[...],
task_manager=task_manager())``: `task_manager` indexes lm-eval's task files once per process
(about 6 s each time otherwise), so evaluating several models or checkpoints pays it once.
``lm-eval`` is the optional extra ``ngdiff-jax[lm-eval]``.

What equals lm-eval's own transformers backend (``--model hf``; tests/test_lm_harness.py): the
tokenization (``TemplateLM``'s context/continuation split, the tokenizer's own special tokens),
each continuation's log-likelihood and greedy flag, the rolling windows of
``loglikelihood_rolling`` and greedy generation cut at ``until``. Where we differ, on purpose:

* a row longer than the model's context keeps its last ``max_length`` tokens; lm-eval's HF
  backend keeps ``max_length + 1`` (it never runs the last one) — one context token more, so
  values differ only for rows that had to be cut (rolling windows are ``max_length`` tokens for
  the same reason, lm-eval's ``max_length + 1``);
* generation is greedy only: a request asking to sample (``do_sample=True`` or
  ``temperature > 0``) fails naming the task's key, instead of silently decoding greedily.

Nothing downloads: ``pretrained`` is a local HF directory (``ngdiff convert``,
``save_pretrained``), as for ``ngdiff eval``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "the lm-evaluation-harness adapter needs the package lm-eval: pip install 'ngdiff-jax[lm-eval]' "
        f"(lm-eval==0.4.13) ({e})"
    ) from e

__all__ = ["DEFAULT_BATCH_SIZE", "NgdiffLM", "evaluate_lm_eval", "main", "task_manager"]

#: rows per compiled scoring batch when ``batch_size`` is not given (or ``auto``)
DEFAULT_BATCH_SIZE = 16
#: lm-eval's default ``max_gen_toks`` (its HF backend's)
MAX_GEN_TOKS = 256


def _positive_int(key: str, value) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"--model_args {key}={value!r}: expected a positive integer.")
    return int(text)


@register_model("ngdiff")
class NgdiffLM(TemplateLM):
    """An ngdiff-jax `CausalLM` as an lm-eval model.

    Args:
      pretrained: a local HF model directory (ours: ``save_pretrained`` / ``ngdiff convert``).
      tokenizer: tokenizer directory (default ``pretrained``).
      dtype: ``float32`` / ``bfloat16`` parameters and compute (default the backend's: float32 on
        CPU, bfloat16 on accelerators); scores are float32.
      batch_size: rows per compiled batch (``auto``: `DEFAULT_BATCH_SIZE`).
      max_length: context length (default the model's ``max_position_embeddings``).
      max_gen_toks: default new tokens of ``generate_until`` (a task's ``max_gen_toks`` wins).
      model, tokenizer_obj: an already built `CausalLM` and tokenizer instead of ``pretrained``
        (e.g. a model being unlearned, evaluated in the same process).
      mesh: a mesh preset (``fsdp``, ``dp``, ``fsdp_tensor``; `ngdiff_jax.parallel`): the weights
        are streamed into their shardings over every device and each compiled scoring and decoding
        program runs sharded (XLA's SPMD partitioning follows the weights); default one device.
      device, max_batch_size: accepted for lm-eval's CLI, which always passes them; JAX places the
        model on its default device (``JAX_PLATFORMS`` picks the platform).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        dtype: str | None = None,
        batch_size: int | str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = MAX_GEN_TOKS,
        mesh: str | None = None,
        *,
        model=None,
        tokenizer_obj=None,
        device: str | None = None,
        max_batch_size: int | str | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(
                f"--model_args {key}={unknown[key]!r}: the ngdiff model takes pretrained, tokenizer, dtype, "
                "batch_size, max_length, max_gen_toks, mesh; remove it."
            )
        del device, max_batch_size
        if model is None:
            if not pretrained:
                raise ValueError("--model_args pretrained=DIR is required: a local HF model directory.")
            model, tokenizer_obj = _load(pretrained, tokenizer, dtype, mesh)
        elif mesh is not None:
            raise ValueError("NgdiffLM(model=..., mesh=...): a built model keeps its own placement; shard it when "
                             "building it (models.from_pretrained(mesh=...)) and leave mesh out.")  # fmt: skip
        elif tokenizer_obj is None:
            raise ValueError("NgdiffLM(model=...) needs tokenizer_obj= (the model's tokenizer).")
        self.model, self.tokenizer = model, tokenizer_obj
        self.batch_size_per_gpu = (DEFAULT_BATCH_SIZE if batch_size in (None, "auto")
                                   else _positive_int("batch_size", batch_size))  # fmt: skip
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._max_length = _positive_int("max_length", max_length) if max_length is not None else int(context or 2048)
        if context is not None and self._max_length > int(context):
            raise ValueError(f"--model_args max_length={self._max_length}: the model's context is {context} "
                             "positions; use at most that.")  # fmt: skip
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)

    # ------------------------------------------------------------------ tokenization
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; lm-eval needs one (end of text).")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id  # as lm-eval's HF backend

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """lm-eval's HF backend's encoding: the tokenizer's own special tokens, none when the string
        already starts with the BOS text (``add_special_tokens=None``)."""
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode([self.prefix_token_id]) or "\0"):
            kw["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **kw))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)

    # ------------------------------------------------------------------ scoring
    def _scorer(self):
        from ngdiff_jax.evaluation.scoring import Scorer

        return Scorer(self.model, batch_size=self.batch_size_per_gpu, max_length=self._max_length)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(sum of the continuation's log-probs, whether greedy decoding gives it)`` per request
        ``((context, continuation), context_ids, continuation_ids)``."""
        if not requests:
            return []
        examples = []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("lm-eval asked for the log-likelihood of an empty continuation.")
            if len(cont) >= self._max_length:  # it would be scored in part: a wrong number, refused
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the context of {self._max_length} "
                                 "tokens with one token to condition on; shorten the task's continuations or raise "
                                 "--model_args max_length (up to the model's context).")  # fmt: skip
            whole = (list(ctx) + list(cont))[-self._max_length:]
            n = min(len(cont), len(whole) - 1)  # the first token of a row is never scored
            labels = [-100] * (len(whole) - n) + whole[len(whole) - n:]
            examples.append((np.asarray(whole, np.int32), np.asarray(labels, np.int32)))
        scores = self._scorer().score(examples, phase="lm_eval_loglikelihood")
        out = []
        for lp, cor in zip(scores.token_logprobs, scores.correct):
            out.append((float(np.sum(lp, dtype=np.float64)), bool(np.all(cor))))
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in disjoint windows of ``max_length`` tokens (each
        window's first token conditioned on the window before it; the text's first on BOS)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length - 1, context_len=1)):  # fmt: skip
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += ll
        for req, ll in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), ll)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ngdiff_jax.evaluation.generation import generate_texts

        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_gen = int(kw.pop("max_gen_toks"))
            if kw.pop("do_sample", False) or float(kw.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError(
                    f"task {getattr(req, 'task_name', '?')}: generation_kwargs ask to sample (do_sample/temperature); "
                    "the ngdiff model decodes greedily only: set do_sample: false in the task's generation_kwargs."
                )
            if max_gen >= self._max_length:
                raise ValueError(f"task {getattr(req, 'task_name', '?')}: max_gen_toks={max_gen} leaves no room for "
                                 f"a prompt in the context of {self._max_length} tokens.")  # fmt: skip
            settings.append((context, until))
            groups.setdefault((max_gen,), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for (max_gen,), idx in groups.items():
            prompts = [self.tok_encode(settings[i][0]) for i in idx]
            texts = generate_texts(
                self.model, self.tokenizer, prompts, max_new_tokens=max_gen, batch_size=self.batch_size_per_gpu,
                max_length=self._max_length, decode=self.tok_decode,
            )  # fmt: skip
            for i, text in zip(idx, texts):
                for term in settings[i][1]:
                    if term:
                        text = text.split(term)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


def _offline() -> None:
    """No task data from the network: lm-eval's datasets come from the local cache or local files."""
    import os

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):  # pragma: no cover - older layouts read the variables
        pass


def task_manager(include_path: str | None = None):
    """lm-eval's ``TaskManager`` with the task YAMLs under ``include_path`` added, built once per
    process and state of that folder: indexing lm-eval's built-in task YAMLs takes about 6 s on
    2 cores at every construction. The cache key holds the path, size and modification time of
    every ``*.yaml``/``*.yml`` file under ``include_path`` (or of that file), so an added, edited
    or removed task file gives a new index."""
    if not include_path:
        return _task_manager(None, ())
    root = Path(include_path).expanduser().resolve()
    found = [root] if root.is_file() else root.rglob("*")
    files = tuple(sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in found
                         if f.suffix in (".yaml", ".yml") and f.is_file()))  # fmt: skip
    return _task_manager(str(root), files)


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, files: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def _tasks(tasks: Sequence[str], include_path: str | None):
    """lm-eval's task manager and the tasks' names, or a one-line error naming an unknown task."""
    from ngdiff_jax.errors import InputError

    tm = task_manager(include_path)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known and not tm.match_tasks([t])]
    if unknown:
        raise InputError(f"--tasks {unknown[0]}: lm-eval knows no such task or group (lm-eval {_version()}); "
                         "list them with `lm_eval ls tasks`, or pass a task YAML's folder with --lm-eval-include.")
    return tm


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")


def evaluate_lm_eval(model, tokenizer, tasks: Sequence[str], *, include_path: str | None = None,
                     num_fewshot: int | None = None, limit: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     name: str = "model", meta: dict | None = None):
    """lm-eval ``tasks`` on ``model`` (offline) as an `ngdiff_jax.evaluation.results.EvalResult`:
    aggregates ``<task>/<metric>`` and ``<task>/<metric>_stderr`` (lm-eval's filter ``none``
    dropped from the key; other filters kept as ``<metric>,<filter>``), lm-eval's whole results
    and configs under ``meta["lm_eval"]``. A task whose data are not in the local cache fails at
    once (`ngdiff_jax.errors.InputError`, one line naming the task)."""
    import lm_eval

    from ngdiff_jax.errors import InputError
    from ngdiff_jax.evaluation.batching import Stopwatch
    from ngdiff_jax.evaluation.results import EvalResult

    _offline()
    tm = _tasks(tasks, include_path)
    lm = NgdiffLM(model=model, tokenizer_obj=tokenizer, batch_size=batch_size)
    try:  # lm-eval loads every task's data before the model's first call
        with Stopwatch() as sw:
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, num_fewshot=num_fewshot,
                                          limit=limit, log_samples=False)  # fmt: skip
    except OSError as e:  # offline: ConnectionError (not in the cache), FileNotFoundError (a local file)
        raise InputError(
            f"--tasks {','.join(tasks)}: lm-eval could not load the task data offline ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); put the dataset in the local Hugging Face cache on a "
            "connected machine (datasets.load_dataset with the task's dataset_path/dataset_name) or point a task "
            "YAML at local files (dataset_path: json) and pass its folder with --lm-eval-include."
        ) from None
    agg = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            label = metric if filt in ("", "none") else f"{metric},{filt}"
            agg[f"{task}/{label}"] = None if value != value else float(value)  # NaN -> None
    info = dict(meta or {})
    info["lm_eval"] = {"version": _version(), "tasks": list(tasks), "num_fewshot": num_fewshot, "limit": limit,
                       "results": out["results"], "n-shot": out.get("n-shot"), "versions": out.get("versions")}
    return EvalResult(name=name, benchmark="lm-eval", aggregates=agg, meta=info,
                      timings={"total_run_s": round(sw.seconds, 3)})


def _load(pretrained: str, tokenizer: str | None, dtype: str | None, mesh: str | None = None):
    from pathlib import Path

    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from ngdiff_jax.backends import for_platform
    from ngdiff_jax.models import from_pretrained

    if not Path(pretrained).is_dir():
        raise ValueError(f"--model_args pretrained={pretrained!r}: not a local model directory (nothing is "
                         "downloaded; convert or save one: ngdiff convert / save_pretrained).")  # fmt: skip
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype is not None and dtype not in names:
        raise ValueError(f"--model_args dtype={dtype!r}: use float32 or bfloat16.")
    dt = names[dtype or for_platform().compute]
    placement = {}
    if mesh is not None:
        from ngdiff_jax.parallel import PRESET_NAMES, make_mesh, preset_config, resolve_rules

        if mesh not in PRESET_NAMES:
            raise ValueError(f"--model_args mesh={mesh!r}: use one of {', '.join(PRESET_NAMES)}.")
        placement = {"mesh": make_mesh(mesh), "rules": resolve_rules(preset_config(mesh).rules)}
    model = from_pretrained(pretrained, dtype=dt, param_dtype=dt, **placement)
    return model, AutoTokenizer.from_pretrained(tokenizer or pretrained)


def main(argv: Any = None) -> None:
    """``ngdiff-lm-eval``: lm-eval's command line with the ``ngdiff`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["ngdiff-lm-eval", *argv]
    cli_evaluate()
