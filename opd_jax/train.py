"""The OPD loop: sample -> teacher scores -> loss / gradient -> update -> log / checkpoint.

Every step's prompts and sampling key are pure functions of (seed, step), and the checkpoint holds
params, optimizer state, RNG and data position, so a run resumed from step k continues exactly as
the uninterrupted run would have.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from opd_jax import checkpoint as ckpt
from opd_jax import distributed as dist
from opd_jax import sharding as shd
from opd_jax.config import Config, to_dict
from opd_jax.errors import OpdError
from opd_jax.evaluate import decode_completions, greedy_accuracy, rewards_for
from opd_jax.metrics import MetricsWriter, SamplesWriter, plot_metrics
from opd_jax.models import ModelConfig, init_model, load_model
from opd_jax.models.transformer import with_runtime
from opd_jax.plan import check_fits
from opd_jax.optim import find_state, jumped, load_mask, make_optimizer, undo_jump
from opd_jax.sampling import generate
from opd_jax.tasks import (Prompter, PromptSource, build_char_tokenizer, encode_pairs, load_tokenizer, stop_ids,
                           verifiers_for)
from opd_jax.teachers import build_teachers, score_batch
from opd_jax.timing import NO_TIMER, PhaseTimer
from opd_jax.preemption import Preemption
from opd_jax.train_step import (check_loss_config, check_micro_batch, probe_divergence, sharded_train_step,
                                teacher_output_kind, uses_rl)


LINE_SEARCH_ALPHAS = (0.0, 0.5, 1.0, 2.0, 4.0)  # optim.effopd_line_search: step sizes along d_k tried after each window


def train_state(params, opt_state, step: int, key) -> dict:
    """What a checkpoint holds: params, optimizer state, step, data position (= step) and the RNG key."""
    # host scalars (numpy): the same on every process, written once by Orbax in a multi-host run
    return {"params": params, "opt_state": opt_state, "step": np.asarray(step, np.int32), "data_position": np.asarray(step, np.int32),
            "rng": np.asarray(jax.random.key_data(key))}


def build_student(spec, seed: int, remat: str = "none", mesh=None, rules=None):
    """The student model: read from its HF folder (with a mesh, each device receives only its own
    shard: no full copy on one device) or initialised from `spec.init`."""
    if spec.path:
        model = load_model(spec.path, dtype=spec.dtype, mesh=mesh, rules=rules)
    else:
        try:
            cfg = ModelConfig(**{"param_dtype": spec.dtype, "dtype": spec.dtype, **spec.init})
        except TypeError as e:
            raise OpdError(f"student.init: {e}") from None
        model = init_model(cfg, seed)
    return with_runtime(model, attention=spec.attention, remat=remat)


def get_tokenizer(cfg: Config):
    """data.tokenizer, else the student folder's own tokenizer, else the built-in character tokenizer
    (built in memory; the run writes it to its folder when training starts)."""
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    if cfg.student.path and (Path(cfg.student.path) / "tokenizer.json").exists():
        return load_tokenizer(cfg.student.path)
    return build_char_tokenizer(None)


class Trainer:
    """Holds what a run needs; `run()` trains from scratch or from the last checkpoint."""

    def __init__(self, cfg: Config, *, resume: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.train.out_dir)
        self.resume = resume
        check_loss_config(cfg.loss)
        dist.initialize(cfg.distributed)
        self.mesh = shd.mesh_from_config(cfg.mesh)
        self.rules = shd.rules_named(cfg.mesh.rules)
        self.source = PromptSource(cfg.data.domains, cfg.data.path, seed=cfg.train.seed)
        dc, nd = cfg.data, len(self.source.domains)
        self.routes = tuple(cfg.routing.get(d, "") for d in self.source.domains)  # teacher of each domain's rows
        parts = {k: nd * dc.per_domain * g for k, g, used in
                 (("on", dc.group_size, cfg.loss.lam > 0), ("off", 1, cfg.loss.lam < 1)) if used}
        if cfg.train.micro_batch != "auto":
            check_micro_batch(cfg.train.micro_batch, parts, cfg.loss, dc.group_size, self.routes)
        self.tokenizer = get_tokenizer(cfg)
        self.stop = stop_ids(self.tokenizer, cfg.student.path)  # EOS + the model's generation_config.json
        self.prompter = Prompter(self.tokenizer, dc.chat_template, dc.chat_template_kwargs)
        self.verifiers = verifiers_for(dc.verifiers, self.source.domains)  # rewards and eval accuracy
        self.eval_examples = self.source.batch(0, cfg.train.eval_per_domain, stream=1)
        self.prompt_len = cfg.data.max_prompt_len
        self.prompter.encode(self.eval_examples, self.prompt_len)  # template / length errors now, before any compile
        # the compiled step's memory from shapes only, before any weights are read (resolves micro_batch=auto)
        self.micro, _ = check_fits(cfg)
        self.student = build_student(cfg.student, cfg.train.seed, cfg.train.remat, self.mesh, self.rules)
        if self.student.cfg.vocab_size < len(self.tokenizer):
            raise OpdError(f"student vocabulary {self.student.cfg.vocab_size} is smaller than the tokenizer's "
                           f"{len(self.tokenizer)}")
        lc = cfg.loss  # pure reward RL (GRPO, alpha = 0) on on-policy data is the one mode without teachers
        need_teachers = not (lc.lam == 1 and lc.rl_mode == "mix" and lc.rl_alpha == 0)
        self.teachers = (build_teachers(cfg.teachers, cfg.routing, self.source.domains, self.student, mesh=self.mesh,
                                        rules=shd.rules_named(cfg.mesh.teacher_rules)) if need_teachers else {})
        self.graphdef, state = nnx.split(self.student)
        # explicit shardings at the step boundary: params / optimizer state in and out alike, so every
        # step reuses one executable and nothing is resharded between steps
        self.param_sh = shd.param_shardings(self.student, self.mesh, self.rules)
        self.params = dist.put_global(nnx.to_pure_dict(state), self.param_sh)
        self.optimizer = make_optimizer(cfg.optim, cfg.train.steps, self.params)
        self.opt_sh = shd.opt_state_shardings(self.optimizer, self.params, self.param_sh, self.mesh)
        self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_sh)(self.params)
        self.step_fn = sharded_train_step(self.graphdef, optimizer=self.optimizer, lc=cfg.loss,
                                          prompt_len=cfg.data.max_prompt_len, group_size=cfg.data.group_size,
                                          temperature=cfg.data.temperature, mesh=self.mesh, param_sh=self.param_sh,
                                          opt_sh=self.opt_sh, rules=self.rules, micro=self.micro,
                                          routes=self.routes)
        # hidden-state modes: the loss applies each teacher's output matrix chunk by chunk
        self.teacher_w = ({n: t.w for n, t in self.teachers.items()}
                          if self.teachers and teacher_output_kind(cfg.loss) == "hidden" else None)
        self.base_key = jax.random.key(cfg.train.seed)
        self.samples = None  # the last on-policy batch's (examples, completions, rewards), for samples.jsonl
        self._setup_guard()

    # ------------------------------------------------------------------ state
    def train_state(self, step: int) -> dict:
        return train_state(self.params, self.opt_state, step, self.base_key)

    def model(self):
        return nnx.merge(self.graphdef, self.params)

    # ------------------------------------------------------------------ batches
    def _scores(self, tokens, full_mask, rows_per_domain):
        lc, dc = self.cfg.loss, self.cfg.data
        return score_batch(self.teachers, self.cfg.routing, self.source.domains, rows_per_domain, tokens, full_mask,
                           prompt_len=self.prompt_len, temperature=dc.temperature, what=teacher_output_kind(lc),
                           topk=lc.topk)

    def on_policy_batch(self, step: int, examples, decode: bool = True, timer: PhaseTimer = NO_TIMER):
        """Sample the student's completions and score them. decode: bring the completions to the host
        and score them with the verifiers (RL rewards, eval steps, samples log); otherwise rewards are
        None and nothing waits for the sampler. -> (batch, teacher row slices, rewards)."""
        dc = self.cfg.data
        g = dc.group_size
        rep = [ex for ex in examples for _ in range(g)]  # each prompt's G samples contiguous (GRPO groups)
        ids, pmask = self.prompter.encode(rep, self.prompt_len)
        timer.mark("host")
        roll = timer.mark("sample", generate(
            self.model(), ids, pmask, key=jax.random.fold_in(self.base_key, step), max_new_tokens=dc.max_new_tokens,
            temperature=dc.temperature, top_k=dc.top_k, top_p=dc.top_p, eos_id=list(self.stop),
            pad_id=self.tokenizer.pad_token_id or 0, mesh=self.mesh, rules=self.rules))
        rewards = None
        if decode:
            texts = decode_completions(self.tokenizer, dist.to_host(roll.tokens)[:, self.prompt_len:],
                                       dist.to_host(roll.mask), self.stop)
            rewards = rewards_for(rep, texts, self.verifiers)
            self.samples = (rep, texts, rewards)
        batch = {"tokens": roll.tokens, "prompt_mask": self._rows(pmask), "mask": roll.mask,
                 "sampler_logprobs": roll.logprobs,
                 "rewards": self._rows(np.zeros(len(rep), np.float32) if rewards is None else rewards)}
        timer.mark("host")
        if self.teachers:
            full_mask = jnp.concatenate([batch["prompt_mask"], roll.mask], 1)
            batch["teacher"], rows = timer.mark("teacher", *self._scores(roll.tokens, full_mask, dc.per_domain * g))
        else:
            batch["teacher"], rows = self._rows(np.zeros(roll.mask.shape, np.float32)), {}
        return batch, rows, rewards

    def _rows(self, x):
        """Host data (every process knows all of it) -> a global array with rows over the batch axes."""
        x = np.asarray(x)
        return dist.to_global(x, shd.rows_sharding(x.shape[0], x.ndim, self.mesh, self.rules))

    def off_policy_batch(self, examples, timer: PhaseTimer = NO_TIMER):
        if any(e.answer is None for e in examples):
            raise OpdError("loss.lam < 1 needs dataset answers, but some prompts have no 'answer'")
        tokens, pmask, amask = (self._rows(x) for x in encode_pairs(
            self.prompter, examples, [e.answer for e in examples], self.prompt_len,
            self.cfg.data.max_new_tokens))
        timer.mark("host")
        teacher, _ = timer.mark("teacher", *self._scores(tokens, jnp.concatenate([pmask, amask], 1),
                                                         self.cfg.data.per_domain))
        return {"tokens": tokens, "prompt_mask": pmask, "mask": amask, "teacher": teacher}

    # ------------------------------------------------------------------ EffOPD guard
    def _setup_guard(self):
        oc = self.cfg.optim
        self.guard = bool(oc.effopd_guard or oc.effopd_line_search)
        if not self.guard:
            return
        what = "optim.effopd_line_search" if oc.effopd_line_search else "optim.effopd_guard"
        if oc.effopd_window <= 0:
            raise OpdError(f"{what} needs EffOPD on (optim.effopd_window > 0)")
        if oc.accumulate > 1:
            raise OpdError(f"{what} does not support optim.accumulate > 1; set one of them off")
        if not self.teachers:
            raise OpdError(f"{what} measures the teacher divergence, so it needs teachers")
        self.probe_examples = self.source.batch(0, oc.effopd_probe_per_domain, stream=2)  # held out from training
        self.guard_mask = load_mask(oc.mask, self.params) if oc.mask else None

    def probe(self, params, tokens_from=None):
        """Exact teacher divergence of `params` on the probe prompts. The probe completions are sampled
        (fixed key) from `tokens_from` (default `params`) so two parameter sets can be compared on the same tokens."""
        dc, per = self.cfg.data, self.cfg.optim.effopd_probe_per_domain
        if tokens_from is None:
            ids, pmask = self.prompter.encode(self.probe_examples, self.prompt_len)
            roll = generate(nnx.merge(self.graphdef, params), ids, pmask, mesh=self.mesh, rules=self.rules,
                            key=jax.random.fold_in(self.base_key, 2**31 - 1), max_new_tokens=dc.max_new_tokens,
                            temperature=dc.temperature, top_k=dc.top_k, top_p=dc.top_p,
                            eos_id=list(self.stop), pad_id=self.tokenizer.pad_token_id or 0)
            pmask = self._rows(pmask)
            full_mask = jnp.concatenate([pmask, roll.mask], 1)
            teacher, _ = score_batch(self.teachers, self.cfg.routing, self.source.domains, per, roll.tokens, full_mask,
                                     prompt_len=self.prompt_len, temperature=dc.temperature, what="hidden")
            tokens_from = {"tokens": roll.tokens, "prompt_mask": pmask, "mask": roll.mask,
                           "teacher": teacher}
        div = probe_divergence(self.graphdef, params, tokens_from, {n: t.w for n, t in self.teachers.items()},
                               lc=self.cfg.loss, prompt_len=self.prompt_len, temperature=dc.temperature,
                               routes=self.routes)
        return float(div), tokens_from

    def _guard_jump(self) -> dict:
        """After an update that extrapolated: keep the jump only if it does not raise the probe divergence."""
        st = find_state(self.opt_state)
        if st is None or not bool(jumped(st)):
            return {}
        without = undo_jump(self.params, st, self.guard_mask)
        before, probe_batch = self.probe(without)
        if self.cfg.optim.effopd_line_search:
            return self._line_search(without, before, probe_batch, float(st.cosine))
        after, _ = self.probe(self.params, probe_batch)
        rolled = after > before
        if rolled:
            self.params = jax.device_put(without, self.param_sh)
        return {"effopd/alpha": float(st.alpha), "effopd/cosine": float(st.cosine), "effopd/probe_before": before,
                "effopd/probe_after": after, "effopd/rolled_back": float(rolled)}

    def _line_search(self, without, before: float, probe_batch, cosine: float) -> dict:
        """EffOPD's adaptive step as a line search: the transform jumped exactly d_k (fixed alpha 1), so
        candidate alpha is without + alpha * (params - without); the probe divergence picks it (ties go
        to the smaller alpha, and alpha = 0 is the update without any jump)."""
        jump = jax.tree.map(lambda p, w: p.astype(jnp.float32) - w.astype(jnp.float32), self.params, without)
        at = lambda a: jax.tree.map(lambda w, d: (w.astype(jnp.float32) + a * d).astype(w.dtype), without, jump)  # noqa: E731
        scores = {0.0: before}
        for a in LINE_SEARCH_ALPHAS[1:]:
            scores[a], _ = self.probe(at(a), probe_batch)
        best = min(scores, key=lambda a: (scores[a], a))
        self.params = jax.device_put(at(best), self.param_sh)
        return {"effopd/alpha": best, "effopd/cosine": cosine, "effopd/probe_before": before,
                "effopd/probe_after": scores[best], "effopd/rolled_back": float(best == 0.0),
                **{f"effopd/probe_alpha_{a:g}": v for a, v in scores.items()}}

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> tuple[dict, list[dict]]:
        """Greedy accuracy per domain (the domains' verifiers) and the greedy completions as samples."""
        acc, texts, rewards = greedy_accuracy(
            self.model(), self.tokenizer, self.eval_examples, max_prompt_len=self.prompt_len,
            max_new_tokens=self.cfg.data.max_new_tokens, mesh=self.mesh, stop=self.stop, prompter=self.prompter,
            verifiers=self.verifiers, return_texts=True)
        return {f"eval/{d}/accuracy": v for d, v in acc.items()}, self._sample_rows("greedy_eval", self.eval_examples,
                                                                                    texts, rewards)

    def _sample_rows(self, source, examples, texts, rewards, divergence=None) -> list[dict]:
        """samples.jsonl lines: the rendered prompt exactly as tokenized, the completion, its reward and
        the mean per-token teacher divergence of the sample (None where no teacher scored it)."""
        div = [None] * len(texts) if divergence is None else [float(d) for d in np.asarray(divergence)]
        return [{"source": source, "domain": ex.domain, "prompt": self.prompter.text(ex), "completion": t,
                 "answer": ex.answer, "reward": float(r), "divergence": d}
                for ex, t, r, d in zip(examples, texts, rewards, div)]

    def run(self, *, stop_after: int | None = None) -> dict:
        cfg, tc = self.cfg, self.cfg.train
        mgr = ckpt.manager(self.out / "checkpoints", tc.keep_checkpoints)
        start = 0
        if self.resume:
            restored = ckpt.restore_latest(mgr, self.train_state(0))
            if restored is None:
                raise OpdError(f"--resume given but {self.out / 'checkpoints'} holds no checkpoint")
            start, st = restored
            self.params, self.opt_state = st["params"], st["opt_state"]
        elif mgr.latest_step() is not None:
            raise OpdError(f"{self.out} already holds checkpoints (step {mgr.latest_step()}); pass --resume to continue "
                           "or set train.out_dir to a new folder")
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            if self.tokenizer.name_or_path == "":  # the built-in tokenizer: kept with the run (export uses it)
                self.tokenizer.save_pretrained(self.out / "tokenizer")
        writer = MetricsWriter(self.out, resume_step=start if self.resume else None)
        self.sample_log = SamplesWriter(self.out, resume_step=start if self.resume else None)
        bar = None
        if tc.progress and dist.is_main():
            from tqdm.auto import tqdm
            bar = tqdm(total=tc.steps, initial=start, desc="opd", dynamic_ncols=True)
        last = {}
        end = tc.steps if stop_after is None else min(tc.steps, stop_after)
        self.unread = []  # (step, loss, skipped flag) on device, read at the next log or checkpoint step
        self.skipped_in_a_row = 0
        try:
            with Preemption() as preemption:
                for step in range(start, end):
                    done = step + 1
                    record = self._one_step(step, writer, bar, log=done == end)
                    last = record or last
                    stop = preemption.reached(done)  # SIGTERM: finish this step, save it, exit cleanly
                    if done % tc.checkpoint_every == 0 or done == tc.steps or stop:
                        self._read_skips()  # never save after the run should have stopped
                        ckpt.save(mgr, done, self.train_state(done))
                    if stop:
                        print(f"opd-jax: preempted (SIGTERM): saved step {done}; continue with --resume", flush=True)
                        return last
        finally:
            if bar is not None:
                bar.close()
            writer.close()
        if end == tc.steps and dist.is_main():
            plot_metrics(self.out / "metrics.jsonl", self.out / "plots")
        return last

    def _read_skips(self) -> int:
        """Read the skip flags of the steps since the last read (one host round-trip for all of them);
        stop the run after train.max_skipped non-finite steps in a row. -> skipped steps read."""
        flags = [(s, float(loss), float(skip)) for s, loss, skip in self.unread]
        self.unread = []
        for s, loss, skip in flags:
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if skip else 0
            if self.skipped_in_a_row >= self.cfg.train.max_skipped:
                raise OpdError(f"loss is {loss} at step {s} ({self.skipped_in_a_row} non-finite step(s) in a row, "
                               f"train.max_skipped={self.cfg.train.max_skipped}); stopped, and no update with a "
                               "non-finite loss or gradient was applied (the last checkpoint is intact): lower "
                               "optim.lr or check the teachers' outputs")
        return int(sum(skip for _, _, skip in flags))

    def _one_step(self, step: int, writer: MetricsWriter, bar, log: bool = False) -> dict:
        """One step. Only log and eval steps read anything back from the devices (and time each phase);
        the others are dispatched asynchronously and return {}."""
        cfg, lc, tc = self.cfg, self.cfg.loss, self.cfg.train
        done = step + 1
        evaluating = done % tc.eval_every == 0 or done == tc.steps
        log = log or evaluating or done % tc.log_every == 0
        if log:  # earlier steps' queued work is not this step's phases
            jax.block_until_ready(self.params)
        timer = PhaseTimer(sync=log)
        examples = self.source.batch(step, cfg.data.per_domain)
        batch, rows, rewards = {}, {}, None
        if lc.lam > 0:  # completions come to the host only when something reads them
            batch["on"], rows, rewards = self.on_policy_batch(step, examples, decode=evaluating or uses_rl(lc),
                                                              timer=timer)
        if lc.lam < 1:
            batch["off"] = self.off_policy_batch(examples, timer=timer)
        self.params, self.opt_state, loss, metrics = timer.mark(
            "update", *self.step_fn(self.params, self.opt_state, batch, self.teacher_w))
        self.unread.append((done, loss, metrics["skipped"]))
        guard = self._guard_jump() if self.guard else {}  # EffOPD guard: every step that jumped (it reads back)
        if bar is not None:
            bar.update(1)
        if not log:
            return {}
        record = {"loss": float(loss), "skipped_steps": float(self._read_skips()), **guard}
        record.update(timer.record())
        for k, v in metrics.items():
            v = np.asarray(v)
            if k == "on_policy/row_divergence":
                for name, sls in rows.items():
                    record[f"teacher/{name}/divergence"] = float(np.mean(np.concatenate([v[s] for s in sls])))
            elif v.ndim == 0 and k != "skipped":
                record[k] = float(v)
        gen_tokens = float(dist.to_host(batch["on"]["mask"]).sum()) if "on" in batch else 0.0
        record["tokens_per_s"] = gen_tokens / record["time/step"]
        if rewards is not None:
            record["reward"] = float(rewards.mean())
        if evaluating:
            acc, greedy = self.evaluate()
            record.update(acc)
            # what the student wrote this step (on-policy, with the teachers' divergence), else its greedy eval answers
            self.sample_log.write(done, self._sample_rows("on_policy", *self.samples, metrics["on_policy/row_divergence"])
                                  if "on" in batch else greedy)
        writer.write(done, record)
        if bar is not None:
            div = next((v for k, v in record.items() if k.endswith("policy/divergence")), float("nan"))
            post = {"loss": f"{record['loss']:.4f}", "div": f"{div:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
            if "reward" in record:
                post["reward"] = f"{record['reward']:.2f}"
            if "eval/mean/accuracy" in record:
                post["acc"] = f"{record['eval/mean/accuracy']:.2f}"
            bar.set_postfix(post)
        return record


def train(cfg: Config, *, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or resume) training from a config; returns the last step's metrics."""
    return Trainer(cfg, resume=resume).run(stop_after=stop_after)


def restore_run_params(run_dir: str | Path, step: int | None = None):
    """(model graphdef, pure-dict params, step) of a run's checkpoint (the newest when step is None)."""
    from opd_jax.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise OpdError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    student = build_student(cfg.student, cfg.train.seed)
    graphdef, state = nnx.split(student)
    params = nnx.to_pure_dict(state)
    mgr = ckpt.manager(run_dir / "checkpoints")
    opt = make_optimizer(cfg.optim, cfg.train.steps, params)
    like = train_state(params, opt.init(params), 0, jax.random.key(cfg.train.seed))
    restored = ckpt.restore_latest(mgr, like, step=step)
    if restored is None:
        raise OpdError(f"no checkpoint in {run_dir / 'checkpoints'}")
    return graphdef, restored[1]["params"], int(restored[0])


def export_student(run_dir: str | Path, out: str | Path) -> Path:
    """Write the newest checkpoint's student as a Hugging Face folder (with the run's tokenizer)."""
    from opd_jax.models import save_model

    run_dir = Path(run_dir)
    graphdef, params, step = restore_run_params(run_dir)
    path = save_model(nnx.merge(graphdef, params), out)
    from opd_jax.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    student_dir = Path(cfg.student.path) if cfg.student.path else None
    tok_dir = next((d for d in (run_dir / "tokenizer", cfg.data.tokenizer and Path(cfg.data.tokenizer), student_dir)
                    if d and (Path(d) / "tokenizer.json").exists()), None)
    if tok_dir is not None:  # the tokenizer the run used
        load_tokenizer(tok_dir).save_pretrained(path)
    if student_dir is not None and (student_dir / "generation_config.json").exists():  # its stop ids
        (Path(path) / "generation_config.json").write_text((student_dir / "generation_config.json").read_text())
    (Path(path) / "opd_jax_step.json").write_text(json.dumps({"step": step}))
    return Path(path)
