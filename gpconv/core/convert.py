"""Convert any PyTorch model: replace its 1x1 convolutions by grouped pointwise blocks.

``convert`` applies the papers' recipe (Mendel 2022; Entropy 2022, Section 3) to a model gpconv did
not build: every plain 1x1 ``nn.Conv2d`` (groups 1, no padding, no dilation, the same stride on both
axes) whose plan is worth grouping (``make_plan(...).grouped``: small layers stay dense, by the rule
the block itself uses) becomes a :class:`~gpconv.core.block.GroupedPointwiseConv2d` with the same input
and output channels, stride, bias, dtype and device; with ``linear=True`` every ``nn.Linear`` likewise
becomes a :class:`~gpconv.core.block.GroupedPointwiseLinear`. Everything else is left as it is, and every
1x1 convolution left dense is noted with the reason (``summarize`` lists them).
``summarize`` lists the grouped pointwise layers of a model with their parameters before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

from torch import nn
from torch.nn.utils import parametrize

from .block import GroupedPointwiseConv2d, GroupedPointwiseLinear, Grouping
from ..layers import ActivationSpec, check_activation
from .plan import make_plan
from .rewriting import (FIT_ERROR_ATTRIBUTE, GROUPED_BLOCKS, KEPT_ATTRIBUTE, KeptLayer, copy_model,  # noqa: F401
                        is_plain_linear, is_plain_pointwise)
from .summary import ConversionSummary, ReplacedLayer, summarize

# summarize, ConversionSummary, ReplacedLayer (gpconv/core/summary.py), KeptLayer, is_plain_pointwise and
# is_plain_linear (gpconv/core/rewriting.py): re-exported, their names here are public.
__all__ = ["convert", "summarize", "ConversionSummary", "ReplacedLayer", "KeptLayer", "is_plain_pointwise",
           "is_plain_linear", "conversion_record", "apply_conversion", "CONVERSION_RECORD_FORMAT"]

# Attribute of a converted model: its conversion record (:func:`conversion_record`).
RECORD_ATTRIBUTE = "_gpconv_conversion"
CONVERSION_RECORD_FORMAT = "gpconv-conversion/1"
EXCLUDED, TOO_SMALL = "excluded", "too small to group"
NOT_MAPPED, MAPPED_DENSE = "not in the per-layer mapping", "dense in the per-layer mapping"
# Parts of the reasons of layers kept dense because a block in their place would lose part of what they
# are (:func:`_identity_refusal`); they get a warning of their own.
IDENTITY_REASONS = ("lazy, not initialized", "parametrized", "computed by a hook", "state_dict hooks",
                    " has its own forward", " tied to ")
# The hooks a replacement takes over: it sees the same inputs and outputs (and gradients) as the layer.
MOVED_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
Owners = Dict[int, Dict[int, str]]  # id of a parameter -> {id of a module holding it: "module.parameter"}


def _parameter_owners(model: nn.Module) -> Owners:
    """Every parameter's holders, one name per distinct module: a parameter with two is tied."""
    owners: Owners = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, parameter in module._parameters.items():
            if parameter is not None:
                owners.setdefault(id(parameter), {}).setdefault(id(module), f"{module_name}.{name}".lstrip("."))
    return owners


def _identity_refusal(layer: nn.Module, owners: Owners) -> Optional[str]:
    """Why a grouped block in ``layer``'s place would lose part of what the layer is; None when nothing
    would: a parametrization, a weight or bias computed by a hook (old-style ``spectral_norm``,
    ``torch.nn.utils.prune``), state_dict hooks, a subclass with a forward of its own, or a parameter
    shared with another module (tied weights: the block would untie them and add parameters)."""
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        return "lazy, not initialized yet: run a batch through the model first"
    if parametrize.is_parametrized(layer):
        return f"parametrized {', '.join(layer.parametrizations)}"
    computed = [name for name in ("weight", "bias") if name not in layer._parameters and
                getattr(layer, name, None) is not None]
    if computed:
        return f"{' and '.join(computed)} computed by a hook"
    if (layer._state_dict_hooks or layer._state_dict_pre_hooks or layer._load_state_dict_pre_hooks
            or layer._load_state_dict_post_hooks):
        return "state_dict hooks"
    base = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    if any(getattr(type(layer), method, None) is not getattr(base, method, None) for method in ("forward", "_conv_forward")):
        return f"{type(layer).__name__} has its own forward"
    for name, parameter in layer._parameters.items():
        others = [holder for module, holder in owners.get(id(parameter), {}).items() if module != id(layer)]
        if others:
            return f"{name} tied to {', '.join(others)}"
    return None


def _take_over(layer: nn.Module, block: nn.Module) -> None:
    """``block`` in ``layer``'s place: its training flag, ``requires_grad`` (weights as the layer's
    weight, biases as its bias) and forward, pre-forward and backward hooks, in their order."""
    block.train(layer.training)
    for name, parameter in block.named_parameters():
        source = layer.bias if name.endswith("bias") and layer.bias is not None else layer.weight
        parameter.requires_grad_(source.requires_grad)
    for attribute in MOVED_HOOKS:
        getattr(block, attribute).update(getattr(layer, attribute))
    block._is_full_backward_hook = layer._is_full_backward_hook


PerLayer = Mapping[str, Optional[int]]


def _structural_reason(module: nn.Module) -> Optional[str]:
    """Why a 1x1 ``nn.Conv2d`` is not a plain pointwise convolution; None for plain ones and other modules."""
    if not isinstance(module, nn.Conv2d) or module.kernel_size != (1, 1) or is_plain_pointwise(module):
        return None
    if module.groups > 1:
        return f"groups={module.groups}"
    if module.dilation != (1, 1):
        return f"dilation={module.dilation}"
    if module.stride[0] != module.stride[1]:
        return f"stride={module.stride}"
    return f"padding={module.padding!r}"


def _patterns(exclude: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    if isinstance(exclude, str):
        return (exclude,)
    try:
        patterns = tuple(exclude)
    except TypeError:
        raise TypeError(f"exclude must be a pattern or a sequence of patterns, got {type(exclude).__name__}") from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"exclude patterns must be strings, got {pattern!r}")
    return patterns


def _excluded(name: str, patterns: Tuple[str, ...], matched: set) -> bool:
    """A module is excluded when its dotted name, or the name of one of its parents, matches."""
    parts = name.split(".")
    hit = False
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(".".join(parts[:end]), pattern) for end in range(1, len(parts) + 1)):
            matched.add(pattern)
            hit = True
    return hit


@dataclass(frozen=True)
class _Settings:
    channels_per_group: Optional[int]  # None with a per-layer mapping
    per_layer: Optional[Dict[str, Optional[int]]]
    version: int
    l_layer: bool
    activation: ActivationSpec
    patterns: Tuple[str, ...]
    linear: bool
    owners: Owners = field(default_factory=dict)


def convert(model: nn.Module, channels_per_group: Union[int, PerLayer] = 16, *, version: int = 2, l_layer: bool = True,
            activation: ActivationSpec = None, exclude: Union[str, Iterable[str]] = (),
            linear: bool = False) -> nn.Module:
    """Return a deep copy of ``model`` whose 1x1 convolutions are grouped pointwise blocks.

    The input model is not modified. Each plain 1x1 ``nn.Conv2d`` (see :func:`is_plain_pointwise`)
    whose plan is grouped becomes ``GroupedPointwiseConv2d(in, out, channels_per_group,
    version=version, l_layer=l_layer, activation=activation, batch_norm=False, bias=<conv had
    one>, stride=<conv's>)``: no batch norm and no activation inside the block by default, since the
    convolution had none (a batch norm or activation that followed it in ``model`` stays). The new
    blocks are freshly initialised (grouped weights cannot be derived from dense ones): convert,
    then train or fine-tune. Depthwise, grouped, spatial and existing grouped pointwise layers are
    untouched; a convolution shared by several parents stays shared.

    With ``linear=True`` every ``nn.Linear`` (see :func:`is_plain_linear`) whose plan is grouped
    becomes a :class:`GroupedPointwiseLinear` acting on the last dimension (the pointwise
    convolutions of ConvNeXt-style blocks, MLPs): exclude the classifier to keep it dense.

    Every 1x1 convolution left dense is noted with its reason (``groups=4``, ``dilation``,
    ``padding``, excluded, too small to group): ``print(gpconv.summarize(converted))`` lists them; the
    ones that are not plain pointwise convolutions also give one warning.

    Args:
        channels_per_group: the papers' ``Ch`` (Entropy 2022, Eq. 7), or a per-layer mapping
            ``{module name: Ch or None}`` (what :func:`gpconv.core.fit.choose_channels_per_group` returns):
            each named layer gets its own ``Ch`` (None keeps it dense), layers not named stay dense,
            and a name that is not a layer ``convert`` could group is a one-line ``ValueError``.
        version: 1 (Mendel 2022) or 2 (Entropy 2022). ``l_layer=False``: K only ("no L" rows).
        activation: None or an activation applied at the end of every path of each block.
        exclude: ``fnmatch`` patterns of module names (``"classifier.*"``, ``"layer4"``) to keep dense;
            a module is excluded if its name or a parent's name matches. A pattern matching no
            module gives a warning.
        linear: also replace ``nn.Linear`` layers (default False).

    A model without 1x1 convolutions comes back as an unchanged copy; ``summarize`` says so.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    settings = _settings(channels_per_group, version, l_layer, activation, exclude, linear)
    converted = copy_model(model, "convert")
    settings = dataclasses.replace(settings, owners=_parameter_owners(converted))
    matched: set = set()
    for name, _ in converted.named_modules():
        if name:
            _excluded(name, settings.patterns, matched)
    kept: List[KeptLayer] = []
    replacements: Dict[int, nn.Module] = {}
    _replace_children(converted, "", settings, replacements, kept)
    _check_mapping_names(settings, converted, kept)
    _warn(settings.patterns, matched, kept)
    object.__setattr__(converted, KEPT_ATTRIBUTE, tuple(kept))
    object.__setattr__(converted, RECORD_ATTRIBUTE, _record(converted, settings))
    return converted


def _check_mapping_names(settings: _Settings, converted: nn.Module, kept: List[KeptLayer]) -> None:
    """A per-layer mapping may only name layers convert could group (a typo would silently keep one dense)."""
    if settings.per_layer is None:
        return
    seen = {layer.name for layer in kept} | {name for name, module in converted.named_modules()
                                             if isinstance(module, GROUPED_BLOCKS)}
    unknown = sorted(set(settings.per_layer) - seen)
    if unknown:
        raise ValueError(f"channels_per_group mapping names {len(unknown)} layer(s) that are not 1x1 convolutions "
                         f"(or, with linear=True, linear layers) of the model: {', '.join(unknown[:5])}")


def _record(converted: nn.Module, settings: _Settings) -> dict:
    """The conversion record of a model ``convert`` just built (see :func:`conversion_record`)."""
    layers, inner = {}, set()
    for name, module in converted.named_modules():
        if isinstance(module, GROUPED_BLOCKS) and id(module) not in inner and name not in layers:
            layers[name] = module.plan.channels_per_group
            inner.update(id(m) for m in module.modules())
    activation = settings.activation if settings.activation is None or isinstance(settings.activation, str) else None
    return {"format": CONVERSION_RECORD_FORMAT, "channels_per_group": layers, "version": settings.version,
            "l_layer": settings.l_layer, "linear": settings.linear, "activation": activation}


def conversion_record(model: nn.Module) -> Optional[dict]:
    """What :func:`convert` did to ``model``, as plain JSON-ready data, or None for a model ``convert``
    did not build: ``{"format": "gpconv-conversion/1", "channels_per_group": {layer name: Ch, ...},
    "version", "l_layer", "linear", "activation"}`` (activation None when it was an ``nn.Module``).
    :func:`apply_conversion` re-applies it to a freshly built base model, which then accepts the
    converted model's ``state_dict``."""
    record = getattr(model, RECORD_ATTRIBUTE, None)
    return None if record is None else copy.deepcopy(record)


def apply_conversion(model: nn.Module, record: Mapping) -> nn.Module:
    """``convert`` ``model`` (a base model built as the converted one's was) as ``record`` says
    (:func:`conversion_record`). ``ValueError`` (one line) for a record of another format or one that
    names layers the model does not have."""
    if not isinstance(record, Mapping) or record.get("format") != CONVERSION_RECORD_FORMAT:
        found = record.get("format") if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(f"not a gpconv conversion record (format {found!r}, expected {CONVERSION_RECORD_FORMAT!r})")
    mapping = record.get("channels_per_group")
    if not isinstance(mapping, Mapping):
        raise ValueError("conversion record: channels_per_group must map layer names to channels per group")
    return convert(model, dict(mapping), version=record.get("version", 2), l_layer=record.get("l_layer", True),
                   activation=record.get("activation"), linear=record.get("linear", False))


def _settings(channels_per_group: Union[int, PerLayer], version: int, l_layer: bool, activation: ActivationSpec,
              exclude: Union[str, Iterable[str]], linear: bool) -> _Settings:
    """``convert``'s arguments checked (one-line errors) and gathered."""
    per_layer = None
    if isinstance(channels_per_group, Mapping):
        per_layer = dict(channels_per_group)
        for name, value in per_layer.items():
            if not isinstance(name, str):
                raise TypeError(f"channels_per_group mapping keys must be layer names, got {name!r}")
            if value is not None:
                Grouping(value, version, l_layer)
        channels_per_group = None
        Grouping(None, version, l_layer)
    else:
        Grouping(channels_per_group, version, l_layer)  # one-line errors for bad grouping settings
    check_activation(activation)
    if not isinstance(linear, bool):
        raise TypeError(f"linear must be True or False, got {linear!r}")
    return _Settings(channels_per_group, per_layer, version, l_layer, activation, _patterns(exclude), linear)


def _layer_channels(name: str, settings: _Settings):
    """``(Ch, None)`` for the layer called ``name``, or ``(None, reason)`` when it stays dense by the mapping."""
    if settings.per_layer is None:
        return settings.channels_per_group, None
    if name not in settings.per_layer:
        return None, NOT_MAPPED
    value = settings.per_layer[name]
    return (value, None) if value is not None else (None, MAPPED_DENSE)


def _replace_children(parent: nn.Module, prefix: str, settings: _Settings, replacements: Dict[int, nn.Module],
                      kept: List[KeptLayer]) -> None:
    """Replace, depth first, the plain pointwise layers under ``parent`` (in place). ``replacements``
    maps a replaced layer's ``id`` to its block, so a layer shared by several parents stays shared."""
    for child_name, child in list(parent._modules.items()):  # named_children() would skip shared modules
        name = f"{prefix}{child_name}"
        if child is None or isinstance(child, GROUPED_BLOCKS):
            continue
        parametrized_linear = parametrize.is_parametrized(child) and type(child).__bases__[0] is nn.Linear
        if is_plain_pointwise(child) or (settings.linear and (is_plain_linear(child) or parametrized_linear)):
            if id(child) not in replacements:
                replacements[id(child)] = _replacement(child, name, settings, kept)
            setattr(parent, child_name, replacements[id(child)])
            continue
        reason = _structural_reason(child)
        if reason is not None:
            kept.append(KeptLayer(name, reason))
        _replace_children(child, name + ".", settings, replacements, kept)


def _warn(patterns: Tuple[str, ...], matched: set, kept: List[KeptLayer]) -> None:
    """One warning per exclude pattern that matched nothing, one for the 1x1 convolutions that are not
    plain pointwise convolutions (the user may have expected them grouped)."""
    for pattern in patterns:
        if pattern not in matched:
            warnings.warn(f"gpconv.convert: exclude pattern {pattern!r} matches no module", UserWarning, stacklevel=3)
    expected = (EXCLUDED, TOO_SMALL, NOT_MAPPED, MAPPED_DENSE)
    whole = [f"{layer.name} ({layer.reason})" for layer in kept if any(part in layer.reason for part in IDENTITY_REASONS)]
    unusual = [f"{layer.name} ({layer.reason})" for layer in kept
               if layer.reason not in expected and f"{layer.name} ({layer.reason})" not in whole]
    if unusual:
        warnings.warn(f"gpconv.convert: {len(unusual)} 1x1 convolutions are not plain pointwise convolutions and "
                      f"stay dense: {', '.join(unusual)}", UserWarning, stacklevel=3)
    if whole:
        warnings.warn(f"gpconv.convert: {len(whole)} layers stay dense, a block would lose part of what they are: "
                      f"{', '.join(whole)}", UserWarning, stacklevel=3)


def _replacement(layer: nn.Module, name: str, settings: _Settings, kept: List[KeptLayer]) -> nn.Module:
    """The grouped block for a plain 1x1 convolution or linear layer, or the layer itself (noted in ``kept``)."""
    is_conv = isinstance(layer, nn.Conv2d)
    in_channels, out_channels = (layer.in_channels, layer.out_channels) if is_conv else (layer.in_features,
                                                                                         layer.out_features)
    if _excluded(name, settings.patterns, set()):
        kept.append(KeptLayer(name, EXCLUDED))
        return layer
    reason = _identity_refusal(layer, settings.owners)
    if reason is not None:
        kept.append(KeptLayer(name, reason))
        return layer
    channels_per_group, reason = _layer_channels(name, settings)
    if reason is not None:
        kept.append(KeptLayer(name, reason))
        return layer
    plan = make_plan(in_channels, out_channels, channels_per_group, version=settings.version,
                     l_layer=settings.l_layer)
    if not plan.grouped:
        kept.append(KeptLayer(name, TOO_SMALL))
        return layer
    options = dict(version=settings.version, l_layer=settings.l_layer, activation=settings.activation,
                   bias=layer.bias is not None)
    if is_conv:
        block = GroupedPointwiseConv2d(in_channels, out_channels, channels_per_group, batch_norm=False,
                                       stride=layer.stride[0], **options)
    else:
        block = GroupedPointwiseLinear(in_channels, out_channels, channels_per_group, **options)
    block.to(device=layer.weight.device, dtype=layer.weight.dtype)
    _take_over(layer, block)
    return block
