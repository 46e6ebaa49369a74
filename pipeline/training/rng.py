"""The RNG states of a process (python, numpy, torch CPU and CUDA), as a checkpoint's rng.pt
holds them: tensors and plain numbers only, so the file loads with
`torch.load(weights_only=True)`; the files of before (tuples with a numpy array) still load
with OLD_RNG_GLOBALS allowed."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def rng_state() -> dict:
    """The process's RNG states (python, numpy, torch CPU, and CUDA where present) as tensors
    and plain numbers only, so that rng.pt loads with `torch.load(weights_only=True)`:
    python {"version", "state": int64 (625,), "gauss_next"}, numpy {"algorithm", "key": int64
    (624,), "pos", "has_gauss", "cached_gaussian"}, torch: uint8 tensor, cuda: list of them."""
    version, mt, gauss_next = random.getstate()
    algorithm, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "algorithm": algorithm,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, rank: int = 0) -> None:
    """Restore the states rng_state() returned, or the tuples (with a numpy array) that rng.pt
    held before it held tensors only. rank > 0 restores its own states from
    state["other_ranks"][rank - 1] (a checkpoint of as many processes or more); without them
    (fewer processes then, or an earlier rng.pt) it takes rank 0's, then reseeds torch with a
    number drawn from rank 0's torch state plus the rank, so that each rank's dropout still
    differs. Raises TypeError, ValueError, KeyError or RuntimeError for states of the wrong
    kind (load_checkpoint turns them into a CheckpointError)."""
    others = state.get("other_ranks", []) if rank else []
    if 0 < rank <= len(others):
        return set_rng_state(others[rank - 1])
    python, numpy = state["python"], state["numpy"]
    if isinstance(python, dict):
        mt = tuple(int(x) for x in python["state"].tolist())
        python = (int(python["version"]), mt, python["gauss_next"])
    if isinstance(numpy, dict):
        key = np.asarray(numpy["key"].numpy(), dtype=np.int64)
        if key.shape != (624,) or key.min() < 0 or key.max() >= 2**32:
            raise ValueError(f"numpy key of shape {tuple(key.shape)} is not an MT19937 state")
        numpy = (
            numpy["algorithm"],
            key.astype(np.uint32),
            int(numpy["pos"]),
            int(numpy["has_gauss"]),
            float(numpy["cached_gaussian"]),
        )
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if rank:
        digest = hashlib.sha256(state["torch"].numpy().tobytes()).digest()
        torch.manual_seed(int.from_bytes(digest[:4], "little") + rank)


_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
OLD_RNG_GLOBALS = (
    _RECONSTRUCT,
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),  # the name numpy 1.x pickles
    (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),  # numpy 2's, read under numpy 1.x
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
)
"""What an rng.pt written before tensors-only RNG states holds besides tensors and numbers:
numpy's MT19937 key array (under the module name of the numpy that wrote it). Unpickling these
builds an array and nothing else (an object array's items go through the same restricted
unpickler), so such files still load with weights_only."""
