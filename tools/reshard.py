"""Re-shard a recognition checkpoint folder for another number of ranks, offline.

    python -m tools.reshard work_dirs/run/checkpoints/step_00012000 --world-size 3 --out DIR
    python -m tools.reshard work_dirs/run/checkpoints/step_00012000 --world-size 1 --out DIR   # all class centres

CHECKPOINT_DIR is one `checkpoints/step_N` folder of a train.py run (rank_R.pt files and the COMPLETE marker). DIR
gets rank_0.pt .. rank_{N-1}.pt and a COMPLETE marker for N ranks: Partial FC class centres and their optimizer state
re-partitioned (every class centre exactly once), everything else carried over (utils/run/reshard.py). With
`--world-size 1`, DIR/rank_0.pt holds the full classifier (`partial_fc.weight`, [num_classes, D]). W -> 1 -> W
round trips are bitwise.

To continue training from DIR, copy it to `<output>/checkpoints/step_N` of the run folder (the name must be its
step) and resume there with N ranks; with one disk per node, give each node the folder. A resume on shared storage
does not need this tool: it re-shards on load.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from utils.checkpoint import atomic_save, file_sha256, safe_load
from utils.cli import ArgumentParser, UsageError, expanded_path, positive_int, run_command


def read_folder(directory: Path) -> tuple[dict, dict[int, dict]]:
    """(COMPLETE marker, every rank's state); one-line errors for a missing marker or rank file."""
    marker = directory / "COMPLETE"
    if not directory.is_dir():
        raise UsageError(f"CHECKPOINT_DIR {directory} is not a folder; give one checkpoints/step_N folder of a run")
    if not marker.is_file():
        raise UsageError(f"{marker} does not exist: {directory} is not a complete checkpoint (the run may have "
                         f"stopped while writing it); use an older checkpoints/step_N folder")
    try:
        meta = json.loads(marker.read_text())
        world = int(meta["world_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{marker}: not a COMPLETE marker with a world_size ({exc})") from None
    if meta.get("kind", "recognition") != "recognition":
        raise UsageError(f"{directory} is a {meta.get('kind')!r} checkpoint: only recognition (train.py) checkpoints "
                         f"hold Partial FC shards to re-shard")
    missing = [f"rank_{r}.pt" for r in range(world) if not (directory / f"rank_{r}.pt").is_file()]
    if missing:
        raise UsageError(f"{directory}: {', '.join(missing)} missing of the {world} rank files COMPLETE lists; copy "
                         f"every node's file of this step into the folder (per-node disks), or use another step")
    return meta, {r: safe_load(directory / f"rank_{r}.pt") for r in range(world)}


def main(argv: list[str] | None = None) -> Path:
    parser = ArgumentParser(prog="python -m tools.reshard", description=__doc__)
    parser.add_argument("checkpoint", type=expanded_path, metavar="CHECKPOINT_DIR",
                        help="a checkpoints/step_N folder written by train.py (rank_R.pt files + COMPLETE)")
    parser.add_argument("--world-size", type=positive_int, required=True,
                        help="number of ranks to write the checkpoint for (1: one file with every class centre)")
    parser.add_argument("--out", type=expanded_path, required=True,
                        help="output folder for rank_0.pt .. rank_{N-1}.pt and COMPLETE; must not hold rank files")
    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help="the class count of the data you will train on; an error when the checkpoint's differs "
                             "(default: not checked)")
    args = parser.parse_args(argv)
    from utils.run.elastic import saved_course
    from utils.run.reshard import ReshardError, reshard_states
    from utils.run.run_folder import mark_complete

    meta, states = read_folder(args.checkpoint)
    old_world = int(meta["world_size"])
    if args.out.resolve() == args.checkpoint.resolve():
        raise UsageError(f"--out {args.out} is CHECKPOINT_DIR itself; give a new folder")
    if args.out.exists() and any(args.out.glob("rank_*.pt")):
        raise UsageError(f"--out {args.out} already holds rank files; give an empty or new folder")
    try:
        count = int(states[0]["partial_fc"]["_extra_state"]["num_classes"])
    except (KeyError, TypeError):
        raise UsageError(f"{args.checkpoint / 'rank_0.pt'} has no Partial FC shard metadata: not a train.py "
                         f"recognition checkpoint") from None
    recorded = (meta.get("config") or {}).get("num_classes")
    if recorded is not None and int(recorded) != count:
        raise UsageError(f"{args.checkpoint / 'rank_0.pt'} holds {count} classes but COMPLETE's config says "
                         f"num_classes={recorded}: the folder mixes files of different runs")
    if args.num_classes is not None and args.num_classes != count:
        raise UsageError(f"{args.checkpoint} has {count} class centres but --num-classes {args.num_classes}: the data "
                         f"does not match this checkpoint; train on the data it was trained on, or start a new run "
                         f"with pretrained_backbone_model={args.checkpoint / 'rank_0.pt'}")
    position = saved_course(states[0], meta)  # older files: write the position the step count implied
    seed = int((meta.get("config") or {}).get("seed", 0))
    try:
        new = reshard_states(states, old_world, args.world_size, seed=seed,
                             name=lambda r: str(args.checkpoint / f"rank_{r}.pt"))
    except ReshardError as exc:
        raise UsageError(f"{args.checkpoint}: {exc}") from None
    sizes, digests = {}, {}
    for r, state in new.items():
        if position is not None:
            state.setdefault("data_position", position)
        path = args.out / f"rank_{r}.pt"
        atomic_save(state, path)
        sizes[str(r)] = path.stat().st_size
        digests[str(r)] = file_sha256(path)
    config = {**(meta.get("config") or {}), "world_size": args.world_size}
    kept = {k: meta[k] for k in ("step", "kind", "finite", "config_name", "epoch") if k in meta}  # not per-file keys
    mark_complete(args.out, {**kept, "world_size": args.world_size, "sizes": sizes, "sha256": digests,
                             "config": config,
                             "resharded_from": {"directory": str(args.checkpoint), "world_size": old_world}})
    def classes(state: dict) -> str:
        extra = state["partial_fc"]["_extra_state"]
        return f"{extra['class_start']}..{extra['class_start'] + extra['num_local'] - 1}"

    shown = ", ".join(f"rank {r} classes {classes(s)}" for r, s in list(new.items())[:4])
    print(f"{args.checkpoint} ({old_world} ranks, {count} classes, step {new[0]['step']}) -> {args.out} "
          f"({args.world_size} ranks: {shown}{' ...' if len(new) > 4 else ''})")
    return args.out


if __name__ == "__main__":
    run_command(main)
