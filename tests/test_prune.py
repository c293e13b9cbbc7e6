"""`opd-jax prune-layers`: the pruned folder is the full model minus the dropped layers (checked against
transformers' torch model with those layers removed), and the layer dropped is the one whose removal
moves the next-token distributions least (checked by removing each layer in torch)."""

import json

import numpy as np
import pytest
import torch
import transformers

from opd_jax.errors import OpdError
from opd_jax.prune import held_out_text, prune_layers
from opd_jax.tiny_chat import build_chat_tokenizer


def _torch_without(model, drop):
    """transformers' model with layer `drop` removed (a copy)."""
    import copy

    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList([layer for i, layer in enumerate(m.model.layers) if i != drop])
    m.config.num_hidden_layers = len(m.model.layers)
    for i, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = i
    return m


def test_prune_layers_drops_the_least_missed_layer_and_writes_a_loadable_folder(tmp_path):
    from conftest import make_hf_model
    from opd_jax.models import load_model
    from opd_jax.tasks import stop_ids

    tok = build_chat_tokenizer()
    full = make_hf_model("llama", std=0.1, vocab_size=len(tok), num_hidden_layers=3, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    src = tmp_path / "full"
    full.save_pretrained(src)
    tok.save_pretrained(src)
    rec = prune_layers(src, 2, tmp_path / "pruned", log=lambda *a: None)
    ids, mask = held_out_text(load_model(src), tok, stop_ids(tok, src))
    rows = [ids[i, mask[i] > 0].tolist() for i in range(len(ids))]

    def kl_to_full(model):
        out = []
        for r in rows:
            with torch.no_grad():
                p = torch.log_softmax(full(torch.tensor([r])).logits[0].double(), -1)
                q = torch.log_softmax(model(torch.tensor([r])).logits[0].double(), -1)
            out.append((p.exp() * (p - q)).sum(-1)[:-1].numpy())
        return float(np.concatenate(out).mean())

    kls = {d: kl_to_full(_torch_without(full, d)) for d in range(3)}
    assert rec["dropped"] == [min(kls, key=kls.get)] and rec["kept"] == [i for i in range(3) if i != rec["dropped"][0]]
    np.testing.assert_allclose(rec["kl"], kls[rec["dropped"][0]], rtol=1e-3, atol=1e-5)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    ref = _torch_without(full, rec["dropped"][0])
    with torch.no_grad():
        np.testing.assert_allclose(pruned(torch.tensor([rows[0]])).logits.numpy(),
                                   ref(torch.tensor([rows[0]])).logits.numpy(), atol=1e-4)
    assert json.loads((tmp_path / "pruned" / "pruning.json").read_text())["layers"] == 3
    assert (tmp_path / "pruned" / "tokenizer.json").exists()
    with pytest.raises(OpdError, match=r"--keep must be in \[1, 2\]"):
        prune_layers(src, 3, tmp_path / "p2")
    with pytest.raises(OpdError, match="already exists"):
        prune_layers(src, 2, tmp_path / "pruned")
    # a recorded choice (--drop) instead of the search: the layer named goes, the KL recorded is torch's
    worst = max(kls, key=kls.get)
    given = prune_layers(src, None, tmp_path / "given", drop=[worst], log=lambda *a: None)
    assert given["dropped"] == [worst] and given["kept"] == [i for i in range(3) if i != worst]
    np.testing.assert_allclose(given["kl"], kls[worst], rtol=1e-3, atol=1e-5)
    with pytest.raises(OpdError, match="--drop must name"):
        prune_layers(src, None, tmp_path / "p3", drop=[3])
    with pytest.raises(OpdError, match="disagrees with --drop"):
        prune_layers(src, 1, tmp_path / "p3", drop=[0])
