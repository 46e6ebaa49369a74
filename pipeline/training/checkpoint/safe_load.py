"""Reading the torch.save files of a checkpoint without running code: torch.load with
weights_only=True, and the one-line refusal of a file that needs more (UnsafeFileError, exit 2)
saying what unpickling it would call."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CheckpointError, UnsafeFileError
from pipeline.training.rng import OLD_RNG_GLOBALS

RNG = "rng.pt"
"""A checkpoint's RNG states; format 1's may name numpy's array reconstruction (OLD_RNG_GLOBALS)."""


UNSAFE_THEN = (
    "delete {folder} (a resumed run then continues from the checkpoint before it) or "
    "get the checkpoint from a source you trust"
)
"""What to do about a refused file of checkpoint `folder`."""


def refused_file(path: Path, error: Exception, then: str = UNSAFE_THEN) -> UnsafeFileError:
    """The one-line refusal of a file that torch.load(weights_only=True) would not load, saying
    why: what unpickling it would call (torch's static scan of its pickle), or why it cannot be
    checked; `error`: the loader's own error. `then`: what to do ({folder}: the file's folder)."""
    try:
        calls = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        calls -= global_names(OLD_RNG_GLOBALS) if path.name == RNG else set()
    except ValueError:  # "Expected input to be a checkpoint returned by torch.save"
        why = "it is not a file of torch.save, whose contents can be checked before loading"
    except Exception as e:  # noqa: BLE001 - e.g. a pickle opcode that torch.save never writes
        why = f"torch cannot check it before loading ({first_line(e)})"
    else:
        why = (
            f"unpickling it would call {', '.join(sorted(calls))}, which can run any code"
            if calls
            else f"weights-only loading refused it ({first_line(error)})"
        )
    return refusal(path, why, then)


def refusal(path: Path, why: str, then: str = UNSAFE_THEN) -> UnsafeFileError:
    """The one-line UnsafeFileError of `path`, refused because `why`; `then`: what to do."""
    return UnsafeFileError(
        f"{path} was refused and nothing in it was run: {why}. A file this pipeline writes "
        "holds only tensors and plain numbers, so this one was altered or made elsewhere: "
        + then.format(folder=path.parent)
    )


def first_line(error: Exception) -> str:
    """The line of a pickle error that says what is wrong (torch's own adds advice around it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = next((line for line in lines if "Unsupported" in line), lines[0] if lines else "")
    return found.removeprefix("WeightsUnpickler error: ")[:200] or type(error).__name__


def global_names(globals_: tuple) -> set[str]:
    """`module.name` of each class or function (or the name given beside it), as torch's scan
    names them."""
    return {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__name__}" for g in globals_}


def load_file(path: str | os.PathLike, allow: tuple = ()) -> Any:
    """torch.load of one checkpoint file onto the CPU with weights_only=True (tensors, numbers,
    strings and containers; plus the classes in `allow`): unpickling can call nothing else, so
    a file from elsewhere cannot run code. Raises UnsafeFileError for a file that needs more,
    CheckpointError for one that cannot be read at all."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only's refusal (or a damaged pickle)
        raise refused_file(path, e) from None
    except Exception as e:  # noqa: BLE001 - a damaged file raises zip, EOF or runtime errors
        text = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {text})") from None
