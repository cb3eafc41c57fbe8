"""prepare / ensure_prepared on real files: decoding edge cases, shards, manifest, atomicity."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataSection
from pipeline.data import DataError, ShardedImages, ensure_prepared, prepare
from pipeline.data import sources
from pipeline.data.shards import MANIFEST

# --- helpers ----------------------------------------------------------------------------------


def data_cfg(tmp_path: Path, **values) -> DataSection:
    base = {"source": "folder", "image_size": 32, "channels": 3, "prepared_dir": tmp_path / "prepared",
            "prepare_workers": 1}  # fmt: skip
    base.update(values)
    return DataSection(**base)


def solid(colour, size=(40, 40), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def shard_arrays(directory: Path) -> np.ndarray:
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    return np.concatenate([np.load(directory / s["file"], allow_pickle=False) for s in manifest["shards"]])


def leftovers(parent: Path, name: str) -> list[str]:
    """Staging / replaced directories that prepare must never leave behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f"{name}.tmp-") or p.name.startswith(f"{name}.old-"))


def close(pixel, colour, tol) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(colour, dtype=int)) <= tol))


# Each good file: (relative path, writer, check of the 32x32x3 output).


def _write_exif_rotated(path: Path) -> None:
    # Stored landscape 48x32: top half red, bottom half blue. Orientation 6 = "rotate 90 degrees
    # clockwise to display", so the displayed (portrait) image has blue on the left, red on the right.
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:16] = (255, 0, 0)
    pixels[16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def _write_rgba(path: Path) -> None:
    # Left half opaque green, right half fully transparent *black*: transparent must become white.
    pixels = np.zeros((40, 40, 4), np.uint8)
    pixels[:, :20] = (0, 200, 0, 255)
    Image.fromarray(pixels, mode="RGBA").save(path)


def _write_palette(path: Path) -> None:
    img = Image.new("P", (40, 40), 1)
    img.putpalette([0, 0, 0, 30, 60, 220] + [0] * 762)
    img.save(path)


def _write_i16(path: Path) -> None:
    # Left 32896 -> 128 and right 40000 -> 156 when scaled by 255/65535; clipping would give
    # 255, and truncating to the low byte 128 and 64 (hence the second value).
    pixels = np.full((40, 40), 32896, np.uint16)
    pixels[:, 20:] = 40000
    img = Image.fromarray(pixels)
    assert img.mode == "I;16"
    img.save(path)


def _write_palette_transparent(path: Path) -> None:
    # Palette index 0 (black) is marked transparent: the right half must come out white.
    pixels = np.ones((40, 40), np.uint8)
    pixels[:, 20:] = 0
    img = Image.fromarray(pixels, mode="P")
    img.putpalette([0, 0, 0, 250, 120, 0] + [0] * 762)
    img.save(path, transparency=0)


GOOD = {
    "nested/deeper/good2.png": (lambda p: solid((10, 200, 60)).save(p), lambda a: close(a, (10, 200, 60), 0)),
    "nested/good1.jpg": (lambda p: solid((200, 30, 30)).save(p, quality=95), lambda a: close(a, (200, 30, 30), 4)),
    "top.png": (lambda p: solid((90, 90, 250)).save(p), lambda a: close(a, (90, 90, 250), 0)),
    "modes/gray.png": (lambda p: solid(77, mode="L").save(p), lambda a: close(a, (77, 77, 77), 0)),
    "modes/rgba.png": (
        _write_rgba,
        lambda a: close(a[:, :12], (0, 200, 0), 2) and close(a[:, -12:], (255, 255, 255), 2),
    ),
    "modes/palette.png": (_write_palette, lambda a: close(a, (30, 60, 220), 0)),
    "modes/palette_alpha.png": (
        _write_palette_transparent,
        lambda a: close(a[:, :12], (250, 120, 0), 2) and close(a[:, -12:], (255, 255, 255), 2),
    ),
    "modes/cmyk.jpg": (lambda p: solid((0, 255, 255, 0), mode="CMYK").save(p, quality=95), lambda a: close(a, (255, 0, 0), 4)),
    "modes/i16.png": (_write_i16, lambda a: close(a[:, :12], (128,) * 3, 0) and close(a[:, -12:], (156,) * 3, 0)),
    "exif/rotated.jpg": (
        _write_exif_rotated,
        lambda a: close(a[:, :10], (0, 0, 255), 12) and close(a[:, -10:], (255, 0, 0), 12),
    ),
    "formats/pic.webp": (lambda p: solid((240, 200, 20)).save(p, quality=90), lambda a: close(a, (240, 200, 20), 8)),
    "formats/pic.bmp": (lambda p: solid((5, 6, 7)).save(p), lambda a: close(a, (5, 6, 7), 0)),
}


def _write_truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD = {
    "broken/truncated.jpg": (_write_truncated_jpeg, "truncated"),
    "broken/empty.png": (lambda p: p.write_bytes(b""), "not a readable image"),
    "broken/x.jpg": (lambda p: p.write_text("this is not a jpeg\n"), "not a readable image"),
}


def sorted_like_prepare(names) -> list[str]:
    return [str(p) for p in sorted(Path(n) for n in names)]


def build_folder(root: Path, good=True, bad=True) -> Path:
    chosen = {**(GOOD if good else {}), **({k: (w, None) for k, (w, _) in BAD.items()} if bad else {})}
    for name, (write, _check) in chosen.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    (root / "notes.txt").write_text("ignored: not an image suffix\n")
    return root


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    return build_folder(tmp_path / "images")


# --- folder source ----------------------------------------------------------------------------


def test_folder_keeps_good_files_and_reports_each_bad_one(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder, shard_size=4)
    manifest = prepare(cfg)

    assert manifest["count"] == len(GOOD)
    assert manifest["shape"] == [32, 32, 3] and manifest["dtype"] == "uint8"
    assert manifest["skipped_count"] == len(BAD)
    reasons = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(reasons) == set(BAD), reasons  # relative paths; notes.txt is not even considered
    for name, (_write, expected) in BAD.items():
        assert expected in reasons[name], (name, reasons[name])
    assert manifest["source"]["root"] == str(mixed_folder.resolve())
    assert json.loads((Path(cfg.prepared_dir) / MANIFEST).read_text()) == manifest


def test_folder_images_are_converted_correctly_in_file_order(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder, shard_size=4)
    prepare(cfg)
    images = ShardedImages(Path(cfg.prepared_dir))
    assert len(images) == len(GOOD)
    rows = images.gather(np.arange(len(images)))
    assert rows.shape == (len(GOOD), 32, 32, 3) and rows.dtype == np.uint8
    for name, row in zip(sorted_like_prepare(GOOD), rows):
        assert GOOD[name][1](row), f"{name}: unexpected pixels, e.g. corners {row[0, 0]} {row[-1, -1]}"


def test_sixteen_bit_is_scaled_and_exif_rotation_applied_in_grayscale(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    _write_i16(root / "a_i16.png")
    _write_exif_rotated(root / "b_rotated.jpg")
    cfg = data_cfg(tmp_path, root=root, channels=1)
    prepare(cfg)
    rows = ShardedImages(Path(cfg.prepared_dir)).gather(np.arange(2))
    assert rows.shape == (2, 32, 32, 1)
    assert np.all(rows[0, :, :12] == 128) and np.all(rows[0, :, -12:] == 156)  # scaled, not clipped or wrapped
    # grayscale of blue (29) on the left and red (76) on the right after applying orientation 6
    assert abs(int(rows[1, :, :10].mean()) - 29) <= 6 and abs(int(rows[1, :, -10:].mean()) - 76) <= 6


def test_shards_are_plain_uint8_npy_matching_manifest_hashes(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder, shard_size=4)
    manifest = prepare(cfg)
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 4]
    for shard in manifest["shards"]:
        path = Path(cfg.prepared_dir) / shard["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        array = np.load(path, allow_pickle=False)
        assert array.dtype == np.uint8 and array.shape == (shard["count"], 32, 32, 3)
    assert sorted(p.name for p in Path(cfg.prepared_dir).iterdir()) == sorted([MANIFEST] + [s["file"] for s in manifest["shards"]])


def test_gather_returns_requested_images_in_order_across_shards(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder, shard_size=3)
    prepare(cfg)
    images = ShardedImages(Path(cfg.prepared_dir))
    assert len(images.arrays) == 4  # 3 + 3 + 3 + 3
    everything = shard_arrays(Path(cfg.prepared_dir))
    order = np.array([11, 0, 5, 3, 9, 4, 4, 1, 7])  # crosses every shard, repeats one, not sorted
    np.testing.assert_array_equal(images.gather(order), everything[order])
    assert images.gather(np.array([], dtype=np.int64)).shape == (0, 32, 32, 3)


def test_channels_one_shape(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder, channels=1)
    manifest = prepare(cfg)
    assert manifest["shape"] == [32, 32, 1]
    images = ShardedImages(Path(cfg.prepared_dir))
    assert images.gather(np.arange(len(images))).shape == (len(GOOD), 32, 32, 1)


def test_max_images_counts_only_usable_images(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder, max_images=3)
    manifest = prepare(cfg)
    assert manifest["count"] == 3
    assert manifest["source"]["max_images"] == 3
    full = data_cfg(tmp_path, root=mixed_folder, prepared_dir=tmp_path / "full")
    prepare(full)
    np.testing.assert_array_equal(shard_arrays(Path(cfg.prepared_dir)), shard_arrays(Path(full.prepared_dir))[:3])


# --- errors and atomicity ---------------------------------------------------------------------


def assert_nothing_prepared(cfg: DataSection) -> None:
    target = Path(cfg.prepared_dir)
    assert not (target / MANIFEST).exists()
    assert leftovers(target.parent, target.name) == []


def test_only_bad_files_raises_naming_root(tmp_path):
    root = build_folder(tmp_path / "only-bad", good=False)
    cfg = data_cfg(tmp_path, root=root)
    with pytest.raises(DataError) as err:
        prepare(cfg)
    assert str(root) in str(err.value) and "no usable images" in str(err.value)
    assert f"{len(BAD)} files skipped" in str(err.value)
    assert_nothing_prepared(cfg)
    assert not Path(cfg.prepared_dir).exists()


def test_empty_folder_raises_naming_root(tmp_path):
    root = tmp_path / "empty"
    (root / "sub").mkdir(parents=True)
    (root / "readme.txt").write_text("no images here")
    cfg = data_cfg(tmp_path, root=root)
    with pytest.raises(DataError, match="holds no image files") as err:
        prepare(cfg)
    assert str(root) in str(err.value)
    assert_nothing_prepared(cfg)


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_root_that_is_not_a_directory_raises(tmp_path, kind):
    root = tmp_path / "not-a-dir.png"
    if kind == "file":
        solid((1, 2, 3)).save(root)
    cfg = data_cfg(tmp_path, root=root)
    with pytest.raises(DataError, match="is not a directory") as err:
        prepare(cfg)
    assert str(root) in str(err.value)
    assert_nothing_prepared(cfg)


def test_prepare_twice_needs_force_and_force_rebuilds(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder, max_images=2)
    first = prepare(cfg)
    with pytest.raises(DataError, match="already prepared"):
        prepare(cfg)
    assert json.loads((Path(cfg.prepared_dir) / MANIFEST).read_text()) == first  # untouched by the refusal

    bigger = data_cfg(tmp_path, root=mixed_folder, max_images=5)
    rebuilt = prepare(bigger, force=True)
    assert first["count"] == 2 and rebuilt["count"] == 5
    assert len(ShardedImages(Path(cfg.prepared_dir))) == 5
    assert leftovers(tmp_path, "prepared") == []


def test_failed_forced_rebuild_keeps_the_old_shards(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder)
    before = prepare(cfg)
    broken = data_cfg(tmp_path, root=build_folder(tmp_path / "only-bad", good=False))
    with pytest.raises(DataError):
        prepare(broken, force=True)
    assert json.loads((Path(cfg.prepared_dir) / MANIFEST).read_text()) == before
    assert len(ShardedImages(Path(cfg.prepared_dir))) == len(GOOD)
    assert leftovers(tmp_path, "prepared") == []


def test_prepare_refuses_to_replace_a_directory_that_is_not_prepared(tmp_path, mixed_folder):
    # e.g. data.prepared_dir pointed at the image folder by mistake: it must not be deleted.
    for target in (mixed_folder, tmp_path / "other"):
        target.mkdir(exist_ok=True)
        (target / "keep.txt").write_text("user data")
        cfg = data_cfg(tmp_path, root=mixed_folder, prepared_dir=target)
        for force in (False, True):
            with pytest.raises(DataError, match="not a prepared directory") as err:
                prepare(cfg, force=force)
            assert str(target) in str(err.value)
            assert (target / "keep.txt").read_text() == "user data"
    assert (mixed_folder / "top.png").exists()
    assert leftovers(tmp_path, "other") == [] and leftovers(tmp_path, "images") == []


def test_prepare_into_existing_empty_directory_is_fine(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder)
    Path(cfg.prepared_dir).mkdir()
    assert prepare(cfg)["count"] == len(GOOD)


# --- ensure_prepared --------------------------------------------------------------------------


def test_ensure_prepared_prepares_once_then_reuses(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder)
    assert ensure_prepared(cfg) == cfg.prepared_dir
    manifest_path = Path(cfg.prepared_dir) / MANIFEST
    stamp = manifest_path.stat().st_mtime_ns, manifest_path.stat().st_ino
    # An equivalent config (root spelled differently, other shard size / workers) reuses it.
    same = data_cfg(tmp_path, root=tmp_path / "images" / ".." / "images", shard_size=2, prepare_workers=3)
    assert ensure_prepared(same) == cfg.prepared_dir
    assert (manifest_path.stat().st_mtime_ns, manifest_path.stat().st_ino) == stamp


def test_ensure_prepared_refuses_shards_from_another_config(tmp_path, mixed_folder):
    ensure_prepared(data_cfg(tmp_path, root=mixed_folder))
    other = data_cfg(tmp_path, root=mixed_folder, image_size=64)
    with pytest.raises(DataError) as err:
        ensure_prepared(other)
    message = str(err.value)
    assert "'image_size': 32" in message and "'image_size': 64" in message
    assert str(cfg_dir := Path(other.prepared_dir)) in message and "--force" in message
    assert ShardedImages(cfg_dir).shape == (32, 32, 3)  # not silently replaced


def test_ensure_prepared_reports_an_unreadable_manifest(tmp_path, mixed_folder):
    cfg = data_cfg(tmp_path, root=mixed_folder)
    prepare(cfg)
    (Path(cfg.prepared_dir) / MANIFEST).write_text("{ not json")
    with pytest.raises(DataError, match="unreadable"):
        ensure_prepared(cfg)


def test_ensure_prepared_failure_leaves_nothing_that_looks_prepared(tmp_path):
    cfg = data_cfg(tmp_path, root=build_folder(tmp_path / "only-bad", good=False))
    with pytest.raises(DataError):
        ensure_prepared(cfg)
    assert_nothing_prepared(cfg)
    with pytest.raises(DataError, match="no usable images"):  # still fails the same way, not "already prepared"
        ensure_prepared(cfg)


# --- the spawn process pool -------------------------------------------------------------------


def build_many(root: Path, count: int) -> None:
    rng = np.random.default_rng(5)
    for index in range(count):
        sub = root / f"d{index % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(sub / f"{index:03d}.png")
    (root / "d1" / "bad.png").write_bytes(b"\x89PNG broken")
    (root / "d2" / "empty.jpg").write_bytes(b"")


def test_pool_of_spawned_workers_matches_single_process(tmp_path):
    root = tmp_path / "many"
    build_many(root, 70)
    serial = data_cfg(tmp_path, root=root, prepare_workers=1, prepared_dir=tmp_path / "serial", shard_size=32)
    pooled = data_cfg(tmp_path, root=root, prepare_workers=2, prepared_dir=tmp_path / "pooled", shard_size=32)

    # The pooled path really runs in worker processes.
    before = set(multiprocessing.active_children())
    items = sources.iterate(pooled)
    first_name, first_value = next(items)
    assert len(set(multiprocessing.active_children()) - before) == 2
    items.close()  # leaving early (e.g. max_images reached) stops the workers
    assert set(multiprocessing.active_children()) - before == set()
    assert first_name == str(Path("d0") / "000.png") and isinstance(first_value, np.ndarray)

    one, two = prepare(serial), prepare(pooled)
    assert one["count"] == two["count"] == 70
    assert one["skipped"] == two["skipped"] and {s["path"] for s in two["skipped"]} == {"d1/bad.png", "d2/empty.jpg"}
    np.testing.assert_array_equal(shard_arrays(serial.prepared_dir), shard_arrays(pooled.prepared_dir))
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]


# --- built-in sources -------------------------------------------------------------------------


def test_digits_source(tmp_path):
    from sklearn.datasets import load_digits

    cfg = DataSection(source="digits", image_size=32, channels=1, prepared_dir=tmp_path / "digits")
    manifest = prepare(cfg)
    assert manifest["count"] == 1797 and manifest["skipped_count"] == 0
    images = ShardedImages(Path(cfg.prepared_dir))
    rows = images.gather(np.arange(len(images)))
    assert rows.shape == (1797, 32, 32, 1)
    assert rows.min() == 0 and rows.max() == 255
    # Each 32x32 image is its 8x8 digit upscaled: 4x4 block means track the original pixels.
    originals = load_digits().images[:100].reshape(100, -1) * (255.0 / 16.0)
    blocks = rows[:100, :, :, 0].reshape(100, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(100, -1)
    for original, block in zip(originals, blocks):
        assert np.corrcoef(original, block)[0, 1] > 0.9


def test_synthetic_source_is_deterministic(tmp_path):
    one = DataSection(source="synthetic", synthetic_count=24, channels=3, prepared_dir=tmp_path / "a", shard_size=10)
    two = DataSection(source="synthetic", synthetic_count=24, channels=3, prepared_dir=tmp_path / "b", shard_size=10)
    first, second = prepare(one), prepare(two)
    assert first["count"] == 24 and len(first["shards"]) == 3
    for a, b in zip(first["shards"], second["shards"]):
        assert (Path(one.prepared_dir) / a["file"]).read_bytes() == (Path(two.prepared_dir) / b["file"]).read_bytes()
    rows = shard_arrays(one.prepared_dir)
    assert len({row.tobytes() for row in rows}) == 24  # distinct pictures, not one repeated
    assert rows.std() > 20


def test_synthetic_max_images_is_a_prefix(tmp_path):
    full = DataSection(source="synthetic", synthetic_count=20, prepared_dir=tmp_path / "full")
    head = DataSection(source="synthetic", synthetic_count=20, max_images=7, prepared_dir=tmp_path / "head")
    assert prepare(full)["count"] == 20
    assert prepare(head)["count"] == 7
    np.testing.assert_array_equal(shard_arrays(head.prepared_dir), shard_arrays(Path(full.prepared_dir))[:7])
