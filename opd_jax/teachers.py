"""Frozen teachers, routed by prompt domain, scoring the student's rollouts.

A teacher is a `Transformer` whose parameters never receive a gradient or optimizer state: the
trainer holds only its (graphdef, state) and calls a jitted forward. `self` is the frozen snapshot
of the student's parameters at the start of training. Batches are grouped by domain (fixed rows per
domain), so each teacher scores only its own contiguous, fixed-size slice.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.batch import Rows, Scored
from opd_jax.errors import OpdError
from opd_jax.lora import base_config, base_graphdef, split
from opd_jax.models import load_model
from opd_jax.models.transformer import activation_layout, with_runtime
from opd_jax.xtok_teacher import CrossTokenizer, build_cross_view, xtok_names


class Teacher(Protocol):
    """What the batch code asks of a teacher. name; vocab_size; score(rows, what, *, temperature, topk) ->
    Scored, what in "hidden" | "logits" | "logprobs" | "topk" (`teacher_scores`); output_matrix(): the
    matrix the loss applies to hidden states ([D_t, V], or {"w": [D_t, V_t], "map": [V_t]} across
    tokenizers; None for a teacher that hands over scores); live: scores with the student's current
    parameters; packs: scores packed rows (`opd_jax.packing`; False: a packed run scores the padded rows and
    moves the hand-over); metrics(): per-step figures for the log. Implementations: `LocalTeacher` (a folder,
    self, self_live), `Privileged` (OPSD and context distillation, around any teacher),
    `xtok_teacher.CrossTokenizer` (its own tokens) and `serving.ServedTeacher` (over HTTP)."""

    name: str
    vocab_size: int
    live: bool
    packs: bool

    def score(self, rows: Rows, what: str, *, temperature: float, topk: int = 0) -> Scored: ...

    def output_matrix(self): ...

    def metrics(self) -> dict: ...


@dataclass
class LocalTeacher:
    """A teacher in this process: a frozen model's (graphdef, state) and a jitted forward."""

    name: str
    graphdef: object
    state: object  # nnx.State, frozen
    vocab_size: int
    mesh: object = None  # with a mesh, the forward is jitted with explicit shardings (see `teacher_forward`)
    w: object = None  # output matrix [D_t, V] in the compute dtype: the loss applies it chunk by chunk
    rules: tuple = ()  # the teacher rules (mesh.teacher_rules) as sorted items: its parameters and activations
    live: bool = False  # path self_live: scored with the student's current parameters (given per call)
    base: bool = False  # path base: ... with their LoRA adapters left out (`opd_jax.lora`): no copy of the weights
    packs = True  # scores packed rows (`Rows.packed`)

    def score(self, rows: Rows, what: str, *, temperature: float, topk: int = 0) -> Scored:
        t = self
        if self.live:
            if rows.params is None:
                raise OpdError(f"teacher {self.name!r} is {'base' if self.base else 'self_live'} (the student's "
                               "current weights) but no current parameters were given")
            t = dataclasses.replace(self, state=split(rows.params)[1] if self.base else rows.params)
        return Scored(teacher_forward(t, rows.tokens, rows.full_mask, prompt_len=rows.prompt_len,
                                      temperature=temperature, what=what, topk=topk, packed=rows.packed))

    def output_matrix(self):
        return self.w

    def metrics(self) -> dict:
        return {}


@dataclass
class Privileged:
    """A teacher that reads a privileged prompt (OPSD, `mode` "answer"; context distillation, "context"):
    its prompt is `template` filled with each row's prompt (and reference answer), encoded by `prompter`
    to `prompt_len` tokens (left-padded), then the student's completion unchanged."""

    inner: object  # the Teacher that scores the privileged rows
    mode: str
    template: str
    prompter: object
    prompt_len: int

    name = property(lambda self: self.inner.name)
    vocab_size = property(lambda self: self.inner.vocab_size)
    live = property(lambda self: self.inner.live)
    packs = False  # its own prompt: it scores the padded rows (packed runs move its scores)

    def score(self, rows: Rows, what: str, *, temperature: float, topk: int = 0) -> Scored:
        if rows.examples is None:
            raise OpdError(f"teacher {self.name!r} is privileged but the rows' examples were not given")
        shown = []
        for ex in rows.examples:
            if ex.answer is None and self.mode == "answer":
                text = ex.prompt if ex.prompt is not None else ex.messages[-1][1]
                raise OpdError(f"teacher {self.name!r} is privileged (answer) but a {ex.domain!r} row has no answer: "
                               f"{text!r:.60}")
            if ex.messages is not None:  # the last user message carries the template
                (role, content), head = ex.messages[-1], ex.messages[:-1]
                filled = self.template.format(prompt=content, answer=ex.answer or "")
                ex = dataclasses.replace(ex, messages=head + ((role, filled),))
            else:
                ex = dataclasses.replace(ex, prompt=self.template.format(prompt=ex.prompt, answer=ex.answer or ""))
            shown.append(ex)
        try:
            ids, pm = self.prompter.encode(shown, self.prompt_len)
        except OpdError as e:
            raise OpdError(f"teacher {self.name!r}'s privileged prompt: {e} (the privileged prompts' limit is "
                           f"data.max_privileged_len, now {self.prompt_len})") from None
        p = rows.prompt_len
        tok = jnp.concatenate([rows.put(ids), rows.tokens[:, p:]], 1)
        fm = jnp.concatenate([rows.put(pm), rows.full_mask[:, p:]], 1)
        return self.inner.score(rows._replace(tokens=tok, full_mask=fm, prompt_len=self.prompt_len), what,
                                temperature=temperature, topk=topk)

    def output_matrix(self):
        return self.inner.output_matrix()

    def metrics(self) -> dict:
        return self.inner.metrics()


def check_privileged(spec):
    """One-line errors for a privileged teacher no run can honour."""
    if spec.privileged not in ("", "answer", "context"):
        raise OpdError(f"teacher {spec.name!r}: privileged must be 'answer', 'context' (or empty), got "
                       f"{spec.privileged!r}")
    if spec.privileged:
        if "{prompt}" not in spec.privileged_template:
            raise OpdError(f"teacher {spec.name!r}: privileged_template must contain {{prompt}} "
                           f"(got {spec.privileged_template!r})")
        if spec.privileged == "answer" and "{answer}" not in spec.privileged_template:
            raise OpdError(f"teacher {spec.name!r}: privileged: answer needs {{answer}} in privileged_template "
                           f"(got {spec.privileged_template!r})")
        if spec.privileged == "context" and "{answer}" in spec.privileged_template:
            raise OpdError(f"teacher {spec.name!r}: privileged: context shows the teacher an instruction, not the "
                           f"answer; give a privileged_template without {{answer}}, e.g. '{{prompt}} Always answer "
                           f"in French.' (got {spec.privileged_template!r})")


def check_routing(specs, routing: dict, domains) -> dict:
    """One-line errors for a domain without a teacher or routed to an unknown one (before anything is
    read or compiled). -> name -> TeacherSpec."""
    names = {t.name: t for t in specs}
    for d in domains:
        if d not in routing:
            raise OpdError(f"domain {d!r} has no teacher in routing (routing covers: {', '.join(routing) or 'none'})")
        if routing[d] not in names:
            raise OpdError(f"routing sends domain {d!r} to teacher {routing[d]!r}, which is not in teachers "
                           f"({', '.join(names) or 'none'})")
    return names


def build_teachers(specs, routing: dict, domains: list[str], student, mesh=None, rules=None,
                   tokenizer=None, roles=None, privileged_rows: tuple = (0, 0), cfg=None,
                   stop: tuple = (), prompter=None) -> dict[str, Teacher]:
    """Load every teacher named in `specs`; check routing and vocabularies before any compute.

    specs: TeacherSpec items (path = HF folder or "self"). routing: domain -> teacher name; a
    missing domain, an unknown teacher name or a vocabulary that differs from the student's is a
    clear error. roles: the MeshConfig whose mesh.roles may give a teacher devices of its own (its
    outputs then move to the learner's devices at the update). privileged_rows: (data.max_privileged_len,
    max_new_tokens), checked against a privileged teacher's context; prompter: the student's, which
    renders a privileged teacher's prompts. cfg (with loss.cross_tokenizer set): teachers from folders
    are scored in their own tokens (`xtok_teacher`), `stop` the student's stop ids. Returns name ->
    Teacher for the teachers that some domain uses.
    """
    names = check_routing(specs, routing, domains)
    out = {}
    for name in sorted({routing[d] for d in domains}):
        spec = names[name]
        check_privileged(spec)
        out[name] = _privileged(spec, _load_teacher(spec, student, mesh, rules, tokenizer, roles, privileged_rows,
                                                    cfg, stop), prompter, privileged_rows[0])
    return out


def _privileged(spec, teacher, prompter, prompt_len: int):
    if not spec.privileged:
        return teacher
    if prompter is None:
        raise OpdError(f"teacher {spec.name!r} is privileged but no prompter was given to render its prompts")
    return Privileged(teacher, spec.privileged, spec.privileged_template, prompter, prompt_len)


def _load_teacher(spec, student, mesh, rules, tokenizer, roles, privileged_rows, cfg, stop):
    """The teacher of `spec` itself (served, or local; across tokenizers when cfg says so)."""
    name = spec.name
    if spec.url:  # behind a server: checked now (reachable, same vocabulary), scored over HTTP
        if spec.path:
            raise OpdError(f"teacher {name!r} has both a path and a url; give one")
        from opd_jax.serving import ServedTeacher
        served = ServedTeacher(name, spec.url, spec.model, spec.timeout, spec.retries)
        served.check(student.cfg.vocab_size, tokenizer)
        return served
    tmesh = mesh
    if mesh is not None and roles is not None:  # mesh.roles: a teacher on devices of its own
        from opd_jax.sharding import mesh_from_config
        tmesh = mesh_from_config(roles, name)
    if spec.path == "base":  # the student's own base arrays, read each step (adapters off): nothing copied
        if not student.cfg.lora_rank:
            raise OpdError(f"teacher {name!r} has path: base (the student's base without its LoRA adapters), but "
                           "the student has no adapters; set student.lora, or use path: self")
        graphdef, state = base_graphdef(student.cfg), split(nnx.to_pure_dict(nnx.state(student)))[1]
        model_cfg = base_config(student.cfg)
    elif spec.is_student:
        graphdef, state = nnx.split(student)
        state = jax.tree.map(jnp.copy, state)  # own buffers: the student's are donated to each update
        if mesh is not None:
            from opd_jax.distributed import put_global
            from opd_jax.sharding import state_shardings
            state = put_global(state, state_shardings(state, tmesh, rules))
        model_cfg = student.cfg
    else:
        if not spec.path:
            raise OpdError(f"teacher {name!r} needs a path (a Hugging Face folder) or path: self")
        model = load_model(spec.path, dtype=spec.dtype, mesh=tmesh, rules=rules)
        with_runtime(model, attention=spec.attention, remat="none")
        graphdef, state = nnx.split(model)
        model_cfg = model.cfg
    vocab, context = model_cfg.vocab_size, model_cfg.max_position_embeddings
    if spec.privileged and sum(privileged_rows) > context:
        raise OpdError(f"teacher {name!r}: data.max_privileged_len {privileged_rows[0]} + max_new_tokens "
                       f"{privileged_rows[1]} = {sum(privileged_rows)} exceeds its context {context}")
    cross = cfg is not None and name in xtok_names(cfg)
    if not cross and vocab != student.cfg.vocab_size:
        raise OpdError(f"teacher {name!r} has vocabulary {vocab} but the student has {student.cfg.vocab_size}; "
                       "they must share a tokenizer, or set loss.cross_tokenizer bpm (or uld)")
    w = jax.lax.stop_gradient(nnx.merge(graphdef, state).output_matrix())  # placed like the weight it reads
    local = LocalTeacher(name, graphdef, state, vocab, tmesh, w, tuple(sorted((rules or {}).items())),
                         live=spec.reads_learner, base=spec.path == "base")
    if cross:
        return CrossTokenizer(local, build_cross_view(spec, cfg, tokenizer, stop, vocab, context, model_cfg))
    return local


def _scores(graphdef, state, tokens, full_mask, *, prompt_len, temperature, what, topk=0, layout=None,
            packed=False):
    """Teacher outputs at the completion positions (no gradient).

    tokens, full_mask [B, P+N]; packed (`opd_jax.packing`): tokens and segment ids [R, L], the outputs at
    the [R, L - 1] positions that predict tokens[:, 1:]. what="hidden": [B, N, D_t] final normed hidden states in the compute
    dtype (the loss applies the output matrix `Teacher.w` and the temperature chunk by chunk, so no
    [B, N, V] array exists); "logits": [B, N, V] float32 raw logits (small models and tests only);
    "logprobs": [B, N] log q_T(y_t) of the sampled tokens at the temperature; "topk": (log-probs
    [B, N, k], ids [B, N, k]) at the temperature; both formed 128 positions at a time; "logprobs+topk":
    (logprobs, (top-k log-probs, ids)) from one forward (a teacher server's reply needs both).
    """
    model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    with activation_layout(layout):  # on a mesh: rows stay on the batch axes through every layer
        h = (model.packed_hidden(tokens, full_mask)[:, :-1] if packed
             else model.completion_hidden(tokens, full_mask, prompt_len))
    if packed:
        prompt_len = 1  # the targets: tokens[:, 1:]
    if layout is not None:
        h = layout(h, ("batch", None, None))
    if what == "hidden":
        return h
    if what == "logits":
        return model.logits(h)
    # chunk by chunk over the completion (`losses.chunked`): no [B, N, V] log-softmax is formed
    from opd_jax.losses.chunked import chunked_token_logprobs, chunked_topk

    w = model.output_matrix()
    if what == "logprobs":
        return chunked_token_logprobs(h, w, tokens[:, prompt_len:], temperature=temperature)
    if what == "logprobs+topk":
        return (chunked_token_logprobs(h, w, tokens[:, prompt_len:], temperature=temperature),
                chunked_topk(h, w, topk, temperature=temperature))
    return chunked_topk(h, w, topk, temperature=temperature)


teacher_scores = jax.jit(_scores, static_argnames=("graphdef", "prompt_len", "temperature", "what", "topk", "packed"))


def teacher_forward(t: LocalTeacher, tokens, full_mask, *, prompt_len, temperature, what, topk=0, packed=False):
    """`teacher_scores` for one local teacher; on a mesh, jitted with explicit shardings: the teacher's
    parameters as placed, tokens / mask / outputs with rows over the batch mesh axes, activations
    constrained by the teacher's own rules (`mesh.teacher_rules`)."""
    if t.mesh is None:
        return teacher_scores(t.graphdef, t.state, tokens, full_mask, prompt_len=prompt_len, temperature=temperature,
                              what=what, topk=topk, packed=packed)
    from opd_jax.sharding import placed

    fn, in_sh = teacher_program(t, tokens.shape, prompt_len=prompt_len, temperature=temperature, what=what, topk=topk,
                                packed=packed)
    return fn(t.state, placed(tokens, in_sh), placed(full_mask, in_sh))


def teacher_program(t: LocalTeacher, shape, *, prompt_len, temperature, what, topk=0, packed=False):
    """(jitted forward, token sharding) of teacher `t` on its mesh for tokens of `shape` [B, P+N]."""
    from opd_jax.sharding import rows_sharding

    rules = dict(t.rules) or None
    rows = shape[0]
    in_sh = rows_sharding(rows, 2, t.mesh, rules)
    out_sh = rows_sharding(rows, 3 if what in ("logits", "hidden") else 2, t.mesh, rules)
    if what == "topk":
        out_sh = (rows_sharding(rows, 3, t.mesh, rules),) * 2
    state_sh, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, t.state))
    return _sharded_scores(t.graphdef, treedef, tuple(state_sh), in_sh, out_sh, prompt_len, temperature, what, topk,
                           t.mesh, t.rules, packed), in_sh


@functools.lru_cache(maxsize=64)
def _sharded_scores(graphdef, treedef, state_sh, in_sh, out_sh, prompt_len, temperature, what, topk, mesh, rules,
                    packed=False):
    """One jitted teacher forward per (architecture, placement, settings): teachers of one shape (and
    a rebuilt run) share the compiled program."""
    from opd_jax.sharding import layout_fn

    return jax.jit(functools.partial(_scores, graphdef, prompt_len=prompt_len, temperature=temperature, what=what,
                                     topk=topk, layout=layout_fn(mesh, dict(rules) or None), packed=packed),
                   in_shardings=(jax.tree.unflatten(treedef, state_sh), in_sh, in_sh), out_shardings=out_sh)


def score_batch(teachers: dict[str, Teacher], groups: dict[str, list[int]], rows: Rows, *, what: str,
                temperature: float, topk: int = 0) -> Scored:
    """Score a batch whose rows are routed by `groups` (teacher name -> row indices, `RowLayout.groups`):
    each teacher scores all of its rows once (`Teacher.score`).

    -> Scored: out, what="hidden": {name: [rows of that teacher, N, D_t]} (its rows in `groups` order;
    teachers may differ in width), otherwise the scores in batch row order (the layout of
    `teacher_scores`); keep [B, N] (host int32): the completion mask times each teacher's covered
    positions, or None when every teacher covers every position; stats summed over the teachers.
    """
    outs, keeps, stats = {}, {}, {}
    for name, idx in groups.items():
        s = teachers[name].score(rows.take(idx), what, temperature=temperature, topk=topk)
        outs[name] = jax.tree.map(jnp.asarray, s.out)
        if s.keep is not None:
            keeps[name] = s.keep
        for k, v in s.stats.items():
            stats[k] = stats.get(k, 0.0) + v
    keep = None
    if keeps:
        from opd_jax.distributed import to_host

        keep = np.asarray(to_host(rows.full_mask)[:, rows.prompt_len:], np.int32).copy()  # the mask alone
        for name, k in keeps.items():
            keep[np.asarray(groups[name])] *= np.asarray(k, np.int32)
    if what == "hidden":
        return Scored(outs, keep, stats)
    inverse = np.argsort(np.concatenate([groups[n] for n in outs]))  # back to batch row order
    back = (lambda x: x) if len(outs) == 1 else (lambda x: x[inverse])
    if what == "topk":
        out = tuple(back(jnp.concatenate([o[k] for o in outs.values()])) for k in (0, 1))
    else:
        out = back(jnp.concatenate(list(outs.values())))
    return Scored(out, keep, stats)
