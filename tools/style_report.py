"""Is a CFSM generator's style space controllable? Its measures as a JSON last line, plus a PNG.

    python -m tools.style_report runs/toy/generator/generator.pth --faces data/toy \\
        --id-model runs/toy/baseline/model.pt --id-network r_tiny --id-embedding-size 128 \\
        --target-faces data/toy/target_faces --out runs/toy/style_report

Writes OUT/style_report.json and OUT/style_report.png (identity distance vs |o| against the stage-1 target d*,
per-direction effect bars, samples). The last stdout line is the report as one JSON object; each goal of the
report's ``goals`` block says its value, threshold and whether it is met. Stage 1 writes the same report at its end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from utils.checkpoint import json_safe
from utils.cli import ArgumentParser, UsageError, resolve_device, run_command


def parse_args(argv=None) -> argparse.Namespace:
    from eval.common import add_network_args

    p = ArgumentParser(description=__doc__)
    p.add_argument("generator", help="CFSM generator file (released format: dict with 'G_state_dict')")
    p.add_argument("--faces", required=True, help="clean faces: toy/RecordIO folder, .rec, image folder or .txt")
    p.add_argument("--id-model", required=True, help="identity network weights (stage 1's id_model)")
    add_network_args(p, prefix="id-")  # --id-network (default auto), --id-embedding-size
    p.add_argument("--target-faces", required=True, help="real target-domain faces (folder or .txt list)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-faces", type=int, default=32, help="clean faces measured (>= 32 recommended)")
    p.add_argument("--num-target-faces", type=int, default=32, help="real target faces measured")
    p.add_argument("--gap-faces", type=int, default=256,
                   help="clean and target faces for the domain gap (cfsm/domain_gap.py; 0 = do not measure it)")
    p.add_argument("--directions", type=int, default=3, help="random unit directions per face and |o|")
    p.add_argument("--distance-range", type=float, nargs=4, default=(0.0, 6.0, 0.05, 0.65),
                   metavar=("LA", "UA", "LM", "UM"), help="stage 1's id_distance_range (defines d*)")
    p.add_argument("--seed", type=int, default=0, help="seed of the directions and face choice")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from cfsm import load_generator
    from cfsm.style_report import write_style_report
    from eval.common import load_rgb_backbone
    from tools.style_grid import load_faces

    from eval.common import check_output_folder

    args = parse_args(argv)
    if args.num_faces < 2:
        raise SystemExit(f"--num-faces must be >= 2, got {args.num_faces}")
    # checked before any model is loaded or face measured
    if args.num_target_faces < 1:
        raise UsageError(f"--num-target-faces must be >= 1, got {args.num_target_faces}")
    if args.gap_faces == 1 or args.gap_faces < 0:
        raise UsageError(f"--gap-faces must be 0 (off) or >= 2, got {args.gap_faces}")
    if args.directions < 1:
        raise UsageError(f"--directions must be >= 1, got {args.directions}")
    if args.distance_range[0] == args.distance_range[1]:
        raise UsageError(f"--distance-range {list(args.distance_range)}: LA and UA must differ (d* divides by UA - LA)")
    check_output_folder(args.out)
    device = resolve_device(args.device)
    generator = load_generator(args.generator).to(device).eval()
    id_net, _ = load_rgb_backbone(args.id_model, args.id_network, args.id_embedding_size, device)  # G: RGB
    faces = load_faces(args.faces, args.num_faces, args.seed)
    target_faces = load_faces(args.target_faces, args.num_target_faces, args.seed, "--target-faces",
                              "--num-target-faces")
    gap = {}
    if args.gap_faces:
        gap = dict(gap_faces=load_faces(args.faces, args.gap_faces, args.seed, count_flag="--gap-faces"),
                   gap_target_faces=load_faces(args.target_faces, args.gap_faces, args.seed, "--target-faces",
                                               "--gap-faces"))
    report = write_style_report(generator, id_net, faces, target_faces, Path(args.out), tuple(args.distance_range),
                                args.directions, args.seed, **gap)
    if "domain_gap" in report:
        g = report["domain_gap"]
        print(f"domain gap: {g['relative_gap']:.3f} (Fréchet distance synthesized-target {g['fd_synth_target']:.4f} / "
              f"clean-target {g['fd_clean_target']:.4f}; 0 = like the target, 1 = no closer than clean faces)",
              file=sys.stderr)
    print(f"style report: {Path(args.out) / 'style_report.png'}", file=sys.stderr)
    print(json.dumps(json_safe(report), allow_nan=False), flush=True)  # valid JSON: NaN as null
    return report


if __name__ == "__main__":
    run_command(main)
