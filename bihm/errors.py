"""The error type for a user's mistakes.

A `UserError` names what is wrong (the file, the config key, the flag, the field) in its
message; `bihm`'s command line prints it as one line, `bihm <cmd>: error: ...`, and exits
with status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a request that cannot be carried out, explained in one line."""


class CheckpointError(UserError, ValueError):
    """A file is not a checkpoint bihm can read (the message names it and says why)."""


def torch_load_error(path: object, err: BaseException) -> CheckpointError:
    """A one-line CheckpointError for a failed `torch.load(path, weights_only=True)`.

    torch's own message advises retrying with weights_only=False, i.e. running whatever
    code the file holds; that is not advice to pass on for a file of unknown origin.
    """
    if "Unsupported global" in str(err):
        why = "it holds objects other than tensors and plain containers (not loaded)"
    else:
        why = f"not a torch file, or truncated ({type(err).__name__})"
    return CheckpointError(f"{path} is not a readable checkpoint: {why}")
