"""Prompts, the CLIP tokenizer and the embedded text bank (SPEC §1.2).

The text bank is WeCLIP's `zeroshot_classifier`: every foreground prompt
(class name with CLIP-ES synonyms) and every background prompt is put in the
template "a clean origami {}.", encoded by the frozen CLIP text tower,
L2-normalised, averaged over templates and re-normalised. It is computed once
per run and cached as an `.npz` keyed by the weights, prompts and templates.

The tokenizer is read from a local Hugging Face snapshot (never downloaded)
and gives the same ids as `transformers.CLIPTokenizer(texts,
padding="max_length", max_length=77, truncation=True)`. `build_word_tokenizer`
writes a small CLIP-compatible BPE vocabulary for the project's tiny
synthetic CLIP.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from ssr_jax import io_utils
from ssr_jax.data import specs, vocabularies

log = logging.getLogger(__name__)

CONTEXT_LENGTH = 77
TEMPLATE = "a clean origami {}."  # [WeCLIP] the only template it uses
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# The prompt lists and their class names live with the dataset specs
# (ssr_jax/data/vocabularies.py, ssr_jax/data/specs.py); re-exported here.
VOC_FG_PROMPTS = vocabularies.VOC_FG_PROMPTS
VOC_BG_PROMPTS = vocabularies.VOC_BG_PROMPTS
COCO_FG_PROMPTS = vocabularies.COCO_FG_PROMPTS
COCO_BG_PROMPTS = vocabularies.COCO_BG_PROMPTS
VOC_CLASS_NAMES = vocabularies.VOC_CLASS_NAMES
COCO_CLASS_NAMES = vocabularies.COCO_CLASS_NAMES
SYNTHETIC_CLASSES_FILE = "classes.json"


def _classes_json_prompts(root: str):
    path = os.path.join(root, SYNTHETIC_CLASSES_FILE)
    hint = (
        f"{path} must hold {{\"classes\": [\"background\", name, ...], "
        "\"prompts\": [one prompt per foreground class], "
        "\"background_prompts\": [prompt, ...]}; regenerate the synthetic "
        "world to write it"
    )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {path}. {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}. {hint}") from e

    def strings(field: str) -> list[str]:
        value = spec.get(field) if isinstance(spec, dict) else None
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise ValueError(
                f"{path}: field {field!r} must be a non-empty list of "
                f"non-empty strings, got {value!r}. {hint}"
            )
        return value

    classes = strings("classes")
    prompts = strings("prompts")
    bg = strings("background_prompts")
    if classes[0] != "background" or len(classes) < 2:
        raise ValueError(
            f"{path}: 'classes' must start with 'background' and name at "
            f"least one foreground class, got {classes!r}. {hint}"
        )
    if len(prompts) != len(classes) - 1:
        raise ValueError(
            f"{path}: {len(prompts)} prompts for {len(classes) - 1} "
            f"foreground classes; give exactly one per class. {hint}"
        )
    return tuple(prompts), tuple(bg), tuple(classes)


def dataset_prompts(
    name: str, root: str = ""
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(fg prompts [C-1], bg prompts [M], class names [C]) of a dataset.

    `name` is `config.data.name`, a registered dataset (`data.specs`): its
    spec's prompts, or, for a spec without built-in prompts (the synthetic
    world), the ones in `<root>/classes.json`. An unknown name raises
    `specs.UnknownDatasetError` (a ValueError) listing the registered ones.
    """
    spec = specs.get(name)
    if spec.fg_prompts is None:
        return _classes_json_prompts(root)
    return (spec.fg_prompts, spec.bg_prompts,
            spec.prompt_names or spec.classes)


# --- tokenizer --------------------------------------------------------------
# CLIP's pre-tokenisation: special tokens, English contractions, runs of
# letters, single digits, runs of other non-space characters.
_CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
    r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` (private copy) and its padding token."""

    backend: tokenizers.Tokenizer
    pad_id: int
    pad_token: str


def _special_token(snapshot_dir: str, field: str, default: str) -> str:
    """A special token as `transformers` resolves it from the snapshot."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(snapshot_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            value = json.load(f).get(field)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return default


def load_tokenizer(snapshot_dir: str) -> TextTokenizer:
    """The CLIP tokenizer of a local Hugging Face snapshot directory.

    Reads `tokenizer.json` with `tokenizers`; a snapshot with only
    `vocab.json` + `merges.txt` goes through `transformers.CLIPTokenizer`.
    Nothing is downloaded.
    """
    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(snapshot_dir, name))

    if not os.path.isdir(snapshot_dir):
        raise FileNotFoundError(
            f"tokenizer directory {snapshot_dir!r} does not exist; set "
            "model.clip_path to a local Hugging Face CLIP snapshot"
        )
    if has("tokenizer.json"):
        backend = tokenizers.Tokenizer.from_file(
            os.path.join(snapshot_dir, "tokenizer.json")
        )
    elif has("vocab.json") and has("merges.txt"):
        from transformers import CLIPTokenizer

        hf = CLIPTokenizer.from_pretrained(
            snapshot_dir, local_files_only=True
        )
        backend = tokenizers.Tokenizer.from_str(
            hf.backend_tokenizer.to_str()
        )
    else:
        raise FileNotFoundError(
            f"no CLIP tokenizer in {snapshot_dir!r}: expected tokenizer.json "
            "or vocab.json + merges.txt (copy them from the Hugging Face "
            "snapshot, e.g. openai/clip-vit-base-patch16)"
        )
    pad_token = _special_token(snapshot_dir, "pad_token", EOS)
    pad_id = backend.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(
            f"pad token {pad_token!r} of {snapshot_dir!r} is not in its "
            "vocabulary; fix tokenizer_config.json"
        )
    return TextTokenizer(backend=backend, pad_id=pad_id, pad_token=pad_token)


def tokenize(
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    context_length: int = CONTEXT_LENGTH,
) -> np.ndarray:
    """Token ids int32 [N, context_length], as `transformers.CLIPTokenizer`.

    BOS, the text's tokens, EOS, then padding; texts too long keep their first
    `context_length - 2` tokens and still end with EOS.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a string")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("every text must be a str")
    if not texts:
        return np.zeros((0, context_length), np.int32)
    backend = tokenizer.backend
    # The same truncation/padding calls transformers makes on its backend.
    backend.enable_truncation(max_length=context_length)
    backend.enable_padding(
        length=context_length, pad_id=tokenizer.pad_id,
        pad_token=tokenizer.pad_token,
    )
    encodings = backend.encode_batch(texts, add_special_tokens=True)
    return np.asarray([e.ids for e in encodings], dtype=np.int32)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte as a printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clip_pipeline(tokenizer) -> None:
    """Puts CLIP's normaliser, pre-tokeniser and decoder on `tokenizer`."""
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Lowercase(),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(_CLIP_SPLIT), behavior="removed", invert=True
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()


def _learn_merges(pieces: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that turn every piece into one `</w>`-terminated token.

    Plain BPE training on the distinct pieces, run until no pair is left
    (ties broken by the pair itself, so the result is deterministic).
    Encoding replays merges by rank, which reproduces a training word's
    segmentation: each given word ends as one token.
    """
    words = [list(p[:-1]) + [p[-1] + "</w>"] for p in sorted(set(pieces))]
    merges = []
    while True:
        counts = collections.Counter()
        for w in words:
            counts.update(zip(w, w[1:], strict=False))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for i, w in enumerate(words):
            if len(w) < 2:
                continue
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out


def build_word_tokenizer(words: Iterable[str], out_dir: str) -> str:
    """Writes a CLIP-compatible BPE tokenizer that keeps `words` whole.

    The vocabulary is laid out as CLIP's: the 256 byte-level characters, the
    same with the end-of-word marker `</w>`, one token per merge, then
    `<|startoftext|>` and `<|endoftext|>` (the largest id, so EOS pooling by
    argmax works). Each word (after CLIP's lower-casing and pre-tokenising;
    a string with spaces or punctuation contributes each of its pieces)
    becomes a single token; any other text splits into byte tokens.

    Writes vocab.json, merges.txt, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json, readable by `load_tokenizer` and by
    `transformers.CLIPTokenizer.from_pretrained(out_dir)`. Returns out_dir.
    """
    probe = tokenizers.Tokenizer(models.BPE())
    _clip_pipeline(probe)
    pieces = []
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"words must be strings, got {word!r}")
        text = probe.normalizer.normalize_str(word)
        pieces += [p for p, _ in probe.pre_tokenizer.pre_tokenize_str(text)]
    pieces = [p for p in pieces if p not in (BOS, EOS)]
    merges = _learn_merges(pieces)

    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)

    tok = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, unk_token=EOS,
        continuing_subword_prefix="", end_of_word_suffix="</w>",
        fuse_unk=False,
    ))
    _clip_pipeline(tok)
    tok.add_special_tokens([
        AddedToken(BOS, special=True, normalized=False),
        AddedToken(EOS, special=True, normalized=False),
    ])
    tok.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]),
        trim_offsets=False, add_prefix_space=False,
    )
    tok.save(os.path.join(out_dir, "tokenizer.json"))

    specials = {
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
    }
    config = dict(
        specials, tokenizer_class="CLIPTokenizer",
        model_max_length=CONTEXT_LENGTH, do_lower_case=True,
        add_prefix_space=False, errors="replace",
    )
    for name, content in (("special_tokens_map.json", specials),
                          ("tokenizer_config.json", config)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    return out_dir


# --- text bank --------------------------------------------------------------
EncodeFn = Callable[[np.ndarray], object]  # ids int32 [N, 77] -> [N, E]


def _templates(template: str | Sequence[str]) -> list[str]:
    templates = [template] if isinstance(template, str) else list(template)
    if not templates:
        raise ValueError("give at least one prompt template")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(
                f"template {t!r} must be a string with one '{{}}' where the "
                "class prompt goes, e.g. 'a clean origami {}.'"
            )
    return templates


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norm)) or np.any(norm == 0):
        raise ValueError(
            f"{what}: the text encoder returned a zero or non-finite "
            "embedding; check the CLIP weights"
        )
    return x / norm


def build_text_bank(
    encode_fn: EncodeFn,
    tokenizer: TextTokenizer,
    fg_prompts: Sequence[str],
    bg_prompts: Sequence[str],
    template: str | Sequence[str] = TEMPLATE,
    batch_size: int = 256,
    context_length: int = CONTEXT_LENGTH,
) -> dict[str, np.ndarray]:
    """Embeds the prompts: {"fg": float32 [C, E], "bg": float32 [M, E]}.

    WeCLIP `zeroshot_classifier` (SPEC §1.2): every (prompt, template) text
    is encoded, L2-normalised, averaged over templates and re-normalised.
    All texts are embedded in batches of `batch_size` (the last one padded, so
    a jitted `encode_fn` compiles once).
    """
    templates = _templates(template)
    prompts = list(fg_prompts) + list(bg_prompts)
    if not fg_prompts or not bg_prompts:
        raise ValueError("need at least one foreground and one background "
                         "prompt")
    texts = [t.format(p) for p in prompts for t in templates]
    ids = tokenize(tokenizer, texts, context_length)
    n = len(ids)
    bs = min(batch_size, n)
    chunks = []
    for start in range(0, n, bs):
        batch = ids[start:start + bs]
        real = len(batch)
        if real < bs:
            batch = np.concatenate([batch, np.repeat(batch[:1], bs - real, 0)])
        out = np.asarray(encode_fn(batch), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != bs:
            raise ValueError(
                f"encode_fn returned shape {out.shape} for {bs} texts; it "
                "must return [N, E] embeddings"
            )
        chunks.append(out[:real])
    emb = _unit_rows(np.concatenate(chunks), "text bank")
    emb = emb.reshape(len(prompts), len(templates), -1).mean(axis=1)
    emb = _unit_rows(emb, "text bank").astype(np.float32)
    nf = len(fg_prompts)
    return {"fg": emb[:nf], "bg": emb[nf:]}


def text_bank_key(
    weights_file: str,
    fg_prompts: Sequence[str],
    bg_prompts: Sequence[str],
    template: str | Sequence[str] = TEMPLATE,
    tokenizer: TextTokenizer | None = None,
    context_length: int = CONTEXT_LENGTH,
) -> str:
    """Cache key: sha256 of the weights file's identity, prompts, templates
    and, given the `tokenizer`, the token ids the encoder will see (so a
    changed tokenizer file or context length misses the cache).

    Identity = absolute path, size and modification time (hashing a 600 MB
    checkpoint on every start would cost more than embedding the prompts).
    """
    if not os.path.isfile(weights_file):
        raise FileNotFoundError(f"weights file {weights_file!r} not found")
    st = os.stat(weights_file)
    payload = {
        "weights": [os.path.realpath(weights_file), st.st_size,
                    st.st_mtime_ns],
        "fg": list(fg_prompts),
        "bg": list(bg_prompts),
        "templates": _templates(template),
    }
    if tokenizer is not None:
        texts = [t.format(p) for p in [*fg_prompts, *bg_prompts]
                 for t in _templates(template)]
        ids = np.ascontiguousarray(tokenize(tokenizer, texts, context_length),
                                   dtype=np.int64)
        payload["tokens"] = [list(ids.shape),
                             hashlib.sha256(ids.tobytes()).hexdigest()]
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_cache(cache_file: str, key: str) -> dict[str, np.ndarray] | None:
    """The cached bank if its key matches; None on a miss (warns if bad)."""
    if not os.path.exists(cache_file):
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            stored = str(z["key"])
            bank = {"fg": z["fg"], "bg": z["bg"]}
    except (OSError, ValueError, KeyError, EOFError,
            zipfile.BadZipFile) as e:
        warnings.warn(
            f"text bank cache {cache_file} is unreadable ({e}); recomputing",
            stacklevel=3,
        )
        return None
    if stored != key:
        log.info("text bank cache %s is stale; recomputing", cache_file)
        return None
    if any(v.dtype != np.float32 or v.ndim != 2 for v in bank.values()):
        warnings.warn(
            f"text bank cache {cache_file} holds malformed arrays; "
            "recomputing", stacklevel=3,
        )
        return None
    return bank


def cached_text_bank(
    cache_file: str,
    key: str,
    compute_fn: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """`compute_fn()` (a text bank), cached in the `.npz` `cache_file`.

    The file stores `key` (see `text_bank_key`) beside "fg" and "bg"; a
    different key or an unreadable file means recompute and overwrite
    (written to a temporary file, then renamed, so a crash never leaves a
    half-written cache). No pickle is involved.
    """
    bank = _read_cache(cache_file, key)
    if bank is not None:
        return bank
    bank = compute_fn()
    fg = np.asarray(bank["fg"], np.float32)
    bg = np.asarray(bank["bg"], np.float32)
    parent = os.path.dirname(os.path.abspath(cache_file))
    os.makedirs(parent, exist_ok=True)
    with io_utils.atomic_write(cache_file, suffix=".npz") as f:
        np.savez(f, key=np.array(key), fg=fg, bg=bg)
    return {"fg": fg, "bg": bg}

