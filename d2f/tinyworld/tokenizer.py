"""The miniature world's tokenizer, trained with the `tokenizers` library, in LLaDA's format.

Words are learned from the task's text by a `WordLevelTrainer`; numbers are split into single
digits as WordPiece pieces (`8`, `~~2` for 82; the continuation prefix is `~~`, not `##`, so that
the `####` token is not mistaken for one) so that every number is learnable from ten digit
tokens and decodes back without spaces ("#### 82", which GSM8K's answer regex needs); `####` is
one token. Special tokens are LLaDA's (bos, end-of-text = pad, mask, end-of-turn, chat headers)
and the chat template is LLaDA's, so the tiny teacher goes through the 8B model's code paths.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from d2f.tiny import LLADA_SPECIALS, as_llada_tokenizer

# words, numbers, "####", and any other single non-space character
_SPLIT = Regex(r"####|[0-9]+|[A-Za-z_]+|[^\sA-Za-z0-9]")
_ROLES = ("user", "assistant", "system")
_CONT = "~~"  # WordPiece continuation prefix of digits inside a number


def train_tokenizer(texts: Iterable[str]):
    """A `PreTrainedTokenizerFast` whose word vocabulary is learned from `texts`."""
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(_SPLIT, behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=list(LLADA_SPECIALS), show_progress=False)
    words.train_from_iterator([*texts, " ".join(_ROLES)], trainer)
    vocab = dict(words.get_vocab())
    for d in "0123456789":  # digits: a word-start piece and a continuation piece each
        for piece in (d, f"{_CONT}{d}"):
            vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(
        models.WordPiece(
            vocab, unk_token="[UNK]", continuing_subword_prefix=_CONT, max_input_chars_per_word=64
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(_SPLIT, behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix=_CONT, cleanup=False)
    return as_llada_tokenizer(tok)
