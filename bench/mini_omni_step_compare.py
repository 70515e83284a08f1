"""Decode step, side by side: this model core against a reference-style step, interleaved in one process.

The reference-style step does what docs/mini-omni.md §16 describes of the reference: checkpoint-layout weights,
K/V expanded to all 14 heads in a 2048-slot cache read whole under a mask, and the full 181120-wide
head for both items. Interleaving the two makes the ratio meaningful on a shared, noisy machine.

Usage: python bench/mini_omni_step_compare.py CHECKPOINT_DIR [--dtype float32|bfloat16] [--steps 16]
Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omni_server.mini_omni import checkpoint  # noqa: E402
from omni_server.mini_omni.config import AUDIO_LAYERS  # noqa: E402
from omni_server.mini_omni.generate import Step, decode_ids, prompt_ids  # noqa: E402
from omni_server.mini_omni.gpt import GPT, MiniOmniModel, apply_rope, rms_norm  # noqa: E402


class ReferenceStyleStep:
    """One decode position the reference's way, from the same weights (dense, checkpoint-layout copies)."""

    def __init__(self, gpt: GPT) -> None:
        c = gpt.config
        self.gpt, self.config = gpt, c
        dense = lambda w: w.to_dense() if w.is_mkldnn else w.contiguous()  # noqa: E731
        self.blocks = [
            {
                name: dense(getattr(module, part).weight.data).clone()
                for name, module, part in (
                    ("qkv", block.attn, "attn"),
                    ("proj", block.attn, "proj"),
                    ("fc_1", block.mlp, "fc_1"),
                    ("fc_2", block.mlp, "fc_2"),
                    ("mlp_proj", block.mlp, "proj"),
                )
            }
            | {"qkv_bias": block.attn.attn.bias.data, "norm_1": block.norm_1.weight, "norm_2": block.norm_2.weight}
            for block in gpt.transformer.h
        ]
        shape = (2, c.n_head, c.block_size, c.head_size)
        dtype = gpt.transformer.wte.weight.dtype
        self.caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.blocks]

    def __call__(self, ids: torch.Tensor, position: int) -> tuple[tuple[int, ...], int]:
        c, gpt = self.config, self.gpt
        x = gpt.embed(ids)
        cos, sin = gpt.rope_cos[position : position + 1], gpt.rope_sin[position : position + 1]
        mask = (torch.arange(c.block_size) <= position)[None]
        for weights, (k_cache, v_cache) in zip(self.blocks, self.caches):
            h = rms_norm(x, weights["norm_1"], c.norm_eps)
            qkv = F.linear(h, weights["qkv"], weights["qkv_bias"]).view(2, 1, c.n_query_groups, c.q_per_kv + 2, -1)
            q = qkv[:, :, :, : c.q_per_kv].reshape(2, 1, c.n_head, -1).transpose(1, 2)
            k = qkv[:, :, :, c.q_per_kv : c.q_per_kv + 1].expand(-1, -1, -1, c.q_per_kv, -1)
            v = qkv[:, :, :, c.q_per_kv + 1 :].expand(-1, -1, -1, c.q_per_kv, -1)
            k = k.reshape(2, 1, c.n_head, -1).transpose(1, 2)
            v = v.reshape(2, 1, c.n_head, -1).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_cache[:, :, position] = k[:, :, 0]
            v_cache[:, :, position] = v[:, :, 0]
            out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
            x = x + F.linear(out.transpose(1, 2).reshape(2, 1, -1), weights["proj"])
            h = rms_norm(x, weights["norm_2"], c.norm_eps)
            x = x + F.linear(F.silu(F.linear(h, weights["fc_1"])) * F.linear(h, weights["fc_2"]), weights["mlp_proj"])
        logits = F.linear(gpt.transformer.ln_f(x[:, -1]), gpt.transformer.wte.weight)  # both items, full width
        audio = logits[0, c.text_vocab_size :].view(AUDIO_LAYERS, -1).topk(1).indices.view(-1).tolist()
        return tuple(audio), int(logits[1, : c.text_vocab_size].topk(1).indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.checkpoint
    model = MiniOmniModel.load(
        folder / checkpoint.GPT_FILE,
        folder / checkpoint.CONFIG_FILE,
        folder / checkpoint.WHISPER_FILE,
        "cpu",
        getattr(torch, args.dtype),
    )
    gpt = model.gpt
    reference_style = ReferenceStyleStep(gpt)
    rows = 98  # output1.wav's length: T = 101
    embeddings = torch.randn(1, rows, gpt.config.n_embd, generator=torch.Generator().manual_seed(0))
    embeddings = embeddings.to(model.dtype).expand(2, -1, -1)
    ours, theirs, agree = [], [], 0
    with torch.inference_mode():
        prompt = prompt_ids(rows)
        first = gpt.select(gpt.prefill(prompt, embeddings))
        # The reference-style cache gets the same prompt K/V, expanded to every head.
        for block, (k_cache, v_cache) in zip(gpt.transformer.h, reference_style.caches):
            per_group = gpt.config.q_per_kv
            k_cache[:, :, : rows + 3] = block.attn.k_cache[:, :, : rows + 3].repeat_interleave(per_group, dim=1)
            v_cache[:, :, : rows + 3] = block.attn.v_cache[:, :, : rows + 3].repeat_interleave(per_group, dim=1)
        step = Step(0, first.audio, first.text)
        for k in range(1, args.steps + 1):
            ids, position = decode_ids(step), rows + 3 + k - 1
            began = time.perf_counter()
            picked = gpt.select(gpt(ids, position))
            ours.append(time.perf_counter() - began)
            began = time.perf_counter()
            other = reference_style(ids, position)
            theirs.append(time.perf_counter() - began)
            agree += other == (picked.audio, picked.text)
            step = Step(k, picked.audio, picked.text)
    ours_ms, theirs_ms = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "threads": torch.get_num_threads(),
                "steps": args.steps,
                "ours_ms_median": ours_ms,
                "ours_ms_min": min(ours) * 1e3,
                "reference_style_ms_median": theirs_ms,
                "reference_style_ms_min": min(theirs) * 1e3,
                "speedup_median": theirs_ms / ours_ms,
                "same_tokens_steps": agree,
            }
        )
    )


if __name__ == "__main__":
    main()
