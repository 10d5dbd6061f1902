"""Tests of the PyTorch eager reference (benchmarks/reference_torch.py).

Each piece against a slow, obvious computation (manual autograd, NumPy or
per-pixel Python loops, hand-built examples) on tiny random models.
Tolerances: 1e-5 absolute on float32 maps unless stated.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import reference_torch as rt

FAST = rt.RefConfig(par_iters=2, colour_iters=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: torch's thread pool only adds contention on shared CI."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rt.make_models("tiny", seed=0)


@pytest.fixture(scope="module")
def batch():
    b = rt.random_batch(2, 64, 5, seed=1, n_segments=12)
    b["labels"][:] = 0.0
    b["labels"][0, [1, 3]] = 1.0  # image 1 has no class at all
    return b


def _pixels(batch):
    return rt.normalize_images(torch.as_tensor(batch["image"]))


# --- encoders ---------------------------------------------------------------


def test_position_embeddings_bilinear(models):
    emb = models.clip.vision_model.embeddings
    pos = emb.position_embedding.weight  # 2x2 pretrained grid
    x = torch.zeros(1, 3, 48, 64)
    got = emb(x, interpolate_pos_encoding=True)[0]
    patches = emb.patch_embedding(x).flatten(2).transpose(1, 2)[0]
    grid = pos[1:].T.reshape(1, -1, 2, 2)
    want = F.interpolate(grid, size=(3, 4), mode="bilinear",
                         align_corners=False).reshape(pos.shape[1], -1).T
    torch.testing.assert_close(got[1:], patches + want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got[0], emb.class_embedding + pos[0],
                               atol=1e-6, rtol=0)


# --- GradCAM ----------------------------------------------------------------


def _manual_cam(models, x_prev, cls_ids, k, projected):
    """Block 12 written out by hand; d p_k / d ln_1(x) by autograd."""
    clip, heads = models.clip, models.heads
    layer = clip.vision_model.encoder.layers[-1]
    att = layer.self_attn
    h = layer.layer_norm1(x_prev).detach().requires_grad_(True)
    t, d = h.shape[1], h.shape[2]
    nh = att.num_heads

    def split(y):
        return y.reshape(t, nh, d // nh).transpose(0, 1)

    q = split(h[0] @ att.q_proj.weight.T + att.q_proj.bias)
    kk = split(h[0] @ att.k_proj.weight.T + att.k_proj.bias)
    v = split(h[0] @ att.v_proj.weight.T + att.v_proj.bias)
    a = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(d // nh), dim=-1)
    o = (a @ v).transpose(0, 1).reshape(t, d)
    x1 = x_prev[0] + o @ att.out_proj.weight.T + att.out_proj.bias
    m = layer.mlp
    z = layer.layer_norm2(x1) @ m.fc1.weight.T + m.fc1.bias
    z = z * torch.sigmoid(1.702 * z)
    x2 = x1 + z @ m.fc2.weight.T + m.fc2.bias
    tok = clip.vision_model.post_layernorm(x2) @ clip.visual_projection.weight.T
    patches = tok[1:]
    texts = torch.cat([models.text_fg[cls_ids], models.text_bg])
    if projected:
        heads.eval()
        patches = heads.isa(patches)  # per token, then the mean
        texts = heads.tsa(texts)
    feat = patches.mean(dim=0, keepdim=True)
    feat = feat / feat.norm(dim=-1, keepdim=True)
    texts = texts / texts.norm(dim=-1, keepdim=True)
    p = torch.softmax(100.0 * feat @ texts.T, dim=-1)[0, k]
    (g,) = torch.autograd.grad(p, h)
    w = g[0, 1:].mean(dim=0)
    cam = torch.relu(h[0, 1:].detach() @ w).numpy()
    cam = (cam - cam.min()) / max(cam.max() - cam.min(), 1e-12)
    return cam


@pytest.mark.parametrize("projected", [False, True])
def test_gradcam_matches_manual_autograd(models, batch, projected):
    cfg = rt.RefConfig(projected=projected)
    hidden, _ = rt.clip_first_blocks(models.clip, _pixels(batch))
    x_prev = hidden[-1][:1]
    cls_ids = [1, 3]
    out = rt.gradcam_image(models, x_prev, cls_ids, (4, 4), cfg)
    assert out["cams"].shape == (2, 4, 4)
    assert out["attn"].shape == (17, 17)
    for k in range(2):
        want = _manual_cam(models, x_prev, cls_ids, k, projected)
        np.testing.assert_allclose(out["cams"][k].reshape(-1).numpy(), want,
                                   atol=1e-5)
    assert not any(p.grad is not None for p in models.heads.parameters())


def test_cams_range_and_absent_classes(models, batch):
    out = rt.pseudo_labels(models, batch, FAST, kmax=3)
    assert out["cls_ids"].tolist() == [[1, 3, -1], [-1, -1, -1]]
    cams = out["cams"]
    assert cams.shape == (2, 3, 4, 4)
    assert cams.min() >= 0 and cams.max() <= 1
    assert torch.all(cams[0, :2].amax(dim=(1, 2)) > 0.99)
    assert torch.all(cams[0, 2] == 0) and torch.all(cams[1] == 0)
    assert torch.all(out["refined"][1] == 0)
    valid = torch.as_tensor(batch["valid"])
    for labels in [out["labels"], *out["seeds"].values()]:
        assert torch.all((labels == 255) == ~valid)
        assert set(labels[0][valid[0]].unique().tolist()) <= {0, 2, 4}
        assert set(labels[1][valid[1]].unique().tolist()) == {0}


def test_present_classes_truncates_with_warning():
    labels = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    with pytest.warns(UserWarning, match="keeping the first 2"):
        ids = rt.present_classes(labels, kmax=2)
    assert ids.tolist() == [[0, 1], [3, -1]]
    assert rt.present_classes(labels).tolist() == [[0, 1, 2], [3, -1, -1]]


# --- affinity, transition, masks --------------------------------------------


def test_compute_trans_mat_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.random((6, 6)).astype(np.float64)
    t = a.copy()
    for _ in range(3):
        for j in range(6):
            t[:, j] /= t[:, j].sum()
        for i in range(6):
            t[i, :] /= t[i, :].sum()
    t = (t + t.T) / 2
    want = np.array([[sum(t[i, m] * t[m, j] for m in range(6))
                      for j in range(6)] for i in range(6)])
    got = rt.compute_trans_mat(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_refine_cam_zeroes_columns_outside_mask():
    rng = np.random.default_rng(1)
    trans = rng.random((4, 4))
    cam = rng.random(4)
    mask = np.array([True, False, True, False])
    want = [sum(trans[i, j] * cam[j] for j in range(4) if mask[j])
            for i in range(4)]
    got = rt.refine_cam(torch.from_numpy(trans),
                        torch.from_numpy(cam).reshape(2, 2),
                        torch.from_numpy(mask).reshape(2, 2))
    np.testing.assert_allclose(got.reshape(-1).numpy(), want, rtol=1e-12)


def test_fuse_affinity_weights_and_layers():
    attn = [torch.full((5, 5), float(i)) for i in range(12)]
    dino = torch.full((4, 4), 10.0)
    cfg = rt.RefConfig()
    # Last 8 blocks: mean of 4..11 = 7.5.
    clip_only = rt.fuse_affinity(attn, dino, True, False, cfg)
    torch.testing.assert_close(clip_only, torch.full((4, 4), 7.5))
    both = rt.fuse_affinity(attn, dino, True, True, cfg)
    torch.testing.assert_close(both, torch.full((4, 4), 0.4 * 7.5 + 6.0))


def test_box_mask_components_and_border_clipping():
    cam = torch.zeros(6, 6)
    cam[1, 1] = 1.0  # single pixel: box [1:2, 1:2]
    cam[2, 2] = 0.5  # diagonal neighbour: same 8-connected component
    cam[4:6, 4:6] = 0.9  # touches the bottom-right border: clipped to 5
    cam[0, 5] = 0.41  # u = 104 <= int(0.4 * 255) = 102? no: kept
    cam[5, 0] = 0.40  # u = 102, not > 102: dropped
    got = rt.box_mask(cam, 0.4).numpy()
    want = np.zeros((6, 6), dtype=bool)
    want[1:3, 1:3] = True
    want[4:5, 4:5] = True
    want[0:1, 5:5] = True  # x1 = min(6, 5) = 5: an empty box
    np.testing.assert_array_equal(got, want)
    assert not rt.box_mask(torch.zeros(3, 3), 0.4).any()


def test_box_mask_matches_cv2_when_installed():
    """CLIP-ES scoremap2bbox with real OpenCV (skipped where cv2 is absent)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(3, 25, 2))
        cam = rng.random((h, w))
        if trial % 2:
            cam = cam * (rng.random((h, w)) > 0.7)
        cam = (cam / max(cam.max(), 1e-7)).astype(np.float32)
        thr = float(rng.choice([0.4, 0.7]))
        u = np.expand_dims((cam * 255).astype(np.uint8), 2)
        _, binary = cv2.threshold(u, int(thr * np.max(u)), 255,
                                  cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE,
                                    cv2.CHAIN_APPROX_SIMPLE)[-2]
        want = np.zeros((h, w), bool)
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            want[y:min(y + bh, h - 1), x:min(x + bw, w - 1)] = True
        got = rt.box_mask(torch.from_numpy(cam), thr).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")


def _numpy_kmeans(points, k, iters):
    n = len(points)
    order = sorted(range(n), key=lambda i: (points[i][0], i))
    centres = [list(points[order[int(math.floor((i + 0.5) * n / k))]])
               for i in range(k)]

    def nearest(p):
        best, best_d = 0, None
        for j, c in enumerate(centres):
            d = sum((float(a) - float(b)) ** 2 for a, b in zip(p, c,
                                                               strict=True))
            if best_d is None or d < best_d:
                best, best_d = j, d
        return best

    for _ in range(iters):
        assign = [nearest(p) for p in points]
        for j in range(k):
            members = [points[i] for i in range(n) if assign[i] == j]
            if members:
                centres[j] = list(np.mean(np.array(members, np.float64), 0))
    return np.array([nearest(p) for p in points]), np.array(centres)


@pytest.mark.parametrize("n,k,iters", [(13, 4, 10), (3, 5, 10), (9, 8, 10),
                                       (40, 8, 1), (40, 8, 2)])
def test_colour_kmeans_matches_numpy(n, k, iters):
    rng = np.random.default_rng(n)
    points = rng.uniform(0, 100, (n, 3)).astype(np.float32)
    points[1, 0] = points[2, 0]  # an L tie: the stable order decides
    got_a, got_c = rt.colour_kmeans(torch.from_numpy(points), k, iters)
    want_a, want_c = _numpy_kmeans(points, k, iters)
    np.testing.assert_array_equal(got_a.numpy(), want_a)
    np.testing.assert_allclose(got_c.numpy(), want_c, atol=1e-4)


def test_colour_kmeans_separates_obvious_groups():
    pts = torch.tensor([[10, 0, 0], [11, 1, 0], [50, 0, 0], [51, 0, 1],
                        [90, 5, 5], [91, 5, 5]], dtype=torch.float32)
    assign, _ = rt.colour_kmeans(pts, 3, 10)
    assert assign.tolist() == [0, 0, 1, 1, 2, 2]


def test_superpixel_colours_mean_lab():
    img = np.zeros((2, 3, 3), np.uint8)
    img[:, :2] = (255, 0, 0)
    img[:, 2] = (0, 0, 255)
    sp = np.array([[0, 0, 2], [0, 0, -1]])
    valid = np.ones((2, 3), bool)
    valid[0, 1] = False
    ids, colours = rt.superpixel_colours(img, sp, valid)
    assert ids.tolist() == [0, 2]
    import skimage.color
    red = skimage.color.rgb2lab(np.array([[[255, 0, 0]]], np.uint8))[0, 0]
    np.testing.assert_allclose(colours[0], red, atol=1e-4)


def test_cluster_ratios_match_pixel_loops():
    rng = np.random.default_rng(5)
    cam = rng.uniform(0, 1, (20, 24)).astype(np.float32)
    cam[:, :6] = rng.uniform(0.35, 0.45, (20, 6))  # around theta_h
    clusters = rng.integers(-1, 4, (20, 24))
    clusters[:, 20:] = 4  # cluster 4 only where the CAM is exactly 0
    cam[:, 20:] = 0.0
    got = rt.cluster_ratios(torch.from_numpy(cam), torch.from_numpy(clusters),
                            6, 0.4).numpy()
    want = []
    for k in range(6):
        num = den = 0.0
        for y in range(20):
            for x in range(24):
                if clusters[y, x] == k:
                    den += float(cam[y, x])
                    num += float(cam[y, x]) if cam[y, x] > 0.4 else 0.0
        want.append(num / den if den > 0 else 0.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[4] == 0 and got[5] == 0


def _loop_superpixel_mask(cam, clusters, valid, cfg):
    up = F.interpolate(torch.as_tensor(cam)[None, None], size=clusters.shape,
                       mode="bilinear", align_corners=False)[0, 0].numpy()
    num, den = {}, {}
    height, width = clusters.shape
    for y in range(height):
        for x in range(width):
            c = int(clusters[y, x])
            if c < 0 or not valid[y, x]:
                continue
            v = float(up[y, x])
            den[c] = den.get(c, 0.0) + v
            num[c] = num.get(c, 0.0) + (v if v > cfg.theta_h else 0.0)
    targets = {c for c in den if den[c] > 0 and num[c] / den[c] > cfg.theta_r}
    h, w = cam.shape
    mask = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            t = vcount = 0
            for y in range(16 * i, 16 * i + 16):
                for x in range(16 * j, 16 * j + 16):
                    if valid[y, x]:
                        vcount += 1
                        t += int(clusters[y, x] in targets)
            mask[i, j] = vcount > 0 and t >= cfg.patch_fraction * vcount
    return mask if mask.any() else np.ones((h, w), bool)


def test_superpixel_mask_matches_pixel_loops():
    cfg = rt.RefConfig(colour_k=4)
    rng = np.random.default_rng(3)
    cam = np.zeros((3, 3), np.float32)
    cam[0, :2] = 1.0
    cam[1, 0] = 0.7
    cam += rng.uniform(0, 0.2, (3, 3)).astype(np.float32)
    clusters = np.zeros((48, 48), np.int64)
    clusters[:, 16:] = 1
    clusters[24:, :] = 2
    clusters[40:, 40:] = 3
    clusters[:5, :5] = -1
    valid = np.ones((48, 48), bool)
    valid[:, 44:] = False
    clusters[~valid] = -1
    want = _loop_superpixel_mask(cam, clusters, valid, cfg)
    got = rt.superpixel_mask(torch.from_numpy(cam), torch.from_numpy(clusters),
                             torch.from_numpy(valid), cfg).numpy()
    np.testing.assert_array_equal(got, want)
    assert 0 < want.sum() < want.size  # a real mix of target and not
    empty = rt.superpixel_mask(torch.zeros(3, 3), torch.from_numpy(clusters),
                               torch.from_numpy(valid), cfg)
    assert empty.all()  # nothing above theta_h: the all-ones fallback


# --- PAR and labels ---------------------------------------------------------


def test_par_follows_colour_edge():
    img = torch.zeros(1, 3, 32, 32)
    img[:, :, :, :16] = torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)
    img[:, :, :, 16:] = torch.tensor([-1.5, 1.0, 1.0]).view(1, 3, 1, 1)
    fg = torch.full((32, 32), 0.2)
    fg[:, :20] = 0.6  # the CAM spills 4 columns over the edge
    masks = torch.stack([1 - fg, fg])[None]
    assert (masks[0].argmax(0)[:, :20] == 1).all()
    out = rt.PAR(num_iter=20)(img, masks)
    labels = out[0].argmax(0)
    assert (labels[:, :16] == 1).all() and (labels[:, 16:] == 0).all()


def test_par_weights_sum_to_one_point_zero_one():
    img = torch.randn(1, 3, 20, 24)
    masks = torch.full((1, 2, 20, 24), 0.5)
    out = rt.PAR(num_iter=3)(img, masks)
    torch.testing.assert_close(out, torch.full_like(out, 0.5 * 1.01 ** 3))


def test_cams_to_labels_without_par():
    cams = torch.zeros(2, 2, 2)
    cams[0, 0, 0] = 1.0  # class 4 (label 5) top-left
    cams[1, 1, 1] = 1.0  # class 0 (label 1) bottom-right
    valid = torch.ones(32, 32, dtype=torch.bool)
    valid[0, 0] = False
    labels = rt.cams_to_labels(cams, torch.tensor([4, 0]), valid,
                               rt.RefConfig())
    assert labels[0, 0] == 255 and labels[1, 1] == 5 and labels[30, 30] == 1
    assert labels[0, 31] == 0  # 1 - max wins where both CAMs are low


# --- losses and the train step ----------------------------------------------


def test_balanced_seg_ce_matches_manual_and_is_safe():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 0, 2, 255]] * 4])  # [1, 4, 4]
    up = F.interpolate(logits, size=(4, 4), mode="bilinear",
                       align_corners=False)
    logp = torch.log_softmax(up, dim=1)[0]
    bg = [-logp[0, y, x] for y in range(4) for x in range(2)]
    fg = [-logp[2, y, 2] for y in range(4)]
    want = 0.5 * (sum(bg) / len(bg) + sum(fg) / len(fg))
    got = rt.balanced_seg_ce(logits, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    no_fg = rt.balanced_seg_ce(logits, torch.zeros(1, 4, 4, dtype=torch.long))
    assert torch.isfinite(no_fg)


def test_proto_loss_matches_manual(models):
    heads = models.heads
    heads.eval()
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 16)
    cams = torch.rand(2, 2, 2, 2)
    cls_ids = torch.tensor([[0, 3], [2, -1]])
    got = rt.proto_loss(heads, tokens, cams, cls_ids, models.text_fg)
    z = heads.isa(tokens[:, 1:])
    pt = heads.tsa(models.text_fg)
    tau = math.exp(heads.log_tau.item())
    terms = []
    for b, k, c in [(0, 0, 0), (0, 1, 3), (1, 0, 2)]:
        w = cams[b, k].reshape(-1)
        f = (w[:, None] * z[b]).sum(0) / (w.sum() + 1e-6)
        f = f / f.norm()
        terms.append(-torch.log_softmax(f @ pt.T / tau, dim=-1)[c])
    torch.testing.assert_close(got, sum(terms) / 3, atol=1e-5, rtol=0)
    none = rt.proto_loss(heads, tokens, cams, torch.full((2, 2), -1),
                         models.text_fg)
    assert none.item() == 0.0


def test_decoder_shapes_and_names():
    dec = rt.Decoder(num_inputs=3, input_dim=8, embed_dim=16, depth=1,
                     heads=2, num_classes=4, dropout=0.0)
    out = dec(torch.randn(3, 2, 12, 8), (3, 4))
    assert out.shape == (2, 4, 3, 4)
    names = set(dict(dec.named_parameters()))
    assert "decoder_fts_fuse.linears_modulelist.2.proj_2.weight" in names
    assert "decoder.transformer.resblocks.0.attn.in_proj_weight" in names
    assert "decoder.linear_pred.bias" in names


def test_end_to_end_train_step_loss_decreases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = rt.make_models("tiny", seed=2)
    b = rt.random_batch(2, 64, 5, seed=3, n_segments=12)
    step = rt.TrainStep(models, rt.RefConfig(par_iters=2, colour_iters=3))
    before = {n: p.clone() for n, p in models.decoder.named_parameters()}
    losses = [step(b)["loss"] for _ in range(6)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    moved = [n for n, p in models.decoder.named_parameters()
             if not torch.equal(p, before[n])]
    assert len(moved) == len(before)
    assert all(not p.requires_grad or p.grad is None
               for p in models.clip.parameters())
