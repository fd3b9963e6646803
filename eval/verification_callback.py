"""Verification during training: the `val_targets` sets are opened and checked before the first step, then evaluated
periodically by rank 0 with :func:`eval.verification.evaluate_verification`, logging to the run's logger.

The metric and the CLI are ``eval/verification.py``; this module is only the trainer's side.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from eval.common import EvalInputError
from eval.verification import evaluate_verification
from utils.data.binfile import BinFileError, load_bin
from utils.errors import ConfigError
from utils.distributed import DistEnv, agree_all

__all__ = ["open_verification_sets", "CallBackVerification", "verification_for_run"]

VerificationSet = tuple[torch.Tensor, np.ndarray]


def open_verification_sets(val_targets: Sequence[str], rec_dir: str | os.PathLike,
                           nfolds: int = 10) -> dict[str, VerificationSet]:
    """Load each set (a name: ``<rec_dir>/<name>.bin``; or a path ending in ``.bin``, named by its stem) and check it
    can be scored: readable, at least ``nfolds`` pairs.

    Raises ConfigError naming the set, the file and the fix (a bad file must stop a run before its first step, not
    after its last one).
    """
    sets: dict[str, VerificationSet] = {}
    for target in val_targets:
        is_path = str(target).endswith(".bin")
        path = Path(os.path.expanduser(str(target))) if is_path else Path(rec_dir) / f"{target}.bin"
        name = path.stem if is_path else str(target)
        where = f"config key 'val_targets' names {str(target)!r}"
        if not path.is_file():
            raise ConfigError(f"{where}, but {path} does not exist; put the .bin file in `rec` ({rec_dir}), give its "
                              f"path, or remove {str(target)!r} from val_targets")
        try:
            images, issame = load_bin(path)
        except BinFileError as exc:
            raise ConfigError(f"{where}: {exc}; replace the file or remove {name!r} from val_targets") from None
        if len(issame) < nfolds:
            raise ConfigError(f"{where}: {path} holds {len(issame)} pairs, {nfolds}-fold verification needs at least "
                              f"{nfolds}; use a complete .bin file or remove {name!r} from val_targets")
        if name in sets:
            raise ConfigError(f"{where}: a second set named {name!r}; give each set a distinct file name")
        sets[name] = (images, issame)
    return sets


class CallBackVerification:
    """Periodic ``.bin`` verification for the training loop (rank 0 only).

    ``sets`` come from :func:`open_verification_sets`. ``cb(step, backbone)`` evaluates every set with the plain
    (non-DDP) backbone in eval mode under no_grad, restores its previous mode, logs ``Accuracy-Flip: mean+-std`` and
    the best so far to ``logger`` (the run's: console and train.log), writes ``val/<name>_accuracy`` and
    ``val/<name>_xnorm`` to ``summary_writer`` when given, and returns ``{name: accuracy}``.
    """

    def __init__(self, sets: dict[str, VerificationSet], batch_size: int = 64, summary_writer: Any = None,
                 nfolds: int = 10, logger: logging.Logger | None = None) -> None:
        self.sets = sets
        self.batch_size = int(batch_size)
        self.summary_writer = summary_writer
        self.nfolds = nfolds
        self.log = logger or logging.getLogger("train")
        self.highest: dict[str, float] = {name: 0.0 for name in sets}
        self.last: dict[str, dict[str, float]] = {}

    def __call__(self, step: int, backbone: nn.Module) -> dict[str, float]:
        results: dict[str, float] = {}
        for name, (images, issame) in self.sets.items():
            try:
                r = evaluate_verification(backbone, images, issame, batch_size=self.batch_size, nfolds=self.nfolds)
            except EvalInputError as exc:  # non-finite embeddings: no score (NaN would read as 50 %); training goes on
                self.log.warning(f"[{name}][{step}] not scored: {exc}")
                results[name] = float("nan")  # null in summary.json
                continue
            self.highest[name] = max(self.highest[name], r["accuracy"])
            self.last[name] = r
            results[name] = r["accuracy"]
            self.log.info(f"[{name}][{step}] XNorm: {r['xnorm']:f}")
            self.log.info(f"[{name}][{step}] Accuracy-Flip: {r['accuracy']:1.5f}+-{r['std']:1.5f}")
            self.log.info(f"[{name}][{step}] Accuracy-Highest: {self.highest[name]:1.5f}")
            if self.summary_writer is not None:
                self.summary_writer.add_scalar(f"val/{name}_accuracy", r["accuracy"], step)
                self.summary_writer.add_scalar(f"val/{name}_xnorm", r["xnorm"], step)
        return results


def verification_for_run(val_targets: Sequence[str], rec_dir: str | os.PathLike, batch_size: int, env: DistEnv,
                         summary_writer: Any = None, logger: logging.Logger | None = None,
                         nfolds: int = 10) -> CallBackVerification | None:
    """The trainer's verification callback, checked before the first step; None on other ranks or without targets.

    Only rank 0 verifies, so only it opens the files; every rank then agrees (one all-reduce) on whether that worked,
    so a bad file stops all ranks at once instead of leaving the others waiting in the first collective.
    """
    if not val_targets:  # the same config on every rank: all skip the agreement alike
        return None
    sets, error = None, None
    if env.is_main:
        try:
            sets = open_verification_sets(val_targets, rec_dir, nfolds)
        except (ConfigError, OSError) as exc:
            error = exc
    if not agree_all(env, error is None):
        if error is not None:
            raise error
        raise ConfigError("rank 0 could not open the verification sets in val_targets (its error names the file); "
                          "stopping with it")
    return CallBackVerification(sets, batch_size, summary_writer, nfolds, logger) if env.is_main else None
