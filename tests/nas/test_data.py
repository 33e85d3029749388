"""Tests for nas.data: every loader on real (bundled or synthesised-on-disk) data."""

from __future__ import annotations

import collections
import gzip
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits as sklearn_load_digits

from nas.data.builtin import load_digits, make_mqar
from nas.data.files import load_image_folder, load_npz, read_image_file
from nas.data.on_disk import load_torchvision_on_disk
from nas.data.splits import IGNORE_INDEX, DataError, Split, TaskData, iterate_batches


def encode_png(pixels: np.ndarray, colour_type: int, filters: tuple[int, ...] = (0, 1, 2, 3, 4)) -> bytes:
    """Independent PNG encoder for the tests: ``pixels`` uint8/uint16 ``[H, W, C]``, row filters cycled."""
    height, width, channels = pixels.shape
    bit_depth = 16 if pixels.dtype == np.uint16 else 8
    raw = pixels.astype(">u2").view(np.uint8) if bit_depth == 16 else pixels
    raw = raw.reshape(height, -1).astype(np.int64)
    pixel_bytes = channels * bit_depth // 8
    rows = []
    previous = np.zeros(raw.shape[1], dtype=np.int64)
    for index in range(height):
        current = raw[index]
        left = np.concatenate([np.zeros(pixel_bytes, dtype=np.int64), current[:-pixel_bytes]])
        upper_left = np.concatenate([np.zeros(pixel_bytes, dtype=np.int64), previous[:-pixel_bytes]])
        filter_type = filters[index % len(filters)]
        if filter_type == 0:
            predictor = np.zeros_like(current)
        elif filter_type == 1:
            predictor = left
        elif filter_type == 2:
            predictor = previous
        elif filter_type == 3:
            predictor = (left + previous) // 2
        else:
            estimate = left + previous - upper_left
            distance_left = np.abs(estimate - left)
            distance_above = np.abs(estimate - previous)
            distance_upper_left = np.abs(estimate - upper_left)
            predictor = np.where(
                (distance_left <= distance_above) & (distance_left <= distance_upper_left),
                left,
                np.where(distance_above <= distance_upper_left, previous, upper_left),
            )
        rows.append(bytes([filter_type]) + ((current - predictor) % 256).astype(np.uint8).tobytes())
        previous = current

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    compressed = zlib.compress(b"".join(rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", compressed[: len(compressed) // 2])
        + chunk(b"IDAT", compressed[len(compressed) // 2 :])
        + chunk(b"IEND", b"")
    )


def encode_pnm(pixels: np.ndarray, maxval: int = 255) -> bytes:
    height, width, channels = pixels.shape
    magic = b"P5" if channels == 1 else b"P6"
    header = magic + b"\n# written by the nasforge tests\n" + f"{width} {height}\n{maxval}\n".encode()
    dtype = np.uint8 if maxval < 256 else np.dtype(">u2")
    return header + pixels.astype(dtype).tobytes()


def class_counts(targets: torch.Tensor, num_classes: int) -> np.ndarray:
    return np.bincount(targets.numpy(), minlength=num_classes)


class TestDigits:
    def test_split_sizes_shapes_and_stratification(self) -> None:
        task = load_digits(resolution=32, seed=0)
        sizes = [task.train.targets.shape[0], task.val.targets.shape[0], task.test.targets.shape[0]]
        assert sum(sizes) == 1797
        assert sizes == [1257, 270, 270]
        assert (task.name, task.modality, task.num_classes, task.input_shape) == ("digits", "image", 10, (1, 32, 32))
        assert task.vocab_size is None
        for split, size in zip((task.train, task.val, task.test), sizes, strict=True):
            assert split.inputs.shape == (size, 1, 32, 32)
            assert split.inputs.dtype == torch.float32
            assert split.targets.dtype == torch.int64
        overall = np.bincount(sklearn_load_digits().target, minlength=10)
        for split, fraction in ((task.val, 270 / 1797), (task.test, 270 / 1797)):
            assert np.all(np.abs(class_counts(split.targets, 10) - overall * fraction) < 1.0)
        assert np.all(np.abs(class_counts(task.train.targets, 10) - overall * 1257 / 1797) < 2.0)

    def test_splits_partition_the_dataset(self) -> None:
        task = load_digits(resolution=8, seed=3)
        everything = torch.cat([task.train.inputs, task.val.inputs, task.test.inputs]).flatten(1).numpy()
        labels = torch.cat([task.train.targets, task.val.targets, task.test.targets]).numpy()
        low, high = everything.min(), everything.max()
        recovered = np.rint((everything - low) / (high - low) * 16).astype(np.int64)
        assert np.allclose((everything - low) / (high - low) * 16, recovered, atol=1e-3)
        bunch = sklearn_load_digits()
        expected = collections.Counter((row.astype(np.int64).tobytes(), int(label)) for row, label in zip(bunch.data, bunch.target, strict=True))
        got = collections.Counter((row.tobytes(), int(label)) for row, label in zip(recovered, labels, strict=True))
        assert got == expected

    def test_normalised_with_train_statistics(self) -> None:
        task = load_digits(resolution=16)
        assert abs(task.train.inputs.mean().item()) < 1e-5
        assert abs(task.train.inputs.std(correction=0).item() - 1.0) < 1e-4
        assert abs(task.val.inputs.mean().item()) < 0.1
        assert task.val.inputs.mean().item() != pytest.approx(0.0, abs=1e-6)

    def test_bilinear_resize_of_the_raw_images(self) -> None:
        task = load_digits(resolution=8, seed=0)
        upsampled = load_digits(resolution=24, seed=0)
        expected = torch.nn.functional.interpolate(task.train.inputs, size=(24, 24), mode="bilinear", align_corners=False)
        # Normalisation is affine per channel, so resizing commutes with it up to the (train) rescaling.
        scale = upsampled.train.inputs.std(correction=0) / expected.std(correction=0)
        shift = upsampled.train.inputs.mean() - expected.mean() * scale
        assert torch.allclose(upsampled.train.inputs, expected * scale + shift, atol=1e-4)

    def test_deterministic_per_seed(self) -> None:
        first, again, other = load_digits(seed=5), load_digits(seed=5), load_digits(seed=6)
        for name in ("train", "val", "test"):
            assert torch.equal(getattr(first, name).inputs, getattr(again, name).inputs)
            assert torch.equal(getattr(first, name).targets, getattr(again, name).targets)
        assert not torch.equal(first.val.inputs, other.val.inputs)

    def test_rejects_bad_resolution(self) -> None:
        with pytest.raises(DataError, match="resolution must be a positive integer, got 0"):
            load_digits(resolution=0)


class TestMQAR:
    def test_shapes_and_metadata(self) -> None:
        task = make_mqar(64, 8, 64, num_train=100, num_val=20, num_test=30)
        assert (task.modality, task.num_classes, task.vocab_size, task.input_shape) == ("sequence", 64, 64, (64,))
        for split, count in ((task.train, 100), (task.val, 20), (task.test, 30)):
            assert split.inputs.shape == split.targets.shape == (count, 64)
            assert split.inputs.dtype == split.targets.dtype == torch.int64
            assert int(split.inputs.min()) >= 0 and int(split.inputs.max()) < 64

    @pytest.mark.parametrize(("length", "pairs", "vocab"), [(64, 8, 64), (16, 2, 12), (30, 7, 20), (128, 4, 8192)])
    def test_every_scored_target_is_the_bound_value(self, length: int, pairs: int, vocab: int) -> None:
        task = make_mqar(length, pairs, vocab, num_train=200, num_val=5, num_test=5, seed=11)
        inputs, targets = task.train.inputs.numpy(), task.train.targets.numpy()
        context = 2 * pairs
        for row_inputs, row_targets in zip(inputs, targets, strict=True):
            keys, values = row_inputs[0:context:2], row_inputs[1:context:2]
            assert len(set(keys.tolist())) == pairs and len(set(values.tolist())) == pairs
            assert np.all((keys >= 1) & (keys < vocab // 2))
            assert np.all((values >= vocab // 2) & (values < vocab))
            assert np.all(row_targets[:context] == IGNORE_INDEX)
            scored = np.flatnonzero(row_targets != IGNORE_INDEX)
            assert scored.size == pairs
            assert np.all((scored - context) % 2 == 0)
            binding = dict(zip(keys.tolist(), values.tolist(), strict=True))
            assert sorted(row_inputs[scored].tolist()) == sorted(keys.tolist())
            for position in scored:
                assert row_targets[position] == binding[int(row_inputs[position])]

    def test_power_law_puts_queries_near_the_prefix(self) -> None:
        def mean_offset(power_a: float) -> float:
            targets = make_mqar(256, 8, 64, 400, 1, 1, seed=0, power_a=power_a).train.targets
            return float((targets != IGNORE_INDEX).nonzero()[:, 1].float().mean())

        assert mean_offset(0.01) < mean_offset(1.0) - 30

    def test_deterministic_and_seeded_per_split(self) -> None:
        first = make_mqar(32, 4, 32, 50, 10, 10, seed=1)
        again = make_mqar(32, 4, 32, 50, 10, 10, seed=1)
        other = make_mqar(32, 4, 32, 50, 10, 10, seed=2)
        more_train = make_mqar(32, 4, 32, 80, 10, 10, seed=1)
        for name in ("train", "val", "test"):
            assert torch.equal(getattr(first, name).inputs, getattr(again, name).inputs)
            assert torch.equal(getattr(first, name).targets, getattr(again, name).targets)
            assert not torch.equal(getattr(first, name).inputs, getattr(other, name).inputs)
        assert not torch.equal(first.val.inputs, first.test.inputs)
        assert not torch.equal(first.train.inputs[:10], first.val.inputs)
        assert torch.equal(first.val.inputs, more_train.val.inputs)

    @pytest.mark.parametrize(
        ("arguments", "message"),
        [
            (
                dict(sequence_length=30, num_kv_pairs=8, vocab_size=64),
                "sequence_length must be at least 4 \\* num_kv_pairs = 32",
            ),
            (
                dict(sequence_length=64, num_kv_pairs=8, vocab_size=17),
                "vocab_size must be at least 2 \\* \\(num_kv_pairs \\+ 1\\) = 18",
            ),
            (dict(sequence_length=64, num_kv_pairs=0, vocab_size=64), "num_kv_pairs must be a positive integer, got 0"),
            (
                dict(sequence_length=64, num_kv_pairs=8, vocab_size=64, num_train=0),
                "num_train must be a positive integer",
            ),
            (dict(sequence_length=64, num_kv_pairs=8, vocab_size=64, num_val=-1), "num_val must be a positive integer"),
            (dict(sequence_length=64, num_kv_pairs=8, vocab_size=64, power_a=0.0), "power_a must be a positive finite"),
            (dict(sequence_length=64.0, num_kv_pairs=8, vocab_size=64), "sequence_length must be a positive integer"),
        ],
    )
    def test_rejects_infeasible_arguments(self, arguments: dict, message: str) -> None:
        counts = dict(num_train=10, num_val=10, num_test=10)
        counts.update({key: arguments.pop(key) for key in list(arguments) if key in counts})
        with pytest.raises(DataError, match=message):
            make_mqar(**arguments, **counts)

    def test_reports_every_problem_at_once(self) -> None:
        with pytest.raises(DataError) as caught:
            make_mqar(8, 4, 6, 10, 10, 10)
        assert "sequence_length must be at least" in str(caught.value)
        assert "vocab_size must be at least" in str(caught.value)


class TestImageFiles:
    """``read_image_file``: PNG and PBM/PGM/PPM through Pillow, ``.npy`` through NumPy; float32 ``[H, W, 1 or 3]``."""

    @pytest.mark.parametrize(("colour_type", "channels"), [(0, 1), (2, 3), (4, 2), (6, 4)])
    @pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
    def test_png_round_trip_all_filters(self, tmp_path: Path, colour_type: int, channels: int, dtype: type) -> None:
        rng = np.random.default_rng(colour_type)
        maximum = np.iinfo(dtype).max
        pixels = rng.integers(0, maximum + 1, size=(11, 7, channels), dtype=np.int64).astype(dtype)
        pixels[3] = pixels[2]
        file = tmp_path / "test.png"
        file.write_bytes(encode_png(pixels, colour_type))
        decoded = read_image_file(file)
        colour = pixels[:, :, :3] if channels >= 3 else pixels[:, :, :1]
        assert decoded.dtype == np.float32
        if dtype == np.uint8 or channels == 1:
            assert decoded.shape == colour.shape
            assert np.array_equal(np.rint(decoded * maximum).astype(np.int64), colour.astype(np.int64))
        else:
            eight_bit = (colour >> 8).astype(np.int64)
            if channels == 2:
                eight_bit = np.repeat(eight_bit, 3, axis=2)
            assert decoded.shape == eight_bit.shape
            assert np.array_equal(np.rint(decoded * 255).astype(np.int64), eight_bit)

    def test_files_written_by_pillow_round_trip(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        grey = rng.integers(0, 256, size=(5, 6), dtype=np.uint8)
        colour = rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
        rgba = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
        grey16 = rng.integers(0, 65536, size=(5, 6), dtype=np.uint16)
        Image.fromarray(grey).save(tmp_path / "grey.png")
        Image.fromarray(grey).save(tmp_path / "grey.pgm")
        Image.fromarray(grey).save(tmp_path / "grey.pnm")
        Image.fromarray(colour).save(tmp_path / "colour.png")
        Image.fromarray(colour).save(tmp_path / "colour.ppm")
        Image.fromarray(rgba).save(tmp_path / "rgba.png")
        Image.fromarray(grey16).save(tmp_path / "grey16.png")
        palette = Image.fromarray(colour).quantize(colors=4)
        palette.save(tmp_path / "palette.png")
        assert Image.open(tmp_path / "grey16.png").mode == "I;16" and Image.open(tmp_path / "palette.png").mode == "P"
        expected = {
            "grey.png": grey[:, :, None] / 255,
            "grey.pgm": grey[:, :, None] / 255,
            "grey.pnm": grey[:, :, None] / 255,
            "colour.png": colour / 255,
            "colour.ppm": colour / 255,
            "rgba.png": rgba[:, :, :3] / 255,
            "grey16.png": grey16[:, :, None] / 65535,
            "palette.png": np.asarray(palette.convert("RGB")) / 255,
        }
        for name, want in expected.items():
            decoded = read_image_file(tmp_path / name)
            assert decoded.dtype == np.float32 and decoded.shape == want.shape, name
            assert np.allclose(decoded, want, atol=1e-6), name
            assert 0.0 <= decoded.min() and decoded.max() <= 1.0, name

    def test_pgm_and_ppm_with_any_maxval(self, tmp_path: Path) -> None:
        grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20
        colour = (np.arange(24).reshape(2, 4, 3) * 1000).astype(np.uint16)
        grey16 = (np.arange(12).reshape(3, 4, 1) * 2000).astype(np.uint16)
        (tmp_path / "a.pgm").write_bytes(encode_pnm(grey))
        (tmp_path / "b.ppm").write_bytes(encode_pnm(colour, maxval=30000))
        (tmp_path / "c.pgm").write_bytes(encode_pnm(grey16, maxval=30000))
        (tmp_path / "d.pgm").write_bytes(encode_pnm(grey // 3, maxval=100))
        (tmp_path / "plain.pgm").write_bytes(b"P2\n2 2\n255\n0 10 20 255\n")
        assert np.allclose(read_image_file(tmp_path / "a.pgm"), grey / 255.0)
        assert np.allclose(read_image_file(tmp_path / "b.ppm"), colour / 30000.0, atol=1 / 255)
        assert np.allclose(read_image_file(tmp_path / "c.pgm"), grey16 / 30000.0, atol=1 / 65535)
        assert np.allclose(read_image_file(tmp_path / "d.pgm"), (grey // 3) / 100.0, atol=0.5 / 255 + 1e-6)
        assert np.allclose(read_image_file(tmp_path / "plain.pgm")[:, :, 0], np.array([[0, 10], [20, 255]]) / 255)

    def test_corrupt_or_mismatched_files_name_the_file(self, tmp_path: Path) -> None:
        good = encode_png(np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8), 2)
        flipped = bytearray(good)
        flipped[50] ^= 0xFF
        cases = {
            "gif.png": (b"GIF89a" + good[6:], "gif.png: not a readable PNG file"),
            "checksum.png": (bytes(flipped), "checksum.png: cannot read as a PNG image"),
            "short.png": (good[:-20], "short.png: cannot read as a PNG image"),
            "shorter.png": (good[:-30], "shorter.png: cannot read as a PNG image"),
            "empty.png": (b"", "empty.png: not a readable PNG file"),
            "short.pgm": (encode_pnm(np.zeros((3, 4, 1), dtype=np.uint8))[:-3], "short.pgm: cannot read as a PBM/PGM/PPM"),
            "png_inside.ppm": (good, "png_inside.ppm: not a readable PBM/PGM/PPM file"),
            "photo.jpg": (b"\xff\xd8", "photo.jpg: unsupported image file ending '.jpg'"),
        }
        for name, (data, message) in cases.items():
            (tmp_path / name).write_bytes(data)
            with pytest.raises(DataError, match=re.escape(message)):
                read_image_file(tmp_path / name)

    def test_npy_image_files(self, tmp_path: Path) -> None:
        np.save(tmp_path / "grey.npy", np.full((4, 5), 51, dtype=np.uint8))
        np.save(tmp_path / "rgba.npy", np.full((4, 5, 4), 0.25, dtype=np.float64))
        np.save(tmp_path / "bad.npy", np.zeros((4, 5), dtype=np.int32))
        assert np.allclose(read_image_file(tmp_path / "grey.npy"), np.full((4, 5, 1), 0.2))
        assert read_image_file(tmp_path / "rgba.npy").shape == (4, 5, 3)
        with pytest.raises(DataError, match="bad.npy: image dtype must be uint8"):
            read_image_file(tmp_path / "bad.npy")


def make_image_folder(root: Path) -> dict[str, int]:
    """Three classes with constant images of distinct brightness, one file format (or several) each."""
    rng = np.random.default_rng(0)
    counts = {}
    bright = root / "zebra"
    bright.mkdir(parents=True)
    for index in range(6):
        np.save(bright / f"{index}.npy", np.full((9, 7), 230, dtype=np.uint8))
    np.save(bright / "colour.npy", np.full((8, 8, 3), 0.9, dtype=np.float32))
    counts["zebra"] = 7
    middle = root / "apple"
    middle.mkdir()
    for index in range(5):
        (middle / f"{index}.pgm").write_bytes(encode_pnm(np.full((10, 6, 1), 128, dtype=np.uint8)))
    (middle / "colour.ppm").write_bytes(encode_pnm(np.full((5, 5, 3), 128, dtype=np.uint8)))
    (middle / "notes.txt").write_text("not an image")
    counts["apple"] = 6
    dark = root / "mango" / "nested"
    dark.mkdir(parents=True)
    for index in range(6):
        pixels = np.clip(rng.normal(25, 3, size=(12, 12, 3)), 0, 255).astype(np.uint8)
        (dark / f"{index}.png").write_bytes(encode_png(pixels, 2))
    (dark / "grey.png").write_bytes(encode_png(np.full((6, 6, 1), 25, dtype=np.uint8), 0))
    counts["mango"] = 7
    (root / ".hidden").mkdir()
    return counts


class TestImageFolder:
    def test_loads_with_labels_by_sorted_class_name(self, tmp_path: Path) -> None:
        counts = make_image_folder(tmp_path / "fruit")
        task = load_image_folder(tmp_path / "fruit", resolution=8, channels=3, val_fraction=0.15, test_fraction=0.15)
        assert (task.name, task.num_classes, task.input_shape) == ("fruit", 3, (3, 8, 8))
        inputs = torch.cat([task.train.inputs, task.val.inputs, task.test.inputs])
        targets = torch.cat([task.train.targets, task.val.targets, task.test.targets])
        assert inputs.shape == (20, 3, 8, 8)
        assert class_counts(targets, 3).tolist() == [counts["apple"], counts["mango"], counts["zebra"]]
        for split in (task.val, task.test):
            assert sorted(split.targets.tolist()) == [0, 1, 2]
        brightness = [float(inputs[targets == label].mean()) for label in range(3)]
        assert brightness[2] > brightness[0] > brightness[1]
        assert torch.allclose(task.train.inputs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)

    def test_single_channel_and_determinism(self, tmp_path: Path) -> None:
        make_image_folder(tmp_path / "fruit")
        first = load_image_folder(tmp_path / "fruit", resolution=5, channels=1, seed=4)
        again = load_image_folder(tmp_path / "fruit", resolution=5, channels=1, seed=4)
        assert first.input_shape == (1, 5, 5)
        assert torch.equal(first.test.inputs, again.test.inputs)
        assert torch.equal(first.train.targets, again.train.targets)

    def test_missing_path_and_file(self, tmp_path: Path) -> None:
        with pytest.raises(DataError, match="does not exist"):
            load_image_folder(tmp_path / "nowhere", resolution=8)
        (tmp_path / "file.npy").write_bytes(b"")
        with pytest.raises(DataError, match="got a file"):
            load_image_folder(tmp_path / "file.npy", resolution=8)

    def test_no_class_folders_and_a_single_class(self, tmp_path: Path) -> None:
        (tmp_path / "empty").mkdir()
        with pytest.raises(DataError, match="empty: no class subfolders"):
            load_image_folder(tmp_path / "empty", resolution=8)
        (tmp_path / "one" / "cat").mkdir(parents=True)
        with pytest.raises(DataError, match="single class subfolder 'cat'"):
            load_image_folder(tmp_path / "one", resolution=8)

    def test_class_folder_without_images(self, tmp_path: Path) -> None:
        make_image_folder(tmp_path / "fruit")
        (tmp_path / "fruit" / "kiwi").mkdir()
        (tmp_path / "fruit" / "kiwi" / "photo.jpg").write_bytes(b"\xff\xd8")
        with pytest.raises(DataError, match=r"kiwi: class folder has no readable images.*photo\.jpg"):
            load_image_folder(tmp_path / "fruit", resolution=8)

    def test_corrupt_file_is_named(self, tmp_path: Path) -> None:
        make_image_folder(tmp_path / "fruit")
        broken = tmp_path / "fruit" / "apple" / "broken.png"
        broken.write_bytes(encode_png(np.zeros((4, 4, 3), dtype=np.uint8), 2)[:-30])
        with pytest.raises(DataError, match="broken.png: cannot read as a PNG image, the file is truncated or corrupt"):
            load_image_folder(tmp_path / "fruit", resolution=8)
        broken.unlink()
        (tmp_path / "fruit" / "apple" / "broken.npy").write_bytes(b"not numpy")
        with pytest.raises(DataError, match="broken.npy: cannot read"):
            load_image_folder(tmp_path / "fruit", resolution=8)

    def test_bad_options(self, tmp_path: Path) -> None:
        make_image_folder(tmp_path / "fruit")
        with pytest.raises(DataError, match="channels must be one of"):
            load_image_folder(tmp_path / "fruit", resolution=8, channels=2)
        with pytest.raises(DataError, match="val_fraction \\+ test_fraction must be below 1"):
            load_image_folder(tmp_path / "fruit", resolution=8, val_fraction=0.5, test_fraction=0.5)


class TestNpz:
    def test_round_trip_with_all_splits(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        arrays = {
            "x_train": rng.integers(0, 256, size=(40, 6, 5, 3), dtype=np.uint8),
            "y_train": rng.integers(0, 4, size=40),
            "x_val": rng.integers(0, 256, size=(8, 6, 5, 3), dtype=np.uint8),
            "y_val": rng.integers(0, 4, size=8),
            "x_test": rng.integers(0, 256, size=(9, 6, 5, 3), dtype=np.uint8),
            "y_test": np.array([0, 1, 2, 3, 4, 0, 1, 2, 3]),
        }
        np.savez(tmp_path / "blocks.npz", **arrays)
        task = load_npz(tmp_path / "blocks.npz")
        assert (task.name, task.input_shape, task.num_classes) == ("blocks", (3, 6, 5), 5)
        train = arrays["x_train"].transpose(0, 3, 1, 2) / 255.0
        mean = train.mean(axis=(0, 2, 3), keepdims=True)
        std = train.std(axis=(0, 2, 3), keepdims=True)
        expected_test = (arrays["x_test"].transpose(0, 3, 1, 2) / 255.0 - mean) / std
        assert np.allclose(task.test.inputs.numpy(), expected_test, atol=1e-5)
        assert task.test.targets.tolist() == arrays["y_test"].tolist()
        assert task.val.targets.tolist() == arrays["y_val"].tolist()

    @pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
    def test_layouts_split_and_resize(self, tmp_path: Path, layout: str) -> None:
        rng = np.random.default_rng(1)
        images = rng.random(size=(50, 1, 7, 9)).astype(np.float32)
        stored = {"NHW": images[:, 0], "NCHW": images, "NHWC": images.transpose(0, 2, 3, 1)}[layout]
        labels = np.repeat(np.arange(5), 10)
        np.savez(tmp_path / "grey.npz", x_train=stored, y_train=labels)
        native = load_npz(tmp_path / "grey.npz", val_fraction=0.2, test_fraction=0.2, seed=3)
        assert native.input_shape == (1, 7, 9)
        sizes = [split.targets.shape[0] for split in (native.train, native.val, native.test)]
        assert sizes == [30, 10, 10]
        assert class_counts(native.val.targets, 5).tolist() == [2] * 5
        resized = load_npz(tmp_path / "grey.npz", resolution=4, seed=3)
        assert resized.input_shape == (1, 4, 4) and resized.train.inputs.shape[1:] == (1, 4, 4)

    def test_missing_keys_list_what_is_present(self, tmp_path: Path) -> None:
        np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4), dtype=np.uint8), y_train=np.zeros(2, dtype=np.int64))
        with pytest.raises(DataError, match=r"missing required key 'x_train'; keys present: \['images', 'y_train'\]"):
            load_npz(tmp_path / "a.npz")
        np.savez(
            tmp_path / "b.npz",
            x_train=np.zeros((4, 4, 4), np.uint8),
            y_train=np.zeros(4, int),
            x_val=np.zeros((1, 4, 4), np.uint8),
        )
        with pytest.raises(DataError, match="'y_val' is missing"):
            load_npz(tmp_path / "b.npz")

    @pytest.mark.parametrize(
        ("x_train", "y_train", "message"),
        [
            (np.zeros((4, 4, 4), np.uint8), np.zeros(5, np.int64), "x_train has 4 images but y_train has 5 labels"),
            (np.zeros((4, 4, 4), np.int64), np.zeros(4, np.int64), "x_train: image dtype must be uint8"),
            (np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.float32), "y_train: labels must have an integer dtype"),
            (np.zeros((4, 16), np.uint8), np.zeros(4, np.int64), "images must have 3 or 4 dimensions"),
            (np.zeros((4, 5, 5, 5), np.uint8), np.zeros(4, np.int64), "cannot find the channel axis"),
            (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 1), np.int64), "labels must have shape \\[N\\]"),
            (np.full((4, 4, 4), np.nan, np.float32), np.zeros(4, np.int64), "must be finite"),
        ],
    )
    def test_bad_arrays(self, tmp_path: Path, x_train: np.ndarray, y_train: np.ndarray, message: str) -> None:
        np.savez(tmp_path / "bad.npz", x_train=x_train, y_train=y_train)
        with pytest.raises(DataError, match=message):
            load_npz(tmp_path / "bad.npz")

    def test_unreadable_files(self, tmp_path: Path) -> None:
        with pytest.raises(DataError, match="does not exist"):
            load_npz(tmp_path / "missing.npz")
        (tmp_path / "junk.npz").write_bytes(b"junk")
        with pytest.raises(DataError, match="junk.npz: cannot read"):
            load_npz(tmp_path / "junk.npz")
        np.save(tmp_path / "single.npy", np.zeros(3))
        with pytest.raises(DataError, match="got a single .npy array"):
            load_npz(tmp_path / "single.npy")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


class TestTorchvisionOnDisk:
    @pytest.mark.parametrize(("name", "folder"), [("MNIST", "MNIST"), ("fashion-mnist", "FashionMNIST")])
    def test_mnist_idx_round_trip(self, tmp_path: Path, name: str, folder: str) -> None:
        raw = tmp_path / folder / "raw"
        raw.mkdir(parents=True)
        rng = np.random.default_rng(0)
        train_images = rng.integers(0, 256, size=(60, 28, 28)).astype(np.uint8)
        train_labels = np.tile(np.arange(10), 6).astype(np.uint8)
        test_images = rng.integers(0, 256, size=(15, 28, 28)).astype(np.uint8)
        test_labels = rng.integers(0, 10, size=15).astype(np.uint8)
        write_idx(raw / "train-images-idx3-ubyte.gz", train_images)
        write_idx(raw / "train-labels-idx1-ubyte.gz", train_labels)
        write_idx(raw / "t10k-images-idx3-ubyte", test_images)
        write_idx(raw / "t10k-labels-idx1-ubyte", test_labels)
        task = load_torchvision_on_disk(name, tmp_path, val_fraction=0.1, seed=0)
        assert task.input_shape == (1, 28, 28) and task.num_classes == 10
        assert task.name == ("mnist" if folder == "MNIST" else "fashion_mnist")
        assert task.train.targets.shape[0] + task.val.targets.shape[0] == 60
        assert class_counts(task.val.targets, 10).sum() == 6
        assert task.test.targets.tolist() == test_labels.tolist()
        slope, intercept = np.polyfit(test_images.ravel().astype(np.float64), task.test.inputs.numpy().ravel(), 1)
        assert np.allclose(test_images.ravel() * slope + intercept, task.test.inputs.numpy().ravel(), atol=1e-4)
        resized = load_torchvision_on_disk(name, tmp_path, resolution=14)
        assert resized.test.inputs.shape == (15, 1, 14, 14)

    def test_cifar10_pickles_round_trip(self, tmp_path: Path) -> None:
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        rng = np.random.default_rng(0)
        colours = rng.integers(0, 256, size=(70, 3)).astype(np.uint8)
        planes = np.broadcast_to(colours[:, :, None], (70, 3, 1024)).reshape(70, 3072).copy()
        labels = np.arange(70) % 10
        for index in range(5):
            rows = slice(10 * index, 10 * index + 10)
            batch = {b"data": planes[rows], b"labels": labels[rows].tolist(), b"batch_label": b"training batch"}
            (folder / f"data_batch_{index + 1}").write_bytes(pickle.dumps(batch, protocol=2))
        (folder / "test_batch").write_bytes(pickle.dumps({"data": planes[50:], "labels": labels[50:].tolist()}))
        task = load_torchvision_on_disk("CIFAR10", tmp_path, val_fraction=0.2)
        assert task.input_shape == (3, 32, 32) and task.num_classes == 10
        assert (task.train.targets.shape[0], task.val.targets.shape[0], task.test.targets.shape[0]) == (40, 10, 20)
        assert task.test.targets.tolist() == labels[50:].tolist()
        test = task.test.inputs
        assert torch.all(test.amax(dim=(2, 3)) == test.amin(dim=(2, 3)))
        for channel in range(3):
            order_expected = np.argsort(colours[50:, channel], kind="stable")
            assert np.array_equal(np.sort(test[:, channel, 0, 0].numpy()), test[order_expected, channel, 0, 0].numpy())

    def test_cifar100_uses_fine_labels(self, tmp_path: Path) -> None:
        folder = tmp_path / "cifar-100-python"
        folder.mkdir()
        data = np.random.default_rng(0).integers(0, 256, size=(30, 3072)).astype(np.uint8)
        fine = (np.arange(30) * 7 % 100).tolist()
        for split, rows in (("train", slice(0, 20)), ("test", slice(20, 30))):
            batch = {"data": data[rows], "fine_labels": fine[rows], "coarse_labels": [0] * len(fine[rows])}
            (folder / split).write_bytes(pickle.dumps(batch))
        task = load_torchvision_on_disk("cifar100", tmp_path, val_fraction=0.0)
        assert task.num_classes == 100 and task.val.inputs.shape == (0, 3, 32, 32)
        assert sorted(task.train.targets.tolist()) == sorted(fine[:20])
        assert task.test.targets.tolist() == fine[20:]

    def test_unknown_name_suggests(self, tmp_path: Path) -> None:
        with pytest.raises(DataError, match="did you mean 'cifar10'") as caught:
            load_torchvision_on_disk("cifar1O", tmp_path)
        assert "['mnist', 'fashion_mnist', 'cifar10', 'cifar100']" in str(caught.value)
        with pytest.raises(DataError, match="did you mean 'mnist'"):
            load_torchvision_on_disk("mnsit", tmp_path)

    def test_missing_files_never_download(self, tmp_path: Path) -> None:
        with pytest.raises(DataError, match=r"MNIST/raw/train-images-idx3-ubyte.*never downloads"):
            load_torchvision_on_disk("mnist", tmp_path)
        with pytest.raises(DataError, match=r"cifar-10-batches-py/data_batch_1 is missing.*never downloads"):
            load_torchvision_on_disk("cifar10", tmp_path)

    def test_refuses_malicious_pickle_and_corrupt_idx(self, tmp_path: Path) -> None:
        class Exploit:
            def __reduce__(self) -> tuple:
                return (print, ("this must never run",))

        folder = tmp_path / "cifar-100-python"
        folder.mkdir()
        (folder / "train").write_bytes(pickle.dumps({"data": Exploit(), "fine_labels": []}))
        with pytest.raises(DataError, match="refusing to load builtins.print"):
            load_torchvision_on_disk("cifar100", tmp_path)
        raw = tmp_path / "MNIST" / "raw"
        raw.mkdir(parents=True)
        (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 20)
        with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
            load_torchvision_on_disk("mnist", tmp_path)


class TestIterateBatches:
    def make_split(self, count: int = 23) -> Split:
        return Split(inputs=torch.arange(count * 2, dtype=torch.float32).reshape(count, 2), targets=torch.arange(count))

    def test_in_order(self) -> None:
        batches = list(iterate_batches(self.make_split(), 5, shuffle=False))
        assert [batch[1].shape[0] for batch in batches] == [5, 5, 5, 5, 3]
        assert torch.equal(torch.cat([targets for _, targets in batches]), torch.arange(23))

    def test_shuffled_covers_every_sample_once(self) -> None:
        split = self.make_split()
        batches = list(iterate_batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
        targets = torch.cat([targets for _, targets in batches])
        assert sorted(targets.tolist()) == list(range(23))
        assert targets.tolist() != list(range(23))
        for inputs, batch_targets in batches:
            assert torch.equal(inputs[:, 0], batch_targets.float() * 2)
        repeat = iterate_batches(split, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
        again = torch.cat([batch_targets for _, batch_targets in repeat])
        assert torch.equal(targets, again)

    def test_drop_last_and_bad_batch_size(self) -> None:
        generator = torch.Generator().manual_seed(1)
        batches = list(iterate_batches(self.make_split(), 5, shuffle=True, generator=generator, drop_last=True))
        assert [batch[0].shape[0] for batch in batches] == [5, 5, 5, 5]
        assert len(set(torch.cat([t for _, t in batches]).tolist())) == 20
        with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
            list(iterate_batches(self.make_split(), 0, shuffle=False))

    def test_works_on_task_splits(self) -> None:
        task = make_mqar(16, 2, 12, 10, 3, 3)
        assert isinstance(task, TaskData)
        assert sum(inputs.shape[0] for inputs, _ in iterate_batches(task.train, 3, shuffle=False)) == 10
        with pytest.raises(ValueError, match="same number of samples"):
            Split(inputs=torch.zeros(3, 2), targets=torch.zeros(4))
