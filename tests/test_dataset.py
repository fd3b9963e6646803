"""Datasets, FaceSampler, DataLoader (worker errors, determinism) and 2-process gloo sharding."""
import hashlib
import json
import os

import cv2
import numpy as np
import pytest
import torch

from dataset import (
    DataError,
    FaceSampler,
    ImageFolderDataset,
    MXFaceDataset,
    SyntheticDataset,
    batch_sampler_loader,
    build_dataset,
    get_dataloader,
    training_loader,
)
from tests.helpers import free_port
from utils.data.recordio import IndexedRecordWriter, IRHeader, pack_record, write_face_rec


@pytest.fixture(scope="module")
def mxrec(fixtures_dir):
    return fixtures_dir / "mxrec"


@pytest.fixture(scope="module")
def expected(mxrec):
    return json.loads((mxrec / "expected.json").read_text())


def _jpeg(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


@pytest.mark.parametrize("variant", ["jpeg_header_first", "png", "face2rec2_layout", "multipart"])
def test_mxface_dataset_fixture_pixels_and_labels(mxrec, expected, variant):
    e = expected[variant]
    ds = MXFaceDataset(mxrec / e["dir"], augment=False)
    assert ds.num_classes == e["num_identities"] and ds.num_images == e["num_images"] == len(ds)
    for i, im in enumerate(e["images"]):
        rgb, label = ds.read_image(i)
        assert label == int(im["label"])
        assert hashlib.md5(rgb.tobytes()).hexdigest() == im["mx_imdecode_rgb_md5"]
    img, label = ds[3]
    rgb, _ = ds.read_image(3)
    ref = torch.from_numpy(rgb).permute(2, 0, 1).float()
    assert img.dtype == torch.float32 and img.shape == (3, 112, 112)
    assert torch.allclose(img, (ref / 255 - 0.5) / 0.5, atol=1e-6)
    assert label.dtype == torch.int64 and label.ndim == 0


def test_flip_is_deterministic_and_augment_off(mxrec):
    ds = MXFaceDataset(mxrec, augment=True)
    a, _ = ds[(0, False)]
    b, _ = ds[(0, True)]
    assert torch.equal(b, a.flip(-1))
    off = MXFaceDataset(mxrec, augment=False)
    assert torch.equal(off[(0, True)][0], a)


def test_no_header_layout(tmp_path):
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for k in (3, 0, 2, 1):
            w.write(k, pack_record(IRHeader(0, float(k % 2), k, 0), _jpeg(k)))
    ds = MXFaceDataset(tmp_path)
    assert ds.num_images == 4 and ds.num_classes == 2
    assert [int(ds[(i, False)][1]) for i in range(4)] == [0, 1, 0, 1]


def _corrupt_rec(tmp_path, bad_label=False, bad_image=False):
    samples = [(0, _jpeg(0)), (0, _jpeg(1)), (1, b"\x00not an image" if bad_image else _jpeg(2)), (1, _jpeg(3))]
    write_face_rec(tmp_path, iter(samples), 2)
    if bad_label:  # rewrite with label 7 for key 2 (num_classes stays 2)
        from utils.data.recordio import IndexedRecordReader

        r = IndexedRecordReader(tmp_path / "train.rec")
        payloads = {k: r.read(k) for k in r.keys}
        payloads[2] = pack_record(IRHeader(0, 7.0, 2, 0), _jpeg(2))
        r.close()
        with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
            for k, p in payloads.items():
                w.write(k, p)
    return tmp_path


def test_label_out_of_range(tmp_path):
    ds = MXFaceDataset(_corrupt_rec(tmp_path, bad_label=True))
    with pytest.raises(DataError, match=r"train\.rec key 2: label 7 outside \[0, 2\)"):
        ds[1]


def test_undecodable_image(tmp_path):
    ds = MXFaceDataset(_corrupt_rec(tmp_path, bad_image=True))
    with pytest.raises(DataError, match=r"train\.rec key 3: could not decode"):
        ds[2]


def test_worker_error_reaches_main_process(tmp_path):
    ds = MXFaceDataset(_corrupt_rec(tmp_path, bad_image=True))
    # one worker: torch takes ~5 s per worker to reap workers after a worker-side error
    loader = get_dataloader(ds, batch_size=2, seed=0, num_workers=1)
    loader.sampler.set_epoch(0)
    with pytest.raises(DataError, match=r"train\.rec key 3: could not decode"):
        for _ in loader:
            pass


def test_missing_rec_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.rec"):
        MXFaceDataset(tmp_path)


def test_image_folder_dataset_and_errors(tmp_path):
    root = tmp_path / "faces"
    for name, n in (("bob", 2), ("alice", 3)):
        (root / name).mkdir(parents=True)
        for j in range(n):
            (root / name / f"{j}.jpg").write_bytes(_jpeg(j))
    ds = ImageFolderDataset(root)
    assert ds.num_classes == 2 and ds.num_images == 5
    assert [int(ds[(i, False)][1]) for i in range(5)] == [0, 0, 0, 1, 1]  # alice < bob
    (root / "carol").mkdir()
    with pytest.raises(DataError, match=r"carol.*no images"):
        ImageFolderDataset(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no identity sub-folders"):
        ImageFolderDataset(tmp_path / "empty")


def test_build_dataset_checks_counts(mxrec):
    assert isinstance(build_dataset(str(mxrec), num_classes=6, num_image=60), MXFaceDataset)
    with pytest.raises(DataError, match=r"num_classes=7 but the data has 6"):
        build_dataset(str(mxrec), num_classes=7)
    with pytest.raises(DataError, match=r"num_image=61 but the data has 60"):
        build_dataset(str(mxrec), num_image=61)
    syn = build_dataset("synthetic", num_classes=10, num_image=100)
    assert isinstance(syn, SyntheticDataset) and len(syn) == 100
    img, label = syn[(13, True)]
    assert img.shape == (3, 112, 112) and int(label) == 3


def test_face_sampler_determinism_sharding_resume():
    n, bs, world = 103, 5, 2
    s = [FaceSampler(n, bs, r, world, seed=1) for r in range(world)]
    assert s[0].batches_per_epoch == 10 and len(s[0]) == 50
    for x in s:
        x.set_epoch(3)
    a, b = list(s[0]), list(s[1])
    ia, ib = {i for i, _ in a}, {i for i, _ in b}
    assert len(ia) == 50 and len(ib) == 50 and not ia & ib
    assert a == list(s[0])  # same epoch -> same order and flips
    flips = dict(a + b)
    assert 0 < sum(flips.values()) < 100
    s[0].set_epoch(4)
    assert list(s[0]) != a
    s[0].set_epoch(3, start_batch=4)
    assert list(s[0]) == a[20:] and len(s[0]) == 30
    assert all(not f for _, f in FaceSampler(n, bs, 0, 1, seed=1, flip=False))
    assert [i for i, _ in FaceSampler(10, 5, 0, 1, seed=1, shuffle=False)] == list(range(10))
    with pytest.raises(ValueError):
        FaceSampler(3, 5, 0, 1, seed=0)


def test_dataloader_is_reproducible(mxrec):
    ds = MXFaceDataset(mxrec)
    runs = []
    for _ in range(2):
        loader = get_dataloader(ds, batch_size=8, seed=5, num_workers=2)
        loader.sampler.set_epoch(1, start_batch=2)
        runs.append([(x.sum().item(), y.tolist()) for x, y in loader])
    assert runs[0] == runs[1] and len(runs[0]) == 7 - 2


def test_training_loader_is_the_seeded_loader_on_cpu(mxrec):
    """The trainers' loader: on CPU exactly get_dataloader's batches (no prefetcher), positioned by its sampler."""
    ds = MXFaceDataset(mxrec)
    loader = training_loader(ds, 8, 5, 0, 0, 1, torch.device("cpu"))
    reference = get_dataloader(ds, batch_size=8, seed=5, num_workers=0)
    assert isinstance(loader.sampler, FaceSampler) and loader.sampler.batches_per_epoch == 7
    for which in (loader, reference):
        which.sampler.set_epoch(1, start_batch=2)
    assert [y.tolist() for _, y in loader] == [y.tolist() for _, y in reference]


def test_batch_sampler_loader_yields_the_samplers_batches(mxrec):
    ds = MXFaceDataset(mxrec)
    batches = [[(3, False), (0, True)], [(5, False)]]
    loader = batch_sampler_loader(ds, batches, num_workers=0, device=torch.device("cpu"))
    got = [(x.shape[0], y.tolist()) for x, y in loader]
    assert got == [(2, [ds[(3, False)][1].item(), ds[(0, True)][1].item()]), (1, [ds[(5, False)][1].item()])]
    assert torch.equal(next(iter(loader))[0][1], ds[(0, True)][0])  # the flip flag reaches the dataset


def _gloo_worker(rank, world, port, n, bs, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sampler = FaceSampler(n, bs, rank, world, seed=7)
        result = {}
        for epoch in range(2):
            sampler.set_epoch(epoch)
            mine = torch.tensor([i for i, _ in sampler], dtype=torch.long)
            gathered = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            result[epoch] = [g.tolist() for g in gathered]
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_two_process_sharding(tmp_path):
    import torch.multiprocessing as tmp

    n, bs, world = 64, 4, 2
    tmp.spawn(_gloo_worker, args=(world, free_port(), n, bs, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert results[0] == results[1]  # both ranks gathered the same view
    for epoch in range(2):
        shards = results[0][epoch]
        assert len(shards[0]) == len(shards[1]) == n // world
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(n))  # every image exactly once per epoch
    assert results[0][0] != results[0][1]  # reshuffled across epochs


def test_cuda_prefetcher_rejects_cpu(mxrec):
    from dataset import CUDAPrefetcher

    with pytest.raises(ValueError, match="CUDA"):
        CUDAPrefetcher(get_dataloader(MXFaceDataset(mxrec), 8, 0, 0), torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetcher_matches_cpu_loader(mxrec):
    from dataset import CUDAPrefetcher

    ds = MXFaceDataset(mxrec)
    dev = torch.device("cuda")
    cpu = get_dataloader(ds, 8, seed=3, num_workers=0)
    gpu = CUDAPrefetcher(get_dataloader(ds, 8, seed=3, num_workers=2, device=dev), dev)
    assert gpu.sampler is gpu.loader.sampler and len(gpu) == len(cpu)
    cpu.sampler.set_epoch(1)
    gpu.sampler.set_epoch(1)
    for (a, la), (b, lb) in zip(cpu, gpu):
        assert b.is_cuda and lb.is_cuda
        assert torch.equal(a, b.cpu()) and torch.equal(la, lb.cpu())


# ---- issue 11: header vs index, empty images, bad labels, rec= a file, ~ --------------------------------------------


def _rewrite(folder, replace):
    """Re-write folder's train.rec/.idx with the payloads of `replace` ({key: payload}) swapped in."""
    from utils.data.recordio import IndexedRecordReader

    r = IndexedRecordReader(folder / "train.rec")
    payloads = {int(k): r.read(k) for k in r.keys}
    r.close()
    payloads.update(replace)
    with IndexedRecordWriter(folder / "train.rec", folder / "train.idx") as w:
        for k, p in payloads.items():
            w.write(k, p)
    return folder


def _four_images(tmp_path):
    # keys: 0 header [5, 7]; 1..4 images (labels 0, 0, 1, 1); 5, 6 identity records
    write_face_rec(tmp_path, iter([(0, _jpeg(0)), (0, _jpeg(1)), (1, _jpeg(2)), (1, _jpeg(3))]), 2)
    return tmp_path


def _header(a, b):
    return pack_record(IRHeader(0, 0.0, 0, 0), b"", label_array=[a, b])


def test_header_range_covering_identity_records_is_refused(tmp_path):
    _rewrite(_four_images(tmp_path), {0: _header(6, 8)})
    with pytest.raises(DataError, match=r"train\.rec: header record \(key 0\) says images are keys 1\.\.5 .* key 5 is "
                                        r"an identity record \(label \[1\.0, 3\.0\]"):
        MXFaceDataset(tmp_path)


def test_header_listing_fewer_images_than_index_warns_with_both_counts(tmp_path):
    _rewrite(_four_images(tmp_path), {0: _header(4, 6)})
    with pytest.warns(UserWarning, match=r"lists 3 images \(keys 1\.\.3\) but .*train\.idx holds 4 image records"):
        ds = MXFaceDataset(tmp_path)
    assert ds.num_images == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MXFaceDataset(_four_images(tmp_path / "good"))  # a correct header: no warning


def test_zero_length_image_is_a_named_data_error(tmp_path):
    _rewrite(_four_images(tmp_path), {3: pack_record(IRHeader(0, 1.0, 3, 0), b"")})
    with pytest.raises(DataError, match=r"train\.rec key 3: could not decode image \(0 bytes\)"):
        MXFaceDataset(tmp_path)[2]
    root = tmp_path / "faces"
    (root / "amy").mkdir(parents=True)
    (root / "amy" / "0.jpg").write_bytes(_jpeg(0))
    (root / "amy" / "1.jpg").write_bytes(b"")  # an interrupted copy
    ds = ImageFolderDataset(root)
    with pytest.raises(DataError, match=r"amy/1\.jpg: could not decode image \(0 bytes\)"):
        ds[1]


@pytest.mark.parametrize("label", [float("nan"), float("inf"), 1.5])
def test_non_integer_label_names_file_and_key(tmp_path, label):
    _rewrite(_four_images(tmp_path), {2: pack_record(IRHeader(0, label, 2, 0), _jpeg(1))})
    with pytest.raises(DataError, match=rf"train\.rec key 2: label {label} is not an integer"):
        MXFaceDataset(tmp_path)[1]


def test_non_integer_label_without_header(tmp_path):
    with IndexedRecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record(IRHeader(0, 0.0, 0, 0), _jpeg(0)))
        w.write(1, pack_record(IRHeader(0, float("nan"), 1, 0), _jpeg(1)))
    with pytest.raises(DataError, match=r"train\.rec key 1: label nan is not an integer"):
        MXFaceDataset(tmp_path)


def test_rec_pointing_at_the_rec_file_says_to_name_the_folder(tmp_path):
    _four_images(tmp_path)
    with pytest.raises(DataError, match=r"is a file; rec is the folder holding train\.rec and train\.idx"):
        build_dataset(str(tmp_path / "train.rec"))


def test_tilde_in_data_paths_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _four_images(tmp_path / "data")
    assert build_dataset("~/data", num_image=4).num_images == 4
    assert MXFaceDataset("~/data").num_classes == 2
    (tmp_path / "faces" / "amy").mkdir(parents=True)
    (tmp_path / "faces" / "amy" / "0.jpg").write_bytes(_jpeg(0))
    assert ImageFolderDataset("~/faces").num_images == 1
    assert not (tmp_path / "~").exists()


def test_image_folder_keeps_no_per_image_python_objects(tmp_path):
    """Forked workers grow by copy-on-access when a dataset holds a Python object per image."""
    import tracemalloc

    root = tmp_path / "faces"
    n = 3000
    for c in range(30):
        (root / f"id{c:02d}").mkdir(parents=True)
        for j in range(n // 30):
            (root / f"id{c:02d}" / f"{j:03d}.jpg").touch()
    tracemalloc.start()
    try:
        ds = ImageFolderDataset(root)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ds.num_images == n and held < 100 * n, held  # arrays: ~40 B an image; a list of Paths: ~400 B
    (root / "id07" / "005.jpg").write_bytes(_jpeg(5))
    img, label = ds.read_image(7 * 100 + 5)
    assert label == 7 and img.shape == (112, 112, 3)


def test_toy_data_root_with_tilde_is_expanded(tmp_path, monkeypatch, mini_toy):
    import shutil

    from utils.data.toyface import ensure_toy_data

    home = tmp_path / "home"
    shutil.copytree(mini_toy, home / "toy")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # where a literal "~" folder would appear
    assert ensure_toy_data("~/toy") == home / "toy"
    assert not (tmp_path / "~").exists()


def test_ensure_rec_makes_toy_data_only_when_asked(tmp_path, monkeypatch, mini_toy):
    """The dataset decides what `rec` means: generate_toy_data=True makes (or finds) the toy set there, refusing a
    folder of other files; False leaves `rec` as it is, even when it is missing."""
    import dataset
    from utils.data.toyface import ToyDataError

    dataset.ensure_rec(tmp_path / "missing", generate_toy_data=False)
    assert not (tmp_path / "missing").exists()
    mtime = (mini_toy / "train.rec").stat().st_mtime_ns
    dataset.ensure_rec(mini_toy, generate_toy_data=True)  # already there: found, not rewritten
    assert (mini_toy / "train.rec").stat().st_mtime_ns == mtime
    other = tmp_path / "mine"
    other.mkdir()
    (other / "photo.jpg").write_bytes(b"x")
    with pytest.raises(ToyDataError, match="generate_toy_data=False"):
        dataset.ensure_rec(other, generate_toy_data=True)
