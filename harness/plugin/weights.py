"""Pretrained weights: named explicitly, and on the machine before any trial starts.

timm resolves an untagged name to its default tag (`resnet50` -> `resnet50.a1_in1k`, timm's own A1
recipe, not the torchvision weights the PMG authors used), so a study that asks for pretrained
weights must name them (`resnet50.tv_in1k`). `ensure_weights` finds the weights a backbone config
needs in the local caches, downloading them once if the machine is online (Hugging Face hub cache,
or torch's hub cache for URL weights); offline, it says which tag, where it looked and how to fix it,
before anything starts. On a cluster each node fills its own cache the first time a trial there
creates the backbone, and every later trial on that node reads it from there.
"""

from __future__ import annotations

from pathlib import Path


class WeightsError(ValueError):
    """Pretrained weights a study needs are not on this machine and cannot be fetched."""


def untagged_weights_error(name: str) -> str | None:
    """Why `pretrained: true` on `name` is ambiguous, or None when the name carries its weights' tag."""
    import timm.models

    arch, _, tag = name.partition(".")
    if tag:
        return None
    tags = [n.partition(".")[2] for n in timm.models.get_arch_pretrained_cfgs(arch)] if \
        timm.models.is_model(arch) else []
    if not tags:
        return None  # unknown or weightless: the backbone builder says what is wrong
    return (f"pretrained: true on the untagged name '{name}' would load timm's default weights '{arch}.{tags[0]}'; "
            f"name the weights in backbone.name, e.g. '{arch}.{tags[0]}' (tags of {arch}: {', '.join(tags)})")


def ensure_weights(name: str, pretrained: bool | str) -> str:
    """Where the weights of a backbone are on this machine (downloaded once into the hub cache when missing
    and online). Empty for random init. Raises WeightsError with the tag, where they were looked for, and the fix."""
    if pretrained is False:
        return ""
    from harness.plugin.pretrained import cached_file, is_named_source

    if is_named_source(pretrained):  # resolved, and so built, with the study (harness.plugin.pretrained)
        return str(cached_file(name, pretrained) or f"{pretrained} (built on first use)")
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise WeightsError(f"backbone.pretrained: no weights file at {path}")
        return str(path)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise WeightsError(f"backbone '{name}': timm has no pretrained weights for it; set backbone.pretrained: false "
                           "or a path to a weights file")
    fix = (f"fetch them on a connected machine (python -c \"import timm; timm.create_model('{name}', "
           f"pretrained=True)\") and copy its cache here, or set backbone.pretrained: /path/to/weights "
           f"(a state dict of timm '{name}')")
    if cfg.hf_hub_id:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        repo = cfg.hf_hub_id.split("@")[0]
        problems = []
        for filename in ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")):
            try:
                return hf_hub_download(repo, filename)
            except EntryNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 - offline, no cache entry, a hub error: all say the same
                problems.append(f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                break
        raise WeightsError(f"pretrained weights '{name}' (hub repo {repo}) are not in the Hugging Face cache "
                           f"{constants.HF_HUB_CACHE} and could not be downloaded ({'; '.join(problems)}): {fix}")
    if cfg.url:
        import torch.hub

        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if target.is_file():
            return str(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(cfg.url, str(target), progress=False)
            return str(target)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"pretrained weights '{name}' are not in torch's hub cache ({target}) and could not "
                               f"be downloaded from {cfg.url} ({type(e).__name__}): {fix}") from None
    raise WeightsError(f"pretrained weights '{name}': timm names no source for them: {fix}")
