"""The tokenizer: any local HF tokenizer directory plus GenLLaVA's special tokens; a BPE trainer for small worlds;
CLIP's tokenizer (Stable Diffusion's prompts, CLIP scores)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import numpy as np
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from genllava_jax import errors

IMAGE, I2T, T2I, SOI, EOI = "<image>", "[I2T]", "[T2I]", "[SOI]", "[EOI]"
INST, END_INST = "[INST]", "[/INST]"


def genllava_tokens(num_img_tokens: int) -> list[str]:
    return [IMAGE, I2T, T2I, SOI, *(f"[IMG{i}]" for i in range(num_img_tokens)), EOI]


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    image: int
    i2t: int
    t2i: int
    soi: int
    img: tuple[int, ...]
    eoi: int
    bos: int
    eos: int
    pad: int

    @property
    def generation(self) -> tuple[int, ...]:
        """[SOI] [IMG0..N-1] [EOI]: what ends the assistant's answer in t2i and edit records."""
        return (self.soi, *self.img, self.eoi)

    @classmethod
    def of(cls, tokenizer, num_img_tokens: int = 16) -> "SpecialIds":
        vocab = tokenizer.get_vocab()
        missing = [t for t in genllava_tokens(num_img_tokens) if t not in vocab]
        if missing:
            raise errors.BadValue(f"tokenizer lacks {missing}; load it with load_tokenizer(path, {num_img_tokens})")
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise errors.BadValue("tokenizer needs bos_token and eos_token (the Mistral-Instruct template uses both)")
        # Padding is masked out everywhere, so any id will do; Mistral has no pad token, LLaVA pads with <unk>.
        pad = next(i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
                   if i is not None)
        return cls(image=vocab[IMAGE], i2t=vocab[I2T], t2i=vocab[T2I], soi=vocab[SOI],
                   img=tuple(vocab[f"[IMG{i}]"] for i in range(num_img_tokens)), eoi=vocab[EOI],
                   bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=pad)


def load_tokenizer(path: str | Path, num_img_tokens: int = 16):
    """AutoTokenizer from a local directory, with <image>, [I2T], [T2I], [SOI], [IMG0..N-1], [EOI] added if absent."""
    if not Path(path).is_dir():
        raise errors.MissingFile(f"tokenizer directory {str(path)!r} does not exist")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    vocab = tokenizer.get_vocab()
    missing = [t for t in genllava_tokens(num_img_tokens) if t not in vocab]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tokenizer


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, num_img_tokens: int = 16,
                    vocab_size: int = 1024) -> Path:
    """A BPE tokenizer trained on `texts`, saved in the HF format; Mistral's layout (<unk> 0, <s> 1, </s> 2, ▁)."""
    special = ["<unk>", "<s>", "</s>", "<pad>", INST, END_INST, *genllava_tokens(num_img_tokens)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # "always" prepends ▁ to every piece we encode separately, so a piece tokenises as it would after a space.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       show_progress=False))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", pad_token="<pad>",
                                              additional_special_tokens=special[4:])
    hf.save_pretrained(str(out_dir))
    return Path(out_dir)


def load_clip_tokenizer(path: str | Path):
    """The HF CLIP tokenizer saved in a local folder (a CLIP checkpoint's, or an SD pipeline's `tokenizer/`)."""
    if not Path(path).is_dir():
        raise errors.MissingFile(f"CLIP tokenizer directory {str(path)!r} does not exist")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def clip_tokens(tokenizer, texts: Iterable[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int32 (B, max_length): padded to `max_length` (default the tokenizer's
    model_max_length, 77 for CLIP) and truncated, as Stable Diffusion's pipelines encode prompts."""
    enc = tokenizer(list(texts), padding="max_length", max_length=max_length or tokenizer.model_max_length,
                    truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
