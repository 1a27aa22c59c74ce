"""Small checkpoints and a word-level tokenizer for the command-line tests of
generate, eval and positions."""
from __future__ import annotations

import re
from pathlib import Path

from flax import nnx

import repo_jax as rj
from repo_jax import params_io

WORDS = ("the a is was of to and in on it he she they we you i not but for with as at by "
         "from this that what which who how why question answer because therefore yes no "
         "man woman water door open closed ran fell sun sky grass green blue yellow day night "
         "magic number special text hidden quiz memorize some within following make sure "
         "will about numbers afterwards one for mentioned provided here go there back again "
         "0 1 2 3 4 5 6 7 8 9 . , ? : ! ' -").split()


def word_tokenizer():
    """A `tokenizers` word-level tokenizer over WORDS (+ [UNK]): 100-odd ids, so that
    tiny models can read any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok


def tiny_config(repo: bool = True, vocab_size: int = 128) -> rj.ModelConfig:
    cfg = rj.ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 2)
    return cfg.replace(repo_start_layer=1) if repo else cfg


def save_model_dir(directory: Path, cfg: rj.ModelConfig, tokenizer: bool = True, seed: int = 0,
                   position_scale: float = 50.0) -> Path:
    """A repo-jax model directory (repo_jax.json + params/), with the word tokenizer.
    RePo maps are scaled up so that the learned positions spread visibly."""
    model = rj.Olmo2Model(cfg, rngs=nnx.Rngs(seed))
    for i in cfg.repo_layers:
        a = model.layers[i].self_attn
        a.final_map.kernel[...] = a.final_map.kernel[...] * position_scale
    directory.mkdir(parents=True, exist_ok=True)
    params_io.save_params(directory, params_io.flat_params(model))
    params_io.write_meta(directory, cfg, {"source": "test"})
    if tokenizer:
        word_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


def one_line_error(stderr: str) -> str:
    """The single `error: ...` line a refused command prints (and nothing like a traceback)."""
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert not re.search(r"Traceback|File \"", stderr), stderr
    return lines[0]
