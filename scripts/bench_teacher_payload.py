"""Bytes per scored token of a served teacher's reply (the vLLM prompt_logprobs protocol, JSON), against
the same numbers packed as int32 id + float32 log-prob, for k = 1 (sampled-token estimators), 8 and 32.

A loopback `opd_jax.teacher_server.serve` of a small random model with a 2,374-token vocabulary, 8 rows of
32 prompt + 128 completion tokens. Its ids have at most 4 digits; Qwen3's have up to 6, so a Qwen3
teacher's JSON is somewhat larger. The reply covers every position of a row (the protocol
scores the whole prompt), so the prompt's entries are part of each completion token's cost.

    python scripts/bench_teacher_payload.py
"""

import numpy as np

from opd_jax.models import ModelConfig, init_model
from opd_jax.serving import ServedTeacher
from opd_jax.teacher_server import serve


def main():
    cfg = dict(vocab_size=151936 // 64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    server = serve(init_model(ModelConfig(**cfg), seed=0), 0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, cfg["vocab_size"], (8, 32 + 128)).astype(np.int32)
    mask = np.ones_like(tokens)
    try:
        for k, what in ((1, "logprobs"), (8, "topk"), (32, "topk")):
            client = ServedTeacher("t", url)
            client.score_ids(tokens, mask, prompt_len=32, temperature=1.0, what=what, topk=k)
            print(f"k={k:2d} {what:8s}: {client.bytes_per_token:8.1f} bytes per scored token (JSON); packed "
                  f"int32 + float32: {(k + 1) * 8} bytes ({client.bytes_per_token / ((k + 1) * 8):.1f}x)")
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
