"""Tiny checkpoints in the families' ORIGINAL formats, for tests, benchmarks and demos.

`write_tiny_checkpoint(dir, family)` writes what the hub holds for the 8B models, only small:
an original `config.json` (LLaDA `model_type "llada"` fields / Dream `model_type "Dream"`), random
weights under the original key names in safetensors, and the tokenizer files in the original layout
(LLaDA: `tokenizer.json` for `PreTrainedTokenizerFast` with a LLaDA-style chat template; Dream:
`vocab.json` + `merges.txt` with the remote-code `DreamTokenizer` class named in its config). Loading
them goes through exactly the code path of the real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# LLaDA-style chat turns: <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>, after bos.
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLADA_SPECIALS = (
    "<|endoftext|>",
    "<|startoftext|>",
    "<|mdm_mask|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[UNK]",
)
DREAM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")

_WORDS = (
    "the a an of to and is in it you that he was for on are with as his they at be this from "
    "have or by one had not but what all were when we there can how many does much more total "
    "has gets buys apples books coins pens cats left now each then after sum plus minus answer "
    "question user assistant system def return if else print for while x y n"
).split()
_PUNCT = list(".,:;?!()[]{}=+-*/#'\"<>_") + ["####", "\n"]


def llada_tokenizer(extra_words: tuple[str, ...] = ()):
    """A word-level tokenizer with LLaDA's special tokens, digits split one per token."""

    vocab_list = list(LLADA_SPECIALS) + [str(d) for d in range(10)] + _PUNCT + list(_WORDS)
    vocab_list += [w for w in extra_words if w not in vocab_list]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split("####", behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return as_llada_tokenizer(tok)


def as_llada_tokenizer(tok: Tokenizer):
    """Wrap a `tokenizers.Tokenizer` holding LLaDA's special tokens as LLaDA's HF tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        mask_token="<|mdm_mask|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        chat_template=LLADA_CHAT_TEMPLATE,
    )


def write_dream_tokenizer_files(out: Path, vocab_size: int = 300) -> None:
    """Byte-level BPE `vocab.json` + `merges.txt` and a Dream-style `tokenizer_config.json`."""
    corpus = [" ".join(_WORDS), "0 1 2 3 4 5 6 7 8 9 10 12 25 100", "def f(x):\n    return x + 1"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(DREAM_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 20, trainer)
    tok.model.save(str(out))  # vocab.json, merges.txt
    n = tok.get_vocab_size()
    added = {
        str(n + i): {
            "content": t,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(DREAM_SPECIALS)
    }
    config = {
        "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "tokenizer_class": "DreamTokenizer",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
        "unk_token": None,
        "model_max_length": 2048,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def llada_config(
    vocab_size: int,
    mask_token_id: int,
    eos_token_id: int,
    bos_token_id: int | None = None,
    d_model: int = 48,
    n_layers: int = 2,
    n_heads: int = 4,
    mlp_hidden_size: int = 96,
    max_sequence_length: int = 512,
    rope_theta: float = 500000.0,
    n_kv_heads: int | None = None,
) -> dict[str, Any]:
    """An original LLaDA `config.json` dict (the fields of GSAI-ML/LLaDA-8B-Instruct), sized down."""
    return {
        "architectures": ["LLaDAModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "model_type": "llada",
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_heads if n_kv_heads is None else n_kv_heads,
        "mlp_hidden_size": mlp_hidden_size,
        "mlp_ratio": 4,
        "vocab_size": vocab_size,
        "embedding_size": vocab_size,
        "max_sequence_length": max_sequence_length,
        "rope": True,
        "rope_theta": rope_theta,
        "rms_norm_eps": 1e-05,
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "block_type": "llama",
        "include_bias": False,
        "include_qkv_bias": False,
        "weight_tying": False,
        "block_group_size": 1,
        "alibi": False,
        "input_emb_norm": False,
        "scale_logits": False,
        "attention_dropout": 0.0,
        "embedding_dropout": 0.0,
        "residual_dropout": 0.0,
        "init_device": "meta",
        "init_fn": "mitchell",
        "precision": "amp_bf16",
        "mask_token_id": mask_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        "use_cache": False,
    }


def dream_config(
    vocab_size: int,
    mask_token_id: int,
    eos_token_id: int,
    hidden_size: int = 48,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 96,
    max_position_embeddings: int = 512,
) -> dict[str, Any]:
    """An original Dream `config.json` dict (the fields of Dream-org/Dream-v0-Base-7B), sized down."""
    return {
        "architectures": ["DreamModel"],
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "model_type": "Dream",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": num_hidden_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": False,
        "mask_token_id": mask_token_id,
        "pad_token_id": eos_token_id,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
    }


def ar_config(
    vocab_size: int,
    eos_token_id: int,
    bos_token_id: int | None = None,
    hidden_size: int = 48,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 96,
    max_position_embeddings: int = 512,
) -> dict[str, Any]:
    """A plain Llama `config.json` dict (transformers' own format): the autoregressive baseline."""
    from transformers import LlamaConfig

    raw = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    ).to_dict()
    raw["architectures"] = ["LlamaForCausalLM"]
    return raw


def write_tiny_checkpoint(
    out: str | Path, family: str, seed: int = 0, with_tokenizer: bool = True, **sizes
) -> Path:
    """Write a random tiny checkpoint of `family` ("llada", "dream" or "ar") in its original format."""
    from d2f.models import build_model, save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if family == "llada":
        tok = llada_tokenizer()
        vocab = len(tok) + 2  # odd-sized embedding with unused rows, as in the 8B checkpoint
        vocab += 1 - vocab % 2
        raw = llada_config(vocab, tok.mask_token_id, tok.eos_token_id, tok.bos_token_id, **sizes)
        model = build_model(raw, tokenizer=tok, seed=seed)
        save_model(model, out, tokenizer=tok if with_tokenizer else None)
    elif family == "ar":
        tok = llada_tokenizer()
        vocab = len(tok) + 2
        vocab += 1 - vocab % 2
        raw = ar_config(vocab, tok.convert_tokens_to_ids("<|eot_id|>"), tok.bos_token_id, **sizes)
        model = build_model(raw, tokenizer=tok, seed=seed)
        save_model(model, out, tokenizer=tok if with_tokenizer else None)
    elif family == "dream":
        write_dream_tokenizer_files(out)
        from d2f.models import load_tokenizer

        tok = load_tokenizer(out, spec=_dream_spec())
        vocab = len(tok) + 2
        vocab += 1 - vocab % 2
        raw = dream_config(vocab, tok.mask_token_id, tok.eos_token_id, **sizes)
        model = build_model(raw, tokenizer=tok, seed=seed)
        save_model(model, out)
        if not with_tokenizer:
            for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                (out / f).unlink()
    else:
        raise ValueError(f"unknown family {family!r}; supported: 'llada', 'dream', 'ar'")
    return out


def _dream_spec():
    from d2f.family import SPECS

    return SPECS["dream"]


def main(argv: list[str] | None = None) -> None:
    """`python -m d2f.tiny OUT`: write tiny LLaDA, Dream and AR checkpoints under OUT, load them."""
    import argparse

    from d2f.family import family_of
    from d2f.models import load_model

    parser = argparse.ArgumentParser(prog="python -m d2f.tiny", description=main.__doc__)
    parser.add_argument("out", type=Path, help="directory for <out>/llada, <out>/dream, <out>/ar")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for family in ("llada", "dream", "ar"):
        path = write_tiny_checkpoint(args.out / family, family, seed=args.seed)
        model, tok = load_model(path)
        n = sum(p.numel() for p in model.parameters())
        print(f"{family}: {path} ({type(model).__name__}, {n:,} parameters, {len(tok)} tokens)")
        print(f"  {family_of(model)}")


if __name__ == "__main__":
    main()
