"""Backbone weights: the timm / Hugging Face hub path and local files, with errors that say how to get them.

- ``model.pretrained: true`` goes through ``timm.create_model(pretrained=True)``, i.e. the HF hub and its cache
  (``HF_HOME``; ``HF_HUB_OFFLINE=1`` uses only the cache). Failure -> `WeightsError` naming the repo and the ways
  to get the weights.
- ``model.weights: PATH`` loads a local file: timm ``.safetensors`` or Meta's official DINOv3 / DINOv2 ``.pth``.
  Meta's key names are remapped by timm's own ``checkpoint_filter_fn`` (eva.py for DINOv3, vision_transformer.py
  for DINOv2), which also resamples position embeddings to the run's image size. ``.pth`` files are read with
  ``torch.load(weights_only=True)``: tensors only, never pickled code.
- A file that does not fit the backbone -> `WeightsError` naming the file and the registered backbone(s) it fits.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydefect import console
from raydefect.errors import WeightsError, first_line
from raydefect.models.registry import REGISTRY, BackboneSpec, resolve_backbone, timm_kwargs

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("model_ema", "teacher", "model", "state_dict", "module")
_PREFIXES = ("module.", "backbone.", "teacher.backbone.", "model.")


def how_to_get(spec: BackboneSpec) -> str:
    """The three ways out when pretrained weights are unavailable."""
    return (
        f"download them where there is internet with `huggingface-cli download {spec.hf_hub_id}` and copy the "
        "Hugging Face cache here (HF_HOME; HF_HUB_OFFLINE=1 then reads only the cache), or point to a local file "
        "with --set model.weights=PATH (timm .safetensors or Meta's official .pth), or train from scratch with "
        "--set model.pretrained=false"
    )


def create_pretrained(spec: BackboneSpec, kwargs: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model(pretrained=True)``: the real hub path, with user errors instead of hub tracebacks."""
    import timm

    if not spec.has_pretrained:
        raise WeightsError(
            f"model.backbone '{spec.name}' is random-init only and has no pretrained weights; "
            "set --set model.pretrained=false (or pick a DINOv3/DINOv2 backbone from `raydefect models`)"
        )
    try:
        return timm.create_model(f"{spec.timm_name}.{spec.pretrained_tag}", pretrained=True, **kwargs)
    except OSError as e:  # huggingface_hub's offline / not-found / HTTP / gated errors are all OSErrors
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = "HF_HUB_OFFLINE is set and they are not in the local cache" if offline else first_line(e, 400)
        raise WeightsError(
            f"cannot get pretrained weights for {spec.name} ({spec.hf_hub_id}): {where}. Fix: {how_to_get(spec)}"
        ) from e


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file -> flat ``{name: tensor}``; never unpickles code. Errors name the file and the fix."""
    import torch

    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"model.weights: file not found: {p} (fix the path, or drop model.weights)")
    if p.is_dir():
        raise WeightsError(f"model.weights: {p} is a folder; point to the weights file inside it")
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(
                f"model.weights: {p} is not a readable safetensors file ({first_line(e)}); re-download or re-export it"
            ) from e
    elif suffix in TORCH_SUFFIXES:
        try:
            data = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError (code objects) or a broken zip/pickle stream
            unsafe = "weights_only" in str(e) or "Unsupported global" in str(e)
            reason = "it holds pickled Python objects, not just tensors (refused)" if unsafe else first_line(e)
            raise WeightsError(
                f"model.weights: cannot read {p}: {reason}; use Meta's or timm's published "
                "checkpoint, or convert it to .safetensors"
            ) from e
    else:
        raise WeightsError(
            f"model.weights: {p} has an unknown extension '{p.suffix}'; expected .safetensors (timm) or .pth (Meta)"
        )
    return _unwrap(data, p)


def _unwrap(data: Any, path: Path) -> dict[str, torch.Tensor]:
    """Training checkpoints nest the weights ({'teacher': {'backbone.x': ...}}); find the flat tensor dict."""
    import torch

    for _ in range(4):
        if not isinstance(data, Mapping):
            break
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            break
        inner = next((data[k] for k in _WRAPPER_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, Mapping) or not data:
        raise WeightsError(f"model.weights: {path} holds no weights (expected a state dict of tensors)")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"model.weights: {path} holds no tensors (expected a state dict)")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _drop_meta_qkv_bias(state_dict: dict[str, torch.Tensor], model: nn.Module, path: Path | None) -> None:
    """Meta's DINOv3 stores a fused qkv bias with a key mask; timm's default DINOv3 variants have no qkv bias.

    timm's filter would print an exception per block; drop them here instead, and say so if they were not zero.
    """
    names = {n for n, _ in model.named_parameters()}
    if any(n.endswith(("q_bias", "q_proj.bias")) for n in names):
        return  # the model has a bias: timm's filter splits it
    dropped = [k for k in state_dict if k.endswith(("attn.qkv.bias", "attn.qkv.bias_mask"))]
    nonzero = sum(int(state_dict[k].abs().sum() > 0) for k in dropped if k.endswith("qkv.bias"))
    for k in dropped:
        del state_dict[k]
    if nonzero and path is not None:
        console.warn(
            f"{path.name}: {nonzero} blocks have a non-zero qkv bias that this timm variant has no slot for; "
            "it was dropped"
        )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Any supported key layout (timm, Meta DINOv3, Meta DINOv2) -> the model's own names, via timm's filter."""
    module = sys.modules[type(model).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    sd = dict(state_dict)  # timm's DINOv2 converter pops keys from its input
    out = filter_fn(sd, model) if filter_fn is not None else sd
    head = getattr(model, "head", None)
    if head is not None and not any(True for _ in head.parameters()):
        out = {k: v for k, v in out.items() if not k.startswith("head.")}  # classifier weights of another task
    return out


def _mismatches(converted: Mapping[str, torch.Tensor], model: nn.Module, skip: str | None = None) -> list[str]:
    """What keeps ``converted`` from loading strictly into ``model`` (keys under the ``skip`` prefix ignored)."""
    expected = model.state_dict()
    if skip:
        expected = {k: v for k, v in expected.items() if not k.startswith(skip + ".")}
        converted = {k: v for k, v in converted.items() if not k.startswith(skip + ".")}
    problems = []
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    shapes = [
        f"{k}: file {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    return problems


def identify_backbone(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered backbones a state dict fits exactly (checked on the meta device: nothing is allocated)."""
    import timm
    import torch

    proj = state_dict.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return []
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    depth = max(blocks) + 1 if blocks else 0
    fits = []
    for spec in REGISTRY.values():
        if spec.embed_dim != dim or spec.depth != depth or spec.patch_size != patch:
            continue
        with torch.device("meta"), fast_meta_init():
            candidate = timm.create_model(
                spec.timm_name, pretrained=False, **timm_kwargs(spec, spec.default_image_size)
            )
        try:
            sd = dict(state_dict)
            if "storage_tokens" in sd:
                _drop_meta_qkv_bias(sd, candidate, None)
            converted = convert_state_dict(sd, candidate)
        except Exception:  # the filter itself may fail on a foreign layout: it does not fit
            continue
        if not _mismatches(converted, candidate):
            fits.append(spec.name)
    return fits


def create_cnn_from_file(spec: BackboneSpec, kwargs: Mapping[str, Any], path: str | Path) -> nn.Module:
    """A CNN from a local timm checkpoint (e.g. ``resnet18.a1_in1k``'s model.safetensors): timm loads the state dict
    into the whole network (its own key filter, classifier included) before cutting the ``features_only`` wrapper."""
    import timm
    import torch

    p = Path(path).expanduser()
    sd = read_state_dict(p)
    with torch.device("meta"), fast_meta_init():  # the whole network, to check the file strictly (timm only warns)
        full = timm.create_model(spec.timm_name, pretrained=False, **dict(spec.timm_kwargs))
    try:
        problems = _mismatches(convert_state_dict(sd, full), full, skip=full.pretrained_cfg.get("classifier"))
    except Exception as e:  # a foreign layout can break timm's key filter
        problems = [f"conversion failed ({first_line(e)})"]
    if problems:
        raise WeightsError(
            f"model.weights: {p} does not fit backbone '{spec.name}' ({spec.timm_name}): {'; '.join(problems)}. "
            f"Use a timm checkpoint of {spec.timm_name} or pick the backbone it was made for with "
            "--set model.backbone=NAME"
        )
    try:
        return timm.create_model(
            spec.timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": sd}, **dict(kwargs)
        )
    except (RuntimeError, KeyError, ValueError) as e:  # load_state_dict's missing / unexpected / shape errors
        raise WeightsError(
            f"model.weights: {p} does not fit backbone '{spec.name}' ({spec.timm_name}): {first_line(e)}. "
            f"Use a timm checkpoint of {spec.timm_name} (e.g. {spec.hf_hub_id or spec.timm_name}) or pick the "
            "backbone it was made for with --set model.backbone=NAME"
        ) from e


def load_weights_file(model: nn.Module, path: str | Path, spec: BackboneSpec) -> None:
    """Load a local weights file into a freshly built backbone; strict, with errors naming the file and the fit."""
    p = Path(path).expanduser()
    raw = read_state_dict(p)
    sd = dict(raw)
    if "storage_tokens" in sd:  # Meta DINOv3 layout
        _drop_meta_qkv_bias(sd, model, p)
    try:
        converted = convert_state_dict(sd, model)
        problems = _mismatches(converted, model)
    except Exception as e:  # timm's resampling fails on incompatible shapes
        problems = [f"conversion failed ({first_line(e)})"]
    if problems:
        fits = identify_backbone(raw)
        fix = (
            f"it fits {' / '.join(fits)}: set --set model.backbone={fits[0]}"
            if fits
            else "it fits no registered backbone (supported: timm checkpoints and Meta's official DINOv3/DINOv2 .pth; "
            "Hugging Face transformers checkpoints are not)"
        )
        raise WeightsError(
            f"model.weights: {p} does not fit backbone '{spec.name}' ({spec.timm_name}): {'; '.join(problems)}. {fix}"
        )
    model.load_state_dict(converted, strict=True)
    console.debug(f"loaded {len(converted)} tensors from {p} into {spec.name}")


def check_weights_available(model_cfg: Any) -> None:
    """Cheap pre-flight on the driver, before workers start: the weights a `ModelConfig` asks for can be had.

    ``model.weights``: the file exists and has a known extension (whether it fits is checked when loading).
    ``model.pretrained``: the backbone has pretrained weights and they are in the local
    Hugging Face cache, else (online) the hub answers within seconds. Raises the same `WeightsError` the worker
    would, without reading tensors or downloading.
    """
    spec = resolve_backbone(model_cfg.backbone)
    if model_cfg.weights:
        p = Path(model_cfg.weights).expanduser()
        if not p.exists():
            raise WeightsError(f"model.weights: file not found: {p} (fix the path, or drop model.weights)")
        if p.is_dir():
            raise WeightsError(f"model.weights: {p} is a folder; point to the weights file inside it")
        if p.suffix.lower() not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
            raise WeightsError(
                f"model.weights: {p} has an unknown extension '{p.suffix}'; expected .safetensors (timm) or .pth (Meta)"
            )
        return
    if not model_cfg.pretrained:
        return
    if not spec.has_pretrained:
        raise WeightsError(
            f"model.backbone '{spec.name}' is random-init only and has no pretrained weights; "
            "set --set model.pretrained=false (or pick a DINOv3/DINOv2 backbone from `raydefect models`)"
        )
    from huggingface_hub import try_to_load_from_cache

    repo = spec.hf_hub_id
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in ("model.safetensors", "pytorch_model.bin")):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        where = "HF_HUB_OFFLINE is set and they are not in the local cache"
    else:
        unreachable = hub_unreachable()
        if unreachable is None:
            return  # the hub answers: it decides (a failure in the worker is reported with the same fix)
        where = f"they are not in the local cache and the Hugging Face hub cannot be reached ({unreachable})"
    raise WeightsError(f"cannot get pretrained weights for {spec.name} ({repo}): {where}. Fix: {how_to_get(spec)}")


#: Seconds the pre-flight waits for the Hugging Face hub to answer before calling it unreachable (the hub client
#: itself retries a dead network for minutes, inside every worker).
HUB_PROBE_TIMEOUT_S = 5.0


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``) cannot be reached from here, or None when it answers at all (any
    HTTP status: a gated or missing repo is the hub's to report). One request through the hub client's own session
    (its proxies and certificates), in a thread so a hung name lookup cannot hold the run past `timeout`."""
    import threading

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    box: dict[str, str | None] = {}

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            box["reason"] = None
        except Exception as e:  # the HTTP client's connect / DNS / TLS / timeout errors
            box["reason"] = first_line(e)

    thread = threading.Thread(target=probe, daemon=True, name="raydefect-hub-probe")
    thread.start()
    thread.join(timeout + 1.0)
    if "reason" not in box:
        return f"{constants.ENDPOINT}: no answer in {timeout:.0f} s"
    reason = box["reason"]
    return None if reason is None else f"{constants.ENDPOINT}: {reason}"


@contextlib.contextmanager
def fast_meta_init() -> Iterator[None]:
    """Build models on ``torch.device("meta")`` in milliseconds instead of ~0.5 s each.

    timm's truncated-normal init decomposes into slow reference ops on meta tensors, which hold no values anyway;
    it is skipped for them only, so anything building real models meanwhile is initialised as usual.
    """
    from timm.layers import weight_init

    original = weight_init._trunc_normal_

    def trunc_normal(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

    weight_init._trunc_normal_ = trunc_normal
    try:
        yield
    finally:
        weight_init._trunc_normal_ = original
