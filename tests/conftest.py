import os

import pytest

# Tests run on 2 cores: keep each process to its share and make kernels deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- tiny shard sets for tests
# A real shard set on disk (tars + DALI indexes + manifest) written with the production ShardWriter,
# without going through `preprocess`, so loader/trainer/eval tests do not depend on a source reader.
# Saliency is a known function of the image (its first channel thresholded at 128), so tests can
# check that image and saliency stay aligned under augmentation.

def write_tiny_shard_set(root, *, num_samples=64, size=16, channels=3, num_classes=4, per_shard=16,
                         image_format="png", seed=0, split="train"):
    import json

    import cv2
    import numpy as np

    from shards.format import FORMAT_NAME, FORMAT_VERSION, encode_label, sanitize_key
    from shards.storage import atomic_write_json
    from shards.writer import ShardWriter

    root = __import__("pathlib").Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    infos, written = [], 0
    for shard_no in range(-(-num_samples // per_shard)):
        with ShardWriter(root / f"{split}-{shard_no:06d}.tar") as w:
            for _ in range(min(per_shard, num_samples - written)):
                label = int(rng.integers(num_classes))
                # smooth random blobs, brighter for higher labels: learnable and with real structure
                small = rng.integers(0, 256, (4, 4, channels), dtype=np.uint8)
                img = cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR).reshape(size, size, channels)
                img = np.clip(img.astype(np.int16) // 2 + label * (128 // num_classes), 0, 255).astype(np.uint8)
                sal = np.where(img[..., 0] >= 128, 255, 0).astype(np.uint8)
                sample = {"__key__": sanitize_key(f"s{written:06d}"), "label.i64": encode_label(label),
                          "cls": str(label).encode(), "json": json.dumps({"source_id": written}).encode(),
                          "sal.png": cv2.imencode(".png", sal)[1].tobytes()}
                if image_format == "raw":
                    sample["raw"] = img.tobytes()
                else:
                    bgr = img if channels == 1 else img[..., ::-1]
                    sample[image_format] = cv2.imencode("." + image_format, np.ascontiguousarray(bgr))[1].tobytes()
                w.write(sample)
                written += 1
        infos.append(w.info.to_dict())
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "satpipe_version": "test", "split": split,
        "config": {"source": "tiny-test", "seed": seed}, "fingerprint": {"digest": f"tiny-{seed}-{num_samples}"},
        "classes": [f"class{i}" for i in range(num_classes)],
        "image": {"format": image_format, "height": size, "width": size, "channels": channels},
        "shards": infos, "counts": {"read": num_samples, "written": num_samples, "skipped": {}},
    }
    atomic_write_json(root / "manifest.json", manifest)
    return root


@pytest.fixture
def tiny_shards(tmp_path):
    """Factory: tiny_shards(**kwargs) -> path of a fresh shard set (see write_tiny_shard_set)."""
    counter = iter(range(1000))
    return lambda **kw: write_tiny_shard_set(tmp_path / f"shards{next(counter)}", **kw)
