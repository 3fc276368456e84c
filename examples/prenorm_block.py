"""Two pre-norm transformer blocks in plain NumPy, forward and backward, with normkit's fused
residual add + LayerNorm (nk.add_layer_norm), checked against the unfused composition
(x + residual, then nk.layer_norm).

Each block is  h = x + attention(LN1(x));  out = h + mlp(LN2(h)).  Between sublayers the sum of
the residual stream and a branch is needed twice: as the next residual stream and, normalized,
as the next branch's input. nk.add_layer_norm returns both in one pass over memory.

Run:  python examples/prenorm_block.py
"""

import numpy as np

import normkit as nk

T, D, HIDDEN, BLOCKS = 16, 32, 64, 2  # tokens, model width, MLP width, blocks
rng = np.random.default_rng(0)


def params():
    s = 1.0 / np.sqrt(D)
    return {
        "wq": rng.standard_normal((D, D)) * s, "wk": rng.standard_normal((D, D)) * s,
        "wv": rng.standard_normal((D, D)) * s, "wo": rng.standard_normal((D, D)) * s,
        "w1": rng.standard_normal((D, HIDDEN)) * s, "w2": rng.standard_normal((HIDDEN, D)) / 8,
        "g1": 1 + 0.1 * rng.standard_normal(D), "b1": 0.1 * rng.standard_normal(D),
        "g2": 1 + 0.1 * rng.standard_normal(D), "b2": 0.1 * rng.standard_normal(D),
    }


def attention(a, p):
    q, k, v = a @ p["wq"], a @ p["wk"], a @ p["wv"]
    s = q @ k.T / np.sqrt(D)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    pr = e / e.sum(axis=1, keepdims=True)
    o = pr @ v
    return o @ p["wo"], (a, q, k, v, pr, o)


def attention_backward(dout, cache, p, grads):
    a, q, k, v, pr, o = cache
    grads["wo"] += o.T @ dout
    do = dout @ p["wo"].T
    dv = pr.T @ do
    dp = do @ v.T
    ds = pr * (dp - (dp * pr).sum(axis=1, keepdims=True)) / np.sqrt(D)
    dq, dk = ds @ k, ds.T @ q
    grads["wq"] += a.T @ dq
    grads["wk"] += a.T @ dk
    grads["wv"] += a.T @ dv
    return dq @ p["wq"].T + dk @ p["wk"].T + dv @ p["wv"].T


def mlp(b, p):
    z = b @ p["w1"]
    r = np.maximum(z, 0.0)
    return r @ p["w2"], (b, z, r)


def mlp_backward(dout, cache, p, grads):
    b, z, r = cache
    grads["w2"] += r.T @ dout
    dz = (dout @ p["w2"].T) * (z > 0)
    grads["w1"] += b.T @ dz
    return dz @ p["w1"].T


def forward(x, blocks, fused):
    """The stack's output and what the backward needs. With fused=True every 'sum, then
    normalize' is one nk.add_layer_norm call; else x + residual and nk.layer_norm."""

    def add_norm(stream, branch, g, b):
        if fused:
            o = nk.add_layer_norm(stream, branch, D, g, b)
            return o.y, o.h, o.mean, o.rstd
        h = stream + branch
        o = nk.layer_norm(h, D, g, b)
        return o.y, h, o.mean, o.rstd

    caches, stream, branch = [], x, None
    for i, p in enumerate(blocks):
        if branch is None:  # the first block's input has no pending sum
            o = nk.layer_norm(stream, D, p["g1"], p["b1"])
            a, h0, m1, r1 = o.y, stream, o.mean, o.rstd
        else:
            a, h0, m1, r1 = add_norm(stream, branch, p["g1"], p["b1"])
        att, ca = attention(a, p)
        b, h1, m2, r2 = add_norm(h0, att, p["g2"], p["b2"])
        branch, cm = mlp(b, p)
        caches.append((h0, m1, r1, ca, h1, m2, r2, cm))
        stream = h1
    return stream + branch, caches


def backward(dout, blocks, caches, fused):
    grads = [{k: np.zeros_like(v) for k, v in p.items()} for p in blocks]
    d_stream, d_branch = dout, dout  # out = stream + branch
    for i in reversed(range(len(blocks))):
        p, g = blocks[i], grads[i]
        h0, m1, r1, ca, h1, m2, r2, cm = caches[i]
        db = mlp_backward(d_branch, cm, p, g)
        if fused:
            gr = nk.add_layer_norm_backward(db, d_stream, h1, m2, r2, p["g2"])
            dh1 = gr.dx
        else:
            gr = nk.layer_norm_backward(db, h1, m2, r2, p["g2"])
            dh1 = gr.dx + d_stream
        g["g2"] += gr.dweight
        g["b2"] += gr.dbias
        da = attention_backward(dh1, ca, p, g)  # h1 = h0 + attention(a)
        if fused:
            gr = nk.add_layer_norm_backward(da, dh1, h0, m1, r1, p["g1"])
            dh0 = gr.dx
        else:
            gr = nk.layer_norm_backward(da, h0, m1, r1, p["g1"])
            dh0 = gr.dx + dh1
        g["g1"] += gr.dweight
        g["b1"] += gr.dbias
        d_stream = d_branch = dh0  # h0 = previous stream + previous branch (or x)
    return d_stream, grads


def main():
    blocks = [params() for _ in range(BLOCKS)]
    x = rng.standard_normal((T, D))
    dout = rng.standard_normal((T, D))
    results = {}
    for fused in (True, False):
        y, caches = forward(x, blocks, fused)
        dx, grads = backward(dout, blocks, caches, fused)
        results[fused] = (y, dx, grads)
    (yf, dxf, gf), (yu, dxu, gu) = results[True], results[False]
    diff = max(np.abs(yf - yu).max(), np.abs(dxf - dxu).max(),
               max(np.abs(a[k] - b[k]).max() for a, b in zip(gf, gu) for k in a))
    print(f"{BLOCKS} pre-norm blocks, {T} tokens x {D} features, float64")
    print(f"fused add_layer_norm vs x + residual then layer_norm: max difference {diff:.3g}")
    assert diff < 1e-12, diff
    # the backward itself, by central differences of loss = sum(y * dout) on a few entries
    worst = 0.0
    for (blk, name, idx) in [(0, "g1", (3,)), (1, "g2", (5,)), (0, "wq", (2, 7)), (1, "w1", (4, 9)),
                             (None, "x", (6, 11))]:
        arr = x if blk is None else blocks[blk][name]
        got = dxf[idx] if blk is None else gf[blk][name][idx]
        h, old = 1e-6, arr[idx]
        arr[idx] = old + h
        up = (forward(x, blocks, True)[0] * dout).sum()
        arr[idx] = old - h
        down = (forward(x, blocks, True)[0] * dout).sum()
        arr[idx] = old
        worst = max(worst, abs(got - (up - down) / (2 * h)) / max(1.0, abs(got)))
    print(f"gradients vs central differences: largest relative error {worst:.2g}")
    assert worst < 1e-6, worst
    print("ok")


if __name__ == "__main__":
    main()
