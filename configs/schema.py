"""How `configs/base.py` declares a config key — one row: default, one-line meaning, stage, rule, resume rule — and
every table derived from those rows: the defaults, the value rules checked at load, the keys of each stage, the resume
policy of each trainer, and the key table in docs/configs.md (written by `python -m tools.config_keys --update-docs`).

A key is declared once, in base.py; nothing else lists keys. A key whose choices live in code (backbones, losses,
optimizers, input skips, style sampling, style search) names that code's own declaration as its rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

from utils.run.config_policy import ConfigPolicy

__all__ = ["Key", "Rule", "within", "pair", "choices", "numbers", "STAGES", "RESUME_RULES", "REFUSE", "APPLY", "FREE",
           "INERT", "BOTH", "STAGE1", "STAGE2", "KINDS", "stage_keys", "resume_policy", "key_table_markdown"]

# ---- the stage a key belongs to: a key only the other stage reads is refused at load (configs.loader) ----
BOTH, STAGE1, STAGE2 = "both", "stage 1", "stage 2"
STAGES = (BOTH, STAGE1, STAGE2)
KINDS = {"recognition": STAGE2, "cfsm_stage1": STAGE1}  # a run's kind (its checkpoints) -> its stage

# ---- what a changed key does when a run resumes (utils.run.config_policy.check_config) ----
REFUSE = "refuse"  # gives the saved state its meaning (or the data order): a change is an error
APPLY = "apply"    # changes the training from the resumed step on: applied, listed in one warning line
FREE = "free"      # where and how the run is watched or stopped: no word on resume; a finished run re-run must match
INERT = "inert"    # changes nothing a run records: free on resume, and a finished command re-run with it is a no-op
RESUME_RULES = (REFUSE, APPLY, FREE, INERT)

# Keys the trainers add to the stored config (not in base.py): their resume rule per stage.
DERIVED_KEYS: dict[str, dict[str, str]] = {
    "config_name": {STAGE2: FREE, STAGE1: FREE},
    "world_size": {STAGE2: FREE, STAGE1: REFUSE},  # stage 2 re-shards its state onto another world size
}


@dataclass(frozen=True)
class Rule:
    """A value rule: `check(value) -> bool` and the text an error shows (`config key 'k' = v: <text>`); the text
    may be a function, read when shown (a registry's choices as they are then)."""
    check: Callable[[Any], bool]
    describe: str | Callable[[], str]

    @property
    def text(self) -> str:
        return self.describe() if callable(self.describe) else self.describe


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def numbers(value: Any, count: int | None = None) -> bool:
    """A list/tuple of finite real numbers (of length `count` when given)."""
    return isinstance(value, (list, tuple)) and (count is None or len(value) == count) and all(
        _is_number(v) for v in value)


def within(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           none_ok: bool = False, note: str = "") -> Rule:
    """One number in [low, high] (bounds optional, open when *_open; None allowed when none_ok)."""
    def check(v: Any) -> bool:
        if v is None:
            return none_ok
        return _is_number(v) and ((low is None or (v > low if low_open else v >= low))
                                  and (high is None or (v < high if high_open else v <= high)))

    if low is not None and high is not None:
        text = f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        text = f"must be {'>' if low_open else '>='} {low:g}"
    else:
        text = f"must be {'<' if high_open else '<='} {high:g}"
    text += " or None" if none_ok else ""
    return Rule(check, text + (f" ({note})" if note else ""))


def pair(low: float, high: float | None, what: str, low_open: bool = False) -> Rule:
    """A (min, max) pair with low <= min <= max <= high."""
    def check(v: Any) -> bool:
        return numbers(v, 2) and (v[0] > low if low_open else v[0] >= low) and v[0] <= v[1] and (
            high is None or v[1] <= high)

    bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
    return Rule(check, f"must be (min, max) with min <= max, both {bounds} ({what})")


def choices(declared: Collection[Any]) -> Rule:
    """One of the names the owning code declares (a registry dict or a tuple), looked up when checked: that code is
    the one list, and a name registered later (a plug-in loss) is a choice too."""
    return Rule(lambda v: v in declared, lambda: f"choices: {', '.join(map(str, declared))}")


@dataclass(frozen=True)
class Key:
    """One config key: its default, what it means (one line), the stage that reads it, the rule its value obeys
    (None: only its type, from the default), what a change does on resume, and how it is parsed."""
    name: str
    default: Any
    meaning: str
    stage: str = BOTH
    resume: str = APPLY
    rule: Rule | None = None
    types: tuple[type, ...] | None = None  # the types it may take when not just the default's (e.g. (str, None))
    path: bool = False                      # a file or folder: `~` is expanded at load
    legacy: Any = field(default=None)       # the value runs saved before the key existed had (compared on resume)
    renamed_from: tuple[str, ...] = ()      # its former names: refused in configs ("renamed to"), mapped on resume

    def __post_init__(self) -> None:
        if self.stage not in STAGES or self.resume not in RESUME_RULES:
            raise ValueError(f"config key {self.name!r}: stage {self.stage!r} / resume {self.resume!r} unknown")


def stage_keys(keys: Sequence[Key], stage: str) -> tuple[str, ...]:
    """The keys only `stage` reads."""
    return tuple(k.name for k in keys if k.stage == stage)


def resume_policy(keys: Sequence[Key], kind: str) -> ConfigPolicy:
    """The resume policy of a trainer (`kind`: recognition | cfsm_stage1), derived from the rows: a key of the
    other stage is free; every other key follows its row."""
    stage = KINDS[kind]
    rules = {k.name: (k.resume if k.stage in (BOTH, stage) else FREE) for k in keys}
    rules.update({name: per_stage[stage] for name, per_stage in DERIVED_KEYS.items()})
    picked = lambda *wanted: tuple(name for name, rule in rules.items() if rule in wanted)  # noqa: E731
    return ConfigPolicy(
        kind=kind, refuse=picked(REFUSE), apply=picked(APPLY), free=picked(FREE, INERT), inert=picked(INERT),
        init_key="pretrained_backbone_model" if stage == STAGE2 else "init_generator",
        legacy={k.name: k.legacy for k in keys if k.legacy is not None},
        renamed={old: k.name for k in keys for old in k.renamed_from})


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def key_table_markdown(keys: Sequence[Key], sections: Mapping[str, str]) -> str:
    """The key table of docs/configs.md: one row per key, in base.py's order, under its section heading."""
    lines = ["| key | default | stage | meaning | rule | on resume |", "|---|---|---|---|---|---|"]
    for k in keys:
        if k.name in sections:
            lines.append(f"| **{sections[k.name]}** | | | | | |")
        lines.append(f"| `{k.name}` | `{_cell(repr(k.default))}` | {k.stage} | {_cell(k.meaning)} | "
                     f"{_cell(k.rule.text) if k.rule else ''} | {k.resume} |")
    return "\n".join(lines)


DOCS_TABLE = ("<!-- key table: python -m tools.config_keys --update-docs -->\n", "<!-- end key table -->")


def docs_with_table(doc: str, table: str) -> str:
    """`doc` (docs/configs.md) with the text between the key-table markers replaced by `table`."""
    start, end = DOCS_TABLE
    if start not in doc or end not in doc:
        raise ValueError(f"docs/configs.md has no key-table markers ({start.strip()} ... {end})")
    return doc[:doc.index(start) + len(start)] + table + "\n" + doc[doc.index(end):]
