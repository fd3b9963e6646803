"""Weights & Biases logging of a training run, optional: the scalars and images TensorBoard gets, on rank 0.

`utils.logging.run_writer` creates a `WandbWriter` when `wandb=True` and fans the run's writer calls
(`add_scalar`, `add_image`, `close`) out to it and to TensorBoard, so every trainer, the verification callback and
stage 1 log to both without knowing it. `wandb` is not in requirements.txt (a 20 MB wheel plus about ten
dependencies): `pip install wandb`; `wandb=True` without it is a config error naming the key.

Per run: the run's config is the wandb config; each step's values are one wandb row with `global_step` as its x
axis (so a resumed run that repeats steps after its last checkpoint still plots on the step axis); the wandb run id
and name are kept in `<output>/wandb_run.json`, and a training run that resumes from a checkpoint continues that
wandb run (`wandb_resume`). wandb's own files go to `<output>/wandb/` (offline runs: `WANDB_MODE=offline`, then
`wandb sync <output>/wandb/offline-run-*`). The API key is never a config key: the config is copied into
summary.json and every checkpoint; use `wandb login` or WANDB_API_KEY. docs/monitoring.md maps the keys to
arcface_torch's.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

RUN_FILE = "wandb_run.json"
ARTIFACT_FILES = ("model.pt", "generator.pth")  # what the trainers write at the end (stage 2, stage 1)


def wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def _as_hwc(image: Any, dataformats: str) -> np.ndarray:
    """An image in TensorBoard's layouts (CHW, HWC, HW; tensor or array) as an HWC / HW numpy array."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if dataformats.upper() == "CHW":
        array = np.transpose(array, (1, 2, 0))
    return array


class WandbWriter:
    """TensorBoard's `add_scalar` / `add_image` / `close` for one wandb run (rank 0).

    Values of one step are buffered and logged as one row when a later step arrives or on `flush` / `close`."""

    def __init__(self, output: str | Path, cfg: Mapping[str, Any], resumed: bool) -> None:
        from utils.errors import ConfigError

        if not wandb_installed():
            raise ConfigError("config key 'wandb' = True, but the wandb package is not installed: `pip install "
                              "wandb`, or set wandb=False")
        import wandb

        self.wandb = wandb
        self.output = Path(output)
        self.save_artifacts = bool(cfg.get("wandb_save_artifacts"))
        run_file = self.output / RUN_FILE
        previous = self._previous_run(run_file) if resumed and cfg.get("wandb_resume") else None
        if previous is not None:
            run_id, name = previous["id"], previous["name"]
        else:
            run_id = None  # wandb draws one; stored below
            name = f"{cfg.get('config_name', 'run')}_{time.strftime('%y%m%d_%H%M')}"
            if cfg.get("wandb_run_suffix"):
                name += f"_{cfg['wandb_run_suffix']}"
        self.output.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=cfg.get("wandb_project") or "cfsm", entity=cfg.get("wandb_entity"),
                                  name=name, notes=cfg.get("wandb_notes") or None, id=run_id,
                                  resume="allow" if previous is not None else None, dir=str(self.output),
                                  config=dict(cfg))
        except wandb.errors.Error as e:  # no login, no network, a wrong entity: say which keys and what to do
            raise ConfigError(f"config key 'wandb' = True: wandb.init failed ({' '.join(str(e).split())}); run "
                              f"`wandb login` or set WANDB_API_KEY, check wandb_project / wandb_entity, or set "
                              f"WANDB_MODE=offline and `wandb sync` later") from None
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        run_file.write_text(json.dumps({"id": self.run.id, "name": name, "project": self.run.project}) + "\n")
        self.pending: dict[str, Any] = {}
        self.pending_step: int | None = None

    @staticmethod
    def _previous_run(run_file: Path) -> dict | None:
        try:
            data = json.loads(run_file.read_text())
        except (OSError, ValueError):
            return None  # none yet (the run was started without wandb) or unreadable: a new wandb run
        return data if isinstance(data, dict) and data.get("id") and data.get("name") else None

    def _at(self, step: int) -> None:
        if self.pending_step is not None and step != self.pending_step:
            self.flush()
        self.pending_step = int(step)

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        self._at(step)
        self.pending[tag] = float(value)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        self._at(step)
        self.pending[tag] = self.wandb.Image(_as_hwc(image, dataformats))

    def flush(self) -> None:
        if self.pending:
            self.run.log({**self.pending, "global_step": self.pending_step})
        self.pending = {}

    def close(self) -> None:
        """Log what is buffered, upload the run's model files as an artifact (`wandb_save_artifacts`), finish."""
        self.flush()
        if self.save_artifacts:
            files = [self.output / f for f in ARTIFACT_FILES if (self.output / f).is_file()]
            if files:
                artifact = self.wandb.Artifact(f"model-{self.run.id}", type="model")
                for f in files:
                    artifact.add_file(str(f))
                self.run.log_artifact(artifact)
        self.run.finish()


class FanOutWriter:
    """One writer for the run that forwards each call to several (TensorBoard, wandb)."""

    def __init__(self, writers: list[Any]) -> None:
        self.writers = writers

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        for w in self.writers:
            w.add_image(tag, image, step, dataformats=dataformats)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()
