"""The PyTorch side of the benchmark: transformers' ``LlamaForCausalLM`` with torch autograd,
the same NGDiff arithmetic and Adam update, and transformers' greedy ``generate``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def load_hf_model(model_dir: str | Path, device: str, dtype: str):
    """The HF model from a directory written by ``ngdiff_jax.models.save_pretrained``
    (so the weights are exactly the JAX model's)."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = None
    return model


def torch_batch(batch: dict[str, np.ndarray], device: str) -> dict:
    import torch

    return {k: torch.from_numpy(np.asarray(v, np.int64)).to(device) for k, v in batch.items()}


class TorchNGDiffStep:
    """One NGDiff unlearning step in PyTorch, the arithmetic of ngdiff-jax's ``ngdiff`` method
    with a fixed rate: gradient ascent on the forget batch (loss ``-NLL``) and NLL on the retain
    batch, each by its own forward and ``torch.autograd.grad``; ``d = g_r/|g_r| + g_f/|g_f|``
    with global L2 norms; Adam on ``d``. Written with torch's multi-tensor (``_foreach``) kernels,
    the fastest eager form.
    """

    def __init__(self, model, forget_batch, retain_batch, *, lr: float = 1e-5, eps: float = 1e-12,
                 autocast_dtype=None):
        import torch

        self.torch = torch
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
        self.fb, self.rb = forget_batch, retain_batch
        self.eps = eps
        self.autocast_dtype = autocast_dtype
        self.device_type = next(model.parameters()).device.type

    def _loss(self, batch):
        torch = self.torch
        if self.autocast_dtype is not None:
            with torch.autocast(self.device_type, dtype=self.autocast_dtype):
                return self.model(**batch).loss
        return self.model(**batch).loss

    def _global_norm(self, grads):
        torch = self.torch
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def step(self) -> dict[str, float]:
        torch = self.torch
        forget_loss = -self._loss(self.fb)
        g_f = torch.autograd.grad(forget_loss, self.params)
        retain_loss = self._loss(self.rb)
        g_r = torch.autograd.grad(retain_loss, self.params)
        forget_loss, retain_loss = forget_loss.detach(), retain_loss.detach()
        with torch.no_grad():
            n_f = self._global_norm(g_f)
            n_r = self._global_norm(g_r)
            w_f = torch.where(n_f > 0, 1.0 / (n_f + self.eps), torch.zeros_like(n_f))
            w_r = torch.where(n_r > 0, 1.0 / (n_r + self.eps), torch.zeros_like(n_r))
            d = torch._foreach_mul(g_r, w_r)
            torch._foreach_add_(d, torch._foreach_mul(g_f, w_f))
            for p, di in zip(self.params, d):
                p.grad = di
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"forget_loss": forget_loss.item(), "retain_loss": retain_loss.item()}

    def timed(self) -> float:
        """One step; its wall time in seconds (synchronizing a GPU)."""
        torch = self.torch
        t0 = time.perf_counter()
        self.step()
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def logits(model, batch) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().cpu().numpy()


def generate_timed(model, ids: np.ndarray, mask: np.ndarray, new_tokens: int, device: str,
                   autocast_dtype=None) -> tuple[float, np.ndarray]:
    """transformers' greedy ``generate`` (KV cache) of exactly ``new_tokens``; ``(seconds, tokens)``."""
    import contextlib

    import torch

    model.eval()
    input_ids = torch.from_numpy(np.asarray(ids, np.int64)).to(device)
    attention_mask = torch.from_numpy(np.asarray(mask, np.int64)).to(device)
    ctx = (torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    t0 = time.perf_counter()
    with torch.no_grad(), ctx:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=new_tokens, pad_token_id=0)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, out[:, ids.shape[1]:].cpu().numpy()


def matmul_rate(n: int, dtype: str, repeats: int, device: str) -> float:
    """Measured square matmul rate of torch in FLOP/s (median after a warm-up)."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / float(np.median(times))
