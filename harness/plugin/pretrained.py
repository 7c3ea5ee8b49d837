"""synthfg-in: a backbone pretrained on synthfg's own source domain, as ImageNet weights are for CUB.

`backbone.pretrained: synthfg-in` fine-tunes from a backbone trained once per machine on other synthfg classes:
Gray-code attribute combinations from RECIPE.class_offset (144: the first with another tail than the studies'
fan; every shipped study uses at most 16 classes from 0, tests/test_pretrained.py checks), its own dataset seed.
Its birds are centred (render 2), as ImageNet's photos are object-centric while the target's are anywhere (render
3): birds off the centre are not learnt from scratch in such a budget, centred ones are, and their part features
carry over (SourceRecipe says what was measured). The recipe trains the whole timm classifier model from random
init in fp32 on one thread (the weights do not depend on the machine's core count), seeded; its backbone weights
are saved as the state dict of the timm model (the classifier at timm's init), the form `backbone.pretrained: PATH`
loads. About a minute on one core of a 2-core AVX2 CPU for the studies' quarter-width ResNet-18.

Cached like timm's hub cache, in $FGVC_HARNESS_CACHE/pretrained/synthfg-in-<key>/ (weights.pth, meta.json with
the file's size and CRC-32, verified before use: a broken entry is rebuilt), keyed by the backbone's name and
kwargs and the recipe; built on first use under a file lock, so processes that ask together build it once.

Identity: the study loader resolves `synthfg-in` to `synthfg-in@<hash>`, the content hash of the weights (their
tensors' bytes) that this machine built (BackboneConfig's validator; the build happens then, in the driver,
before Ray starts). The hash is thus part of every trial's identity: another build (another torch, other CPU
kernels, a new recipe) gives other identities, so its trials rerun instead of mixing with results made from other
weights. A trial given `synthfg-in@<hash>` uses the entry with that hash, building it on a node that lacks it, and
fails with the fix when that node's build differs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE_NAME = "synthfg-in"
HASH_CHARS = 12


@dataclass(frozen=True)
class SourceRecipe:
    """How synthfg-in is built. Any change gives new cache entries and, through the hash, new trial identities;
    bump `version` when the code of the build changes what it produces. Measured on this 2-core AVX2 box (fine-tuning
    the `baseline` method 4 epochs on the ablations' default data, render 3, 16 classes x 40, chance 6%): from
    scratch 5%; from this recipe 24-25%; from a 48- or 24-class source, or batch 64, 14-18%; from a source at
    render 3 chance (birds off the centre could not be learnt from scratch in any budget tried, up to 32k images)."""

    version: int = 1
    classes: int = 16            # words 144-159: wing pattern x eye ring, and beak; crown yellow, tail forked
    class_offset: int = 144      # past every study's classes (the studies' 16 have tail fan, crown none)
    dataset_seed: int = 28       # other birds than any study's (seed 0) and the smoke backbone's (1)
    render: int = 2              # centred birds, as ImageNet's photos are object-centric (see the class docstring)
    part_scale: float = 2.0      # clearer parts and fewer distractors than the studies' (1.5, 6): a source to learn
    clutter: int = 3             # from quickly (75% held-out top-1 against 44% at the studies' settings)
    occlusion: float = 0.25
    train_per_class: int = 100
    test_per_class: int = 4      # a sanity figure for the progress line only
    stored: int = 72             # the studies' resize and crop (most default profiles: 72 -> 64)
    crop: int = 64
    epochs: int = 8
    batch_size: int = 32         # 50 steps an epoch: batch 64 learnt half as much in the same time
    lr: float = 0.1              # from scratch, cosine to 0 over every step
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0                # initialisation and batch order
    threads: int = 1             # one thread: the same weights on every core count

    def source_params(self):
        from harness.data.synthfg import SynthFGParams

        return SynthFGParams(classes=self.classes, class_offset=self.class_offset, seed=self.dataset_seed,
                             train_per_class=self.train_per_class, test_per_class=self.test_per_class,
                             render=self.render, part_scale=self.part_scale, clutter=self.clutter,
                             occlusion=self.occlusion)


RECIPE = SourceRecipe()


class PretrainedError(ValueError):
    """The named pretrained weights cannot be built or do not match the ones a trial was resolved with."""


def is_named_source(pretrained: object) -> bool:
    """Whether a backbone.pretrained value names synthfg-in (bare, or pinned to a hash) rather than a path."""
    return isinstance(pretrained, str) and (pretrained == SOURCE_NAME or pretrained.startswith(SOURCE_NAME + "@"))


def pinned_hash(pretrained: str) -> str | None:
    """The content hash a pinned `synthfg-in@<hash>` asks for; None for the bare name. Raises on a malformed pin."""
    if pretrained == SOURCE_NAME:
        return None
    digest = pretrained.removeprefix(SOURCE_NAME + "@")
    if len(digest) != HASH_CHARS or any(c not in "0123456789abcdef" for c in digest):
        raise PretrainedError(f"backbone.pretrained: '{pretrained}' is not {SOURCE_NAME} nor {SOURCE_NAME}@<the "
                              f"{HASH_CHARS} hex digits of a build's content hash>; write {SOURCE_NAME}")
    return digest


def cache_root() -> Path:
    from harness.data import cache_dir

    return cache_dir() / "pretrained"


def entry_path(name: str, kwargs: dict, recipe: SourceRecipe | None = None) -> Path:
    """The cache entry of one backbone (timm name and kwargs) under one recipe (default: RECIPE)."""
    recipe = recipe or RECIPE
    blob = json.dumps({"name": name, "kwargs": kwargs, "recipe": dataclasses.asdict(recipe)}, sort_keys=True,
                      default=str)
    return cache_root() / f"{SOURCE_NAME}-{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def content_hash(state: dict[str, torch.Tensor]) -> str:
    """A hash of the weights themselves (names, dtypes, shapes, bytes), not of the file that holds them."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:HASH_CHARS]


def verify(path: Path) -> str | None:
    """None when the entry is whole; harness.data.ABSENT when there is none; else what is wrong with it (the
    dataset cache's check: each file's size and CRC-32 against meta.json)."""
    from harness.data import ABSENT, _crc32

    if not path.exists():
        return ABSENT
    try:
        meta = json.loads((path / "meta.json").read_text())
        expected = meta["files"]["weights.pth"]
        size = (path / "weights.pth").stat().st_size
        meta["content_hash"]
    except FileNotFoundError as e:
        return f"{Path(e.filename).name if e.filename else 'a file'} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable or incomplete ({type(e).__name__})"
    if size != expected.get("bytes"):
        return f"weights.pth has {size:,} bytes, meta.json says {expected.get('bytes')}"
    if _crc32(path / "weights.pth") != expected.get("crc32"):
        return "weights.pth does not match its checksum in meta.json"
    return None


def ensure_source_weights(name: str, kwargs: dict | None = None, recipe: SourceRecipe | None = None,
                          log=None) -> tuple[Path, str]:
    """(weights file, content hash) of synthfg-in for this backbone: read from this machine's cache, or built
    into it first (under a file lock; a broken entry is rebuilt)."""
    from harness.data import _discard

    kwargs, recipe = dict(kwargs or {}), recipe or RECIPE
    path = entry_path(name, kwargs, recipe)
    if verify(path) is None:
        return path / "weights.pth", json.loads((path / "meta.json").read_text())["content_hash"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process ends, whatever happens to it
        problem = verify(path)  # another process may have built it while we waited
        if problem is not None:
            from harness.data import ABSENT

            if problem != ABSENT:
                print(f"pretrained cache entry {path} is broken: {problem}; rebuilding it", file=sys.stderr)
                _discard(path)
            _write(build(name, kwargs, recipe, log or _say), path, name, kwargs, recipe)
    return path / "weights.pth", json.loads((path / "meta.json").read_text())["content_hash"]


def resolve_pin(name: str, kwargs: dict, pretrained: str) -> str:
    """`synthfg-in` -> `synthfg-in@<hash>` of this machine's build (built now if absent); a pin is kept as it is."""
    if pinned_hash(pretrained) is not None:
        return pretrained
    return f"{SOURCE_NAME}@{ensure_source_weights(name, kwargs)[1]}"


def weights_file(name: str, kwargs: dict, pretrained: str) -> Path:
    """The file a backbone loads for `synthfg-in` or `synthfg-in@<hash>`; raises PretrainedError when this
    machine's build has another hash than the pin."""
    path, digest = ensure_source_weights(name, kwargs)
    wanted = pinned_hash(pretrained)
    if wanted is not None and wanted != digest:
        raise PretrainedError(
            f"backbone.pretrained: {pretrained} asks for the {SOURCE_NAME} build with content hash {wanted}, but "
            f"this machine's build of {name} {kwargs} ({path}) has {digest} (another torch or other CPU kernels "
            f"build other weights): copy the folder {path.parent.name} from the machine that resolved the study "
            f"into {cache_root()} here, or resolve the study on this machine (its trials then get new identities)")
    return path


def cached_file(name: str, pretrained: str) -> Path | None:
    """The weights file of this machine's cached build of `name` with the pin's hash (any kwargs), or None."""
    wanted = pinned_hash(pretrained)
    for meta_file in sorted(cache_root().glob(f"{SOURCE_NAME}-{name}-*/meta.json")):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if meta.get("backbone") == name and wanted in (None, meta.get("content_hash")) and \
                verify(meta_file.parent) is None:
            return meta_file.parent / "weights.pth"
    return None


def _say(message: str) -> None:
    print(f"{SOURCE_NAME}: {message}", file=sys.stderr, flush=True)


def _write(state: dict[str, torch.Tensor], path: Path, name: str, kwargs: dict, recipe: SourceRecipe) -> None:
    from harness.core.atomic import atomic_write
    from harness.data import _crc32

    def write(tmp: Path) -> None:
        torch.save(state, tmp / "weights.pth")
        meta = {"source": SOURCE_NAME, "backbone": name, "kwargs": kwargs, "recipe": dataclasses.asdict(recipe),
                "content_hash": content_hash(state), "torch": torch.__version__,
                "files": {"weights.pth": {"bytes": (tmp / "weights.pth").stat().st_size,
                                          "crc32": _crc32(tmp / "weights.pth")}}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))

    atomic_write(path, write, directory=True)


def build(name: str, kwargs: dict, recipe: SourceRecipe = RECIPE, log=_say) -> dict[str, torch.Tensor]:
    """Train the timm classifier `name` (with `kwargs`) on the source domain by the recipe; its state dict with
    the classifier put back at timm's init for the default head (so `pretrained_cfg_overlay` loads it like hub
    weights). Leaves the caller's RNG and thread count as they were."""
    import timm

    from harness.data.imageset import BatchPipeline
    from harness.data.synthfg import generate

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    log(f"building the pretrained backbone {name} {kwargs} once for this machine (recipe {recipe.version}: "
        f"{recipe.classes} source classes x {recipe.train_per_class} images, {recipe.epochs} epochs, fp32, "
        f"{recipe.threads} thread) into {cache_root()}")
    try:
        with torch.random.fork_rng(devices=[]):
            source = generate(recipe.source_params(), recipe.stored)  # rendering: elementwise, any thread count
            torch.set_num_threads(recipe.threads)
            torch.manual_seed(recipe.seed)
            model = timm.create_model(name, pretrained=False, num_classes=recipe.classes, **kwargs)
            head = set(model.get_classifier().state_dict())
            accuracy = _train(model, source, recipe, BatchPipeline, log)
            full = timm.create_model(name, pretrained=False, **kwargs).state_dict()  # timm's default head, at init
    finally:
        torch.set_num_threads(threads)
    classifier = model.default_cfg.get("classifier", "fc")
    trained = {k: v for k, v in model.state_dict().items()
               if not (k.startswith(classifier + ".") and k.removeprefix(classifier + ".") in head)}
    full.update(trained)
    log(f"built in {time.perf_counter() - t0:.0f} s; top-1 {100 * accuracy:.0f}% on {recipe.classes} source "
        f"classes' held-out images (chance {100 / recipe.classes:.0f}%), content hash {content_hash(full)}")
    return full


def _train(model: torch.nn.Module, source, recipe: SourceRecipe, pipeline_cls, log) -> float:
    """SGD with momentum, cosine over every step, random crops and flips; the held-out top-1 after the last epoch."""
    train = pipeline_cls(source.train, recipe.crop, recipe.batch_size, train=True)
    test = pipeline_cls(source.test, recipe.crop, recipe.batch_size, train=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    steps = recipe.epochs * len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + torch.cos(torch.tensor(
        torch.pi * s / steps))).item())
    g = torch.Generator().manual_seed(recipe.seed)
    for epoch in range(recipe.epochs):
        model.train()
        total, started = 0.0, time.perf_counter()
        for images, labels in train.batches(g):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        log(f"epoch {epoch + 1}/{recipe.epochs}: loss {total / len(train):.2f} "
            f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in test.batches())
    return right / len(source.test)
