"""Loading torch checkpoint files without holding them in memory twice.

A checkpoint is memory-mapped (torch's private file mapping), each tensor is converted to the model's
device and dtype in turn, and the source's pages are then dropped from this process's resident set, so the
2.8 GB `lit_model.pth` loads into a bf16 model with about 1 GB resident rather than 3.8.
"""

from __future__ import annotations

import ctypes
import mmap
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class MappedCheckpoint:
    content: Any  # what the file holds: a state dict, or whisper's {"dims", "model_state_dict"}
    mapped: bool  # whether every tensor in `content` lies in the file mapping

    def release(self, tensor: torch.Tensor) -> None:
        """Drop a converted source tensor's pages from the resident set (they stay in the page cache).

        Only for file-mapped tensors: the pages are clean copies of the file, so dropping them loses nothing
        (touching them again would fault them back in). On anonymous memory this would zero data.
        """
        if not self.mapped or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        aligned = start - start % mmap.PAGESIZE
        _libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(end - aligned), _MADV_DONTNEED)


def load_mapped(path: Path) -> MappedCheckpoint:
    """`torch.load` memory-mapped, tensors-only unpickling; a file in the pre-zip format is read whole."""
    try:
        return MappedCheckpoint(torch.load(path, map_location="cpu", mmap=True, weights_only=True), mapped=True)
    except (RuntimeError, pickle.UnpicklingError) as error:
        if "zip" not in str(error) and "mmap" not in str(error):
            raise
    return MappedCheckpoint(torch.load(path, map_location="cpu", weights_only=True), mapped=False)
