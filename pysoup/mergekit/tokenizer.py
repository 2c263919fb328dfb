"""mergekit 0.1.5's tokenizer merge (`tokenizer_source: base | union | <model>`, the `tokenizer:` section) and chat
templates, for configs that ask for them: the output tokenizer, each input's embedding and LM-head rows moved to the
output vocabulary (rows a model lacks filled as mergekit fills them), and the tokenizer files to write.

This follows mergekit/tokenizer/build.py and embed.py step by step (same vocabulary, same ids, same fill values); the
one difference is the order in which a union meets the models' tokenizers: mergekit walks a set (an order that
changes between runs when several models add tokens), pysoup the config's order, base first.

transformers and tokenizers are needed here only; the plain file merge never imports them. Each input's embedding
and LM head is rebuilt in the output vocabulary one at a time (one such tensor in memory, its rows read from the mapped
input) into a scratch file beside the models, and merged from there; every other tensor streams from the inputs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings

from pysoup.errors import PlanError

# The files AutoTokenizer.save_pretrained writes (and that a donor's copy would bring): replaced as a set.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "chat_template.json",
)
_POSITION = re.compile(r"position|wpe")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise PlanError(
            "tokenizer_source, tokenizer and chat_template need transformers (pip install transformers)"
        ) from None
    return transformers


def model_vocab_size(path: str):
    cfg = _config(path)
    v = cfg.get("vocab_size")
    if v is None and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("vocab_size")
    return v if isinstance(v, int) else None


def _config(path: str) -> dict:
    p = os.path.join(path, "config.json")
    if not os.path.isfile(p):
        return {}
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def _load(path: str):
    try:
        return _transformers().AutoTokenizer.from_pretrained(path, use_fast=True)
    except Exception as exc:  # transformers raises many kinds; the message is what the user needs
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise PlanError(f"{path}: cannot load its tokenizer ({first})") from None


def _stripped(path: str):
    """The tokenizer without tokens at ids >= the model's vocab_size (mergekit's get_stripped_tokenizer)."""
    import tokenizers

    tok = _load(path)
    vocab_size = model_vocab_size(path) or len(tok.get_vocab())
    unused = [t for t, i in tok.get_vocab().items() if i >= vocab_size]
    if not unused:
        return tok
    if not tok.is_fast:
        raise PlanError(f"{path}: has tokens beyond vocab_size and no fast tokenizer: cannot merge its tokenizer")
    d = json.loads(tok._tokenizer.to_str())
    if d["model"]["type"] != "BPE":
        raise PlanError(f"{path}: tokenizer type {d['model']['type']}; only BPE tokenizers can be stripped")
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < vocab_size]
    unused_set = set(unused)
    for t in unused:
        d["model"]["vocab"].pop(t, None)

    def keep(m):
        toks = m.split(" ") if isinstance(m, str) else m
        return not any(t in unused_set for t in toks)

    d["model"]["merges"] = [m for m in d["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
    return tok


def _union(base_tok, toks: dict):
    """mergekit's build_union_tokenizer."""
    transformers = _transformers()
    out_added, out_vocab = {}, {}
    for path, tok in toks.items():
        vocab_size = model_vocab_size(path) or tok.vocab_size
        added = tok.added_tokens_decoder
        for t, i in tok.get_vocab().items():
            if i >= vocab_size:
                continue
            out_vocab.setdefault(t, len(out_vocab))  # added tokens too: skipped below, as mergekit does
        for i, info in added.items():
            if i >= vocab_size or info.content in out_added:
                continue
            out_added[info.content] = info
    with tempfile.TemporaryDirectory() as d:
        base_tok.save_pretrained(d, legacy_format=False, safe_serialization=True)
        res = transformers.AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


class Vocabulary:
    """The output tokenizer and, per input model, output token id -> its row (-1: the model lacks the token)."""

    def __init__(self, spec, models: list, base: str | None):
        self.spec = spec
        self.models = models  # every referenced model path, base first
        self.base = base
        cfg = spec.tokenizer or {}
        source = spec.tokenizer_source if spec.tokenizer is None else cfg.get("source", "union")
        self.tokens = dict(cfg.get("tokens") or {})
        self.pad_to = cfg.get("pad_to_multiple_of")
        donor = base if base is not None else models[0]
        base_tok = _stripped(donor)
        toks = {donor: base_tok}
        for m in models:
            if m not in toks:
                try:
                    toks[m] = _load(m)
                except PlanError as exc:  # mergekit: "Unable to load tokenizer ... Assuming same as base"
                    warnings.warn(f"{exc}; assuming it is {donor}'s, as mergekit does", stacklevel=3)
        if source == "base":
            out = base_tok
        elif source == "union":
            out = _union(base_tok, toks)
        else:
            out = _load(source)
        existing = set(out.get_vocab())
        for t in self.tokens:
            if t not in existing:
                out.add_tokens(t)
                existing.add(t)
        self.tokenizer = out
        self.vocab = out.get_vocab()
        self.original = {m: t.get_vocab() for m, t in toks.items()}
        self.permutations = {}
        for m in models:
            model_vocab = toks.get(m, base_tok).get_vocab()
            size = model_vocab_size(m) or len(model_vocab)
            p = {}
            for t, new in self.vocab.items():
                old = model_vocab.get(t)
                if old is None:
                    p[new] = -1
                elif old < size:
                    p[new] = old
            self.permutations[m] = p
        n = len(self.vocab)
        self.size = n if not self.pad_to or n % self.pad_to == 0 else (n // self.pad_to + 1) * self.pad_to

    def is_vocab_tensor(self, name: str, shape, model: str) -> bool:
        """An embedding or LM head: a 2-D tensor outside the layers whose rows are the model's tokens."""
        from pysoup.mergekit.slices import place

        where = place(name)
        size = model_vocab_size(model)
        return (
            where is not None
            and where[0] != "layer"
            and len(shape) == 2
            and size is not None
            and shape[0] == size
            and not _POSITION.search(name)
        )

    def permuted(self, tensors: dict, dtype=None):
        """{model path: tensor} of one vocabulary tensor -> (model path, its rows laid out in the output vocabulary),
        one model at a time (mergekit's PermutedVocabulary.execute, axis 0). `dtype`: mergekit's compute dtype (the
        config's `dtype`), else the inputs' promoted dtype. Rows are read from the inputs as they are (mapped files):
        the only tensor made is the one yielded, plus the filled rows."""
        import torch

        models = list(tensors)
        vocab, perms = self.vocab, self.permutations
        token_shape = tensors[models[0]].shape[1:]
        if dtype is None:
            dtype = tensors[models[0]].dtype
            for t in tensors.values():
                dtype = torch.promote_types(dtype, t.dtype)
        configs = {t: _token_config(c, self.spec.path) for t, c in self.tokens.items()}
        average = set()
        for token, tid in vocab.items():  # assign_embedding_sources
            if token in configs:
                continue
            has = [perms[m][tid] >= 0 for m in models]
            if sum(has) == 1:
                configs[token] = {"source": ("model", models[has.index(True)]), "force": False}
            elif sum(has) == 0:
                configs[token] = {"source": ("zero",), "force": False}
            elif self.base in models and perms[self.base][tid] >= 0:
                configs[token] = {"source": ("model", self.base), "force": False}
            else:
                average.add(token)
        defaults = {}
        for token, tid in vocab.items():
            cfg = configs.get(token)
            if not (cfg and cfg["force"]) and all(perms[m][tid] >= 0 for m in models):
                continue
            embed = torch.zeros(token_shape, dtype=dtype)
            if token in average:
                count = 0
                for m in models:
                    if perms[m][tid] < 0:
                        continue
                    embed = embed + tensors[m][perms[m][tid]].to(dtype)
                    count += 1
                embed /= count
            elif cfg is not None:
                embed = self._default(tensors, token, tid, cfg).to(dtype)
            else:
                continue
            defaults[token] = embed
        for m in models:
            p, old = perms[m], tensors[m]
            new = torch.zeros((self.size, *token_shape), dtype=dtype)
            copied, filled = [], []
            for token, tid in vocab.items():
                force = configs[token]["force"] if token in configs else False
                if p[tid] >= 0 and not force:
                    copied.append((tid, p[tid]))
                elif token in defaults:
                    filled.append((tid, defaults[token]))
            if copied:
                dst, src = zip(*copied)
                new[list(dst)] = old[list(src)].to(dtype)
            for tid, embed in filled:
                new[tid] = embed
            if self.size > len(vocab):
                new[len(vocab) :] = torch.mean(new[: len(vocab)], dim=0)
            yield m, new
            del new

    def _default(self, tensors, token, tid, cfg):
        source = cfg["source"]
        if source[0] == "zero":
            t = next(iter(tensors.values()))
            return t.new_zeros(t.shape[1:])
        model = source[1]
        if model not in tensors:
            raise PlanError(f"{self.spec.path}: token {token!r} takes its embedding from {model!r}, not an input here")
        if source[0] == "model_token":
            _, _, token_id, src_token = source
            if token_id is None:
                if src_token not in self.original.get(model, {}):
                    raise PlanError(f"{self.spec.path}: token {src_token!r} is not in {model!r}'s tokenizer")
                token_id = self.original[model][src_token]
            if not 0 <= token_id < tensors[model].shape[0]:
                raise PlanError(f"{self.spec.path}: token id {token_id} is out of range for {model!r}")
            return tensors[model][token_id]
        p = self.permutations[model]
        if p[tid] < 0:
            raise PlanError(f"{self.spec.path}: token {token!r} is not in {model!r}'s tokenizer")
        return tensors[model][p[tid]]

    def files(self) -> list:
        return tokenizer_files(self.tokenizer, self.spec.chat_template, self.spec.path, self.models)


def _token_config(cfg, path):
    """A `tokenizer.tokens` entry as ((kind, ...), force)."""
    if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
        raise PlanError(f"{path}: a tokenizer.tokens entry has 'source' and 'force', got {cfg!r}")
    src = cfg.get("source")
    if isinstance(src, dict):
        kind = src.get("kind")
        if kind == "zero":
            source = ("zero",)
        elif kind == "model_token":
            if (src.get("token_id") is None) == (src.get("token") is None):
                raise PlanError(f"{path}: a model_token source has token_id or token (one of them)")
            source = ("model_token", str(src.get("model")), src.get("token_id"), src.get("token"))
        else:
            raise PlanError(f"{path}: token source kind {kind!r} is not zero or model_token")
    elif isinstance(src, str):
        source = ("model", src)
    elif src is None:
        source = ("zero",)
    else:
        raise PlanError(f"{path}: a token source is a model path or {{kind: ...}}, got {src!r}")
    return {"source": source, "force": bool(cfg.get("force", False))}


def chat_template_text(template: str, path: str) -> str:
    """mergekit's _set_chat_template: one of its built-in names (read from the installed mergekit package), else a
    literal Jinja template."""
    if len(template) < 256 and "\n" not in template and "{" not in template:
        try:
            import importlib.resources

            from mergekit._data import chat_templates

            f = importlib.resources.files(chat_templates).joinpath(template + ".jinja")
            if f.is_file():
                return f.read_text()
        except ImportError:
            raise PlanError(
                f"{path}: chat_template {template!r} names one of mergekit's built-in templates: install mergekit "
                "(pysoup reads them from it) or give the Jinja text"
            ) from None
    if len(template) < 20 or "{" not in template:
        raise PlanError(f"{path}: invalid chat_template {template!r} (a built-in name or a Jinja template)")
    return template


def auto_chat_template(models: list):
    """mergekit's `chat_template: auto`: the template most of the models' tokenizers carry (stripped), or None. A
    tie goes to the template met first, the models in config order (mergekit walks a set)."""
    from collections import Counter

    templates = []
    for m in models:
        try:
            template = _load(m).chat_template
        except PlanError:
            continue  # mergekit skips a model whose tokenizer does not load
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            templates.append(template.strip())
    return Counter(templates).most_common(1)[0][0] if templates else None


def tokenizer_files(tokenizer, chat_template=None, path="", models=()) -> list:
    """(name, bytes) of every file tokenizer.save_pretrained writes, with the config's chat template."""
    if chat_template == "auto":
        chat_template = auto_chat_template(list(models))
        if chat_template is not None:
            tokenizer.chat_template = chat_template
    elif chat_template:
        tokenizer.chat_template = chat_template_text(chat_template, path)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        out = []
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                out.append((name, f.read()))
    return out


def donor_tokenizer_files(donor: str, chat_template: str, path: str, models=()) -> list:
    """No tokenizer merge but a chat_template: the donor's tokenizer, saved again with the template (as mergekit's
    _copy_tokenizer does then)."""
    return tokenizer_files(_load(donor), chat_template, path, models)
