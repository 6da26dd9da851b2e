"""Checkpoint files that a crash cannot tear: written to a temporary file beside the target, flushed to disk and
renamed over it (``os.replace`` is atomic on POSIX), and read back only when whole, with a SHA-256 digest of the
contents checked first. A file cut short, altered, or written by something else is refused in one ``ValueError``
line naming the file and what is wrong; a refused load changes neither the model nor the optimizer.

Under data parallelism every rank holds the same factors, decompositions and buffers (factors are all-reduced,
decompositions broadcast); only the Fisher sampler's generator is per rank, and the optimizer's ``state_dict()``
gathers those. So every rank calls :func:`save_checkpoint`, rank 0 writes, and every rank loads the same file.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
from typing import Union

import torch
from torch import nn

FORMAT = "kldwrm_fast checkpoint 1"
"""The format tag a file must carry to be read."""


def save_checkpoint(path: Union[str, os.PathLike], model: nn.Module, optimizer, **extra) -> None:
    """Write ``model``'s and ``optimizer``'s ``state_dict()`` and the picklable ``extra`` items (an epoch, a data
    loader position) to ``path`` atomically: a reader sees the previous file or the new one, never part of one.

    Under data parallelism call it on every rank (the optimizer's ``state_dict()`` gathers every rank's sampler
    state); rank 0 writes the file."""
    path = pathlib.Path(path)
    contents = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": extra}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    buffer = io.BytesIO()
    torch.save(contents, buffer)
    payload = buffer.getvalue()
    record = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(record, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def load_checkpoint(path: Union[str, os.PathLike], model: nn.Module, optimizer, map_location=None) -> dict:
    """Load a :func:`save_checkpoint` file into ``model`` and ``optimizer`` and return its ``extra`` items.

    Raises ``ValueError`` (one line) for a file that is truncated, altered or not this format, and for contents that
    do not fit the model or the optimizer (``load_state_dict``'s own checks); then both are left as they were."""
    record = _read(pathlib.Path(path))
    contents = torch.load(io.BytesIO(record["payload"]), map_location=map_location, weights_only=True)
    kept = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    try:
        try:
            model.load_state_dict(contents["model"])
        except RuntimeError as error:  # nn.Module's message spans lines, one per mismatched tensor
            reason = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise ValueError(f"Invalid checkpoint {str(path)!r}: its model state does not fit this model ({reason})"
                             ) from None  # fmt: skip
        optimizer.load_state_dict(contents["optimizer"])  # leaves the optimizer as it was when it raises
    except BaseException:
        model.load_state_dict(kept)
        raise
    return contents["extra"]


def _read(path: pathlib.Path) -> dict:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch.load's errors for a cut zip archive vary by version: RuntimeError, EOFError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"Invalid checkpoint {str(path)!r}: not a whole checkpoint file, truncated or not written "
                         f"by save_checkpoint ({reason})") from None  # fmt: skip
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"Invalid checkpoint {str(path)!r}: not a {FORMAT!r} file (was it written by torch.save? "
                         "load it with torch.load and optimizer.load_state_dict)")  # fmt: skip
    payload = record.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != record.get("sha256"):
        raise ValueError(f"Invalid checkpoint {str(path)!r}: its contents do not match their SHA-256 digest (torn "
                         "or altered after writing)")  # fmt: skip
    return record
