"""Greedy picks from one slice of the tied output head, reading as few weight bytes as exactness allows.

Each decode step needs the argmax of item 0's 7 audio slices and of item 1's text slice: 181120 rows of
896 weights, a third of the model's bytes. The CPU reads bf16 oneDNN-packed rows about twice as fast as
fp32 ones, so fp32 mode *screens* with a bf16 copy: a rigorous bound on the bf16 logits' error leaves a
handful of candidate rows, which are then scored in fp32 against the exact weights. The pick is the same
as the full fp32 head's; only the bytes read change. bf16 mode takes the bf16 logits' argmax directly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from omni_server.mini_omni.layers import can_pack, linear, pack

# Relative error of one bf16 rounding is at most 2^-8. The screened dot product rounds the hidden state
# and the weights (2 * 2^-8 of sum |h_i w_i|), accumulates n products in fp32 (n * 2^-24) and rounds its
# output (2^-8 of the logit). Both slacks are doubled for safety; sum |h_i w_i| <= |h| |w| (Cauchy-Schwarz).
_OUTPUT_SLACK = 2 * 2.0**-8


def _product_slack(n: int) -> float:
    return 2 * (2 * 2.0**-8 + n * 2.0**-24)


# Beyond this many candidates in a group, scoring the whole group in fp32 is as cheap.
_MAX_CANDIDATES = 256


class HeadSlice:
    """Rows [start, stop) of the head, split into `groups` equal groups that are each argmax-ed."""

    def __init__(self, weight: torch.Tensor, groups: int) -> None:
        self.exact = weight  # a view of the embedding: no copy
        self.groups = groups
        self.width = weight.shape[0] // groups
        self.packed: torch.Tensor | None = None
        self.row_norms: torch.Tensor | None = None  # |w_r| times the product slack
        if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and can_pack(torch.bfloat16):
            self.packed = pack(weight.to(torch.bfloat16), batch=1)
            if weight.dtype == torch.float32:
                self.row_norms = weight.norm(dim=1) * _product_slack(weight.shape[1])

    def argmax(self, hidden: torch.Tensor, rows: Iterable[int]) -> dict[int, list[int]]:
        """For each of `rows` of `hidden` [N, d]: per group, the index (within the group) of the largest logit,
        in `topk(1)` order. The logits are computed for all N rows (one fixed-shape GEMM), picks only for `rows`."""
        wanted = list(rows)
        if self.packed is None:
            # W h^T rather than h W^T: for 4 rows MKL's GEMM then streams the 152000x896 fp32 text slice once
            # (41 ms here, against 107 ms); for 1 row the two give the same bits (and 36-38 ms).
            logits = (self.exact @ hidden.T).T
            return {row: self._topk(logits[row]) for row in wanted}
        approx = linear(hidden.to(torch.bfloat16), self.packed)
        if self.row_norms is None:
            return {row: self._topk(approx[row]) for row in wanted}
        grouped = approx.float().view(len(hidden), self.groups, self.width)
        return {row: self._screened(hidden[row : row + 1], grouped[row], self.row_norms) for row in wanted}

    def _topk(self, logits: torch.Tensor) -> list[int]:
        return torch.topk(logits.view(self.groups, self.width), 1).indices.view(-1).tolist()

    def _screened(self, hidden: torch.Tensor, approx: torch.Tensor, row_norms: torch.Tensor) -> list[int]:
        bound = hidden.norm() * row_norms.view(self.groups, self.width)
        bound = bound + _OUTPUT_SLACK * approx.abs()
        floor = (approx - bound).max(dim=1, keepdim=True).values
        candidates = approx + bound >= floor  # every row that could be the exact maximum
        picks = []
        for group in range(self.groups):
            rows = candidates[group].nonzero().view(-1)
            offset = group * self.width
            if len(rows) > _MAX_CANDIDATES:
                rows = torch.arange(self.width, device=hidden.device)
            exact = F.linear(hidden, self.exact[offset : offset + self.width].index_select(0, rows))
            picks.append(int(rows[torch.topk(exact.view(-1), 1).indices]))
        return picks
