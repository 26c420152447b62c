"""build-shards on a small real COCO set: content, read-back by webdataset and DALI, determinism,
refusal to mix builds, image unit, output formats."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from coco_fixture import COLOURS, CATEGORIES, make_coco  # noqa: E402

from preprocess.build import build  # noqa: E402
from preprocess.config import BuildConfig  # noqa: E402
from preprocess.plan import BuildError  # noqa: E402
from shards.format import PROVENANCE_NAME, decode_label  # noqa: E402
from shards.manifest import check_shard_files, read_manifest  # noqa: E402
from shards.reading import iter_tar_samples  # noqa: E402


def cfg_for(root: Path, out: Path, **kw) -> BuildConfig:
    base = dict(source="coco", annotations=str(root / "ann.json"), images=str(root / "images"), size=32,
                shard_size=4, out=str(out), progress=False, sigma_frac=0.0)
    base.update(kw)
    return BuildConfig(**base)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != PROVENANCE_NAME}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=6, objects=3)
    return root


@pytest.fixture(scope="module")
def built(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "train"
    manifest = build(cfg_for(coco, out), log=lambda *_: None)
    return out, manifest


def test_manifest_counts_and_files(built):
    out, manifest = built
    m = read_manifest(out)
    assert m.classes == [c["name"] for c in CATEGORIES]
    assert manifest["counts"] == {"read": 19, "written": 18, "skipped": {"crowd annotation": 1},
                                  "saliency_kinds": {"mask": 18}}
    assert manifest["saliency"]["kind"] == "mask"
    assert m.num_samples == 18 and len(m.shards) >= 4  # 3 objects per image, <= 4 per shard
    assert all(s["samples"] <= 4 for s in m.shards)
    assert check_shard_files(m, full=True) == []
    assert m.image == {"format": "jpg", "height": 32, "width": 32, "channels": 3}
    assert "workers" not in m.raw["config"] and m.raw["config"]["size"] == 32
    text = (out / "manifest.json").read_text()
    assert str(out.parent) not in text  # no absolute output path in the manifest


def test_samples_match_objects(built, coco):
    """Each object crop: label = its category, hard saliency covers pixels of the object's colour."""
    out, _ = built
    doc = json.loads((coco / "ann.json").read_text())
    cat_of = {str(a["id"]): a["category_id"] for a in doc["annotations"]}
    index_of = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    seen = 0
    for tar in sorted(out.glob("*.tar")):
        labels = []
        for s in iter_tar_samples(tar):
            meta = json.loads(s["json"])
            label = decode_label(s["label.i64"])
            assert label == int(s["cls"]) == index_of[cat_of[meta["annotation_id"]]]
            img = cv2.imdecode(np.frombuffer(s["jpg"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            sal = cv2.imdecode(np.frombuffer(s["sal.png"], np.uint8), cv2.IMREAD_UNCHANGED)
            assert img.shape == (32, 32, 3) and sal.shape == (32, 32) and set(np.unique(sal)) <= {0, 255}
            colour = np.array(COLOURS[cat_of[meta["annotation_id"]]])
            # a pixel looks like the object when nearer its colour than the dark background (~30)
            like = np.abs(img.astype(int) - colour).sum(axis=2) < np.abs(img.astype(int) - 30).sum(axis=2)
            inside = sal == 255
            # the object's own pixels are (almost all) salient; the background (almost all) not
            assert inside.sum() > 30 and (like & inside).sum() / inside.sum() > 0.85
            assert (like & ~inside).sum() < 0.15 * inside.sum()
            assert len(meta["boxes"]) == 1
            labels.append(label)
            seen += 1
    assert seen == 18


def test_readback_webdataset_and_dali_identical(built):
    import webdataset as wds
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    out, _ = built
    m = read_manifest(out)
    urls = [str(p) for p in m.tar_paths()]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    ref = [(s["__key__"], s["jpg"], s["sal.png"], s["label.i64"]) for s in ds]
    assert len(ref) == m.num_samples
    pipe = Pipeline(batch_size=len(ref), num_threads=1, device_id=None)
    with pipe:
        jpg, sal, label = fn.readers.webdataset(paths=urls, index_paths=[str(p) for p in m.index_paths()],
                                                ext=["jpg", "sal.png", "label.i64"],
                                                dtypes=[types.UINT8, types.UINT8, types.INT64],
                                                missing_component_behavior="error", random_shuffle=False)
        pipe.set_outputs(jpg, sal, label, fn.decoders.image(sal, output_type=types.GRAY))
    pipe.build()
    jpg_b, sal_b, label_b, sal_dec = pipe.run()
    for i, (key, j, s, lab) in enumerate(ref):
        assert bytes(np.array(jpg_b[i])) == j, key
        assert bytes(np.array(sal_b[i])) == s, key
        assert int(np.array(label_b[i]).reshape(-1)[0]) == decode_label(lab)
        assert np.array_equal(np.array(sal_dec[i])[..., 0], cv2.imdecode(np.frombuffer(s, np.uint8), 0))


def test_rebuild_is_identical_and_workers_do_not_matter(built, coco, tmp_path):
    out, _ = built
    other = tmp_path / "w2"
    build(cfg_for(coco, other, workers=2), log=lambda *_: None)
    assert files_of(other) == files_of(out)


def test_parallel_build_main_process_leaves_rendering_to_workers(coco, tmp_path):
    """With --workers 2 the main process only plans: it never imports the Numba kernels (0.15 s of
    serial time on a parallel build). A script file: forkserver workers re-import the main module."""
    import subprocess
    import sys
    script = tmp_path / "parallel_build.py"
    script.write_text(
        "import sys\nfrom preprocess.cli import main\n"
        "if __name__ == '__main__':\n"
        f"    rc = main(['build-shards', 'coco', '--annotations', {str(coco / 'ann.json')!r}, '--images',"
        f" {str(coco / 'images')!r}, '--size', '32', '--shard-size', '4', '--out', {str(tmp_path / 'out')!r},"
        " '--workers', '2', '--no-progress'])\n"
        "    print('numba imported:', 'numba' in sys.modules)\n"
        "    sys.exit(rc)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "numba imported: False" in r.stdout and (tmp_path / "out" / "manifest.json").is_file()


def test_rerun_keeps_shards_and_refuses_other_config(built, coco, tmp_path):
    out = tmp_path / "o"
    build(cfg_for(coco, out), log=lambda *_: None)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    logs = []
    build(cfg_for(coco, out), log=logs.append)
    assert "already complete, 0 to build" in logs[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    with pytest.raises(BuildError, match=r"config differs in size.*--overwrite"):
        build(cfg_for(coco, out, size=48), log=lambda *_: None)
    assert read_manifest(out).image["height"] == 32  # untouched
    build(cfg_for(coco, out, size=48, overwrite=True), log=lambda *_: None)
    assert read_manifest(out).image["height"] == 48


def test_changed_input_refuses(coco, tmp_path):
    root = tmp_path / "c"
    make_coco(root, num_images=3, objects=2)
    out = tmp_path / "o"
    build(cfg_for(root, out), log=lambda *_: None)
    doc = json.loads((root / "ann.json").read_text())
    doc["annotations"] = doc["annotations"][:-2]
    (root / "ann.json").write_text(json.dumps(doc))
    with pytest.raises(BuildError, match="inputs changed"):
        build(cfg_for(root, out), log=lambda *_: None)


def test_image_unit_png_and_raw(coco, tmp_path):
    m = build(cfg_for(coco, tmp_path / "img", unit="image", image_format="png", size=40), log=lambda *_: None)
    assert m["counts"]["written"] == 6 and m["counts"]["skipped"] == {}
    first = next(iter_tar_samples(next((tmp_path / "img").glob("*.tar"))))
    img = cv2.imdecode(np.frombuffer(first["png"], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (40, 40, 3)
    # 160x120 padded to a square: top and bottom rows are padding, not image
    assert img[0].max() == 0 and img[-1].max() == 0 and img[20].max() > 0
    assert len(json.loads(first["json"])["boxes"]) >= 3  # all objects of the image
    m = build(cfg_for(coco, tmp_path / "raw", image_format="raw", size=16), log=lambda *_: None)
    s = next(iter_tar_samples(next((tmp_path / "raw").glob("*.tar"))))
    assert len(s["raw"]) == 16 * 16 * 3 and m["image"]["format"] == "raw"


def test_box_saliency_and_blur(coco, tmp_path):
    build(cfg_for(coco, tmp_path / "box", saliency="box"), log=lambda *_: None)
    s = next(iter_tar_samples(next((tmp_path / "box").glob("*.tar"))))
    sal = cv2.imdecode(np.frombuffer(s["sal.png"], np.uint8), 0)
    ys, xs = np.nonzero(sal == 255)
    # a box map is a filled rectangle
    assert (sal[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == 255).all()
    build(cfg_for(coco, tmp_path / "soft", sigma_frac=0.1), log=lambda *_: None)
    s = next(iter_tar_samples(next((tmp_path / "soft").glob("*.tar"))))
    sal = cv2.imdecode(np.frombuffer(s["sal.png"], np.uint8), 0)
    assert len(np.unique(sal)) > 10  # soft map


def test_forkserver_preload_warms_every_kernel_path():
    """The workers' preload renders one sample per saliency path; afterwards no Numba kernel compiles."""
    import subprocess
    import sys
    script = ("import preprocess.forkserver_preload\n"
              "from kernels import raster as r, rle, saliency as s\n"
              "for f in (r._rasterize_polygons, r._rasterize_boxes, rle._resample_mask, s._foreground):\n"
              "    print(len(f.signatures))\n"
              "print(len(s._saliency_u8.signatures))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    counts = list(map(int, out.stdout.split()))
    assert counts[:4] == [1] * 4 and counts[4] == 2, out.stdout  # saliency from uint8 and from soft float masks


def test_forkserver_fast_exit_is_only_armed_in_the_forkserver():
    """The preload skips interpreter teardown in the forkserver only: anyone else importing it (a test,
    a user) keeps its exit code and its atexit handlers."""
    import subprocess
    import sys
    script = ("import atexit, preprocess.forkserver_preload as p\n"
              "atexit.register(print, 'atexit ran')\n"
              "assert not p._in_forkserver()\n"
              "raise SystemExit(3)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and "atexit ran" in out.stdout, out.stderr


def test_workers_requested_reads_the_command_line():
    from preprocess.workers import workers_requested
    assert workers_requested(["coco", "--workers", "4", "--size", "32"]) == 4
    assert workers_requested(["coco", "--workers=3"]) == 3
    assert workers_requested(["coco", "--size", "32"]) == 0
    assert workers_requested(["coco", "--workers", "two"]) == 0 and workers_requested(["coco", "--workers"]) == 0
    assert workers_requested(["coco", "--workers", "2", "--executor", "ray"]) == 0  # Ray's processes build


def test_help_names_each_default_once():
    """`--out` says its default in words; the generated `(default: '')` must not follow it (issue 15)."""
    from preprocess.build_cli import make_parser

    ap = make_parser("coco")
    text = " ".join(ap.format_help().split())  # argparse wraps lines
    assert "output folder, or a URL" in text and "(default: shards/SOURCE/SPLIT) --workers" in text
    for action in ap._actions:
        assert (action.help or "").count("(default:") <= 1, action.option_strings


# ----------------------------------------------------------------------------- the saliency kind, recorded honestly

def _voc_export(root: Path, n: int, with_masks: set[int]) -> Path:
    """Annotations/ + JPEGImages/ as annotation tools export them; SegmentationObject/ PNGs only for
    the images in `with_masks` (a set where masks exist for some images only)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import dataset_fixtures as fx

    rng = np.random.default_rng(3)
    for i in range(n):
        name = f"frame_{i:03d}"
        fx.write_jpeg(root / "JPEGImages" / f"{name}.jpg", fx.object_photo(rng, 48, 64, (10, 5, 40, 35)))
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(
            fx.voc_xml(f"{name}.jpg", 64, 48, [{"name": "dog", "box": (11, 6, 40, 35)}]))
        if i in with_masks:
            inst = np.zeros((48, 64), np.uint8)
            inst[8:30, 14:36] = 1  # object 1: smaller than its box
            fx.write_palette_png(root / "SegmentationObject" / f"{name}.png", inst)
    return root


def _voc_build(root: Path, out: Path) -> dict:
    cfg = BuildConfig(source="voc", root=str(root), split="all", saliency="auto", size=32, shard_size=3,
                      out=str(out), progress=False, sigma_frac=0.0)
    return build(cfg, log=lambda *_: None)


def _sample_kinds(out: Path) -> list[str]:
    return [json.loads(s["json"])["saliency"] for tar in sorted(out.glob("*.tar")) for s in iter_tar_samples(tar)]


def test_auto_on_a_maskless_voc_export_records_box(tmp_path):
    """`auto` resolves to `mask` for VOC (the class may have masks); this export has none: box maps,
    and the samples, the manifest, info and preview say so."""
    from preprocess.info import describe
    from preprocess.preview import first_samples, grid_title

    m = _voc_build(_voc_export(tmp_path / "voc", 4, set()), tmp_path / "out")
    assert m["saliency"]["kind"] == "box" and m["saliency"]["requested"] == "mask"
    assert m["counts"]["saliency_kinds"] == {"box": 4}
    assert _sample_kinds(tmp_path / "out") == ["box"] * 4
    assert "saliency    box (requested mask)" in describe(tmp_path / "out")
    manifest, samples = first_samples(tmp_path / "out", 2)
    assert grid_title("d", manifest, 2).endswith("saliency box (requested mask)")
    assert [s[4] for s in samples] == ["box", "box"]  # each saliency panel names its sample's kind


def test_a_set_with_masks_for_some_images_counts_both_kinds(tmp_path):
    m = _voc_build(_voc_export(tmp_path / "voc", 5, {0, 3}), tmp_path / "out")
    assert m["counts"]["saliency_kinds"] == {"box": 3, "mask": 2}
    assert m["saliency"]["kind"] == "mixed"
    assert sorted(_sample_kinds(tmp_path / "out")) == ["box"] * 3 + ["mask"] * 2
    from preprocess.info import describe
    assert "saliency    mixed: box 3, mask 2 (requested mask)" in describe(tmp_path / "out")


def test_executor_ray_without_ray_installed_says_what_to_install(coco, tmp_path, monkeypatch, capsys):
    from preprocess.build import run

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    assert run(cfg_for(coco, tmp_path / "o", executor="ray")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--executor ray needs Ray: pip install 'satpipe[ray]'" in err
    assert not (tmp_path / "o").exists()  # refused before planning or writing anything
