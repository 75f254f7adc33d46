"""LoRA in the finetune/unlearn pipelines (``lora.*`` keys, see ``config_schema.LoraSection``).

The pipelines build their step from an ``apply_fn(params, input_ids, attention_mask)`` as
usual; :meth:`LoraRun.bind` turns that step factory into a step over the *adapters* with the
frozen base as one more (not donated, not differentiated) argument::

    step(adapters, opt_state, *args, base)  ==  make_step(apply_with(base))(adapters, opt_state, *args)

so gradients, the optimizer state and the NGDiff/MGDA/PCGrad norms cover only the adapters,
and the base arrays are never written (they stay bit-identical, in whatever dtype they were
loaded). The reference model of NPO/KL is the base with a copy of the initial adapters
(which are zero in ``B``: the model before unlearning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ngdiff_jax.models import lora, stacked


class LoraRun:
    """A loaded model with adapters attached for one run."""

    def __init__(self, model, section, *, seed: int = 0):
        self.spec = section.spec(model.config.model_type)  # unknown targets for this family: error
        lora.attach(model, self.spec, seed=seed)
        self.model = model
        # apply_fn takes {"base": ..., "lora": ...}; a scanned model (run.scan_layers): both trees
        # stacked on the layer axis, the base frozen, and the model keeps its structure only
        self.stacked = model.scan_layers
        self.apply_fn, self.base, self.adapters = lora.split(model, release=self.stacked)

    def _per_block(self, adapters, *, host: bool = False):
        """``(base, adapters)`` in the per-block layout the merge and PEFT export read (``host``:
        the base as views of the stacked arrays, no copy, for the export)."""
        if not self.stacked:
            return self.base, adapters
        return stacked.unstack(self.base, host=host), stacked.unstack(adapters)

    @property
    def frozen(self) -> tuple:
        """Extra step arguments after the pipeline's own: ``(base,)``."""
        return (self.base,)

    def bind(self, make_step):
        """``make_step(apply_fn) -> step(params, opt_state, *args)`` to
        ``step(adapters, opt_state, *args, base)`` (see the module doc)."""
        pair_apply = self.apply_fn

        def step(adapters, opt_state, *args):
            *args, base = args

            def on_adapters(fn):
                return lambda params, *a, **kw: fn({"base": base, "lora": params}, *a, **kw)

            return make_step(pair_apply.map(on_adapters))(adapters, opt_state, *args)

        return step

    def eval_params(self, adapters) -> dict[str, Any]:
        """What ``self.apply_fn`` takes for the adapters ``adapters``."""
        return {"base": self.base, "lora": adapters}

    def wrap_eval(self, eval_fn):
        """An ``eval_fn(step, params)`` built on ``self.apply_fn`` made to take the loop's adapters."""
        if eval_fn is None:
            return None
        return lambda step, adapters: eval_fn(step, self.eval_params(adapters))

    def merged_params(self, adapters):
        """Full model params (base with the adapters merged), for hooks written for the plain model."""
        return lora.merge_params(self.model, *self._per_block(adapters), self.spec)

    def export(
        self, adapters, out: Path, tokenizer, *, base_model: str | None, model_dir=None, adapter_dir=None,
        card: dict | None = None, dtype=None,
    ) -> tuple[Path, Path]:
        """Merged model to ``out/model`` (``save_pretrained``), PEFT adapter to ``out/adapter``
        (or to ``model_dir``/``adapter_dir``: the pipelines pass temporary dirs swapped in atomically)."""
        from ngdiff_jax import models

        model_dir = Path(model_dir) if model_dir is not None else Path(out) / "model"
        adapter_dir = Path(adapter_dir) if adapter_dir is not None else Path(out) / "adapter"
        stats: dict = {}
        base, adapters = self._per_block(adapters, host=True)
        # lazily merged: each tensor is made when it is written, so the export never holds a
        # second model (a float32 export of a bfloat16 base would otherwise hold 2x the base)
        merged = lora.merged_model(self.model, base, adapters, self.spec, dtype=dtype, stats=stats, lazy=True)
        del base
        if stats["update_lost"] > 0.1:  # the merged weights would silently miss part of the unlearning
            import sys

            name = np.dtype(merged.param_dtype).name
            print(f"warning: rounding the merged model to {name} loses {stats['update_lost']:.0%} of the LoRA "
                  "update (relative norm); the PEFT adapter is exact. Set precision.export=float32 for an "
                  "exact merged model.", file=sys.stderr)
        self.last_export_stats = stats
        if card is not None:
            lora_txt = (f"LoRA rank {self.spec.rank}, alpha {self.spec.alpha:g} on "
                        f"{', '.join(self.spec.targets)}, merged into the weights")
            card = {**card, "method": "; ".join(x for x in (card.get("method"), lora_txt) if x)}
        models.save_pretrained(merged, model_dir, tokenizer=tokenizer, card=card)
        del merged
        lora.save_peft_adapter(self.model, adapters, self.spec, adapter_dir, base_model_name_or_path=base_model)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(adapter_dir))
        return model_dir, adapter_dir

    def summary(self) -> dict[str, Any]:
        out = {
            "rank": self.spec.rank,
            "alpha": self.spec.alpha,
            "targets": list(self.spec.targets),
            "trainable_params": lora.count_params(self.adapters),
            "base_params": lora.count_params(self.base),
        }
        stats = getattr(self, "last_export_stats", None)
        if stats:  # the share of the adapter update the merged export's rounding lost
            out["merged_update_lost"] = stats["update_lost"]
        return out
