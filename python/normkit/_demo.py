"""``python -m normkit demo``: the BatchNorm paper's Figure 1 on scikit-learn's digits.

Ioffe and Szegedy (2015, section 4.1) train a network of three fully connected hidden layers of
100 sigmoid units on MNIST, with batches of 60, with and without BatchNorm, and show (a) test
accuracy against training steps and (b, c) the 15th, 50th and 85th percentiles of one
last-hidden-layer sigmoid input over training. This module repeats that experiment with NumPy
and normkit only, on the 8x8 handwritten digits that ship inside scikit-learn (nothing is
downloaded), then deploys the BatchNorm network: inference with the running averages, with
recomputed statistics (``BatchNorm.recompute_statistics``, Algorithm 2 and the exact population),
and with every BatchNorm folded into its dense layer (``fold_batch_norm``).

Both runs start from the same weights and see the same batches with the same learning rate; the
only difference is the BatchNorm layers (whose networks drop the dense biases, which BatchNorm's
mean subtraction would cancel). Everything is float64 and seeded, so a run is reproducible.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Dict, List, Optional, TextIO

import numpy as np

from . import _core
from .deploy import fold_batch_norm
from .functional import batch_norm
from .layers import BatchNorm

HIDDEN = (100, 100, 100)
BATCH = 60
TEST_FRACTION = 0.2
WATCHED_UNIT = 0  # the last-hidden-layer unit whose sigmoid input is tracked
DEFAULT_STEPS = 2000
DEFAULT_LR = 0.5
DEFAULT_OUT = "normkit_demo.png"

INSTALL_HINT = (
    'python -m normkit demo needs scikit-learn (for its bundled digits data) and matplotlib '
    '(for the figure): pip install "normkit[demo]" (or pip install scikit-learn matplotlib)'
)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


class _Net:
    """Dense layers (weights stored ``(in, out)``, used as ``h @ W``), each followed by a
    BatchNorm (``bn=True``, no dense bias) or a bias, then a sigmoid; a softmax output layer."""

    def __init__(self, weights: List[np.ndarray], bn: bool):
        self.W = [w.copy() for w in weights]
        self.b = [np.zeros(w.shape[1]) for w in weights]
        self.bns: List[Optional[BatchNorm]] = [
            BatchNorm(w.shape[1], dtype=np.float64) if bn else None for w in weights[:-1]
        ]

    def train(self, mode: bool) -> None:
        for bn in self.bns:
            if bn is not None:
                bn.train(mode)

    @property
    def training(self) -> bool:
        return any(bn is not None and bn.training for bn in self.bns)

    def forward(self, x: np.ndarray, upto: Optional[int] = None, batch_stats: bool = False):
        """Logits, and every hidden layer's (input, sigmoid input, sigmoid output). With
        ``upto=k``, stop at the input of hidden layer k's BatchNorm and return it. With
        ``batch_stats``, BatchNorm normalizes with the statistics of ``x`` as in training, but
        leaves the running statistics alone."""
        cache = []
        h = x
        for k, (W, bn) in enumerate(zip(self.W[:-1], self.bns)):
            z = h @ W
            if upto == k:
                return z
            if bn is None:
                z = z + self.b[k]
            elif batch_stats:
                z = batch_norm(z, bn.weight, bn.bias, eps=bn.eps).y
            else:
                z = bn(z)
            s = _sigmoid(z)
            cache.append((h, z, s))
            h = s
        return h @ self.W[-1] + self.b[-1], cache

    def sgd_step(self, x: np.ndarray, labels: np.ndarray, lr: float) -> None:
        logits, cache = self.forward(x)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(labels)), labels] -= 1.0
        dz = p / len(labels)  # d(mean cross-entropy)/d(logits)
        h_last = cache[-1][2]
        grads = [(h_last.T @ dz, dz.sum(axis=0))]
        dh = dz @ self.W[-1].T
        for k in reversed(range(len(cache))):
            h, _, s = cache[k]
            dz = dh * s * (1.0 - s)
            bn = self.bns[k]
            if bn is not None:
                dz = bn.backward(dz)
                bn.weight -= lr * bn.grad_weight
                bn.bias -= lr * bn.grad_bias
            grads.append((h.T @ dz, dz.sum(axis=0)))
            dh = dz @ self.W[k].T
        for k, (dW, db) in zip(reversed(range(len(self.W))), grads):
            self.W[k] -= lr * dW
            if k == len(self.W) - 1 or self.bns[k] is None:
                self.b[k] -= lr * db

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Inference: BatchNorm with its running statistics; the mode is left as it was."""
        mode = self.training
        self.train(False)
        out = self.forward(x)[0]
        self.train(mode)
        return out


def _scores(logits: np.ndarray, labels: np.ndarray):
    """(accuracy, mean cross-entropy) of ``logits`` against ``labels``."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return _accuracy(logits, labels), float(-log_p[np.arange(len(labels)), labels].mean())


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


class _Progress:
    """A one-line text progress bar on a stream (stderr), redrawn at most ~50 times."""

    def __init__(self, label: str, total: int, stream: TextIO):
        self.label, self.total, self.stream = label, total, stream
        self.every = max(1, total // 50)
        self.t0 = time.perf_counter()

    def update(self, done: int) -> None:
        if done % self.every and done != self.total:
            return
        width = 30
        filled = width * done // self.total if self.total else width
        bar = "#" * filled + "." * (width - filled)
        secs = time.perf_counter() - self.t0
        self.stream.write(f"\r{self.label:<22} [{bar}] {done:>6}/{self.total} {secs:5.1f} s")
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _train(weights, bn: bool, data, steps: int, lr: float, seed: int, eval_steps, stream) -> Dict:
    """Train one network; returns its history (accuracy and watched-unit percentiles at
    ``eval_steps``) and the trained network."""
    x_train, y_train, x_test, y_test = data
    net = _Net(weights, bn)
    rng = np.random.default_rng([seed, 1])  # the batch order: the same for both runs
    order = np.empty(0, np.int64)
    acc, pct = [], []
    progress = _Progress("with BatchNorm" if bn else "without BatchNorm", steps, stream)
    evals = set(eval_steps)
    for step in range(steps + 1):
        if step in evals:
            acc.append(_accuracy(net.logits(x_test), y_test))
            # the sigmoid input as training shapes it: batch statistics of the test images
            z = net.forward(x_test, batch_stats=True)[1][-1][1][:, WATCHED_UNIT]
            pct.append(np.percentile(z, [15, 50, 85]))
        if step == steps:
            break
        if len(order) < BATCH:
            order = np.concatenate([order, rng.permutation(len(x_train))])
        idx, order = order[:BATCH], order[BATCH:]
        net.sgd_step(x_train[idx], y_train[idx], lr)
        progress.update(step + 1)
    if steps == 0:
        progress.update(0)
    return {"net": net, "acc": np.array(acc), "pct": np.array(pct)}


def _inference_results(net: _Net, data):
    """Test (accuracy, cross-entropy) of the trained BatchNorm network at inference with its
    running averages, with recomputed statistics (paper, population) and folded; plus the folded
    network's largest logit difference from the BatchNorm network it came from."""
    x_train, _, x_test, y_test = data
    batches = [x_train[i:i + BATCH] for i in range(0, len(x_train), BATCH)]
    rows = [("running averages (momentum 0.1)", _scores(net.logits(x_test), y_test))]
    saved = [bn.state_dict() for bn in net.bns]
    net.train(False)
    for method in ("paper", "population"):
        for bn, state in zip(net.bns, saved):
            bn.load_state_dict(state)
        # layer by layer: layer k's inputs come from layers < k with their new statistics
        for k, bn in enumerate(net.bns):
            bn.recompute_statistics((net.forward(b, upto=k) for b in batches), method=method)
        rows.append((f'recompute_statistics(method="{method}")', _scores(net.logits(x_test), y_test)))
    # fold the population statistics into the dense layers: a plain sigmoid network remains
    folded = _Net(net.W, bn=False)
    for k, bn in enumerate(net.bns):
        folded.W[k], folded.b[k] = fold_batch_norm(net.W[k], None, bn, out_axis=1)
    folded.b[-1] = net.b[-1].copy()
    bn_logits = net.logits(x_test)
    folded_logits = folded.logits(x_test)
    diff = float(np.abs(folded_logits - bn_logits).max())
    rows.append(("folded into the dense layers (fold_batch_norm)", _scores(folded_logits, y_test)))
    return rows, diff


def _load_digits(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0  # pixel intensities 0..16 -> [0, 1]
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng([seed, 0]).permutation(len(x))
    n_test = int(round(TEST_FRACTION * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _initial_weights(n_in: int, seed: int) -> List[np.ndarray]:
    """Small random Gaussian weights (the paper's initialization): N(0, 1/fan_in)."""
    rng = np.random.default_rng([seed, 2])
    sizes = (n_in, *HIDDEN, 10)
    return [rng.standard_normal((a, b)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])]


def _figure(path: str, steps_axis, plain: Dict, bn: Dict, lr: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots(1, 3)
    ax[0].plot(steps_axis, plain["acc"], color="tab:gray", label="without BatchNorm")
    ax[0].plot(steps_axis, bn["acc"], color="tab:blue", label="with BatchNorm")
    ax[0].set(title="(a) test accuracy", xlabel="training step", ylabel="accuracy", ylim=(0, 1))
    ax[0].legend(loc="lower right")
    ax[0].grid(alpha=0.3)
    lo = min(plain["pct"].min(), bn["pct"].min())
    hi = max(plain["pct"].max(), bn["pct"].max())
    pad = 0.05 * (hi - lo + 1e-12)
    for a, run, title in ((ax[1], plain, "(b) without BatchNorm"), (ax[2], bn, "(c) with BatchNorm")):
        for j, (q, style) in enumerate(((15, ":"), (50, "-"), (85, "--"))):
            a.plot(steps_axis, run["pct"][:, j], "k" + style, label=f"{q}th percentile")
        a.set(title=title, xlabel="training step", ylim=(lo - pad, hi + pad),
              ylabel=f"input to sigmoid {WATCHED_UNIT} of hidden layer {len(HIDDEN)}")
        a.legend(loc="best", fontsize="small")
        a.grid(alpha=0.3)
    fig.suptitle(
        f"{len(HIDDEN)}×{HIDDEN[0]} sigmoid network on scikit-learn digits, batches of {BATCH}, "
        f"SGD lr {lr:g}, same seed and batches: without and with normkit.BatchNorm"
    )
    fig.savefig(path, dpi=100)


def run(steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, seed: int = 0,
        out: str = DEFAULT_OUT, stdout: Optional[TextIO] = None,
        stderr: Optional[TextIO] = None) -> int:
    """Run the demo; returns the process exit status."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        stderr.write(f"{INSTALL_HINT}\n(scikit-learn is not installed)\n")
        return 1
    try:
        import matplotlib  # noqa: F401

        have_mpl = True
    except ImportError:
        have_mpl = False

    with single_threaded():
        return _run(steps, lr, seed, out, have_mpl, stdout, stderr)


@contextlib.contextmanager
def single_threaded():
    """One BLAS thread and one normkit thread while the demo runs. Its arrays are tiny (at most
    359 x 100): on a shared 2-core machine, threads waiting for busy cores made the run ten
    times slower. normkit's results do not depend on its thread count (SPEC section 5)."""
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits  # comes with scikit-learn
        except ImportError:  # pragma: no cover - scikit-learn depends on it
            pass
        else:
            stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        threads = _core.get_num_threads()
        _core.set_num_threads(1)
        stack.callback(_core.set_num_threads, threads)
        yield


def _run(steps, lr, seed, out, have_mpl, stdout, stderr) -> int:
    t0 = time.perf_counter()
    data = _load_digits(seed)
    x_train, _, x_test, _ = data
    print(
        f"normkit demo: the BatchNorm paper's Figure 1 network on scikit-learn digits "
        f"({len(x_train)} training / {len(x_test)} test images of 8x8 pixels)\n"
        f"network {x_train.shape[1]}-{'-'.join(map(str, HIDDEN))}-10, sigmoid hidden units, "
        f"batches of {BATCH}, SGD learning rate {lr:g}, {steps} steps, seed {seed}",
        file=stdout,
    )
    n_points = min(steps, 100)
    eval_steps = sorted({round(i * steps / n_points) for i in range(n_points + 1)}) if steps else [0]
    weights = _initial_weights(x_train.shape[1], seed)
    plain = _train(weights, False, data, steps, lr, seed, eval_steps, stderr)
    bn = _train(weights, True, data, steps, lr, seed, eval_steps, stderr)

    shown = list(range(0, len(eval_steps), max(1, len(eval_steps) // 10)))
    if shown[-1] != len(eval_steps) - 1:
        shown.append(len(eval_steps) - 1)
    print("\ntest accuracy during training (same weights at step 0, same batches, same lr):", file=stdout)
    print("    step  without BN  with BN", file=stdout)
    for i in shown:
        print(f"  {eval_steps[i]:6d}  {plain['acc'][i]:9.3f}  {bn['acc'][i]:7.3f}", file=stdout)

    rows, diff = _inference_results(bn["net"], data)
    print("\nthe BatchNorm network at inference, on the test images:", file=stdout)
    width = max(len(name) for name, _ in rows)
    print(f"  {'statistics used':<{width}}  accuracy  cross-entropy", file=stdout)
    for name, (acc, loss) in rows:
        print(f"  {name:<{width}}  {acc:8.3f}  {loss:13.4f}", file=stdout)
    print(f"  (folded vs BatchNorm network: largest logit difference {diff:.1e})", file=stdout)

    if have_mpl:
        _figure(out, eval_steps, plain, bn, lr)
        print(f"\nfigure written to {out}", file=stdout)
    else:
        print(f"\nmatplotlib is not installed, so no figure was written ({INSTALL_HINT})", file=stdout)
    print(f"done in {time.perf_counter() - t0:.1f} s", file=stdout)
    return 0
