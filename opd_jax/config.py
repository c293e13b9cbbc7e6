"""One typed, frozen config tree; YAML files plus dotted `key.sub=value` overrides.

Unknown keys are errors that suggest the nearest valid key; values are converted to the field's
type (so `optim.lr=3e-4` on the command line is a float).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opd_jax.errors import OpdError
from opd_jax.urls import split_url  # noqa: F401 (public here too)


@dataclass(frozen=True)
class ModelSpec:
    """A model: a Hugging Face folder (`path`) or a fresh tiny one (`init`, ModelConfig fields)."""

    path: str | None = None  # a Hugging Face folder (config.json, safetensors, tokenizer)
    init: dict = field(default_factory=dict)  # without a path: a fresh random model with these ModelConfig fields
    dtype: str = "float32"  # float32 | bfloat16: the parameters' and the compute dtype
    attention: str = "auto"  # auto | blockwise (flash-style, no [T, S] scores) | naive | splash (Pallas TPU kernel)
    lora: dict = field(default_factory=dict)  # {rank, alpha, targets}: train LoRA adapters on a frozen base (opd_jax.lora)


@dataclass(frozen=True)
class TeacherSpec:
    name: str = "teacher"  # what routing and mesh.roles call it
    # an HF folder, "self" (the student's frozen snapshot at step 0), "self_live" (the student's current
    # weights, no gradient through them) or "base" (with student.lora: the student's frozen base, adapters off)
    path: str | None = None
    dtype: str = "float32"  # float32 | bfloat16
    attention: str = "auto"  # as student.attention
    # a teacher behind a server (instead of path): http://host:port of an OpenAI-compatible completions
    # endpoint with vLLM's prompt_logprobs (vLLM, SGLang, or `opd-jax serve-teacher`); opd_jax.serving
    url: str | None = None
    model: str = "teacher"  # the model name sent to the server
    timeout: float = 60.0  # seconds for a whole scoring call: every byte of the reply, and the retries
    retries: int = 4  # retries (backoff doubling from 0.5 s, at most 8 s) within the timeout, then the run stops
    # on-policy self-distillation (OPSD): "answer" shows this teacher privileged_template filled with the row's
    # prompt and reference answer instead of the student's prompt; it scores the same completion tokens.
    # Context distillation: "context" fills a template without {answer}, e.g. "{prompt} Always answer in French."
    # (an instruction only the teacher sees; the last user message of a chat row carries it)
    privileged: str = ""
    privileged_template: str = "answer: {answer}. {prompt}"  # what a privileged teacher reads ({prompt}, {answer})
    # cross-tokenizer teachers (loss.cross_tokenizer bpm | uld; opd_jax.xtok): the teacher's tokenizer folder
    # (None: its model folder's), and its own prompt / completion lengths in its tokens (0: 2 x the data's)
    tokenizer: str | None = None
    max_prompt_len: int = 0  # the teacher's prompt length in its own tokens (0: 2 x data.max_prompt_len)
    max_new_tokens: int = 0  # the teacher's completion length in its own tokens (0: 2 x data.max_new_tokens)

    @property
    def is_student(self) -> bool:  # path self, self_live or base: the student's own weights
        return self.path in ("self", "self_live", "base")

    @property
    def reads_learner(self) -> bool:  # path self_live or base: the learner's current arrays, read each step
        return self.path in ("self_live", "base")


@dataclass(frozen=True)
class DataConfig:
    domains: tuple = ("addition", "reverse", "sort")  # built-in task domains, or the domains of data.path's records
    path: str | None = None  # prompt records: .jsonl / .json / .parquet / datasets save_to_disk folder
    chat_template: bool = False  # render string prompts as one user message through the tokenizer's chat template
    chat_template_kwargs: dict = field(default_factory=dict)  # passed to apply_chat_template, e.g. {enable_thinking: false}
    verifiers: dict = field(default_factory=dict)  # domain -> exact | math | regex:PATTERN | python:module:function
    tokenizer: str | None = None  # folder with tokenizer.json; None: the built-in character tokenizer
    per_domain: int = 8  # prompts per domain per step
    group_size: int = 4  # completions sampled per prompt
    max_prompt_len: int = 16  # prompt tokens (left-padded; a longer prompt is refused)
    max_new_tokens: int = 8  # the longest completion, in tokens
    temperature: float = 1.0  # one temperature everywhere: sampler, teacher scores and loss
    top_k: int = 0  # sample from the k most likely tokens only (0 = off)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens reaching this probability (1 = off)
    rollout_slots: int = 0  # decode slots of the rollout engine (0 = one per sampled row); refilled as rows end
    decode_steps_per_call: int = 8  # decode steps per engine dispatch (the host refills slots between calls)
    # rollout horizon (opd_jax.horizon): sample, score and train on the first h new tokens only; a fraction
    # of max_new_tokens in (0, 1] or a token count >= 2; schedule fixed, linear (to the whole length), or
    # progressive (one bucket longer when the teacher divergence over the last horizon_window steps stops falling)
    horizon: float = 1.0
    horizon_schedule: str = "fixed"  # fixed | linear | progressive
    horizon_window: int = 5  # progressive: steps over which the divergence must keep falling
    max_privileged_len: int = 0  # privileged teachers' prompt length in tokens (0: 2 x max_prompt_len)
    # packed update (opd_jax.packing): whole sequences end to end in rows of this many tokens, so the update
    # and the teachers compute on real tokens, not padding (0 = padded rows; at least max_prompt_len + max_new_tokens)
    pack_tokens: int = 0


@dataclass(frozen=True)
class LossConfig:
    estimator_type: str = "full"  # full (chunked exact divergence) | sampled | topk
    kind: str = "reverse_kl"  # reverse_kl | forward_kl | jsd | tv | hellinger | alpha | proximal_kl
    estimator: str = "opd_plus"  # for sampled: opd_plus | stop_grad
    level: str = "token"  # for sampled: token | sequence (the sequence-level score function)
    baseline: str = "none"  # for sampled: none | loo (leave-one-out batch-mean baseline, variance reduction)
    beta: float = 0.5  # jsd's mixture weight; proximal_kl's teacher weight
    alpha_div: float = 0.5  # the alpha of the alpha divergence
    topk: int = 8  # topk: ids per position (and what a served teacher returns)
    topk_from: str = "teacher"  # topk: whose top k ids form the buckets, teacher | student (+ a tail bucket either way)
    normalize: str = "token"  # token (divide by the real token count) | sequence (per-row mean, then the batch mean)
    seq_chunk: int = 128  # positions per chunk of the loss's logits (no [B, T, V] array)
    lam: float = 1.0  # GKD: fraction of on-policy data (1 = pure OPD, 0 = supervised KD on answers)
    rl_alpha: float = 1.0  # weight of OPD vs GRPO reward (1 = pure OPD); used when < 1 or rl_mode=replace
    rl_mode: str = "mix"  # mix (OPD + GRPO advantage) | replace (the GRPO term in the OPD term's place)
    clip_eps: float = 0.2  # PPO clip of the sampled-token and RL terms
    # cap on the importance ratio pi_theta / pi_sampler inside the PPO-clipped sampled-token and RL terms
    # when train.max_staleness >= 1 (tokens drawn by an older policy); unused when synchronous; 0 = no cap
    is_cap: float = 2.0
    # a teacher whose tokenizer is not the student's: "" (refused), bpm (byte-prefix marginalisation onto
    # the student's vocabulary) or uld (identical-token KL + sorted L1, GOLD's baseline); opd_jax.losses.xtok
    cross_tokenizer: str = ""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # the peak learning rate
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    weight_decay: float = 0.0  # adamw's decoupled weight decay
    b1: float = 0.9  # adamw's first-moment decay
    b2: float = 0.99  # adamw's second-moment decay
    momentum: float = 0.9  # sgd's momentum
    clip_norm: float = 1.0  # global gradient-norm clip (0 = off)
    accumulate: int = 1  # steps whose gradients are summed before one optimizer update
    effopd_window: int = 0  # > 0: EffOPD extrapolation every this many steps (opd_jax.optim.effopd)
    effopd_alpha_max: float = 2.0  # the largest extrapolation factor
    effopd_min_cos: float = 0.0  # extrapolate only when successive window updates agree at least this much (cosine)
    effopd_guard: bool = False  # roll a jump back when it raises the teacher divergence on a held-out probe batch
    effopd_probe_per_domain: int = 8  # probe prompts per domain for the guard
    # after each window, a probe-batch line search over alpha in (0, 0.5, 1, 2, 4) along the window's
    # update d_k: keep the alpha with the lowest exact teacher divergence (0 is always a candidate)
    effopd_line_search: bool = False
    mask: str | None = None  # safetensors mask file: train only its coordinates (opd_jax.optim.masks)
    state_dtype: str = ""  # "" = the parameters' dtype; float32 keeps optimizer state (and updates) in float32


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps of the run
    seed: int = 0  # initial randomness: sampling keys, prompt order, fresh models
    out_dir: str = "runs/opd"  # the run folder (config.yaml, checkpoints/, metrics.jsonl, samples.jsonl, tb/, plots/)
    checkpoint_every: int = 50  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 2  # newest checkpoints kept (at least 1)
    eval_every: int = 50  # steps between greedy evaluations (and samples.jsonl lines)
    eval_per_domain: int = 64  # evaluation prompts per domain
    log_every: int = 1  # only log steps read loss / metrics back from the devices (and time each phase)
    max_skipped: int = 3  # stop after this many non-finite steps in a row (their updates are skipped on device)
    # an update that multiplies the parameters' global norm by more than this in one step is skipped on
    # device like a non-finite one (an absurd learning rate must not reach the checkpoint); 0 = off
    max_update_ratio: float = 2.0
    progress: bool = True  # a progress bar on the terminal
    # rows per forward/backward inside the step (gradients accumulated); 0 = all rows; "auto" = the
    # largest that fits the device memory (the planner compiles the step for each candidate)
    micro_batch: int | str = 0
    # stop-rate guard: at log steps, the share of completions that end with a stop id (rollout/eos_rate);
    # below min_eos_rate it warns once, and after eos_patience log steps in a row below it the run stops
    # with a one-line error (a student that has lost the ability to stop); 0 = off
    min_eos_rate: float = 0.0
    eos_patience: int = 3  # log steps in a row below min_eos_rate before the run stops
    # asynchronous OPD: the sampler runs up to this many policy versions behind the learner (0 = synchronous:
    # sample, score, update, one after the other); sequences older than this are dropped (opd_jax.pipeline)
    max_staleness: int = 0
    remat: str = "full"  # recompute each layer body in the backward pass: full | dots (keep matmuls) | none


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1  # mesh axis sizes; one of them may be -1 (all remaining devices)
    fsdp: int = -1  # the parameter-sharding (FSDP) axis; -1 = all remaining devices
    tensor: int = 1  # the tensor-parallel axis
    rules: str = "default"  # student parameter rules: default (fsdp + tensor) | fsdp
    teacher_rules: str = "fsdp"  # teachers keep no optimizer state: pure FSDP by default
    rollout_rules: str = "rollout"  # the student's layout while sampling: weights whole per batch shard (split over tensor)
    # devices of each role: {learner: "0-3", sampler: "0-3", <teacher name>: "4-7"}; a role not listed
    # shares the learner's devices (the default: everything on every device)
    roles: dict = field(default_factory=dict)
    device_memory_gb: float | None = None  # per-device memory for the fit check (default: what the device reports)


@dataclass(frozen=True)
class DistributedConfig:
    coordinator: str | None = None  # host:port of process 0; unset on TPU VMs (auto-detected)
    num_processes: int | None = None  # processes (hosts) in the run; unset on TPU VMs
    process_id: int | None = None  # this process's index; unset on TPU VMs


@dataclass(frozen=True)
class Config:
    student: ModelSpec = field(default_factory=ModelSpec)
    teachers: tuple = ()  # of TeacherSpec
    routing: dict = field(default_factory=dict)  # domain -> teacher name
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


_SECTIONS = {"student": ModelSpec, "data": DataConfig, "loss": LossConfig, "optim": OptimConfig,
             "train": TrainConfig, "mesh": MeshConfig, "distributed": DistributedConfig}


def _suggest(key: str, valid: list[str], where: str) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    prefix = f"{where}." if where else ""
    return f"; did you mean {prefix + near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"


def _coerce(value, typ, where: str):
    """Convert a YAML / command-line value to the field's scalar type (bool, int, float, str)."""
    if value is None:
        return None
    if typing.get_origin(typ) in (typing.Union, types.UnionType):  # X | None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if isinstance(value, bool) and typ in (int, float):  # YAML's true is not the number 1
        raise OpdError(f"config {where}: expected {typ.__name__}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool) or str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
            return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")
    elif typ in (int, float, str):
        try:
            out = typ(value)
            if typ is int and float(value) != out:
                raise ValueError
            return out
        except (TypeError, ValueError):
            pass
    else:
        return value
    raise OpdError(f"config {where}: expected {typ.__name__}, got {value!r}")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise OpdError(f"config {where or 'root'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if cls is DataConfig and key == "jsonl":
            raise OpdError("config data.jsonl was renamed data.path (it also reads .json, .parquet and datasets folders)")
        if key not in fields:
            raise OpdError(f"unknown config key {path!r}" + _suggest(key, list(fields), where))
        if cls is Config and key in _SECTIONS:
            kw[key] = _build(_SECTIONS[key], value or {}, path)
        elif cls is Config and key == "teachers":
            kw[key] = tuple(_build(TeacherSpec, t, f"{path}[{i}]") for i, t in enumerate(value or []))
        elif cls is Config and key == "routing":
            if not isinstance(value, dict):
                raise OpdError("config routing: expected a mapping domain -> teacher name")
            kw[key] = {str(k): str(v) for k, v in value.items()}
        elif key == "micro_batch" and str(value).strip().lower() == "auto":
            kw[key] = "auto"
        elif key == "micro_batch":
            try:
                kw[key] = _coerce(value, int, path)
            except OpdError:
                raise OpdError(f"config {path}: expected a number of rows or auto, got {value!r}") from None
        elif hints[key] is dict:
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise OpdError(f"config {path}: expected a mapping, got {value!r}")
            kw[key] = {str(k): v for k, v in value.items()}
        elif key == "domains":
            kw[key] = tuple(value) if isinstance(value, (list, tuple)) else tuple(str(value).split(","))
        else:
            kw[key] = _coerce(value, hints[key], path)
    return cls(**kw)


def _set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise OpdError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults) and apply `key.sub=value` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise OpdError(f"config file does not exist: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise OpdError(f"{p} is not valid YAML: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise OpdError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
    return validate(_build(Config, tree, ""))


# (section, key) -> (test, what it must be); checked by `validate` before anything is read or written
_POSITIVE = ("must be >= 1", lambda v: v >= 1)
_LIMITS = {
    ("data", "per_domain"): _POSITIVE, ("data", "group_size"): _POSITIVE, ("data", "max_prompt_len"): _POSITIVE,
    ("data", "max_new_tokens"): _POSITIVE,
    ("data", "temperature"): ("must be > 0 (it divides the sampler's, the teachers' and the loss's logits)",
                              lambda v: v > 0),
    ("data", "top_k"): ("must be >= 0 (0 = no top-k filter)", lambda v: v >= 0),
    ("data", "top_p"): ("must be in (0, 1]", lambda v: 0 < v <= 1),
    ("data", "rollout_slots"): ("must be >= 1, or 0 for one slot per sampled row", lambda v: v >= 0),
    ("data", "decode_steps_per_call"): _POSITIVE,
    ("data", "max_privileged_len"): ("must be >= 0 (0 = 2 x max_prompt_len)", lambda v: v >= 0),
    ("data", "pack_tokens"): ("must be >= 0 (0 = padded rows)", lambda v: v >= 0),
    ("loss", "topk"): _POSITIVE, ("loss", "seq_chunk"): _POSITIVE,
    ("loss", "clip_eps"): ("must be > 0", lambda v: v > 0),
    ("loss", "is_cap"): ("must be 0 (no importance weights) or >= 1 (a cap below 1 would shrink every on-policy "
                         "token)", lambda v: v == 0 or v >= 1),
    ("train", "max_staleness"): ("must be >= 0 (0 = synchronous)", lambda v: v >= 0),
    ("train", "min_eos_rate"): ("must be in [0, 1] (0 = off)", lambda v: 0 <= v <= 1),
    ("train", "eos_patience"): _POSITIVE,
    ("optim", "lr"): ("must be > 0", lambda v: v > 0),
    ("optim", "warmup_steps"): ("must be >= 0", lambda v: v >= 0),
    ("optim", "weight_decay"): ("must be >= 0", lambda v: v >= 0),
    ("optim", "clip_norm"): ("must be >= 0 (0 = no clipping)", lambda v: v >= 0),
    ("optim", "accumulate"): _POSITIVE, ("optim", "effopd_window"): ("must be >= 0 (0 = off)", lambda v: v >= 0),
    ("optim", "effopd_probe_per_domain"): _POSITIVE,
    ("train", "steps"): _POSITIVE, ("train", "checkpoint_every"): _POSITIVE, ("train", "eval_every"): _POSITIVE,
    ("train", "log_every"): _POSITIVE, ("train", "eval_per_domain"): _POSITIVE, ("train", "max_skipped"): _POSITIVE,
    ("train", "keep_checkpoints"): ("must be >= 1 (0 would delete every checkpoint, the last one included)",
                                    lambda v: v >= 1),
    ("train", "max_update_ratio"): ("must be > 1, or 0 to turn the check off", lambda v: v == 0 or v > 1),
}


def validate(cfg: Config) -> Config:
    """Refuse, in one line, any number outside its meaningful range (before any model is read or any
    file is written). Returns cfg."""
    for (section, key), (what, ok) in _LIMITS.items():
        v = getattr(getattr(cfg, section), key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or not ok(v):
            raise OpdError(f"config {section}.{key} {what}, got {v!r}")
    mb = cfg.train.micro_batch
    if mb != "auto" and (not isinstance(mb, int) or mb < 0):
        raise OpdError(f"config train.micro_batch must be a number of rows >= 0 (0 = all rows) or auto, got {mb!r}")
    if not cfg.train.out_dir:
        raise OpdError("config train.out_dir must name a folder")
    for i, t in enumerate(cfg.teachers):
        check_teacher(t, f"teachers[{i}] ({t.name!r})")
    return cfg


def check_teacher(t: TeacherSpec, where: str):
    """One-line errors for a teacher entry's numbers, url and privileged template (before anything is
    read or written)."""
    import string

    check_served(t.url, t.timeout, t.retries, f"config {where}")
    for key in ("max_prompt_len", "max_new_tokens"):
        if getattr(t, key) < 0:
            raise OpdError(f"config {where}.{key} must be >= 0 (0 = twice the data's), got {getattr(t, key)!r}")
    if t.privileged:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(t.privileged_template) if f is not None}
        except ValueError as e:
            raise OpdError(f"config {where}.privileged_template {t.privileged_template!r} is not a template: {e}") from None
        unknown = sorted(fields - {"prompt", "answer"})
        if unknown:
            raise OpdError(f"config {where}.privileged_template has field {{{unknown[0]}}}; only {{prompt}} and "
                           "{answer} can be filled")


def check_served(url, timeout, retries, where: str):
    """A served teacher's settings (the config's check and `serving.ServedTeacher`'s): url None or an
    http(s) address (`split_url`), timeout finite seconds > 0, retries a whole number >= 0."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise OpdError(f"{where}.timeout must be a finite number of seconds > 0, got {timeout!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise OpdError(f"{where}.retries must be a whole number >= 0, got {retries!r}")
    if url is not None:
        split_url(url, f"{where}.url")


def to_dict(cfg) -> dict:
    """The config as plain data (for YAML / JSON, and for hashing into cache keys)."""
    return dataclasses.asdict(cfg)
