"""Slices and layer stacking (mergekit's `slices:`): which input tensor becomes which output tensor.

A tensor belongs to a layer when its name holds a layer-stack component and an index (`model.layers.N.`,
`transformer.h.N.`, `blocks.N.`, ...: pysoup.strategies.params.layer_index); the stack's layer count is the
model's config.json `num_hidden_layers` (`n_layer`, `num_layers`), or the names' when there is no config.json.
Output slice s takes layers [start, stop) of each of its sources and becomes output layers [offset_s, offset_s +
stop - start), offset_s the layers of the slices before it: the names are renumbered. As in mergekit 0.1.5 (plan.py),
the tensors outside the layers are merged from the first slice's sources when they come before the layers
(embeddings) and from the last slice's when they come after (final norm, LM head); a name pysoup cannot place
either way is an error naming the tensor, never a silent copy.

Each source of a slice is a view of its checkpoint (the same files and readers, a table with the output's names),
so the planner and the engine see an ordinary merge of whole checkpoints per slice.

`modules:` (mergekit 0.1.5's plan.py): a model of one layer stack has one module, "default". An architecture of
several (ARCH_MODULES, from mergekit's architecture definitions) has named modules, each the tensors under its name
prefix with its own layer stack and layer count (config.json's `text_config.num_hidden_layers`...): each module is
stacked on its own as above (layers renumbered from 0, its non-layer tensors from its first / last slice), and the
modules a config does not list are left out of the output, as mergekit leaves them out.
"""

from __future__ import annotations

import json
import os
import re
import warnings

from pysoup.errors import PlanError
from pysoup.io.checkpoint import FileCheckpoint
from pysoup.io.table import TensorTable
from pysoup.strategies.params import _LAYER, layer_index

# Tensors outside the layer stack: before it (embeddings) or after it (final norm, LM head, classifier head).
# GPT-NeoX's LM head is `embed_out`: after the layers.
# Vision towers (Pixtral, SigLIP): the patch convolution and the norm before the layers are "pre" too.
_PRE = re.compile(
    r"(?:^|[._])(?:embed(?!_out)\w*|wte|wpe|tok_embeddings|word_embeddings|position_embeddings|patch_conv|ln_pre)"
    r"(?:\.|$)"
)
_POST = re.compile(
    r"(?:^|[._])(?:norm|final_layernorm|final_layer_norm|ln_f|lm_head|embed_out|score|head|output)(?:\.|$)"
)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

DEFAULT_MODULE = "default"  # the one module of a model with one layer stack (mergekit's name)

# mergekit 0.1.5's architectures of several modules that pysoup reads (mergekit/_data/architectures/*.json), by
# config.json's `architectures`: module -> (the prefix of its tensors' names, the config.json key of its layer count,
# dotted, or None for a module without layers). Others are an error naming these.
ARCH_MODULES = {
    "Mistral3ForConditionalGeneration": {
        "text_decoder": ("language_model.", "text_config.num_hidden_layers"),
        "vision_tower": ("vision_tower.", "vision_config.num_hidden_layers"),
        "multi_modal_projector": ("multi_modal_projector.", None),
    },
}


def num_layers_of(config: dict):
    """The layer count a model's config.json states, or None."""
    for key in _LAYER_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def read_model_config(ckpt) -> dict:
    """config.json of a model directory ({} for a file or a directory without one)."""
    if ckpt.directory is None:
        return {}
    path = os.path.join(ckpt.directory, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: cannot read ({exc})") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"{path}: not a JSON object")
    return cfg


def config_value(config: dict, key: str):
    """config.json's value at a dotted key ('text_config.num_hidden_layers'), or None."""
    for part in key.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(part)
    return config


def architecture_of(ckpt) -> str | None:
    """config.json's `architectures[0]`, or None."""
    archs = read_model_config(ckpt).get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def place(name: str):
    """("layer", index), ("pre", None) or ("post", None); None when pysoup cannot place the tensor."""
    i = layer_index(name)
    if i is not None:
        return "layer", i
    if _PRE.search(name):
        return "pre", None
    if _POST.search(name):
        return "post", None
    return None


def renamed(name: str, index: int) -> str:
    """The name with its layer index replaced: renamed('model.layers.3.mlp.w', 7) -> 'model.layers.7.mlp.w'."""
    m = _LAYER.search(name)
    return name[: m.start(1)] + str(index) + name[m.end(1) :]


class SlicePositions:
    """t of each output tensor of one slice: i / (n - 1) over the slice's n layers (1 when n = 1), 0 outside the
    layers, as mergekit 0.1.5's plan_slice."""

    def __init__(self, offset: int, count: int):
        self.offset, self.count = offset, count

    def t(self, name: str) -> float:
        i = layer_index(name)
        if i is None:
            return 0.0
        return (i - self.offset) / (self.count - 1) if self.count > 1 else 1.0


class _Layers:
    """Each model's tensors (of one module: `module` = (name, tensor name prefix, layer count key)) sorted into pre,
    layers and post, checked once per model and module."""

    def __init__(self, ckpt, module=None):
        self.ckpt = ckpt
        names = ckpt.table.names()
        self.pre, self.post, self.layer = [], [], {}  # rows; layer: index -> rows
        prefixes = set()
        rows = range(len(names))
        if module is not None:
            rows = [r for r in rows if names[r].startswith(module[1])]
            if not rows:
                raise PlanError(f"{ckpt.name}: no tensor of module {module[0]!r} (names starting {module[1]!r})")
            if all(layer_index(names[r]) is None for r in rows):  # a module without layers (a projector): all "pre"
                self.pre, self.count = list(rows), 0
                return
        for row in rows:
            name = names[row]
            where = place(name)
            if where is None:
                raise PlanError(
                    f"{ckpt.name}: tensor {name!r} is neither in a layer nor an embedding, norm or head: pysoup cannot "
                    "place it in a slice merge"
                )
            kind, i = where
            if kind == "layer":
                self.layer.setdefault(i, []).append(row)
                prefixes.add(name[: _LAYER.search(name).start(1)])
            else:
                (self.pre if kind == "pre" else self.post).append(row)
        if len(prefixes) > 1:
            raise PlanError(
                f"{ckpt.name}: more than one layer stack ({', '.join(sorted(prefixes))}): slices need one (a model of "
                f"several modules takes `modules:`; pysoup knows those of {', '.join(sorted(ARCH_MODULES))})"
            )
        cfg = read_model_config(ckpt)
        stated = num_layers_of(cfg) if module is None else config_value(cfg, module[2])
        stated = stated if isinstance(stated, int) and not isinstance(stated, bool) else None
        self.count = stated if stated is not None else (max(self.layer) + 1 if self.layer else 0)
        beyond = [i for i in self.layer if i >= self.count]
        if beyond:
            row = self.layer[min(beyond)][0]
            raise PlanError(
                f"{ckpt.name}: tensor {names[row]!r} is in layer {min(beyond)}, but config.json states "
                f"{self.count} layers"
            )

    def view(self, rows_and_names: list) -> FileCheckpoint:
        return view(self.ckpt, rows_and_names)


def view(ckpt, rows_and_names: list) -> FileCheckpoint:
    """The tensors at `rows` of a file checkpoint under new names: the same readers (so the same mapped windows), a
    table of its own."""
    t = ckpt.table
    cols = ([], [], [], [], [], [])
    for row, name in rows_and_names:
        _, dtype, shape, begin, end = t.info(row)
        for col, v in zip(cols, (name, dtype, list(shape), begin, end, t.group(row))):
            col.append(v)
    table = TensorTable.from_entries(*cols)
    return FileCheckpoint(ckpt.name, ckpt._readers, table, directory=ckpt.directory)


def _first_match(entries, name):
    return next((j for j, e in enumerate(entries) if e.get("filter") in (None, "*") or e["filter"] in name), None)


def _filters_on_input_names(model_params: dict, names: dict) -> dict:
    """mergekit matches a per-model parameter's filters against the source's own tensor names (`model.layers.5.` of
    the source, output layer 0 of the slice). Where that picks another entry than the output name would for some
    tensor, the setting becomes one entry per output tensor (its full name as the filter) holding the value the
    source's name selects; otherwise it stays as written."""
    out = {}
    for key, setting in model_params.items():
        entries = setting if isinstance(setting, list) and setting and isinstance(setting[0], dict) else None
        if entries is None or all(_first_match(entries, o) == _first_match(entries, i) for o, i in names.items()):
            out[key] = setting
            continue
        exact = []
        for o, i in names.items():
            j = _first_match(entries, i)
            if j is not None:
                exact.append({"filter": o, "value": entries[j]["value"]})
        out[key] = exact
    return out


class GroupInputs:
    """The checkpoints one group's plan takes: the models and the base, as opened (a `models:` config) or as views
    with the output's layer names (slices)."""

    def __init__(self, spec, group, checkpoint, numbering):
        self.positions = None
        self.model_params = group.model_params
        self.input_names = None  # per model: output name -> the source's own name (slices)
        if not spec.layered:
            self.models = [checkpoint(s.model) for s in group.models]
            self.base = checkpoint(group.base.model) if group.base is not None else None
            return
        offset, count, first, last = numbering[id(group)]
        self.positions = SlicePositions(offset, count)

        def view(source):
            layers = numbering["layers"](source.model, group.module)
            a, b = source.layer_range
            if b > layers.count:
                raise PlanError(
                    f"{spec.path}: layer_range {list(source.layer_range)} of {source.model!r} goes past its "
                    f"{layers.count} layers"
                )
            picks = []
            if first:
                picks += [(r, layers.ckpt.table.name(r)) for r in layers.pre]
            for i in range(a, b):
                if i not in layers.layer:
                    raise PlanError(f"{source.model}: no tensor of layer {i} (layer_range {list(source.layer_range)})")
                picks += [(r, renamed(layers.ckpt.table.name(r), offset + i - a)) for r in layers.layer[i]]
            if last:
                picks += [(r, layers.ckpt.table.name(r)) for r in layers.post]
            if not picks:
                raise PlanError(f"{spec.path}: slice of {source.model!r} holds no tensor")
            input_names.append({out: layers.ckpt.table.name(r) for r, out in picks})
            return layers.view(picks)

        input_names: list = []  # per model: output name -> the source's own name
        self.models = [view(s) for s in group.models]
        self.base = view(group.base) if group.base is not None else None
        self.model_params = [
            _filters_on_input_names(p, names) for p, names in zip(group.model_params, input_names[: len(group.models)])
        ]
        self.input_names = input_names[: len(group.models)]

    @staticmethod
    def numbering(spec, checkpoint) -> dict:
        """Per group: (first output layer, layer count, holds the pre tensors, holds the post tensors), each module
        numbered from 0, its first group holding its pre tensors and its last the post ones; "layers": (model path,
        module name) -> its _Layers; "total": output layers (one module), or "totals": config key -> output layers
        of each module of a several-module architecture."""
        out: dict = {}
        if not spec.layered:
            return out
        modules = list(dict.fromkeys(g.module for g in spec.groups))  # None: `slices:`
        layout = GroupInputs._module_layout(spec, checkpoint, modules)
        cache: dict = {}

        def layers(path, module=None):
            key = (path, module)
            if key not in cache:
                mod = (module, *layout[module]) if layout is not None else None
                cache[key] = _Layers(checkpoint(path), mod)
            return cache[key]

        totals = {}
        for module in modules:
            groups = [g for g in spec.groups if g.module == module]
            offset = 0
            for j, g in enumerate(groups):
                src = g.models[0]
                count = src.layer_range[1] - src.layer_range[0] if src.layer_range is not None else None
                if count is None:  # a module's `models:`: every layer
                    count = layers(src.model, module).count
                    for s in g.models + ([g.base] if g.base is not None else []):
                        s.layer_range = (0, layers(s.model, module).count)
                out[id(g)] = (offset, count, j == 0, j == len(groups) - 1)
                offset += count
            if layout is not None and layout[module][1] is not None:
                totals[layout[module][1]] = offset
            elif layout is None:
                out["total"] = offset
        out["layers"] = layers
        if layout is not None:
            out["totals"] = totals
        return out

    @staticmethod
    def _module_layout(spec, checkpoint, modules: list):
        """The ARCH_MODULES entry of the config's models' architecture (None for `slices:` and for one layer stack),
        the config's module names checked against it: a one-line error for a module it does not have, and a warning
        for its modules the config leaves out."""
        from pysoup.mergekit.config import ConfigWarning

        paths = list(dict.fromkeys(s.model for g in spec.groups for s in g.models + ([g.base] if g.base else [])))
        archs = {p: architecture_of(checkpoint(p)) for p in paths}
        arch = archs[paths[0]]
        layout = ARCH_MODULES.get(arch)
        if layout is not None and any(a != arch for a in archs.values()):
            other = next(p for p, a in archs.items() if a != arch)
            raise PlanError(f"{spec.path}: {other!r} is a {archs[other]}, {paths[0]!r} a {arch}: modules need one")
        if modules == [None]:  # `slices:`
            return None
        known = sorted(layout) if layout is not None else [DEFAULT_MODULE]
        for m in modules:
            if m not in known:
                what = f"{arch} (from {paths[0]}'s config.json)" if arch else f"{paths[0]}"
                raise PlanError(
                    f"{spec.path}: modules.{m}: {what} has no module {m!r} (its modules: {', '.join(known)})"
                )
        left = [m for m in known if m not in modules]
        if layout is not None and left:
            warnings.warn(
                f"{spec.path}: modules {', '.join(left)} of {arch} are not in the config: their tensors are left "
                "out of the output, as mergekit 0.1.5 leaves them out",
                ConfigWarning,
                stacklevel=4,
            )
        return layout
