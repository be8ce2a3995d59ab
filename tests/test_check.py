"""`headstart check`: planted duplicates are found where they are (within a class, across splits,
across classes), the fixed split has no leakage, and the data folder is never written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart import check as check_module
from headstart.check import (
    NEAR_CORRELATION,
    NEAR_DISTANCE,
    check,
    check_folder,
    correlated_pairs,
    count_bits,
    default_out,
    inspect_image,
    near_pairs,
    perceptual_hash,
    summary_line,
    thumbnail,
)
from headstart.cli import main
from headstart.errors import UsageError
from headstart.splits import (
    load_image_folder,
    load_split_manifest,
    run_split,
    write_split_manifest,
)

CLASSES = ("cat", "dog", "fox")


def distinct_image(seed: int, size: int = 48, smooth: bool = False) -> Image.Image:
    """A random picture with coarse and (unless smooth) finer detail, like a photo's spectrum:
    no two seeds look alike."""
    rng = np.random.default_rng(seed)
    picture = np.zeros((size, size, 3))
    for cells, weight in ((5, 1.0),) if smooth else ((5, 0.6), (12, 0.4)):
        noise = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        picture += weight * np.asarray(noise.resize((size, size), Image.Resampling.BICUBIC))
    return Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8))


def recompressed(path: Path, scale: float, quality: int) -> bytes:
    """The image at `path` resized and saved again as JPEG: a near-duplicate, other bytes."""
    with Image.open(path) as img:
        size = (round(img.width * scale), round(img.height * scale))
        buffer = io.BytesIO()
        img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
            buffer, "JPEG", quality=quality
        )
    return buffer.getvalue()


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry below root: content hash (or 'dir') and modification time."""
    found = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        content = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(path.relative_to(root))] = (content, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """DATA/{train,val,test}/{cat,dog,fox}/ of distinct images, plus four planted copies:

    - exact copy of train/cat/cat_00.png as test/cat/leak_exact.png      (leakage)
    - resized JPEG of train/dog/dog_00.png as val/dog/leak_near.jpg      (leakage)
    - exact copy of train/cat/cat_01.png as train/dog/conflict.png       (label conflict)
    - resized JPEG of train/fox/fox_00.png as train/fox/fox_again.jpg    (within a class)
    """
    root = tmp_path_factory.mktemp("check") / "data"
    seed = 0
    for split, count in (("train", 8), ("val", 3), ("test", 3)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                seed += 1
                distinct_image(seed).save(folder / f"{name}_{i:02d}.png")
    train = root / "train"
    shutil.copyfile(train / "cat" / "cat_00.png", root / "test" / "cat" / "leak_exact.png")
    (root / "val" / "dog" / "leak_near.jpg").write_bytes(
        recompressed(train / "dog" / "dog_00.png", 2.0, 85)
    )
    shutil.copyfile(train / "cat" / "cat_01.png", train / "dog" / "conflict.png")
    (train / "fox" / "fox_again.jpg").write_bytes(
        recompressed(train / "fox" / "fox_00.png", 0.75, 90)
    )
    return root


@pytest.fixture(scope="module")
def planted_report(planted, tmp_path_factory) -> tuple[dict, dict, dict]:
    """(report, tree digest before, tree digest after) of one `check` with --fix-split."""
    out = tmp_path_factory.mktemp("check_out")
    before = tree_digest(planted)
    report = check(planted, out=out / "check.json", fix_split=out / "split.json")
    return report, before, tree_digest(planted)


def _groups_with(report: dict, path: str) -> list[dict]:
    return [g for g in report["duplicates"]["groups"] if path in {f["path"] for f in g["files"]}]


def test_distinct_images_are_far_apart_in_perceptual_hash():
    hashes = np.stack([perceptual_hash(np.asarray(distinct_image(s, 32))) for s in range(60)])
    assert near_pairs(hashes, NEAR_DISTANCE) == []


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (5, 32), dtype=np.uint8)
    close = base.copy()
    close[:, 0] ^= np.uint8(0b111)  # 3 bits away from its base
    hashes = np.concatenate([base, close, rng.integers(0, 256, (30, 32), dtype=np.uint8)])
    bits = np.unpackbits(hashes, axis=1).astype(int)
    expected = [
        (i, j, int(np.abs(bits[i] - bits[j]).sum()))
        for i in range(len(bits))
        for j in range(i + 1, len(bits))
        if np.abs(bits[i] - bits[j]).sum() <= 100
    ]
    assert sorted(near_pairs(hashes, 100)) == expected
    assert [(i, i + 5, 3) for i in range(5)] == sorted(near_pairs(hashes, 20))


def test_flat_images_have_no_perceptual_hash():
    assert perceptual_hash(np.full((32, 32, 3), 200, np.uint8)) is None
    assert thumbnail(np.full((32, 32, 3), 200, np.uint8)) is None


def test_smooth_copies_are_caught_by_thumbnail_correlation(tmp_path):
    original = distinct_image(7, smooth=True)
    original.save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(recompressed(tmp_path / "a.png", 2.0, 85))
    a, b = (inspect_image(str(tmp_path / name)) for name in ("a.png", "b.jpg"))
    assert near_pairs(np.stack([a.phash, b.phash]), NEAR_DISTANCE) == []  # hash bits are noise
    assert correlated_pairs(np.stack([a.thumbnail, b.thumbnail]), NEAR_CORRELATION) == [(0, 1)]
    others = [thumbnail(np.asarray(distinct_image(s, 32, smooth=True))) for s in range(60)]
    assert correlated_pairs(np.stack(others), NEAR_CORRELATION) == []


def test_leakage_across_splits_is_found(planted_report):
    report = planted_report[0]
    (exact,) = _groups_with(report, "test/cat/leak_exact.png")
    assert exact["exact"] and exact["distance"] == 0
    assert {f["path"] for f in exact["files"]} == {
        "train/cat/cat_00.png",
        "test/cat/leak_exact.png",
    }
    assert "across_splits" in exact["flags"] and "within_class" in exact["flags"]
    (near,) = _groups_with(report, "val/dog/leak_near.jpg")
    assert not near["exact"] and 0 <= near["distance"] <= NEAR_DISTANCE
    assert {f["split"] for f in near["files"]} == {"train", "val"}
    assert report["duplicates"]["across_splits"] == 2


def test_exact_duplicate_across_classes_is_a_label_conflict(planted_report):
    report = planted_report[0]
    (conflict,) = _groups_with(report, "train/dog/conflict.png")
    assert conflict["exact"] and conflict["flags"] == ["across_classes"]
    assert {f["class"] for f in conflict["files"]} == {"cat", "dog"}
    assert report["duplicates"]["across_classes"] == 1
    assert any("different class labels" in w for w in report["warnings"])


def test_near_duplicate_within_a_class(planted_report):
    report = planted_report[0]
    (group,) = _groups_with(report, "train/fox/fox_again.jpg")
    assert group["flags"] == ["within_class"] and not group["exact"]
    assert report["duplicates"]["n_groups"] == 4  # nothing but the planted copies


def test_counts_sizes_and_summary(planted_report, planted):
    report = planted_report[0]
    assert report["counts"]["train"] == {"cat": 8, "dog": 9, "fox": 9}
    assert report["counts"]["test"]["cat"] == 4
    assert report["counts"]["total"] == {"cat": 15, "dog": 16, "fox": 15}
    assert report["imbalance_ratio"] == pytest.approx(16 / 15, abs=1e-3)
    assert report["images"]["formats"] == {"PNG": 44, "JPEG": 2}
    assert report["images"]["width"]["max"] == 96 and report["images"]["width"]["min"] == 36
    line = summary_line(report)
    assert line.startswith("data check: 46 images in 3 classes (train/val/test 26/10/10)")
    assert "4 duplicate groups (2 exact): 2 across splits, 1 across classes" in line
    assert json.loads(Path(report["out"]).read_text())["duplicates"]["n_groups"] == 4


def test_data_folder_is_untouched(planted_report):
    _, before, after = planted_report
    assert before == after and len(before) > 40


def test_fixed_split_has_no_leakage(planted_report, planted):
    report = planted_report[0]
    fixed = load_split_manifest(report["fixed_split"]["path"])
    assert report["fixed_split"]["moved"] == 2
    recheck = check_folder(fixed)
    assert recheck["duplicates"]["across_splits"] == 0
    assert recheck["duplicates"]["n_groups"] == 4  # still reported, now each in one split
    train = set(fixed.train.paths)
    assert str(planted / "test" / "cat" / "leak_exact.png") in train  # moved to train...
    assert str(planted / "val" / "dog" / "leak_near.jpg") in train
    assert len(fixed.test) == 9 and len(fixed.val) == 9  # ...so test and val only lost images


def test_a_runs_split_is_read_from_its_split_json_and_a_damaged_one_is_one_clear_error(
    planted, tmp_path
):
    folder = load_image_folder(str(planted), seed=3)
    run = tmp_path / "run"
    write_split_manifest(folder, run / "split.json")
    again = run_split(run, data=tmp_path / "elsewhere")  # split.json's root is still there
    assert (again.train, again.val, again.test) == (folder.train, folder.val, folder.test)
    (run / "split.json").write_text("{not json")
    with pytest.raises(UsageError, match="is not a readable split manifest"):
        run_split(run, data=planted)
    with pytest.raises(UsageError, match="has no split.json"):
        run_split(tmp_path / "empty", data=planted)


def test_split_manifest_round_trip(planted, tmp_path):
    folder = load_image_folder(str(planted))
    loaded = load_split_manifest(write_split_manifest(folder, tmp_path / "split.json"))
    for part in ("train", "val", "test"):
        assert getattr(loaded, part) == getattr(folder, part)
    assert loaded.class_names == folder.class_names and loaded.skipped == ()
    moved = tmp_path / "moved"
    shutil.copytree(planted, moved)
    elsewhere = load_split_manifest(tmp_path / "split.json", data=moved)
    assert elsewhere.train.paths[0].startswith(str(moved))


def test_bad_manifests_are_one_line_errors(tmp_path, planted):
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a readable split manifest"):
        load_split_manifest(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(UsageError, match="not a headstart split manifest"):
        load_split_manifest(tmp_path / "other.json")
    folder = load_image_folder(str(planted))
    manifest = json.loads(write_split_manifest(folder, tmp_path / "s.json").read_text())
    manifest["test"].append(manifest["train"][0])
    (tmp_path / "twice.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="is listed in train and in test"):
        load_split_manifest(tmp_path / "twice.json")
    with pytest.raises(UsageError, match="none of its"):
        load_split_manifest(tmp_path / "s.json", data=tmp_path)


def test_same_split_as_training_in_class_folders(image_folder_factory, tmp_path):
    data = image_folder_factory(classes=("a", "b"), per_class=10, odd_files=True)
    folder = load_image_folder(str(data), val_split=0.3, test_split=0.2, seed=5)
    report = check_folder(folder)
    for part in ("train", "val", "test"):
        assert list(report["counts"][part].values()) == getattr(folder, part).counts(2)
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons == {f"a/{name}": reason for name, reason in image_folder_factory.ODD_BAD.items()}
    odd = {item["path"]: item["reasons"] for item in report["odd"]}
    assert odd["a/tiny_1x1.png"] == ["tiny (1x1)"]
    assert any("animated" in reason for reason in odd["a/animated.gif"])


def test_nothing_is_written_inside_data(planted, tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="inside the data folder"):
        check(planted, out=planted / "check.json")
    with pytest.raises(UsageError, match="--fix-split"):
        check(planted, out=tmp_path / "c.json", fix_split=planted / "train" / "split.json")
    monkeypatch.chdir(planted)
    with pytest.raises(UsageError, match="inside the data folder"):
        check(planted)  # the default ./check-data.json would land in DATA
    assert default_out(planted) == Path("check-data.json")


def test_cli_check(planted, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(planted), "--fix-split", "fixed.json"]) == 0
    out = capsys.readouterr().out
    assert "duplicates across splits (leakage): 2" in out
    assert "label conflicts" in out and "written: check-data.json, fixed.json" in out
    assert (tmp_path / "check-data.json").is_file() and (tmp_path / "fixed.json").is_file()
    assert main(["check", str(planted), "--near-distance", "300"]) == 2
    assert "--near-distance" in capsys.readouterr().err
    assert not any(name.startswith("check") for name in os.listdir(planted))


def test_file_names_that_are_not_utf8_round_trip(tmp_path, capsys):
    data = tmp_path / "data"
    for i, name in enumerate(("a", "b")):
        (data / name).mkdir(parents=True)
        for j in range(4):
            distinct_image(100 + 10 * i + j).save(data / name / f"{j}.png")
    odd = os.path.join(os.fsencode(data / "a"), b"caf\xe9.png")  # Latin-1 bytes, not UTF-8
    distinct_image(99).save(odd, format="PNG")
    report = check(data, out=tmp_path / "c.json", fix_split=tmp_path / "s.json", test_split=0.25)
    assert report["n_images"] == 9
    loaded = load_split_manifest(tmp_path / "s.json")
    assert os.fsdecode(odd) in loaded.train.paths + loaded.val.paths + loaded.test.paths
    assert main(["check", str(data), "--out", str(tmp_path / "c2.json")]) == 0
    assert "data check: 9 images" in capsys.readouterr().out


def test_bit_counts_match_numpy_2_and_the_numpy_1_26_fallback(monkeypatch):
    """pyproject allows NumPy 1.26, which has no ``np.bitwise_count`` (NumPy 2.0+): the
    duplicate search must count bits without it, to the same numbers."""
    words = np.random.default_rng(0).integers(0, 2**63, size=(5, 7, 4), dtype=np.uint64)
    words[0, 0, 0] = np.iinfo(np.uint64).max  # all 64 bits
    expected = np.array([[[bin(int(w)).count("1") for w in row] for row in b] for b in words])
    assert count_bits(words).tolist() == expected.tolist()
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert count_bits(words).tolist() == expected.tolist()
    assert count_bits(words).dtype == np.uint8


def _brute_force_near(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    bits = np.unpackbits(hashes, axis=1).astype(np.int16)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(axis=-1)
    i, j = np.nonzero(np.triu(distance <= max_distance, k=1))
    return list(zip(i.tolist(), j.tolist(), distance[i, j].tolist(), strict=True))


def test_near_pairs_by_pieces_match_every_pair(monkeypatch):
    """Multi-index hashing finds exactly the pairs a comparison of every pair finds, for
    distances from 0 to where every pair is compared: random hashes, copies 0 to 29 bits away,
    and 40 that share their first 64 bits (a large group, compared whole with tiny batches)."""
    rng = np.random.default_rng(5)
    random = rng.integers(0, 256, (200, 32), dtype=np.uint8)
    bits = np.unpackbits(random[:30], axis=1)
    for k in range(30):
        bits[k, rng.choice(256, k, replace=False)] ^= 1
    alike = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    alike[:, :8] = alike[0, :8]
    hashes = np.concatenate([random, np.packbits(bits, axis=1), alike])
    monkeypatch.setattr(check_module, "_CANDIDATES", 64)
    batches = []
    pairs_of = check_module._all_pairs_of
    monkeypatch.setattr(check_module, "_all_pairs_of", lambda *a: batches.append(1) or pairs_of(*a))
    for distance in (0, 3, 8, 16, 30, 120):
        assert near_pairs(hashes, distance) == _brute_force_near(hashes, distance), distance
    assert batches  # the pieces' groups were compared, not every pair


def test_correlated_pairs_by_bands_match_every_pair():
    """The band of close projections misses no pair above the threshold: random unit vectors
    with copies just inside and just outside it, and vectors that all project alike."""
    rng = np.random.default_rng(6)
    vectors = rng.normal(size=(300, 256))
    copies = vectors[:60] + rng.normal(size=(60, 256)) * np.linspace(0.001, 0.05, 60)[:, None]
    same = np.tile(rng.normal(size=(1, 256)), (20, 1)) + rng.normal(size=(20, 256)) * 0.01
    for rows in (np.concatenate([vectors, copies]), same):
        unit = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
        for threshold in (NEAR_CORRELATION, 0.999, 0.9, -1.0):
            i, j = np.nonzero(np.triu(unit @ unit.T >= threshold, k=1))
            expected = list(zip(i.tolist(), j.tolist(), strict=True))
            assert correlated_pairs(unit, threshold) == expected, threshold


@pytest.fixture(scope="module")
def near_copies(tmp_path_factory) -> Path:
    """DATA/{a,b}/: 16 distinct images (4 smooth), most with one to three copies resized and
    recompressed more or less (some near the thresholds), one exact copy across classes."""
    root = tmp_path_factory.mktemp("near") / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    for k in range(16):
        folder = root / ("a" if k % 2 else "b")
        original = folder / f"{k:02d}.png"
        distinct_image(500 + k, size=40, smooth=k < 4).save(original)
        for c, (scale, quality) in enumerate([(1.5, 90), (0.6, 40), (0.4, 20)][: k % 4]):
            (folder / f"{k:02d}_copy{c}.jpg").write_bytes(recompressed(original, scale, quality))
    shutil.copyfile(root / "a" / "01.png", root / "b" / "01_exact.png")
    return root


def test_duplicate_groups_are_those_every_pair_gives(near_copies, tmp_path):
    """The report's duplicate groups on a folder of near copies: those of comparing every pair
    of files (same bytes, hashes within NEAR_DISTANCE bits, or thumbnails correlated at
    NEAR_CORRELATION), linked in chains."""
    report = check(near_copies, out=tmp_path / "c.json", val_split=0.2, test_split=0.2)
    paths = sorted(str(p) for p in near_copies.rglob("*.*"))
    facts = [inspect_image(p) for p in paths]
    hashed = [i for i, f in enumerate(facts) if f.phash is not None]
    hashes = np.stack([facts[i].phash for i in hashed])
    thumbs = np.stack([facts[i].thumbnail for i in hashed])
    links = [(hashed[i], hashed[j]) for i, j, _ in _brute_force_near(hashes, NEAR_DISTANCE)]
    links += [
        (hashed[i], hashed[j])
        for i, j in zip(
            *np.nonzero(np.triu(thumbs @ thumbs.T >= NEAR_CORRELATION, k=1)), strict=True
        )
    ]
    links += [(i, j) for i in range(len(facts)) for j in range(i) if facts[i].sha1 == facts[j].sha1]
    group = {i: {i} for i in range(len(paths))}
    for i, j in links:
        merged = group[i] | group[j]
        for member in merged:
            group[member] = merged
    expected = {
        frozenset(os.path.relpath(paths[i], near_copies) for i in members)
        for members in map(frozenset, group.values())
        if len(members) > 1
    }
    found = {frozenset(f["path"] for f in g["files"]) for g in report["duplicates"]["groups"]}
    assert found == expected
    assert len(found) >= 10  # copies of most originals were found, smooth ones included


def test_a_large_file_is_inspected_from_the_file_to_the_same_facts(planted, monkeypatch):
    """A file too large to hold whole is hashed as it streams and decoded from the file: the
    same facts as from its bytes in memory (JPEG and PNG)."""
    paths = [str(p) for p in sorted(planted.rglob("*.*")) if p.suffix in (".jpg", ".png")][-6:]
    in_memory = [inspect_image(path) for path in paths]
    monkeypatch.setattr(check_module, "_IN_MEMORY_BYTES", 0)
    for path, expected in zip(paths, in_memory, strict=True):
        facts = inspect_image(path)
        for name in ("sha1", "width", "height", "mode", "format", "odd"):
            assert getattr(facts, name) == getattr(expected, name)
        np.testing.assert_array_equal(facts.phash, expected.phash)
        np.testing.assert_array_equal(facts.thumbnail, expected.thumbnail)
