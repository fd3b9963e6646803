"""tools.compare_faces: cosine of two aligned faces or (--align) of two photos' faces, and the verdict with the
threshold's source (given by --threshold, or at --far on a .bin set with the same model)."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from eval.align import NoFaceError
from tools import compare_faces
from utils.cli import UsageError


@pytest.fixture()
def photos(tmp_path: Path) -> dict[str, Path]:
    from skimage import data

    image = Image.fromarray(data.astronaut())
    paths = {"astronaut": tmp_path / "astronaut.png", "rotated": tmp_path / "rotated.png",
             "blank": tmp_path / "blank.png"}
    image.save(paths["astronaut"])
    image.rotate(20, resample=Image.Resampling.BILINEAR, expand=True).save(paths["rotated"])
    Image.new("RGB", (100, 100), (10, 10, 10)).save(paths["blank"])
    return paths


def _main(model: Path, a: Path, b: Path, *args: str) -> float:
    return compare_faces.main([str(a), str(b), "--model", str(model), "--network", "r_tiny", "--device", "cpu",
                               *args])


def test_align_equals_comparing_the_aligned_crops(model_file: Path, photos: dict, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from tools import align

    cos = _main(model_file, photos["astronaut"], photos["rotated"], "--align")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{cos:.6f}" and out[1].startswith("no verdict: give --threshold")
    align.main([str(photos["astronaut"]), str(photos["rotated"]), "--out", str(tmp_path / "c"), "--no-progress"])
    same = _main(model_file, tmp_path / "c" / "astronaut_face0.png", tmp_path / "c" / "rotated_face0.png")
    assert abs(cos - same) < 1e-5


def test_verdict_with_a_given_threshold(model_file: Path, photos: dict, capsys: pytest.CaptureFixture[str]) -> None:
    cos = _main(model_file, photos["astronaut"], photos["rotated"], "--align", "--threshold", "-1")
    assert f"verdict: same person (cosine {cos:.4f} >= threshold -1.0000; threshold: given by --threshold)" \
        in capsys.readouterr().out
    _main(model_file, photos["astronaut"], photos["rotated"], "--align", "--threshold", "1.0001")
    assert "verdict: different (cosine" in capsys.readouterr().out


def test_threshold_from_a_bin_set_at_a_far(model_file: Path, photos: dict, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The printed threshold is the one eval.metrics.threshold_at_far gives on the set's cosines."""
    from eval.common import load_backbone
    from eval.metrics import l2_normalize, threshold_at_far
    from eval.verification import embed_images
    from utils.data.binfile import load_bin, write_bin

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (20, 112, 112, 3), dtype=np.uint8)
    images, issame = [], []
    for i in range(20):  # genuine pairs: an image and its slightly noisy copy; impostors: two different images
        same = i % 2 == 0
        other = base[i] if same else base[(i + 7) % 20]
        noise = rng.integers(-8, 9, other.shape)
        images += [base[i], np.clip(other.astype(int) + noise, 0, 255).astype(np.uint8)]
        issame.append(same)
    write_bin(tmp_path / "set.bin", np.stack(images), issame)
    cos = _main(model_file, photos["astronaut"], photos["rotated"], "--align", "--bin", str(tmp_path / "set.bin"),
                "--far", "0.2")
    line = capsys.readouterr().out.splitlines()[1]
    imgs, same = load_bin(tmp_path / "set.bin")
    emb = l2_normalize(embed_images(load_backbone(model_file, "r_tiny"), imgs))
    want = threshold_at_far(np.sum(emb[0::2] * emb[1::2], 1), same, 0.2)
    m = re.search(r"threshold (-?[0-9.]+); threshold: FAR 0\.2 on (.*set\.bin) \(measured FAR ([0-9.e+-]+) over "
                  r"10 impostor pairs, TAR ([0-9.]+)% over 10 genuine pairs\)", line)
    assert m, line
    assert abs(float(m.group(1)) - want["threshold"]) < 1e-4 and float(m.group(3)) <= 0.2
    assert line.startswith(f"verdict: {'same person' if cos >= want['threshold'] else 'different'}")


def test_bad_uses_are_named(model_file: Path, photos: dict, tmp_path: Path) -> None:
    with pytest.raises(NoFaceError, match=rf"photo {photos['blank']}: no face found"):
        _main(model_file, photos["astronaut"], photos["blank"], "--align")
    with pytest.raises(UsageError, match="--threshold and --bin both"):
        _main(model_file, photos["astronaut"], photos["rotated"], "--threshold", "0.3", "--bin", str(model_file))
    with pytest.raises(UsageError, match="--face all: compare_faces compares one face"):
        _main(model_file, photos["astronaut"], photos["rotated"], "--align", "--face", "all")
    with pytest.raises(UsageError, match=rf"--bin {tmp_path / 'no.bin'} does not exist"):
        _main(model_file, photos["astronaut"], photos["rotated"], "--bin", str(tmp_path / "no.bin"))
    crop = tmp_path / "crop.png"
    cv2.imwrite(str(crop), np.zeros((112, 112, 3), np.uint8))
    from eval.common import EvalInputError

    with pytest.raises(EvalInputError, match=r"astronaut\.png is 512x512, expected an aligned 112x112 face"):
        _main(model_file, photos["astronaut"], crop)  # a raw photo without --align


def _readme_lines(word: str) -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    return [line for line in readme if word in line]


@pytest.mark.slow
def test_readme_compare_faces_lines_run_as_written_on_a_fresh_clone(tmp_path: Path) -> None:
    """Every README compare_faces line with --bin names a set a newcomer has: the toy line runs as written (after the
    README's photo line and the toy steps, here a small toy set and an untrained toy model), and the lfw.bin line
    says where that file comes from."""
    import shlex
    import subprocess
    import sys

    import torch

    from backbones import get_model
    from tests.helpers import REPO, headroom, launch_env
    from utils.data.toyface import ensure_toy_data

    lines = _readme_lines("python -m tools.compare_faces")
    readme = (REPO / "README.md").read_text()
    lfw = [line for line in lines if "--bin data/lfw.bin" in line]
    assert lfw and all("faces_emore" in readme.split(line, 1)[1][:400] for line in lfw), "say where lfw.bin comes from"
    toy = [line for line in lines if "--bin data/toy/" in line]
    assert toy, "no compare_faces line a fresh clone can run"
    # the 300 impostor pairs of toy_clean.bin measure FAR 1e-2; 100 here are the fewest that do
    ensure_toy_data(tmp_path / "data" / "toy", num_identities=4, images_per_identity=2, num_eval_identities=10,
                    num_pairs=200, num_target_faces=2, workers=1)
    (tmp_path / "work_dirs" / "toy").mkdir(parents=True)
    torch.save(get_model("r_tiny", num_features=128).state_dict(), tmp_path / "work_dirs" / "toy" / "model.pt")
    env = launch_env(PYTHONPATH=str(REPO))
    (photo_line,) = _readme_lines("photos/astronaut_rot20.png')\"")
    for line in [photo_line, *toy]:
        command = shlex.split(line.split("  #")[0])
        command[0] = sys.executable
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=headroom(120))
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
    assert "verdict: " in proc.stdout and "on data/toy/toy_clean.bin" in proc.stdout, proc.stdout


def test_an_unaligned_photo_points_at_align(model_file: Path, photos: dict) -> None:
    from eval.common import EvalInputError

    with pytest.raises(EvalInputError, match=r"expected an aligned 112x112 face \(pass --align for raw photos\)$"):
        _main(model_file, photos["astronaut"], photos["rotated"])
