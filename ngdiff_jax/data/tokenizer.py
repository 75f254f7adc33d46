"""Train a small byte-level BPE tokenizer locally (no network), saved as a transformers tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 1024
):
    """Byte-level BPE trained on ``texts`` with ``<pad>``, ``<bos>``, ``<eos>`` (ids 0, 1, 2).

    The tokenizer prepends ``<bos>`` when special tokens are added (Llama-style) and has no
    chat template, so ``QAFormatter`` uses its plain template. Any byte sequence encodes
    (byte-level alphabet), so unseen text never maps to an unknown token.

    Args:
      texts: training text (e.g. every question and answer of a benchmark).
      out_dir: if given, saved there with ``save_pretrained`` so that
        ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it.
      vocab_size: target vocabulary size, special tokens and the 256 byte symbols included.

    Returns:
      the ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + 3:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(byte_alphabet) + 3} (256 bytes + 3 special tokens)."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
    )  # fmt: skip
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast
