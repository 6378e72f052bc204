"""Quiet by default: hide the known, harmless messages of our dependencies; `--verbose` shows all.

Each filter names one message (and where it comes from), so that any other warning or log
line still reaches the console. What is hidden and why:

- Lightning's "Tip" lines that advertise litlogger and litmodels: an info log line printed by
  every Trainer, with no setting to turn it off (Lightning 2.6).
- Deprecation warnings raised inside our dependencies, about calls that they make, not we:
  Lightning's use of torch's `LeafSpec` and `torch.distributed.nn.functional.all_gather`.
- Lightning's warning that an `IterableDataset` with `__len__` may repeat data in several
  DataLoader workers: data_shards/stream.py gives each (rank, worker) its own share, so it
  does not apply.
- Ray Train's `PlacementGroupCleaner` warning, every 2 s, that it cannot query the state
  API (the local Ray we start runs without the dashboard that serves it), and a one-off
  `core_worker.cc` error line about the constructor arguments of Ray Train's own
  `PreemptionWatcher` actor. Ray keeps every worker line in its log files (by default
  /tmp/ray/session_latest/logs/worker-*.err); `RAY_DEDUP_LOGS_SKIP_REGEX` (Ray's setting for
  lines not to forward to the driver) keeps these off the console. It takes effect with
  Ray's log deduplication (its default; `RAY_DEDUP_LOGS=0` forwards every line as it is),
  and must be in the environment before `ray` is imported.

Ray workers and Ray Tune trials are other processes: the launchers call `install` there too.
"""

from __future__ import annotations

import logging
import os
import warnings

# (message regex, category, module regex) for warnings.filterwarnings: the module is the
# one the warning is attributed to (the caller of the deprecated function).
WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"pytorch_lightning\.utilities\._pytree",
    ),
    (
        r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
        FutureWarning,
        r"lightning_fabric\.utilities\.distributed",
    ),
    (
        r"Your `IterableDataset` has `__len__` defined",
        UserWarning,
        r"pytorch_lightning\.utilities\.data",
    ),
)

LIGHTNING_TIPS = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
    "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]",
)
"""The start of each Lightning tip line that is hidden."""

LIGHTNING_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)
"""The loggers of Lightning's rank_zero_info (each package sets its own on import)."""

RAY_LINES = (
    r"Failed to query Ray Train Controller actor state\. State API may be temporarily "
    r"unavailable\. Continuing to monitor\.",
    r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' and ID: '\w+' has "
    r"constructor arguments in the object store and max_restarts > 0",
)
"""Worker log lines that Ray does not forward to the console (regexes, searched in a line)."""

RAY_SKIP_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"

_verbose = True  # until install() is called: library use stays unfiltered
_RAY_SKIP = "|".join(f"(?:{line})" for line in RAY_LINES)


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIPS)


_TIP_FILTER = _DropLightningTips()


def install(verbose: bool = False) -> None:
    """Hide the known noise in this process, or with `verbose` show it again; idempotent.

    Call it before `ray` is imported for the Ray part to take effect in this process.
    """
    global _verbose
    _verbose = verbose
    for message, category, module in WARNINGS:
        # filterwarnings drops an equal filter and puts this one first: it is never there
        # twice, and `verbose` takes it out again.
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
        if verbose:
            warnings.filters.pop(0)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(_TIP_FILTER)
        else:
            logger.addFilter(_TIP_FILTER)  # a no-op if already added
    # The Ray lines: ours added to (or taken out of) what the environment already skips,
    # which a quiet parent process (or the user) may have set.
    theirs = os.environ.get(RAY_SKIP_ENV, "")
    parts = [part for part in theirs.split(f"|{_RAY_SKIP}") if part and part != _RAY_SKIP]
    if not verbose:
        parts.append(_RAY_SKIP)
    if parts:
        os.environ[RAY_SKIP_ENV] = "|".join(parts)
    else:
        os.environ.pop(RAY_SKIP_ENV, None)


def is_verbose() -> bool:
    """Whether this process shows everything (what its workers should do too)."""
    return _verbose
