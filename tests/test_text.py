"""ssr_jax.text: prompt lists, tokenizer parity with transformers, text bank
against a NumPy reference, cache hit / miss / corruption."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest

from ssr_jax import text

transformers = pytest.importorskip("transformers")

ALL_PROMPTS = (text.VOC_FG_PROMPTS + text.VOC_BG_PROMPTS
               + text.COCO_FG_PROMPTS + text.COCO_BG_PROMPTS)
TEMPLATE_WORDS = ("a", "clean", "origami", ".")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    return text.build_word_tokenizer(ALL_PROMPTS + TEMPLATE_WORDS, d)


def _hf_ids(tok, texts):
    out = tok(list(texts), padding="max_length", max_length=77,
              truncation=True)
    return np.asarray(out["input_ids"], np.int32)


# --- prompt lists -----------------------------------------------------------

def test_prompt_list_lengths_and_known_entries():
    assert len(text.VOC_FG_PROMPTS) == 20
    assert len(text.VOC_BG_PROMPTS) == 25
    assert len(text.COCO_FG_PROMPTS) == 80
    assert len(text.COCO_BG_PROMPTS) == 23
    assert len(text.VOC_CLASS_NAMES) == 21
    assert len(text.COCO_CLASS_NAMES) == 81
    assert text.VOC_CLASS_NAMES[0] == text.COCO_CLASS_NAMES[0] == "background"
    # Spot checks against WeCLIP clip/clip_text.py.
    assert text.VOC_FG_PROMPTS[14] == "person with clothes,people,human"
    assert text.VOC_FG_PROMPTS[2] == "bird avian"
    assert text.COCO_FG_PROMPTS[31] == "sknowboard"  # WeCLIP's typo, kept
    assert text.COCO_FG_PROMPTS[78] == "hairdrier,blowdrier"
    assert text.COCO_CLASS_NAMES[32] == "snowboard"
    assert "keyboard" not in text.COCO_BG_PROMPTS
    assert "sign" not in text.COCO_BG_PROMPTS
    assert text.COCO_BG_PROMPTS[-1] == "bridge"


def test_dataset_prompts_builtin():
    fg, bg, names = text.dataset_prompts("voc")
    assert (len(fg), len(bg), len(names)) == (20, 25, 21)
    fg, bg, names = text.dataset_prompts("coco")
    assert (len(fg), len(bg), len(names)) == (80, 23, 81)
    with pytest.raises(ValueError, match="unknown dataset"):
        text.dataset_prompts("cityscapes")


def test_dataset_prompts_synthetic(tmp_path):
    spec = {"classes": ["background", "disc", "star"],
            "prompts": ["red disc", "blue star"],
            "background_prompts": ["sand", "grass"]}
    (tmp_path / "classes.json").write_text(json.dumps(spec))
    fg, bg, names = text.dataset_prompts("synthetic", str(tmp_path))
    assert fg == ("red disc", "blue star")
    assert bg == ("sand", "grass")
    assert names == ("background", "disc", "star")


@pytest.mark.parametrize("content,match", [
    (None, "missing"),
    ("{not json", "cannot read"),
    (json.dumps({"classes": ["background", "a"], "prompts": ["a", "b"],
                 "background_prompts": ["x"]}), "2 prompts for 1"),
    (json.dumps({"classes": ["a", "b"], "prompts": ["b"],
                 "background_prompts": ["x"]}), "start with 'background'"),
    (json.dumps({"classes": ["background", "a"], "prompts": ["a"]}),
     "background_prompts"),
    (json.dumps([1, 2]), "'classes'"),
])
def test_dataset_prompts_synthetic_errors(tmp_path, content, match):
    if content is not None:
        (tmp_path / "classes.json").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        text.dataset_prompts("synthetic", str(tmp_path))


# --- tokenizer --------------------------------------------------------------

def _parity_texts():
    texts = [text.TEMPLATE.format(p) for p in ALL_PROMPTS]
    texts += [
        "A Clean ORIGAMI Dog.",  # upper case
        "bird!!! cat?? (dog), 'train' -- it's 42 sheep; we'll see",
        "  tab\tand\nnewline   spaces  ",
        "zyzzyva quixotic café naïve 東京",  # out of vocabulary: bytes
        "",
        " ".join(["origami zyzzyva"] * 60),  # > 77 tokens: truncated
        "<|endoftext|> inside",
    ]
    return texts


def test_word_tokenizer_keeps_words_whole(tok_dir):
    tok = text.load_tokenizer(tok_dir)
    ids = text.tokenize(tok, ["bird avian", "sknowboard", "origami"])
    # BOS, one id per word, EOS, then padding with EOS.
    vocab = json.load(open(os.path.join(tok_dir, "vocab.json")))
    bos, eos = vocab[text.BOS], vocab[text.EOS]
    assert eos == len(vocab) - 1  # EOS pooling by argmax works
    np.testing.assert_array_equal(
        ids[0, :5], [bos, vocab["bird</w>"], vocab["avian</w>"], eos, eos])
    assert ids[1, 1] == vocab["sknowboard</w>"] and ids[1, 2] == eos
    # An unseen word falls apart into byte-level pieces.
    oov = text.tokenize(tok, ["zyzzyva"])[0]
    assert np.count_nonzero(oov != eos) - 1 > 2


def test_tokenize_matches_transformers(tok_dir):
    texts = _parity_texts()
    ours = text.tokenize(text.load_tokenizer(tok_dir), texts)
    assert ours.dtype == np.int32 and ours.shape == (len(texts), 77)
    # Reference 1: transformers reading the snapshot directory.
    hf = transformers.CLIPTokenizer.from_pretrained(
        tok_dir, local_files_only=True)
    np.testing.assert_array_equal(ours, _hf_ids(hf, texts))
    # Reference 2: transformers building its own pipeline from vocab and
    # merges only (independent of our tokenizer.json).
    vocab = json.load(open(os.path.join(tok_dir, "vocab.json")))
    lines = open(os.path.join(tok_dir, "merges.txt")).read().splitlines()
    merges = [tuple(m.split()) for m in lines[1:]]
    hf2 = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    np.testing.assert_array_equal(ours, _hf_ids(hf2, texts))
    long = ours[-2]
    assert long[-1] == vocab[text.EOS] and np.all(long[:-1] != vocab[text.EOS])


def test_load_tokenizer_without_tokenizer_json(tok_dir, tmp_path):
    d = tmp_path / "slow"
    d.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(os.path.join(tok_dir, name), d / name)
    texts = _parity_texts()
    ours = text.tokenize(text.load_tokenizer(str(d)), texts)
    full = text.tokenize(text.load_tokenizer(tok_dir), texts)
    np.testing.assert_array_equal(ours, full)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        text.load_tokenizer(str(tmp_path))


# --- text bank --------------------------------------------------------------

def _fake_encoder(dim=8, vocab=2048):
    table = np.random.default_rng(0).normal(size=(vocab, dim))
    calls = []

    def encode(ids):
        calls.append(ids.shape)
        ids = np.asarray(ids)
        weights = (np.arange(ids.shape[1]) + 1.0)[None, :, None]
        return (table[ids] * weights).sum(axis=1).astype(np.float32)

    return encode, calls


def test_text_bank_matches_numpy_reference(tok_dir):
    tok = text.load_tokenizer(tok_dir)
    encode, calls = _fake_encoder()
    fg, bg = text.VOC_FG_PROMPTS[:5], text.VOC_BG_PROMPTS[:3]
    templates = ["a clean origami {}.", "a photo of {}", "{}"]
    bank = text.build_text_bank(encode, tok, fg, bg, templates,
                                batch_size=7)
    # 24 texts in batches of 7, the last padded: every call is [7, 77].
    assert calls == [(7, 77)] * 4

    def reference(prompt):
        vecs = []
        for t in templates:
            ids = text.tokenize(tok, [t.format(prompt)])
            v = encode(ids)[0].astype(np.float64)
            vecs.append(v / np.linalg.norm(v))
        m = np.mean(vecs, axis=0)
        return m / np.linalg.norm(m)

    want_fg = np.stack([reference(p) for p in fg])
    want_bg = np.stack([reference(p) for p in bg])
    assert bank["fg"].dtype == np.float32 and bank["fg"].shape == (5, 8)
    np.testing.assert_allclose(bank["fg"], want_fg, atol=1e-6)
    np.testing.assert_allclose(bank["bg"], want_bg, atol=1e-6)
    # One template: plain L2-normalised embeddings.
    one = text.build_text_bank(encode, tok, fg, bg)
    raw = encode(text.tokenize(tok, [text.TEMPLATE.format(p) for p in fg]))
    raw = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(one["fg"], raw, atol=1e-6)


def test_text_bank_errors(tok_dir):
    tok = text.load_tokenizer(tok_dir)
    encode, _ = _fake_encoder()
    with pytest.raises(ValueError, match="'{}'"):
        text.build_text_bank(encode, tok, ["a"], ["b"], "no slot")
    with pytest.raises(ValueError, match="zero or non-finite"):
        text.build_text_bank(lambda ids: np.zeros((len(ids), 4)), tok,
                             ["a"], ["b"])
    with pytest.raises(ValueError, match=r"\[N, E\]"):
        text.build_text_bank(lambda ids: np.ones(4), tok, ["a"], ["b"])


# --- cache ------------------------------------------------------------------

def test_cached_text_bank_hit_miss_and_corruption(tmp_path):
    cache = str(tmp_path / "sub" / "bank.npz")
    calls = []

    def compute(scale):
        def fn():
            calls.append(scale)
            return {"fg": np.full((3, 4), scale, np.float32),
                    "bg": np.full((2, 4), -scale, np.float32)}
        return fn

    first = text.cached_text_bank(cache, "k1", compute(1.0))
    assert calls == [1.0] and os.path.isfile(cache)
    again = text.cached_text_bank(cache, "k1", compute(2.0))
    assert calls == [1.0]  # hit: not recomputed
    np.testing.assert_array_equal(again["fg"], first["fg"])
    np.testing.assert_array_equal(again["bg"], first["bg"])
    stale = text.cached_text_bank(cache, "k2", compute(3.0))
    assert calls == [1.0, 3.0] and stale["fg"][0, 0] == 3.0
    with np.load(cache, allow_pickle=False) as z:
        assert str(z["key"]) == "k2"  # overwritten
    with open(cache, "wb") as f:
        f.write(b"not an npz file")
    with pytest.warns(UserWarning, match="unreadable"):
        fixed = text.cached_text_bank(cache, "k2", compute(4.0))
    assert calls == [1.0, 3.0, 4.0] and fixed["bg"][0, 0] == -4.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text.cached_text_bank(cache, "k2", compute(5.0))
    assert calls == [1.0, 3.0, 4.0]
    assert os.listdir(tmp_path / "sub") == ["bank.npz"]  # no temp files


def test_text_bank_key(tmp_path):
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"abc")
    k = text.text_bank_key(str(w), ["a"], ["b"])
    assert k == text.text_bank_key(str(w), ["a"], ["b"], [text.TEMPLATE])
    assert k != text.text_bank_key(str(w), ["a"], ["c"])
    assert k != text.text_bank_key(str(w), ["a"], ["b"], "a photo of {}.")
    w.write_bytes(b"abcd")  # a different file behind the same path
    assert k != text.text_bank_key(str(w), ["a"], ["b"])
    with pytest.raises(FileNotFoundError):
        text.text_bank_key(str(tmp_path / "missing"), ["a"], ["b"])


def test_text_bank_key_follows_the_tokenizer(tmp_path, tok_dir):
    """A different tokenizer (or context length) behind the same weights
    misses the cache: the key hashes the token ids the encoder sees."""
    w = tmp_path / "model.safetensors"
    w.write_bytes(b"abc")
    fg, bg = ["aeroplane", "bicycle"], ["ground"]
    tok = text.load_tokenizer(tok_dir)
    k = text.text_bank_key(str(w), fg, bg, tokenizer=tok)
    assert k == text.text_bank_key(str(w), fg, bg, tokenizer=tok)
    assert k != text.text_bank_key(str(w), fg, bg)
    assert k != text.text_bank_key(str(w), fg, bg, tokenizer=tok,
                                   context_length=24)
    # a vocabulary with other ids for the same words
    other = text.load_tokenizer(text.build_word_tokenizer(
        ["zebra", "yak", *fg, *bg, "a", "clean", "origami", "."],
        str(tmp_path / "other")))
    assert text.tokenize(other, ["a clean origami bicycle."], 77).tolist() != \
        text.tokenize(tok, ["a clean origami bicycle."], 77).tolist()
    assert k != text.text_bank_key(str(w), fg, bg, tokenizer=other)
