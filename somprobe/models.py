"""Building timm models, loading weights, the normalising wrapper, layer probes and model splits.

Pixels enter every model in [0, 1]; the mean/std normalisation lives inside
:class:`NormalizedModel`, so attacks and paths work in pixel space.

Layer names (probes):

* ``CL1``–``CL4``: the last four stage outputs of a conv net (timm ``feature_info`` /
  ``forward_intermediates``): ResNet stages, DenseNet dense blocks, VGG pooling stages, ...
* ``CLS1``–``CLSn``: the CLS token after each transformer block of a ViT/DeiT-style model.
* ``TOK1``–``TOKn``: the pooled token after each block of a timm ViT (mean over the patch tokens,
  CLS and register tokens left out: the ``avg`` pooling of ``*_gap_*`` ViTs), so ViTs without a
  CLS token have a per-block probe too; their ``all`` is ``CL1``–``CL4``, the patch-token grids
  [B, D, H/p, W/p] after the last four blocks.
* ``module:<dotted.name>``: the output of any sub-module of the timm net (forward hook).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .device import resolve_device
from .errors import ModelError

__all__ = [
    "resolve_device", "build_model", "NormalizedModel", "probe_names", "token_probe_names", "parse_layers",
    "ProbedModel", "split_model", "affine_tail", "load_state_dict", "file_sha256",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
N_CONV_PROBES = 4




def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class NormalizedModel(nn.Module):
    """A timm classifier that takes pixels in [0, 1] and normalises them itself.

    Parameters
    ----------
    net : nn.Module
        The timm model (``.net``).
    mean, std : sequence of 3 floats
        Per-channel normalisation, kept as buffers so they follow ``.to(device)``.
    name : str
        The timm model name.
    image_size : int or None
        The input side length the model expects (metadata; ViTs accept other sizes too).
    num_classes : int
    checkpoint : str or None, checkpoint_sha256 : str or None
        Where the weights came from (recorded in code-store manifests).
    """

    def __init__(self, net: nn.Module, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, name: str = "",
                 image_size: int | None = None, num_classes: int | None = None,
                 checkpoint: str | None = None, checkpoint_sha256: str | None = None,
                 pretrained: bool = False):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.name = name
        self.image_size = image_size
        self.num_classes = num_classes
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256
        self.pretrained = pretrained

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map pixels in [0, 1] to the network's input scale."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, image_size={self.image_size}, num_classes={self.num_classes}"


# --------------------------------------------------------------------------- building
def _close_names(name: str, n: int = 10) -> list[str]:
    import timm

    parts = [p for p in re.split(r"[_\-.\d]+", name) if len(p) >= 3] or [name]
    found: list[str] = []
    for part in parts:
        found.extend(timm.list_models(f"*{part}*"))
    if not found:
        found = difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.5)
    ranked = sorted(set(found), key=lambda m: -difflib.SequenceMatcher(None, name, m).ratio())
    return ranked[:n]


def _read_meta(checkpoint: Path) -> dict:
    meta_path = checkpoint.with_name("meta.json")
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {meta_path}: {e}; fix or delete it (somprobe train writes it)") from e


def load_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict saved by ``somprobe train``, timm or torchvision.

    Accepts a plain state dict, one nested under ``"state_dict"``/``"model"``/``"net"``, and keys
    prefixed ``net.`` (saved from :class:`NormalizedModel`) or ``module.`` (DataParallel).
    Normalisation buffers of a saved wrapper (``mean``/``std``) are dropped.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found: give an existing file to --checkpoint "
                         "(somprobe train writes runs/<name>/model/checkpoint.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/foreign files
        raise ModelError(f"cannot read checkpoint {path}: {e}; pass a torch state dict file") from e
    for key in ("state_dict", "model", "net", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} holds no state dict of tensors; pass the file written by "
                         "somprobe train or a timm/torchvision state dict")
    sd = dict(obj)
    for prefix in ("module.", "net."):
        if sd and all(k.startswith(prefix) or k in ("mean", "std") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _classifier_classes(sd: dict, net: nn.Module) -> int | None:
    clf = getattr(net, "pretrained_cfg", {}).get("classifier")
    names = [clf] if isinstance(clf, str) else list(clf or [])
    for n in names:
        w = sd.get(f"{n}.weight")
        if w is not None:
            return int(w.shape[0])
    return None


def build_model(name: str, *, num_classes: int | None = None, checkpoint: str | os.PathLike | None = None,
                pretrained: bool = False, in_chans: int = 3, image_size: int | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                device: str | torch.device = "cpu", seed: int = 0) -> NormalizedModel:
    """Create a timm classifier wrapped in :class:`NormalizedModel`, in eval mode.

    Parameters
    ----------
    name : str
        Any timm model name (``resnet18``, ``vit_base_patch16_224``, ``test_resnet``, ...).
    num_classes : int, optional
        Classifier width; default: the checkpoint's ``meta.json``, else the checkpoint's
        classifier weight, else timm's default (1000).
    checkpoint : path, optional
        Weights: what ``somprobe train`` saves (with ``meta.json`` beside it giving mean, std,
        num_classes and image_size) or a timm/torchvision state dict.
    pretrained : bool
        Fetch timm's hub weights (needs the network; offline, use ``checkpoint``).
    in_chans : int
    image_size : int, optional
        Input side length; default: ``meta.json``, else timm's ``input_size``.
    mean, std : sequence of float, optional
        Normalisation; default: ``meta.json``, else the model's pretrained config.
    device : str or torch.device
    seed : int
        Seed of timm's initialisation. Weights from a checkpoint or the hub replace it; without
        them (an untrained network) the same seed gives the same weights in every command.
        Recorded as ``model.init_seed`` (None when weights were loaded).

    Returns
    -------
    NormalizedModel

    Raises
    ------
    ModelError
        Unknown model name (close matches listed), unreadable or mismatched checkpoint, or
        hub weights that cannot be fetched.
    """
    import timm

    if checkpoint is not None and pretrained:
        raise ModelError("both --pretrained and --checkpoint given: choose one source of weights")
    if not timm.is_model(name):
        close = _close_names(name)
        hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models()"
        raise ModelError(f"unknown timm model {name!r}; {hint}")

    meta: dict = {}
    sd = None
    ckpt_path = None
    if checkpoint is not None:
        ckpt_path = Path(checkpoint)
        sd = load_state_dict(ckpt_path)
        meta = _read_meta(ckpt_path)
        if meta.get("model") and meta["model"] != name:
            raise ModelError(f"checkpoint {ckpt_path} was trained as {meta['model']!r}, not {name!r}: "
                             f"use --model {meta['model']}")
    if num_classes is None:
        num_classes = meta.get("num_classes")
        if num_classes is None and meta.get("classes"):
            num_classes = len(meta["classes"])
    kwargs: dict = {"in_chans": in_chans}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if _takes_dynamic_size(name):
        # lets a ViT or Swin take inputs other than its 224 default (e.g. digits at 32 px)
        kwargs["dynamic_img_size"] = True
    try:
        # timm initialises from torch's global generator: seed a forked copy so random weights
        # (untrained-network studies) are the same in every command, and the caller's state is
        # left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            try:
                net = timm.create_model(name, pretrained=pretrained, **kwargs)
            except TypeError:
                if "dynamic_img_size" not in kwargs:
                    raise
                kwargs.pop("dynamic_img_size")
                net = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        if pretrained:
            raise ModelError(f"cannot fetch pretrained weights for {name!r} from the timm hub ({e}); "
                             "without network access, train weights with `somprobe train` and pass "
                             "--checkpoint PATH instead") from e
        raise ModelError(f"cannot create timm model {name!r}: {e}") from e

    if sd is not None:
        if num_classes is None:
            n_sd = _classifier_classes(sd, net)
            if n_sd is not None and n_sd != net.num_classes:
                net = timm.create_model(name, num_classes=n_sd, **{k: v for k, v in kwargs.items() if k != "num_classes"})
                num_classes = n_sd
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ModelError(f"checkpoint {ckpt_path} does not fit {name!r} "
                             f"(num_classes={net.num_classes}): {str(e)[:600]}; check --model and "
                             "--num-classes match the checkpoint") from e

    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = tuple(mean if mean is not None else meta.get("mean", cfg.get("mean", IMAGENET_MEAN)))
    std = tuple(std if std is not None else meta.get("std", cfg.get("std", IMAGENET_STD)))
    if len(mean) != in_chans or len(std) != in_chans:
        raise ModelError(f"mean/std need {in_chans} values, got {len(mean)}/{len(std)}")
    if image_size is None:
        image_size = meta.get("image_size") or cfg.get("input_size", (3, 224, 224))[-1]
    model = NormalizedModel(
        net, mean=mean, std=std, name=name, image_size=int(image_size),
        num_classes=int(net.num_classes), pretrained=pretrained,
        checkpoint=str(ckpt_path) if ckpt_path else None,
        checkpoint_sha256=file_sha256(ckpt_path) if ckpt_path else None,
    )
    model.init_seed = int(seed) if sd is None and not pretrained else None
    return model.to(resolve_device(device)).eval()


def check_input_size(model: nn.Module, image_size: int) -> None:
    """Run one blank image of ``image_size`` px through ``model``; a size the network cannot take
    (e.g. 16 px through a ConvNeXt, whose stride-32 stages run out of pixels) becomes a
    :class:`ModelError` that names the size and the fix, instead of a convolution error mid-job.
    """
    p = next(model.parameters(), None)
    x = torch.zeros(1, 3, int(image_size), int(image_size),
                    device=p.device if p is not None else "cpu", dtype=p.dtype if p is not None else None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except (RuntimeError, AssertionError, ValueError, IndexError) as e:
        # timm asserts a fixed input size in some families (AssertionError), convolutions run out
        # of pixels (RuntimeError): either way the size is the user's to change
        name = getattr(model, "name", type(model).__name__)
        cfg = getattr(_net(model), "pretrained_cfg", None) or {}
        native = (cfg.get("input_size") or (None,))[-1]
        fix = "pass a larger --image-size (32 or more for most timm conv nets)"
        if native and int(native) != int(image_size):
            # fixed-size families (BEiT, LeViT, Mixer ...) take only the size they were made for
            fix = (f"pass another --image-size: {int(native)}, the size {name} was made for, always "
                   "works; many nets take others too (conv nets 32 px or more, ViTs multiples of "
                   "the patch size)")
        raise ModelError(f"{name} cannot take {image_size}×{image_size} px inputs "
                         f"({str(e)[:200] or type(e).__name__}); {fix}") from e
    finally:
        model.train(was_training)


def _takes_dynamic_size(name: str) -> bool:
    """Whether ``name``'s timm model class takes ``dynamic_img_size`` (ViT, DeiT, EVA, Swin ...).

    Those classes otherwise assert the exact input size they were built for (Swin at 64 px), so
    build_model turns the option on for them; read from the class signature, not a name list,
    so new timm families are covered.
    """
    import importlib
    import inspect

    import timm.models
    from timm.models._registry import _model_to_module

    mod_name = _model_to_module.get(timm.models.get_arch_name(name), "")
    try:
        mod = importlib.import_module(f"timm.models.{mod_name}")
    except ImportError:
        return False
    for obj in vars(mod).values():
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == mod.__name__:
            try:
                if "dynamic_img_size" in inspect.signature(obj.__init__).parameters:
                    return True
            except (TypeError, ValueError):
                continue
    return False


# --------------------------------------------------------------------------- probes
def _net(model: nn.Module) -> nn.Module:
    return model.net if isinstance(model, NormalizedModel) else model


def _has_cls(net: nn.Module) -> bool:
    return getattr(net, "cls_token", None) is not None and getattr(net, "num_prefix_tokens", 0) >= 1 \
        and hasattr(net, "blocks")


def _n_conv_stages(net: nn.Module) -> int:
    info = getattr(net, "feature_info", None)
    if not info or not hasattr(net, "forward_intermediates"):
        return 0
    return min(N_CONV_PROBES, len(info))


def _token_vit(net: nn.Module) -> bool:
    return all(hasattr(net, a) for a in ("blocks", "patch_embed", "num_prefix_tokens",
                                         "forward_intermediates", "forward_head"))


def token_probe_names(model: nn.Module) -> list[str]:
    """``TOK1..TOKn`` (pooled token after each block) for timm ViTs, with or without a CLS token;
    empty for other nets. Valid in ``parse_layers``, not part of ``all``.

    The activation is computed by :meth:`ProbedModel._token_forward`: the mean of the patch
    tokens after block k (prefix tokens excluded), shape [B, D].
    """
    net = _net(model)
    return [f"TOK{i + 1}" for i in range(len(net.blocks))] if _token_vit(net) else []


def probe_names(model: nn.Module) -> list[str]:
    """Named probes of a model: ``CL1..CL4`` for conv nets, ``CLS1..CLSn`` for ViTs with a CLS token.

    ``module:<name>`` probes are valid too for every named sub-module of ``model.net``.
    """
    net = _net(model)
    if _has_cls(net):
        return [f"CLS{i + 1}" for i in range(len(net.blocks))]
    return [f"CL{i + 1}" for i in range(_n_conv_stages(net))]


def _module_names(net: nn.Module) -> list[str]:
    return [n for n, _ in net.named_modules() if n]


def parse_layers(spec: str | Sequence[str], model: nn.Module) -> list[str]:
    """Expand and validate a layer list such as ``"CL1-CL4,module:layer1.0"``.

    Parameters
    ----------
    spec : str or sequence of str
        Comma-separated names; ``CL1-CL3`` / ``CLS2-CLS5`` / ``TOK1-TOK4`` are ranges. ``"all"``
        means every named probe of the model (:func:`probe_names`; ``TOK`` probes only by name).
    model : nn.Module
        A :class:`NormalizedModel` (or a bare timm net).

    Returns
    -------
    list of str
        Layer names in the given order, duplicates removed.

    Raises
    ------
    ModelError
        An unknown name; the message lists the valid ones.
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    if not items:
        raise ModelError("no layers given: pass e.g. --layers CL1-CL4")
    net = _net(model)
    named = probe_names(model)
    valid = named + token_probe_names(model)
    modules = None
    out: list[str] = []
    for item in items:
        if item.lower() == "all":
            names = named
        elif item.startswith("module:"):
            if modules is None:
                modules = set(_module_names(net))
            if item[len("module:"):] not in modules:
                close = difflib.get_close_matches(item[len("module:"):], sorted(modules), n=8, cutoff=0.4)
                raise ModelError(f"unknown module {item!r} in {getattr(model, 'name', '') or type(net).__name__}; "
                                 f"close module names: {', '.join('module:' + c for c in close) or '(none)'}; "
                                 "list all with [n for n, _ in model.net.named_modules()]")
            names = [item]
        else:
            m = re.fullmatch(r"([A-Za-z]+)(\d+)-([A-Za-z]+)?(\d+)", item)
            if m and (m.group(3) is None or m.group(3).upper() == m.group(1).upper()):
                prefix, a, b = m.group(1).upper(), int(m.group(2)), int(m.group(4))
                if a > b:
                    raise ModelError(f"empty layer range {item!r}: write the lower index first, e.g. {prefix}{b}-{prefix}{a}")
                names = [f"{prefix}{i}" for i in range(a, b + 1)]
            else:
                names = [item.upper() if re.fullmatch(r"(?i)(cls?|tok)\d+", item) else item]
            bad = [n for n in names if n not in valid]
            if bad:
                raise ModelError(f"unknown layer {bad[0]!r} for {getattr(model, 'name', '') or type(net).__name__}; "
                                 f"valid layers: {', '.join(valid) or '(no named probes)'}, or module:<name>")
        out.extend(n for n in names if n not in out)
    return out


class ProbedModel(nn.Module):
    """One forward pass that returns the logits and the activations of all requested layers.

    ``CL``/``CLS`` probes come from timm's ``forward_intermediates`` followed by ``forward_head``
    (equal to ``model(x)``); ``module:`` probes from forward hooks. With only ``module:`` probes
    the model runs its plain forward.

    Parameters
    ----------
    model : NormalizedModel
    layers : str or sequence of str
        Layer names (see :func:`parse_layers`).

    Returns (forward)
    -----------------
    logits : Tensor [B, num_classes]
    acts : dict[str, Tensor]
        ``CL``: feature map [B, C, H, W]; ``CLS``/``TOK``: token [B, D]; ``module:``: the module's output
        (first element if it returns a tuple).
    """

    def __init__(self, model: NormalizedModel, layers: str | Sequence[str]):
        super().__init__()
        self.model = model
        self.layers = parse_layers(layers, model)
        net = _net(model)
        self._named = [l for l in self.layers if not l.startswith("module:")]
        self._modules_wanted = [l for l in self.layers if l.startswith("module:")]
        self._is_vit = _has_cls(net)
        self._tokens = any(l.startswith("TOK") for l in self._named)
        self._n_stages = _n_conv_stages(net)

    def _normalize(self, x):
        return self.model.normalize(x) if isinstance(self.model, NormalizedModel) else x

    def forward(self, x: torch.Tensor):
        net = _net(self.model)
        acts: dict[str, torch.Tensor] = {}
        handles = []
        for layer in self._modules_wanted:
            mod = net.get_submodule(layer[len("module:"):])

            def hook(_m, _i, out, layer=layer):
                acts[layer] = out[0] if isinstance(out, (tuple, list)) else out
            handles.append(mod.register_forward_hook(hook))
        try:
            z = self._normalize(x)
            if not self._named:
                logits = net(z)
            elif self._tokens:
                logits = self._token_forward(net, z, acts)
            elif self._is_vit:
                idx = sorted({int(l[3:]) - 1 for l in self._named})
                final, inter = net.forward_intermediates(z, indices=idx, return_prefix_tokens=True, norm=False)
                for i, (_spatial, prefix) in zip(idx, inter):
                    acts[f"CLS{i + 1}"] = prefix[:, 0]
                logits = net.forward_head(final)
            else:
                final, inter = net.forward_intermediates(z, indices=self._n_stages)
                for i, t in enumerate(inter):
                    name = f"CL{i + 1}"
                    if name in self._named:
                        acts[name] = t
                logits = net.forward_head(final)
        finally:
            for h in handles:
                h.remove()
        return logits, {l: acts[l] for l in self.layers}

    def _token_forward(self, net: nn.Module, z: torch.Tensor, acts: dict) -> torch.Tensor:
        """One pass of a ViT for TOK probes (with any CLS/CL ones): every needed block's tokens.

        ``TOKk`` = mean of the patch tokens after block k; ``CLSk`` = its CLS token; ``CLi`` =
        the patch grid of the i-th of the last ``N_CONV_PROBES`` blocks (as the plain CL path).
        """
        depth = len(net.blocks)
        block = {}
        for l in self._named:
            if l.startswith(("TOK", "CLS")):
                block[l] = int(l[3:]) - 1
            else:
                block[l] = depth - self._n_stages + int(l[2:]) - 1
        idx = sorted(set(block.values()))
        prefix = int(net.num_prefix_tokens) > 0
        # without prefix tokens timm returns plain grids, not (grid, prefix) pairs
        final, inter = net.forward_intermediates(z, indices=idx, return_prefix_tokens=prefix, norm=False)
        out = dict(zip(idx, inter if prefix else [(t, None) for t in inter]))
        for l, b in block.items():
            grid, pre = out[b]
            acts[l] = (grid.mean(dim=(2, 3)) if l.startswith("TOK")
                       else pre[:, 0] if l.startswith("CLS") else grid)
        return net.forward_head(final)


# --------------------------------------------------------------------------- splitting
class _ResNetHead(nn.Module):
    def __init__(self, model: NormalizedModel, stages: int):
        super().__init__()
        self.model = model
        self.stages = stages

    def forward(self, x):
        net = self.model.net
        x = self.model.normalize(x)
        x = net.maxpool(net.act1(net.bn1(net.conv1(x))))
        for i in range(1, self.stages + 1):
            x = getattr(net, f"layer{i}")(x)
        return x


class _ResNetTail(nn.Module):
    def __init__(self, model: NormalizedModel, stages: int):
        super().__init__()
        self.model = model
        self.stages = stages

    def forward(self, h):
        net = self.model.net
        for i in range(self.stages + 1, 5):
            h = getattr(net, f"layer{i}")(h)
        return net.forward_head(h)


class _ViTHead(nn.Module):
    def __init__(self, model: NormalizedModel, blocks: int):
        super().__init__()
        self.model = model
        self.blocks = blocks

    def forward(self, x):
        net = self.model.net
        x = net.patch_embed(self.model.normalize(x))
        x = net._pos_embed(x)
        x = net.patch_drop(x)
        x = net.norm_pre(x)
        for blk in net.blocks[: self.blocks]:
            x = blk(x)
        return x


class _ViTTail(nn.Module):
    def __init__(self, model: NormalizedModel, blocks: int):
        super().__init__()
        self.model = model
        self.blocks = blocks

    def forward(self, h):
        net = self.model.net
        for blk in net.blocks[self.blocks:]:
            h = blk(h)
        return net.forward_head(net.norm(h))


class _Stop(Exception):
    """Carries a module's output out of the forward pass (ends the head early)."""

    def __init__(self, value):
        super().__init__()
        self.value = value


class _HookHead(nn.Module):
    """Pixels → the output of ``model.net.<module>``; the forward stops right after that module."""

    def __init__(self, model: NormalizedModel, module: str):
        super().__init__()
        self.model = model
        self.module = module

    def forward(self, x):
        def hook(_m, _i, out):
            raise _Stop(out[0] if isinstance(out, (tuple, list)) else out)

        handle = self.model.net.get_submodule(self.module).register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop as stop:
            return stop.value
        finally:
            handle.remove()
        raise ModelError(f"module {self.module!r} never ran in the forward pass: it cannot be split at")


class _HookTail(nn.Module):
    """Latent → logits by re-running the net with ``<module>``'s output replaced by ``z``.

    The part before the module runs on ONE placeholder image (batch 1) whatever the batch of
    ``z``, so its cost is a fixed batch-1 head pass per call (see ``split_model``). The
    placeholder is NaN, so if anything after the module read the placeholder's activations
    instead of ``z`` (a module inside a residual branch) the logits would be NaN; ``split_model``
    checks this once when it splits.
    """

    def __init__(self, model: NormalizedModel, module: str, image_size: int, fill: float = float("nan")):
        super().__init__()
        self.model = model
        self.module = module
        self.image_size = int(image_size)
        self.fill = fill

    def forward(self, z):
        def hook(_m, _i, out):
            return (z, *out[1:]) if isinstance(out, tuple) else z

        handle = self.model.net.get_submodule(self.module).register_forward_hook(hook)
        try:
            x = torch.full((1, 3, self.image_size, self.image_size), self.fill, device=z.device, dtype=z.dtype)
            return self.model.net(x)
        finally:
            handle.remove()


def _conv_stage_module(net: nn.Module, k: int) -> str:
    info = list(getattr(net, "feature_info", []))
    return info[len(info) - _n_conv_stages(net) + k - 1]["module"]


def _supported(model: NormalizedModel) -> str:
    probes = probe_names(model)
    named = f"{probes[0]}–{probes[-1]}" if len(probes) > 1 else (probes[0] if probes else "no named probes")
    toks = token_probe_names(model)
    if toks:
        named += f", {toks[0]}–{toks[-1]}"
    return (f"this model splits at {named} and at module:<name> where that module's output alone "
            "determines the logits (a whole stage or block, e.g. module:layer2 or module:blocks.3, "
            "not a layer inside a residual branch)")


def _check_split(model: NormalizedModel, head: nn.Module, tail: nn.Module, layer: str) -> None:
    p = next(model.parameters(), None)
    g = torch.Generator().manual_seed(0)
    size = int(model.image_size or 224)
    x = torch.rand(2, 3, size, size, generator=g).to(p.device if p is not None else "cpu")
    with torch.no_grad():
        want = model(x)
        try:
            got = tail(head(x))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ModelError(f"cannot split {model.name or type(model.net).__name__} at {layer!r} "
                             f"({str(e)[:200]}); {_supported(model)}") from e
    scale = float(want.abs().max()) + 1e-6
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * scale):
        raise ModelError(f"cannot split {model.name or type(model.net).__name__} at {layer!r}: the logits "
                         "depend on more than that layer's output (it is not a cut of the network); "
                         f"{_supported(model)}")


def affine_tail(tail: nn.Module) -> bool:
    """Whether a tail from :func:`split_model` is an affine map of its input (in eval mode).

    True for the tail after the last stage of a timm ResNet (ResNeXt, SE-ResNet, ... anything of
    the ``ResNet`` class) whose head is the stock one: average pooling (or none), flatten,
    dropout (identity in eval mode) and a linear layer. Then logits along a straight segment are
    exactly the interpolation of the logits of its ends, and the class regions of that latent
    are convex (intersections of half-spaces). Decided from the modules' types, never from
    numerical probes: a ReLU tail can look linear on any finite set of test points. Any other
    tail, a subclass that overrides a forward, or a net in training mode gives False.
    """
    if not isinstance(tail, _ResNetTail) or tail.stages != 4:
        return False
    try:
        from timm.layers import SelectAdaptivePool2d
        from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
        from timm.models.resnet import ResNet
    except ImportError:  # pragma: no cover - timm moved them: be conservative
        return False
    net = tail.model.net
    if net.training or type(net).forward_head is not ResNet.forward_head:
        return False
    pool, fc = getattr(net, "global_pool", None), getattr(net, "fc", None)
    return (type(pool) is SelectAdaptivePool2d
            and type(pool.pool) in (nn.AdaptiveAvgPool2d, FastAdaptiveAvgPool, nn.Identity)
            and type(pool.flatten) in (nn.Flatten, nn.Identity)
            and type(fc) in (nn.Linear, nn.Identity))


def split_model(model: NormalizedModel, layer: str, *, check: bool = True) -> tuple[nn.Module, nn.Module]:
    """Split a model at a layer into ``head`` (pixels → latent) and ``tail`` (latent → logits).

    ``tail(head(x))`` equals ``model(x)`` and gradients flow through ``tail`` to its input.

    * ``CL<k>`` of timm ResNets (``conv1``…``layer4``) and ``CLS<k>``/``TOK<k>`` of timm ViT/DeiT
      models (latent = the full token sequence after block k, [B, T, D], since the tail needs
      every token; its first token is the CLS probe, the mean of its patch tokens the TOK probe):
      clean splits, each part runs only its own layers.
    * ``CL<k>`` of every other conv net timm lists in ``feature_info`` (ResNeXt/ByobNet, ConvNeXt,
      RegNet, EfficientNet/MobileNet, DenseNet, VGG, ...; for a ViT without CLS token the latent
      is the token sequence of the block, not the patch grid the probe reshapes it to) and
      ``module:<name>``: a generic
      split by forward hooks on the probed module. The head runs the net and stops right after
      the module. The tail re-runs the net on a single placeholder image with the module's
      output replaced by ``z``: the part before the module is recomputed on every call, but at
      batch 1 whatever the batch of ``z``, so its cost is one batch-1 head pass per call
      (measured in ``benchmarks/decoders.py``, BENCHMARKS.md).

    Parameters
    ----------
    model : NormalizedModel
    layer : str
        ``CL<k>``, ``CLS<k>`` or ``module:<name>`` (see :func:`parse_layers`).
    check : bool
        Run two random images of ``model.image_size`` px through ``tail(head(x))`` once and
        compare with ``model(x)``; a layer whose output does not determine the logits (inside a
        residual branch) raises :class:`ModelError`. On by default for hook splits.

    Returns
    -------
    head, tail : nn.Module
        In eval mode; they share ``model``'s parameters.

    Raises
    ------
    ModelError
        An unknown layer, an architecture or module that cannot be split (the message names the
        layers that can).
    """
    if not isinstance(model, NormalizedModel):
        raise ModelError("split_model needs a NormalizedModel: build it with somprobe.models.build_model")
    (layer,) = parse_layers(layer, model)
    net = model.net
    if layer.startswith(("CLS", "TOK")):
        # the tail needs every token, so CLS<k> and TOK<k> share one split: all tokens after block k
        k = int(layer[3:])
        if not all(hasattr(net, a) for a in ("patch_embed", "_pos_embed", "norm_pre", "norm", "blocks")):
            raise ModelError(f"split_model supports {layer} only on timm VisionTransformer models, "
                             f"not {type(net).__name__}; {_supported(model)}")
        return _ViTHead(model, k).eval(), _ViTTail(model, k).eval()
    if layer.startswith("CL"):
        k = int(layer[2:])
        resnet_like = all(hasattr(net, a) for a in ("conv1", "bn1", "act1", "maxpool", "layer4"))
        stage_modules = [f.get("module") for f in getattr(net, "feature_info", [])][-4:]
        if resnet_like and stage_modules == ["layer1", "layer2", "layer3", "layer4"]:
            return _ResNetHead(model, k).eval(), _ResNetTail(model, k).eval()
        module = _conv_stage_module(net, k)
    elif layer.startswith("module:"):
        module = layer[len("module:"):]
    else:
        raise ModelError(f"split_model cannot split at {layer!r}; {_supported(model)}")
    head = _HookHead(model, module).eval()
    tail = _HookTail(model, module, image_size=model.image_size or 224).eval()
    if check:
        _check_split(model, head, tail, layer)
    return head, tail
