"""Real prompts: records from files, chat templates, stop ids from the model folder, verifiers, the
samples log and `opd-jax eval --data` (issue 13). The tokenizer is a byte-level BPE trained here with
Qwen's special tokens and a Qwen-style chat template; the models are random Qwen3 folders written by
transformers. Nothing is downloaded."""

import json
import sys

import numpy as np
import pytest

from opd_jax import OpdError
from opd_jax.cli import main
from opd_jax.config import load_config
from opd_jax.tasks import Example, Prompter, get_verifier, load_records
from opd_jax.tiny_chat import CHAT_TEMPLATE as TEMPLATE
from opd_jax.tiny_chat import build_chat_tokenizer
from opd_jax.run import build_run
from conftest import make_hf_model, rigged_model

QUESTIONS = ["What is 2+3?", "Compute 1/2 + 1/4.", "What is 7*6?", "Is 0.5 equal to 1/2?"]


def chat(role, content):
    """What the template writes for one message, spelled out independently of jinja."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


@pytest.fixture(scope="module")
def qwen_folders(tmp_path_factory):
    """{"tok": tokenizer, "student": folder, "teacher": folder, "stops": (im_end, endoftext)}: random Qwen3
    models carrying the BPE tokenizer and a generation_config.json with both stop ids (as Qwen3's).
    The student's head rows of the stop ids are scaled up so that sampled rows do end, at either id."""
    import torch

    tok = build_chat_tokenizer()
    stops = tuple(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    root = tmp_path_factory.mktemp("qwen_chat")
    out = {"tok": tok, "stops": stops}
    for name, seed in (("student", 0), ("teacher", 1)):
        model = make_hf_model("qwen3", seed=seed, vocab_size=len(tok), bos_token_id=None, eos_token_id=list(stops),
                              pad_token_id=stops[1])
        if name == "student":
            with torch.no_grad():
                model.lm_head.weight[list(stops)] *= 4.0
        folder = root / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(stops)}))
        out[name] = folder
    return out


def parquet_of_messages(path, n=8):
    import datasets

    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        msgs = ([{"role": "system", "content": "You are a careful math tutor."}] if i % 2 else []) + \
               [{"role": "user", "content": q}]
        rows.append({"messages": msgs, "domain": "math", "answer": "5"})
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def rendered(msgs):
    return "".join(chat(m["role"], m["content"]) for m in msgs) + "<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- rendering


def test_prompter_renders_the_chat_template_and_adds_no_token_twice():
    tok = build_chat_tokenizer()
    ex = Example(None, "5", "math", (("system", "Be brief."), ("user", "What is 2+3?")))
    p = Prompter(tok)
    want = chat("system", "Be brief.") + chat("user", "What is 2+3?") + "<|im_start|>assistant\n"
    assert p.text(ex) == want
    assert p.ids(ex) == tok.encode(want, add_special_tokens=False)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert p.ids(ex).count(start) == 3 and p.ids(ex)[-len(header):] == header  # the assistant header closes it
    # a string prompt as one user message, and template kwargs passed through (Qwen3's enable_thinking)
    assert Prompter(tok, chat_template=True).text(Example("What is 2+3?", "5", "math")) == \
        chat("user", "What is 2+3?") + "<|im_start|>assistant\n"
    off = Prompter(tok, chat_template=True, template_kwargs={"enable_thinking": False})
    assert off.text(Example("hi", None, "x")).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # a template that writes BOS itself (as Llama 3's): BOS appears once, not once more from the tokenizer
    llama = build_chat_tokenizer(template="{{ bos_token }}" + TEMPLATE, bos="<|endoftext|>")
    ids = Prompter(llama).ids(ex)
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    # raw prompts: BOS in front, but not twice when the prompt already starts with it
    raw = Prompter(llama)
    assert raw.ids("What is 2+3?") == [llama.bos_token_id] + llama.encode("What is 2+3?", add_special_tokens=False)
    assert raw.ids("<|endoftext|>What is 2+3?") == raw.ids("What is 2+3?")
    ids, mask = raw.encode(["What is 2+3?", ex], 40)
    assert ids.shape == (2, 40) and mask.sum(1).tolist() == [len(raw.ids("What is 2+3?")), len(raw.ids(ex))]
    assert ids[0, -1] == raw.ids("What is 2+3?")[-1] and ids[0, 0] == llama.pad_token_id  # left padding


def test_messages_without_a_chat_template_and_long_prompts_are_one_line_errors():
    bare = build_chat_tokenizer(template=None)
    ex = Example(None, None, "x", (("user", "hi"),))
    with pytest.raises(OpdError, match="records have 'messages' but the tokenizer .* has no chat template"):
        Prompter(bare).ids(ex)
    with pytest.raises(OpdError, match="data.chat_template is true but the tokenizer"):
        Prompter(bare, chat_template=True).ids(Example("hi", None, "x"))
    with pytest.raises(OpdError, match="exceeds data.max_prompt_len=4"):
        Prompter(build_chat_tokenizer()).encode([ex], 4)


# ----------------------------------------------------------------------------- records


def test_records_from_parquet_json_and_datasets_folders(tmp_path):
    import datasets

    pq = parquet_of_messages(tmp_path / "p.parquet", n=3)
    got = load_records(pq)
    assert [e.messages for e in got][0] == (("user", QUESTIONS[0]),)
    assert got[1].messages == (("system", "You are a careful math tutor."), ("user", QUESTIONS[1]))
    assert {(e.domain, e.answer, e.prompt) for e in got} == {("math", "5", None)}
    folder = tmp_path / "disk"
    datasets.Dataset.from_list([{"prompt": "2+2=", "domain": "add", "answer": 4}]).save_to_disk(str(folder))
    assert load_records(folder) == [Example("2+2=", "4", "add")]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "a", "domain": "d", "answer": "01"}, {"prompt": "b", "domain": "d", "answer": 2}]))
    assert [e.answer for e in load_records(js)] == ["01", "2"]  # exact text kept ("01" stays "01")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a"}, "row 2: 'domain' must be a non-empty string"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "a"}], "domain": "d"}, "row 2: needs exactly one of"),
    ({"messages": [{"role": "user"}], "domain": "d"}, r"row 2: messages\[0\] must be"),
    ({"messages": [], "domain": "d"}, "row 2: 'messages' must be a non-empty list"),
    ({"prompt": "a", "domain": "d", "answer": [1]}, "row 2: 'answer' must be a string or a number"),
])
def test_a_bad_record_names_the_file_and_row(tmp_path, record, message):
    import datasets

    for path in (tmp_path / "bad.jsonl", tmp_path / "bad.parquet"):
        rows = [{"prompt": "ok", "domain": "d"}, record]
        if path.suffix == ".jsonl":
            path.write_text("\n".join(json.dumps(r) for r in rows))
        else:  # every column in every row (absent = null), or Arrow keeps the first row's columns only
            keys = sorted({k for r in rows for k in r})
            try:
                datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows]).to_parquet(str(path))
            except Exception:  # noqa: BLE001 - a mix Arrow cannot store in one column; the JSONL case covers it
                continue
        with pytest.raises(OpdError, match=str(path).replace(".", r"\.") + " " + message):
            load_records(path)


# ----------------------------------------------------------------------------- verifiers


def test_verifiers_by_name(tmp_path, monkeypatch):
    ex, math = get_verifier("exact"), get_verifier("math")
    assert ex(" 42 ", "42") == 1.0 and ex("42.0", "42") == 0.0 and ex("42", None) == 0.0
    assert math("so the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math("so the answer is 0.5", "\\frac{1}{2}") == 1.0
    assert math("\\boxed{12}", "12") == 1.0 and math("we get \\boxed{1+x}", "x+1") == 1.0
    assert math("\\boxed{13}", "12") == 0.0
    assert math("I do not know", "12") == 0.0 and math("\\boxed{12}", None) == 0.0
    rx = get_verifier(r"regex:answer is (\d+)")
    assert rx("the answer is 3, no, the answer is 4", "4") == 1.0  # the last match counts
    assert rx("the answer is 3", "4") == 0.0 and rx("no number here", "4") == 0.0
    (tmp_path / "my_checks.py").write_text("def half(completion, answer):\n    return 0.5 if answer in completion else 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    py = get_verifier("python:my_checks:half")
    assert py("it is 7", "7") == 0.5 and py("it is 8", "7") == 0.0
    for bad, msg in (("fuzzy", "unknown verifier 'fuzzy'"), ("regex:(", "not a valid regular expression"),
                     (r"regex:\d+", "needs a capture group"), ("python:no_such_module_xyz:f", "cannot import"),
                     ("python:my_checks:nope", "has no 'nope'"), ("python:my_checks", "expected python:module:function")):
        with pytest.raises(OpdError, match=msg):
            get_verifier(bad)


# ----------------------------------------------------------------------------- trainer and CLI


def chat_overrides(tmp_path, folders, data, **extra):
    base = {"train.out_dir": str(tmp_path / "run"), "train.steps": 2, "train.eval_every": 2, "train.eval_per_domain": 4,
            "train.checkpoint_every": 2, "train.progress": "false", "student.path": str(folders["student"]),
            "teachers": f"[{{name: t, path: {folders['teacher']}}}]", "routing": "{math: t}",
            "data.path": str(data), "data.domains": "[]", "data.per_domain": 2, "data.group_size": 2,
            "data.max_prompt_len": 64, "data.max_new_tokens": 8, "data.verifiers": "{math: math}",
            "optim.lr": 1e-3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_training_from_parquet_messages_logs_rendered_prompts(tmp_path, qwen_folders):
    """Two steps from a Parquet file of chat messages, with the student folder's own BPE tokenizer: the
    samples log holds every on-policy sample of the eval step, its prompt rendered by the template and
    ending in the assistant header, the completion without stop tokens, its math-verify reward and
    the sample's teacher divergence; the run's tokenizer, stop ids and template all come from the folder."""
    from opd_jax.train import train

    data = parquet_of_messages(tmp_path / "math.parquet")
    train(load_config(None, chat_overrides(tmp_path, qwen_folders, data)))
    lines = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2  # per_domain x group_size on-policy samples at step 2
    want = {rendered(m) for m in (r["messages"] for r in __import__("datasets").Dataset.from_parquet(str(data)))}
    for ln in lines:
        assert ln["step"] == 2 and ln["domain"] == "math" and ln["source"] == "on_policy"
        assert ln["prompt"] in want and ln["prompt"].endswith("<|im_start|>assistant\n")
        assert "<|im_end|>" not in ln["completion"] and "<|endoftext|>" not in ln["completion"]
        assert ln["reward"] == get_verifier("math")(ln["completion"], "5")
        assert np.isfinite(ln["divergence"]) and ln["divergence"] > 0
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/math/accuracy" in metrics[-1]


def test_rollouts_stop_at_either_stop_id_and_padding_never_counts(tmp_path, qwen_folders):
    """Qwen's pad token <|endoftext|> is also a stop id: rows end at the first <|im_end|> or <|endoftext|>
    (the stop token counts in the mask), everything after it is padding outside the mask."""
    data = parquet_of_messages(tmp_path / "math.parquet")
    tr = build_run(load_config(None, chat_overrides(tmp_path, qwen_folders, data, **{"data.per_domain": 16})))
    stops = qwen_folders["stops"]
    assert tr.rollouts.stop == tuple(sorted(stops)) and tr.tokenizer.pad_token_id == stops[1]
    batch = tr.rollouts.on_policy(tr.init.params, tr.source.batch(0, 16), tr.init.key())[0]
    comp = np.asarray(batch.tokens)[:, tr.cfg.data.max_prompt_len:]
    mask = np.asarray(batch.mask)
    ended = {s: 0 for s in stops}
    for row, m in zip(comp, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # one contiguous completion
        hits = [j for j, t in enumerate(row[:n]) if t in stops]
        assert hits in ([], [n - 1])  # no stop id before the end
        if hits:
            ended[int(row[n - 1])] += 1
            assert (row[n:] == stops[1]).all()
    assert all(ended.values()), ended  # rows ended at each of the two stop ids


@pytest.mark.parametrize("override, message", [
    ({"data.jsonl": "x.jsonl"}, "data.jsonl was renamed data.path"),
    ({"data.max_prompt_len": 8}, "exceeds data.max_prompt_len=8"),
    ({"data.verifiers": "{math: fuzzy}"}, "unknown verifier 'fuzzy'"),
    ({"data.verifiers": "{algebra: math}"}, "data.verifiers names domain(s) 'algebra' that no prompt has"),
    ({"data.tokenizer": "CHAR"}, "records have 'messages' but the tokenizer"),
    ({"data.path": "BAD"}, "row 1: 'domain' must be a non-empty string"),
])
def test_bad_data_inputs_are_one_line_cli_errors(tmp_path, qwen_folders, capsys, override, message):
    from opd_jax.tasks import build_char_tokenizer

    data = parquet_of_messages(tmp_path / "math.parquet")
    if override.get("data.tokenizer") == "CHAR":
        build_char_tokenizer(tmp_path / "chartok")
        override = {"data.tokenizer": str(tmp_path / "chartok")}
    if override.get("data.path") == "BAD":
        (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
        override = {"data.path": str(tmp_path / "bad.jsonl")}
    rc = main(["train", *chat_overrides(tmp_path, qwen_folders, data, **override)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_cli_on_a_data_file_with_the_configs_verifiers_and_pass_at_k(tmp_path, capsys):
    """A rigged student answers '4' or '7' with equal probability after '=' (then EOS); greedy takes '4'.
    With the config's math verifier, "4.0" is right; pass@8 finds the '7' that greedy never writes."""
    from opd_jax.models import save_model
    from opd_jax.tasks import build_char_tokenizer

    tok = build_char_tokenizer(None)
    i = tok.convert_tokens_to_ids
    model = rigged_model({i("="): i("4"), i("4"): tok.eos_token_id, i("7"): tok.eos_token_id})
    model.lm_head[...] = model.lm_head[...].at[i("="), i("7")].set(10.0)
    folder = save_model(model, tmp_path / "rigged")
    tok.save_pretrained(folder)
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "add:2+2=", "domain": "four", "answer": "4.0"}, {"prompt": "add:3+4=", "domain": "seven", "answer": "7"},
        {"prompt": "add:9+9=", "domain": "seven", "answer": "7"}]))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  verifiers: {four: math, seven: math}\n  max_prompt_len: 12\n  max_new_tokens: 4\n")

    def run(*extra):
        assert main(["eval", "--model", str(folder), "--data", str(data), *extra]) == 0
        return json.loads(capsys.readouterr().out)

    out = run("--config", str(cfg), "--samples", "8")
    assert out["greedy_accuracy"] == {"four": 1.0, "seven": 0.0, "mean": 0.5}
    assert out["pass@8"]["seven"] == 1.0 and out["pass@8"]["four"] == 1.0
    exact = run("--max-prompt-len", "12", "--max-new-tokens", "4")  # no config: exact match, "4" != "4.0"
    assert exact == {"greedy_accuracy": {"four": 0.0, "seven": 0.0, "mean": 0.0}}
    assert main(["eval", "--model", str(folder), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "data.path does not exist" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    """The bash block of docs/training.md's "Your own prompts and models", run as written (in a scratch folder
    holding the config it names): training writes rendered samples, eval prints greedy and pass@4."""
    from conftest import run_readme_block

    res = run_readme_block("## Your own prompts and models", "chat_example.yaml", tmp_path, doc="docs/training.md")
    first = json.loads((tmp_path / "runs/chat_opd/samples.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("<|im_start|>") and first["prompt"].endswith("<think>\n\n</think>\n\n")
    out = json.loads(res.stdout[res.stdout.rindex('{\n  "greedy_accuracy"'):])
    assert set(out) == {"greedy_accuracy", "pass@4"} and set(out["pass@4"]) == {"math", "words", "mean"}


def test_chat_domain_verifiers_read_a_free_form_reply():
    """contains: the answer as a whole word, any case; last_number: the reply's last number."""
    from opd_jax.tasks.domains import CHAT_DOMAINS
    from opd_jax.tasks.verifiers import get_verifier

    contains, last = get_verifier("contains"), get_verifier("last_number")
    assert contains("The capital of France is Paris.", "Paris") == 1.0
    assert contains("the capital is paris", "Paris") == 1.0
    assert contains("Parisian food", "Paris") == 0.0 and contains("anything", None) == 0.0
    assert contains("It is Buenos Aires, of course", "Buenos Aires") == 1.0
    assert last("To add 7 and 5: 7 + 5 = 12.", "12") == 1.0
    assert last("12, not 13", "12") == 0.0 and last("no digits", "3") == 0.0 and last("1,000 apples", "1000") == 1.0
    import numpy as np
    rng = np.random.RandomState(0)
    for name, want in (("capital", "contains"), ("sum_digits", "last_number")):
        d = CHAT_DOMAINS[name]
        prompt, answer = d.make(rng)
        assert d.verifier == want and prompt.endswith("?") and answer


def test_chat_domains_evaluate_on_prompts_training_never_sees():
    """Stream 1 (evaluation) of capital / sum_digits draws from countries and digit pairs that the
    training stream never draws; together they cover every country and all 100 pairs."""
    from opd_jax.tasks import PromptSource
    from opd_jax.tasks.domains import CAPITALS

    src = PromptSource(["capital", "sum_digits"], seed=3)
    train = {(e.prompt, e.answer) for s in range(300) for e in src.batch(s, 8)}
    held = {(e.prompt, e.answer) for s in range(40) for e in src.batch(s, 8, stream=1)}
    assert not train & held
    countries = {p.split(" of ")[1][:-1] for p, _ in train | held if p.startswith("What is the capital")}
    assert countries == {c for c, _ in CAPITALS}
    sums = {p for p, _ in train | held if "+" in p}
    assert len(sums) == 100 and len({p for p, _ in held if "+" in p}) == 25
    assert all(int(a) == eval(p[8:-1]) for p, a in train | held if "+" in p)
