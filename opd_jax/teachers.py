"""Frozen teachers, routed by prompt domain, scoring the student's rollouts.

A teacher is a `Transformer` whose parameters never receive a gradient or optimizer state: the
trainer holds only its (graphdef, state) and calls a jitted forward. `self` is the frozen snapshot
of the student's parameters at the start of training. Batches are grouped by domain (fixed rows per
domain), so each teacher scores only its own contiguous, fixed-size slice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.errors import OpdError
from opd_jax.models import load_model
from opd_jax.models.transformer import activation_layout, with_runtime
from opd_jax.xtok_teacher import build_cross_view, xtok_names


@dataclass
class Teacher:
    name: str
    graphdef: object
    state: object  # nnx.State, frozen
    vocab_size: int
    mesh: object = None  # with a mesh, the forward is jitted with explicit shardings (see `teacher_forward`)
    w: object = None  # output matrix [D_t, V] in the compute dtype: the loss applies it chunk by chunk
    rules: tuple = ()  # the teacher rules (mesh.teacher_rules) as sorted items: its parameters and activations
    live: bool = False  # path self_live: scored with the student's current parameters (given per call)
    privileged: str = ""  # "answer": its prompt is `template` filled with the row's prompt and answer (OPSD);
    # "context": `template` filled with the prompt alone (an instruction the student does not see)
    template: str = ""
    cross: object = None  # a cross-tokenizer teacher (loss.cross_tokenizer): its xtok_teacher.CrossView


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
                   stop: tuple = ()) -> dict[str, Teacher]:
    """Load every teacher named in `specs`; check routing and vocabularies before any compute.

    specs: TeacherSpec items (path = HF folder or "self"). routing: domain -> teacher name; a
    missing domain, an unknown teacher name or a vocabulary that differs from the student's is a
    clear error. roles: the MeshConfig whose mesh.roles may give a teacher devices of its own (its
    outputs then move to the learner's devices at the update). privileged_rows: (data.max_privileged_len,
    max_new_tokens), checked against a privileged teacher's context. cfg (with loss.cross_tokenizer
    set): teachers from folders are scored in their own tokens (`xtok_teacher`), `stop` the student's
    stop ids. Returns name -> Teacher (or
    serving.ServedTeacher) for the teachers that some domain uses.
    """
    names = check_routing(specs, routing, domains)
    out = {}
    for name in sorted({routing[d] for d in domains}):
        spec = names[name]
        check_privileged(spec)
        if spec.url:  # behind a server: checked now (reachable, same vocabulary), scored over HTTP
            if spec.path:
                raise OpdError(f"teacher {name!r} has both a path and a url; give one")
            from opd_jax.serving import ServedTeacher
            served = ServedTeacher(name, spec.url, spec.model, spec.timeout, spec.retries)
            served.check(student.cfg.vocab_size, tokenizer)
            served.privileged, served.template = spec.privileged, spec.privileged_template
            out[name] = served
            continue
        tmesh = mesh
        if mesh is not None and roles is not None:  # mesh.roles: a teacher on devices of its own
            from opd_jax.sharding import mesh_from_config
            tmesh = mesh_from_config(roles, name)
        if spec.path in ("self", "self_live"):
            graphdef, state = nnx.split(student)
            state = jax.tree.map(jnp.copy, state)  # own buffers: the student's are donated to each update
            if mesh is not None:
                from opd_jax.distributed import put_global
                from opd_jax.sharding import state_shardings
                state = put_global(state, state_shardings(state, tmesh, rules))
            vocab = student.cfg.vocab_size
        else:
            if not spec.path:
                raise OpdError(f"teacher {name!r} needs a path (a Hugging Face folder) or path: self")
            model = load_model(spec.path, dtype=spec.dtype, mesh=tmesh, rules=rules)
            with_runtime(model, attention=spec.attention, remat="none")
            graphdef, state = nnx.split(model)
            vocab = model.cfg.vocab_size
        context = (student.cfg if spec.path in ("self", "self_live") else model.cfg).max_position_embeddings
        if spec.privileged and sum(privileged_rows) > context:
            raise OpdError(f"teacher {name!r}: data.max_privileged_len {privileged_rows[0]} + max_new_tokens "
                           f"{privileged_rows[1]} = {sum(privileged_rows)} exceeds its context {context}")
        cross = None
        if cfg is not None and name in xtok_names(cfg):
            cross = build_cross_view(spec, cfg, tokenizer, stop, vocab, context, model.cfg)
        elif vocab != student.cfg.vocab_size:
            raise OpdError(f"teacher {name!r} has vocabulary {vocab} but the student has {student.cfg.vocab_size}; "
                           "they must share a tokenizer, or set loss.cross_tokenizer bpm (or uld)")
        w = jax.lax.stop_gradient(nnx.merge(graphdef, state).output_matrix())  # placed like the weight it reads
        out[name] = Teacher(name, graphdef, state, vocab, tmesh, w, tuple(sorted((rules or {}).items())),
                            live=spec.path == "self_live", privileged=spec.privileged, template=spec.privileged_template,
                            cross=cross)
    return out


def _scores(graphdef, state, tokens, full_mask, *, prompt_len, temperature, what, topk=0, layout=None):
    """Teacher outputs at the completion positions (no gradient).

    tokens, full_mask [B, P+N]. what="hidden": [B, N, D_t] final normed hidden states in the compute
    dtype (the loss applies the output matrix `Teacher.w` and the temperature chunk by chunk, so no
    [B, N, V] array exists); "logits": [B, N, V] float32 raw logits (small models and tests only);
    "logprobs": [B, N] log q_T(y_t) of the sampled tokens at the temperature; "topk": (log-probs
    [B, N, k], ids [B, N, k]) at the temperature; both formed 128 positions at a time.
    """
    model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    with activation_layout(layout):  # on a mesh: rows stay on the batch axes through every layer
        h = model.completion_hidden(tokens, full_mask, prompt_len)
    if layout is not None:
        h = layout(h, ("batch", None, None))
    if what == "hidden":
        return h
    if what == "logits":
        return model.logits(h)
    # chunk by chunk over the completion (`losses.chunked`): no [B, N, V] log-softmax is formed
    from opd_jax.losses.chunked import chunked_token_logprobs, chunked_topk

    if what == "logprobs":
        return chunked_token_logprobs(h, model.output_matrix(), tokens[:, prompt_len:], temperature=temperature)
    return chunked_topk(h, model.output_matrix(), topk, temperature=temperature)


teacher_scores = jax.jit(_scores, static_argnames=("graphdef", "prompt_len", "temperature", "what", "topk"))


def teacher_forward(t: Teacher, tokens, full_mask, *, prompt_len, temperature, what, topk=0):
    """`teacher_scores` for one teacher; on a mesh, jitted with explicit shardings: the teacher's
    parameters as placed, tokens / mask / outputs with rows over the batch mesh axes, activations
    constrained by the teacher's own rules (`mesh.teacher_rules`)."""
    if not isinstance(t, Teacher):  # a served teacher (opd_jax.serving.ServedTeacher): host arrays over HTTP
        from opd_jax.distributed import to_host
        out = t.score(to_host(tokens), to_host(full_mask), prompt_len=prompt_len, temperature=temperature, what=what,
                      topk=topk)
        return jax.tree.map(jnp.asarray, out)
    if t.mesh is None:
        return teacher_scores(t.graphdef, t.state, tokens, full_mask, prompt_len=prompt_len, temperature=temperature,
                              what=what, topk=topk)
    from opd_jax.sharding import placed

    fn, in_sh = teacher_program(t, tokens.shape, prompt_len=prompt_len, temperature=temperature, what=what, topk=topk)
    return fn(t.state, placed(tokens, in_sh), placed(full_mask, in_sh))


def teacher_program(t: Teacher, shape, *, prompt_len, temperature, what, topk=0):
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
                           t.mesh, t.rules), in_sh


@functools.lru_cache(maxsize=64)
def _sharded_scores(graphdef, treedef, state_sh, in_sh, out_sh, prompt_len, temperature, what, topk, mesh, rules):
    """One jitted teacher forward per (architecture, placement, settings): teachers of one shape (and
    a rebuilt run) share the compiled program."""
    from opd_jax.sharding import layout_fn

    return jax.jit(functools.partial(_scores, graphdef, prompt_len=prompt_len, temperature=temperature, what=what,
                                     topk=topk, layout=layout_fn(mesh, dict(rules) or None)),
                   in_shardings=(jax.tree.unflatten(treedef, state_sh), in_sh, in_sh), out_shardings=out_sh)


def score_batch(teachers: dict[str, Teacher], groups: dict[str, list[int]], tokens, full_mask, *, prompt_len: int,
                temperature: float, what: str, topk: int = 0, views: dict | None = None, live=None):
    """Score a batch whose rows are routed by `groups` (teacher name -> row indices,
    `RowLayout.groups`): each teacher runs once, on all of its rows.

    views: {name: (tokens, full_mask, prompt_len[, post])} of that teacher's rows as it sees them (a
    privileged teacher: its own prompt [n, P_t], then the same completion; a cross-tokenizer teacher: its
    own tokens, and `post` bringing its outputs to the student's positions); live: the student's current
    parameters, for self_live teachers. what="hidden": {name: [rows of that teacher, N, D_t]} (its
    rows in `groups` order; teachers may differ in width). Otherwise the scores in batch row order
    (the layout of `teacher_scores`).
    """
    import dataclasses

    outs = {}
    for name, idx in groups.items():
        whole = idx == list(range(tokens.shape[0]))
        take = (lambda x: x) if whole else (lambda x, i=np.asarray(idx): x[i])
        t = teachers[name]
        if getattr(t, "live", False):
            if live is None:
                raise OpdError(f"teacher {name!r} is self_live but no current parameters were given")
            t = dataclasses.replace(t, state=live)
        post = lambda x: x  # noqa: E731
        if views and name in views:
            toks, fmask, plen, *rest = views[name]
            post = rest[0] if rest else post
        else:
            toks, fmask, plen = take(tokens), take(full_mask), prompt_len
        outs[name] = post(teacher_forward(t, toks, fmask, prompt_len=plen, temperature=temperature, what=what,
                                          topk=topk))
    if what == "hidden":
        return outs
    inverse = np.argsort(np.concatenate([groups[n] for n in outs]))  # back to batch row order
    back = (lambda x: x) if len(outs) == 1 else (lambda x: x[inverse])
    if what == "topk":
        return tuple(back(jnp.concatenate([o[k] for o in outs.values()])) for k in (0, 1))
    return back(jnp.concatenate(list(outs.values())))
