"""Small data fixtures in the real formats (COCO, ImageNet, WebDataset, CIFAR-100), written on demand.

Imported by the tests that need them (pytest puts this folder on sys.path), and by the subprocess that
runs CLIP_benchmark's WebDataset converter.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import torch

from clip_fp8 import synthetic


def write_coco_folder(root: Path, n_images: int, split: str = "train2017", corrupt: int = 0) -> Path:
    """A COCO folder in the real layout: <split>/<12-digit id>.jpg and annotations/captions_<split>.json."""
    from clip_fp8 import synthetic

    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(n_images):
        sample = synthetic.make_sample(7, i)
        name = f"{i + 1:012d}.jpg"
        if i < corrupt:
            (root / split / name).write_bytes(b"not a jpeg")
        else:
            sample.image.save(root / split / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "height": 64, "width": 64, "license": 1,
                       "coco_url": "", "flickr_url": "", "date_captured": "2013-11-14 11:18:45"})
        for j, caption in enumerate([sample.caption, f"{sample.caption}."]):
            annotations.append({"id": 1000 * (i + 1) + j, "image_id": i + 1, "caption": caption})
    data = {"info": {"description": "clip-fp8 test fixture"}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return root


WNIDS = ["n01440764", "n01443537", "n01484850"]  # ImageNet's first three classes: tench, goldfish, great white shark


def write_imagenet(root: Path, per_class: int = 4) -> Path:
    """torchvision's ImageNet layout: meta.bin (wnid -> names, val wnids) and val/<wnid>/*.JPEG."""
    names = {w: (n,) for w, n in zip(WNIDS, ["tench", "goldfish", "great white shark"])}
    for c, wnid in enumerate(WNIDS):
        (root / "val" / wnid).mkdir(parents=True)
        for i in range(per_class):
            synthetic.make_sample(9, c * per_class + i).image.save(root / "val" / wnid / f"ILSVRC2012_val_{c:04d}{i:04d}.JPEG")
    torch.save((names, [w for w in WNIDS for _ in range(per_class)]), root / "meta.bin")
    return root


def write_wds_classification(root: Path) -> Path:
    """CLIP_benchmark's WebDataset layout: <split>/{0..n-1}.tar with .webp/.cls, nshards.txt, classnames, templates."""
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text("1")
    (root / "classnames.txt").write_text("\n".join(synthetic.CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(12):
            sample = synthetic.make_sample(11, i)
            buf = io.BytesIO()
            sample.image.save(buf, format="WEBP")
            for name, data in ((f"s{i:04d}.webp", buf.getvalue()), (f"s{i:04d}.cls", str(sample.label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


# CIFAR-100's fine labels, in label order (the `meta` file of the python release).
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish
forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain
mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower
sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
worm""".split()


def cifar_images(n: int):
    """32x32 RGB images with labels spread over the 100 classes."""
    return [(synthetic.make_sample(13, i).image.resize((32, 32)), (7 * i) % 100) for i in range(n)]


def write_cifar100_python(root: Path, n: int = 10) -> Path:
    """The CIFAR-100 python release's layout and format: cifar-100-python/{meta,test,train} pickles."""
    import numpy as np

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    pairs = cifar_images(n)
    data = np.stack([np.asarray(img).transpose(2, 0, 1).reshape(-1) for img, _ in pairs]).astype(np.uint8)
    batch = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": "testing batch 1 of 1",
             "fine_labels": [label for _, label in pairs], "coarse_labels": [label // 5 for _, label in pairs], "data": data}
    for name in ("test", "train"):
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": CIFAR100_CLASSES,
                                               "coarse_label_names": [f"superclass_{i}" for i in range(20)]}))
    return root


def write_wds_cifar100(root: Path, n: int = 10) -> Path:
    """CIFAR-100 in CLIP_benchmark's WebDataset form, written by CLIP_benchmark's own converter (what
    `clip_benchmark_export_wds` calls) with CIFAR-100's classnames and CLIP_benchmark's 18 templates. The
    converter forks 8 DataLoader workers; it runs in a fresh process, as the CLI would, not in the test's."""
    import subprocess
    import sys

    script = f"""
import json, sys
from pathlib import Path
import clip_benchmark.datasets
from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset
from data_fixtures import CIFAR100_CLASSES, cifar_images

templates = json.loads((Path(clip_benchmark.datasets.__file__).parent / "en_zeroshot_classification_templates.json").read_text())["cifar100"]

class Cifar(list):
    classes, templates = CIFAR100_CLASSES, templates

convert_dataset(Cifar(cifar_images({n})), "test", {str(root)!r}, transform=PIL_to_bytes("webp"), verbose=False)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return root




def write_outlier_checkpoint(dest: Path, layer: str = "vision_model.encoder.layers.1", channel: int = 3,
                             scale: float = 1e6) -> str:
    """The embedded model with one outlier channel going into ``<layer>.mlp.fc1``, computing what it computed.

    ``layer_norm2`` (whose output only fc1 reads) multiplies ``channel`` by ``scale`` and fc1's weight column
    for it is divided by the same, so the float32 model is unchanged; but fc1's input has one channel a million
    times the others, so per-tensor FP8 flushes the rest to zero, and its weight one column a million times
    smaller, flushed too. FP8 of that one GEMM ruins the layer; every other unit is left as trained. FP8's
    range is wide: at 1e4 (or weights up, activations down at 1e5) this tiny model still passes its gate, so
    the outlier is extreme, beyond FP16's range too (the FP16 graph clamps the column, with a warning: not
    what this fixture is for). Returns fc1's module name.
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from clip_fp8 import ASSETS_DIR

    source = ASSETS_DIR / "tiny-clip-shapes"
    model = CLIPModel.from_pretrained(source).eval()
    modules = dict(model.named_modules())
    norm, fc1 = modules[f"{layer}.layer_norm2"], modules[f"{layer}.mlp.fc1"]
    with torch.no_grad():
        norm.weight[channel] *= scale
        norm.bias[channel] *= scale
        fc1.weight[:, channel] /= scale
    model.save_pretrained(dest, safe_serialization=True)
    CLIPProcessor.from_pretrained(source).save_pretrained(dest)
    return f"{layer}.mlp.fc1"
