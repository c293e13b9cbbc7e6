"""A teacher with its own tokenizer: which teachers score across tokenizers, the one-line refusals, and
the teacher's view of a batch (its prompt through its own chat template, the student's completion
re-tokenized by its tokenizer and aligned by byte offsets, `opd_jax.xtok.align_rows`).

`loss.cross_tokenizer` (bpm | uld) turns it on; every teacher loaded from a folder (not self / self_live)
is then scored in its own tokens, even when its tokenizer equals the student's (the identity case the
tests compare with same-tokenizer distillation). The update receives the teacher's hidden states at
the aligned positions [rows, N, D_t] (full / top-k) or its log-probs summed per segment [B, N]
(sampled / rl), a loss mask [B, N] of the positions those cover, and its output matrix with the
vocabulary map {"w": [D_t, V_t], "map": [V_t]} (`opd_jax.losses.xtok`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from opd_jax.errors import OpdError
from opd_jax.xtok import align_rows, token_bytes, vocab_map

HOWS = ("bpm", "uld")


def xtok_names(cfg) -> list[str]:
    """The teachers scored across tokenizers: all loaded from a folder when loss.cross_tokenizer is set."""
    if not cfg.loss.cross_tokenizer:
        return []
    return [t.name for t in cfg.teachers if not t.is_student]


def check_xtok(cfg):
    """One-line errors for a cross-tokenizer run no code path can honour (before anything is loaded)."""
    how = cfg.loss.cross_tokenizer
    if how not in ("",) + HOWS:
        raise OpdError(f"config loss.cross_tokenizer must be bpm, uld or empty, got {how!r}")
    if not how:
        return
    for t in cfg.teachers:
        if t.is_student:
            continue
        if t.url:
            raise OpdError(f"teacher {t.name!r} is served (url): a server scores the student's own token ids, so it "
                           "cannot be a cross-tokenizer teacher; load it from a folder (path)")
        if t.privileged:
            raise OpdError(f"teacher {t.name!r}: privileged prompts with a cross-tokenizer teacher are not supported; "
                           "drop privileged or loss.cross_tokenizer")
        tokenizer_folder(t)
    if how == "uld" and cfg.loss.estimator_type == "topk":
        raise OpdError("loss.cross_tokenizer uld has no top-k form (it compares sorted probabilities); use "
                       "loss.estimator_type full, or cross_tokenizer bpm")
    if cfg.optim.effopd_guard or cfg.optim.effopd_line_search:
        raise OpdError("the EffOPD guard / line search scores a same-tokenizer probe; it does not run with "
                       "loss.cross_tokenizer")


@dataclass(frozen=True, eq=False)
class CrossView:
    """What a cross-tokenizer teacher needs to see a batch: its tokenizer and prompter, both byte
    tables, the student's stop ids, its vocabulary map onto the student's, its prompt / completion
    lengths (in its tokens)."""

    tokenizer: object
    prompter: object
    table: list
    student_table: list
    stop: tuple
    vmap: np.ndarray
    p_len: int
    m_len: int

    def view(self, examples, comp, comp_mask):
        """Teacher ids and mask [n, P_t + M] of `examples` with completions comp [n, N] (mask [n, N]),
        and their alignment (`Aligned`)."""
        try:
            ids, pmask = self.prompter.encode(examples, self.p_len)
        except OpdError as e:
            raise OpdError(f"a cross-tokenizer teacher's prompt: {e} (its limit is teachers[].max_prompt_len, now "
                           f"{self.p_len})") from None
        al = align_rows(comp, comp_mask, self.student_table, self.stop, self.tokenizer, self.table, self.m_len,
                        pad_id=self.tokenizer.pad_token_id or 0)
        return np.concatenate([ids, al.tokens], 1), np.concatenate([pmask, al.mask], 1), al


@dataclass
class CrossTokenizer:
    """A teacher that scores the student's rows in its own tokens (`CrossView`), around the local teacher
    `inner`: its hand-over comes back at the student's positions (hidden states gathered at the aligned
    teacher positions, or log-probs summed per segment), with the positions it covers (`Scored.keep`) and
    the alignment statistics."""

    inner: object
    cross: CrossView

    name = property(lambda self: self.inner.name)
    vocab_size = property(lambda self: self.inner.vocab_size)
    live = property(lambda self: self.inner.live)
    packs = False  # its own tokens: it scores the padded rows (packed runs move its scores: `Rollouts._scatter`)

    def score(self, rows, what: str, *, temperature: float, topk: int = 0):
        import jax.numpy as jnp

        from opd_jax.batch import Rows, Scored

        if rows.examples is None:
            raise OpdError(f"teacher {self.name!r} scores in its own tokens but the rows' examples were not given")
        if what not in ("hidden", "logprobs"):
            raise OpdError(f"teacher {self.name!r} scores in its own tokens, which hands over hidden states or "
                           f"log-probs, not {what!r}")
        comp, cmask = rows.completions()
        t0 = time.perf_counter()
        ids, fmask, al = self.cross.view(rows.examples, comp, cmask)
        seconds = time.perf_counter() - t0
        keep = al.aligned if what == "hidden" else al.whole
        stats = {"aligned": float(np.sum(keep * cmask)), "tokens": float(np.sum(cmask)), "seconds": seconds,
                 **{k: float(getattr(al, k)) for k in ("dropped", "truncated", "partial")}}
        own = Rows(rows.put(ids), rows.put(fmask), self.cross.p_len, rows.examples, rows.params, rows.place)
        out = self.inner.score(own, what, temperature=temperature, topk=topk).out
        n_new = cmask.shape[1]
        if what == "hidden":
            out = jnp.take_along_axis(out, rows.put(al.gather)[..., None], 1)
        else:
            seg = rows.put(al.segment)
            out = jnp.zeros((out.shape[0], n_new + 1), jnp.float32).at[jnp.arange(out.shape[0])[:, None], seg].add(
                out)[:, :n_new]
        return Scored(out, keep, stats)

    def output_matrix(self):
        return {"w": self.inner.w, "map": self.cross.vmap}

    def metrics(self) -> dict:
        return {}


def xtok_metrics(stats: dict, prefix: str = "xtok") -> dict:
    """The log's cross-tokenizer figures from `score_batch`'s summed statistics (nothing without them)."""
    if "tokens" not in stats:
        return {}
    return {f"{prefix}/aligned_fraction": stats["aligned"] / max(stats["tokens"], 1.0),
            f"{prefix}/dropped_rows": stats["dropped"], f"{prefix}/truncated_rows": stats["truncated"],
            f"{prefix}/partial_rows": stats["partial"], f"{prefix}/align_seconds": stats["seconds"]}


def tokenizer_folder(spec) -> str:
    """The folder of teacher `spec`'s tokenizer (teachers[].tokenizer, else its model folder); one line
    when it has none."""
    from pathlib import Path

    folder = spec.tokenizer or spec.path
    if not folder or not ((Path(folder) / "tokenizer.json").exists()
                          or (Path(folder) / "tokenizer_config.json").exists()):
        raise OpdError(f"teacher {spec.name!r} has no tokenizer (no tokenizer.json in {folder}); give "
                       "teachers[].tokenizer, the folder of the tokenizer it was trained with")
    return folder


def check_tokenizer_fits(name: str, folder, tok, model_cfg, model_dir=None):
    """One line when teacher `name`'s tokenizer (from `folder`) cannot be the one its model was trained
    with: more tokens than the model's vocabulary, a BOS id that is not the model config's, or an EOS
    id outside the model's (config.json's eos_token_id, whole list, and generation_config.json's)."""
    import json
    from pathlib import Path

    from opd_jax.tasks.tokenizer import stop_ids

    if len(tok) > model_cfg.vocab_size:
        raise OpdError(f"teacher {name!r}: the tokenizer in {folder} has {len(tok)} tokens but the model only "
                       f"{model_cfg.vocab_size}; give teachers[].tokenizer, the tokenizer it was trained with")
    eos = model_cfg.eos_token_id
    if model_dir is not None and (Path(model_dir) / "config.json").exists():
        try:
            eos = json.loads((Path(model_dir) / "config.json").read_text()).get("eos_token_id", eos)
        except (ValueError, AttributeError):
            pass
    model_eos = {e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)}
    if model_eos and tok.eos_token_id is not None:
        model_eos |= set(stop_ids(type("NoEos", (), {"eos_token_id": None})(), model_dir))
        if tok.eos_token_id not in model_eos:
            raise OpdError(f"teacher {name!r}: the tokenizer in {folder} ends text with id {tok.eos_token_id} but the "
                           f"model's EOS is {sorted(model_eos)}; give teachers[].tokenizer, the tokenizer it was "
                           "trained with")
    if model_cfg.bos_token_id is not None and tok.bos_token_id is not None and tok.bos_token_id != model_cfg.bos_token_id:
        raise OpdError(f"teacher {name!r}: the tokenizer in {folder} starts text with id {tok.bos_token_id} but the "
                       f"model's BOS is {model_cfg.bos_token_id}; give teachers[].tokenizer, the tokenizer it was "
                       "trained with")


def build_cross_view(spec, cfg, student_tok, stop: tuple, teacher_vocab: int, context: int,
                     model_cfg=None) -> CrossView:
    """The CrossView of teacher `spec` (its tokenizer folder: spec.tokenizer, else its model folder);
    model_cfg: the teacher's ModelConfig, whose vocabulary and BOS / EOS the tokenizer must fit."""
    from opd_jax.tasks import Prompter
    from opd_jax.tasks.tokenizer import load_tokenizer

    folder = tokenizer_folder(spec)
    tok = load_tokenizer(folder)
    if model_cfg is not None:
        check_tokenizer_fits(spec.name, folder, tok, model_cfg, spec.path)
    elif len(tok) > teacher_vocab:
        raise OpdError(f"teacher {spec.name!r}: its tokenizer has {len(tok)} tokens but the model only {teacher_vocab}")
    dc = cfg.data
    p_len = spec.max_prompt_len or 2 * dc.max_prompt_len
    m_len = spec.max_new_tokens or 2 * dc.max_new_tokens
    if p_len + m_len > context:
        raise OpdError(f"teacher {spec.name!r}: its prompt {p_len} + completion {m_len} tokens exceed its context "
                       f"{context}; lower teachers[].max_prompt_len / max_new_tokens")
    return CrossView(tok, Prompter(tok, dc.chat_template, dc.chat_template_kwargs), token_bytes(tok),
                     token_bytes(student_tok), tuple(stop),
                     vocab_map(tok, student_tok, cfg.loss.cross_tokenizer, teacher_vocab=teacher_vocab,
                               student_stop=tuple(stop)), p_len, m_len)
