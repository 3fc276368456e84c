"""What PyTorch users reach for on a layer: ``parameters()``, ``named_parameters()``,
``zero_grad()``, ``__call__``, ``LayerNorm(bias=False)``; the dtype message of layers with
running statistics; and the layers' docstrings (sections, momentum, no internal references).
"""

from __future__ import annotations

import doctest
import inspect

import numpy as np
import pytest
from conftest import assert_bitwise_equal, randn

nk = pytest.importorskip("normkit")
layers = pytest.importorskip("normkit.layers")


def all_layers(**kw):
    """One small layer of each kind with its input shape."""
    return [
        (nk.BatchNorm(4, **kw), (6, 4, 5)),
        (nk.InstanceNorm(4, affine=True, track_running_stats=True, **kw), (3, 4, 7)),
        (nk.GroupNorm(2, 4, **kw), (3, 4, 5)),
        (nk.LayerNorm((3, 5), **kw), (4, 3, 5)),
        (nk.RMSNorm(8, **kw), (5, 8)),
    ]


LAYER_IDS = ["BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm", "RMSNorm"]


# -- parameters, named_parameters -----------------------------------------------------------

@pytest.mark.parametrize("index", range(5), ids=LAYER_IDS)
def test_parameters_are_the_layers_own_arrays(index):
    layer, _ = all_layers()[index]
    named = layer.named_parameters()
    expected = ["weight"] if isinstance(layer, nk.RMSNorm) else ["weight", "bias"]
    assert [name for name, _ in named] == expected
    for name, p in named:
        assert p is getattr(layer, name)  # not a copy: an optimizer updates them in place
    params = layer.parameters()
    assert isinstance(params, list) and len(params) == len(expected)
    assert all(p is q for p, (_, q) in zip(params, named))
    assert dict(layer.named_parameters()).keys() == set(expected)


@pytest.mark.parametrize(
    "layer",
    [nk.BatchNorm(3, affine=False), nk.InstanceNorm(3), nk.GroupNorm(1, 3, affine=False),
     nk.LayerNorm(3, elementwise_affine=False),
     nk.LayerNorm(3, elementwise_affine=False, bias=False),
     nk.RMSNorm(3, elementwise_affine=False)],
    ids=["BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm", "LayerNorm-nobias", "RMSNorm"],
)
def test_no_parameters_without_affine(layer):
    assert layer.parameters() == []
    assert layer.named_parameters() == []


def test_sgd_step_through_named_parameters(rng):
    bn = nk.BatchNorm(4, dtype=np.float64)
    x = randn(rng, (16, 4), np.float64, loc=2.0)
    y = bn(x)
    bn.backward(y)
    before = {name: p.copy() for name, p in bn.named_parameters()}
    for name, p in bn.named_parameters():
        p -= 0.1 * getattr(bn, "grad_" + name)
    np.testing.assert_array_equal(bn.weight, before["weight"] - 0.1 * bn.grad_weight)
    np.testing.assert_array_equal(bn.bias, before["bias"] - 0.1 * bn.grad_bias)


# -- zero_grad, __call__ --------------------------------------------------------------------

@pytest.mark.parametrize("index", range(5), ids=LAYER_IDS)
def test_zero_grad_sets_gradients_to_none(index, rng):
    layer, shape = all_layers()[index]
    x = randn(rng, shape, loc=1.0)
    layer.backward(layer(x))
    assert layer.grad_weight is not None
    layer.zero_grad()
    assert layer.grad_weight is None and layer.grad_bias is None


def test_zero_grad_set_to_none_false_zeros_in_place(rng):
    ln = nk.LayerNorm(6)
    x = randn(rng, (5, 6), loc=1.0)
    ln.backward(ln(x) * 3)
    gw, gb = ln.grad_weight, ln.grad_bias
    ln.zero_grad(set_to_none=False)
    assert ln.grad_weight is gw and ln.grad_bias is gb
    assert not gw.any() and not gb.any()
    ln.zero_grad()
    ln.zero_grad(set_to_none=False)  # nothing to zero: stays None
    assert ln.grad_weight is None


@pytest.mark.parametrize("bad", ["False", 0, None, np.array([True])])
def test_zero_grad_rejects_non_bool(bad):
    with pytest.raises(TypeError, match=r"LayerNorm.zero_grad: set_to_none must be a bool"):
        nk.LayerNorm(3).zero_grad(bad)


@pytest.mark.parametrize("index", range(5), ids=LAYER_IDS)
def test_call_is_forward(index, rng):
    a, shape = all_layers()[index]
    b, _ = all_layers()[index]
    x = randn(rng, shape, loc=1.0)
    assert callable(a)
    assert_bitwise_equal(a(x), b.forward(x))


# -- LayerNorm(bias=False) ------------------------------------------------------------------

def test_layer_norm_without_bias(rng):
    ln = nk.LayerNorm((3, 5), bias=False)
    assert ln.bias is None and ln.weight.shape == (3, 5)
    assert [n for n, _ in ln.named_parameters()] == ["weight"]
    assert set(ln.state_dict()) == {"weight"}
    assert "bias=False" in repr(ln)
    ln.weight[...] = np.linspace(0.5, 1.5, 15, dtype=np.float32).reshape(3, 5)
    x = randn(rng, (4, 3, 5), loc=1.0)
    y = ln(x)
    assert_bitwise_equal(y, nk.layer_norm(x, (3, 5), ln.weight, None).y)
    dx = ln.backward(np.cos(x))
    ref = nk.layer_norm_backward(np.cos(x), x, *nk.layer_norm(x, (3, 5), ln.weight)[1:], ln.weight)
    assert_bitwise_equal(dx, ref.dx)
    assert_bitwise_equal(ln.grad_weight, ref.dweight)
    assert ln.grad_bias is None


def test_layer_norm_without_bias_state_round_trip():
    a = nk.LayerNorm(4, bias=False)
    a.weight[...] = [1, 2, 3, 4]
    b = nk.LayerNorm(4, bias=False)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.weight, a.weight)
    with pytest.raises(KeyError, match=r"unexpected keys \['bias'\]"):
        b.load_state_dict(nk.LayerNorm(4).state_dict())
    with pytest.raises(KeyError, match=r"missing keys \['bias'\]"):
        nk.LayerNorm(4).load_state_dict(a.state_dict())


def test_layer_norm_bias_defaults_and_elementwise_affine_false():
    assert nk.LayerNorm(3).bias is not None
    ln = nk.LayerNorm(3, elementwise_affine=False, bias=True)  # bias needs elementwise_affine
    assert ln.weight is None and ln.bias is None and ln.state_dict() == {}
    assert "bias=False" not in repr(nk.LayerNorm(3))


@pytest.mark.parametrize("bad", [np.zeros(3), "False", None, 1])
def test_layer_norm_bias_must_be_bool(bad):
    with pytest.raises(TypeError, match=r"LayerNorm: bias must be a bool"):
        nk.LayerNorm(3, bias=bad)


# -- dtypes: layers with running statistics name the fix --------------------------------------

def _snapshot(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_float32_batch_norm_on_float64_data_names_the_fix(mode, rng):
    bn = nk.BatchNorm(8)
    bn.train(mode == "train")
    before = _snapshot(bn)
    x = randn(rng, (4, 8), np.float64)
    with pytest.raises(
        TypeError,
        match=r"^BatchNorm\(8, dtype=float32\) got float64 input; create the layer with "
              r"dtype=np\.float64 or pass float32 \(or float16, bfloat16\) data",
    ):
        bn(x)
    for k, v in _snapshot(bn).items():
        assert_bitwise_equal(v, before[k])
    assert bn._saved is None
    with pytest.raises(TypeError, match=r"dtype=np\.float64"):
        bn(x.tolist())  # a list of Python floats is float64 data
    with pytest.raises(TypeError, match=r"dtype=np\.float64"):
        bn(x.astype(">f8"))  # either byte order
    # the fix works
    assert nk.BatchNorm(8, dtype=np.float64)(x).dtype == np.float64
    assert bn(x.astype(np.float32)).dtype == np.float32


def test_float64_layer_on_float32_data_names_the_fix(rng):
    x = randn(rng, (4, 3, 5), np.float32)
    with pytest.raises(
        TypeError,
        match=r"^InstanceNorm\(3, dtype=float64\) got float32 input; create the layer with "
              r"dtype=np\.float32 or pass float64 data",
    ):
        nk.InstanceNorm(3, track_running_stats=True, dtype=np.float64)(x)
    with pytest.raises(TypeError, match=r"BatchNorm\(3, dtype=float64\) got float16 input"):
        nk.BatchNorm(3, dtype=np.float64)(x.astype(np.float16))


def test_collective_functionals_check_dtypes_themselves(rng):
    """SyncBatchNorm replaces the functional by a collective one, which must see the error on
    every rank (a rank that raised early would leave the others waiting): the layer leaves the
    check to it."""
    import functools

    class Collective(nk.BatchNorm):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self._functional = functools.partial(nk.batch_norm)

    with pytest.raises(TypeError, match=r"^batch_norm: running_mean has dtype float32"):
        Collective(3)(randn(rng, (4, 3), np.float64))


def test_half_data_on_float32_batch_norm_works(rng):
    bn = nk.BatchNorm(3)
    y = bn(randn(rng, (6, 3), np.float32).astype(np.float16))
    assert y.dtype == np.float16 and bn.num_batches_tracked == 1


def test_layers_without_running_statistics_convert_parameters(rng):
    """LayerNorm(8) (float32 parameters) on float64 data works, as documented: the parameters
    are widened exactly; y and the gradients are float64; the parameters stay float32."""
    ln = nk.LayerNorm(8)
    ln.weight[...] = np.linspace(0.5, 1.5, 8)
    x = randn(rng, (5, 8), np.float64, loc=3.0)
    y = ln(x)
    assert y.dtype == np.float64
    assert_bitwise_equal(y, nk.layer_norm(x, 8, ln.weight.astype(np.float64),
                                          ln.bias.astype(np.float64)).y)
    ln.backward(np.ones_like(y))
    assert ln.grad_weight.dtype == np.float64 and ln.weight.dtype == np.float32
    for layer in (nk.BatchNorm(8, track_running_stats=False), nk.InstanceNorm(8),
                  nk.GroupNorm(2, 8), nk.RMSNorm(8)):
        shape = (5, 8) if isinstance(layer, nk.RMSNorm) else (5, 8, 3)
        assert layer(randn(rng, shape, np.float64)).dtype == np.float64
    assert "float32 layer also takes float64" in " ".join(nk.LayerNorm.__doc__.split())


def test_non_float_input_keeps_the_functional_message():
    with pytest.raises(TypeError, match=r"batch_norm: x has unsupported dtype int64"):
        nk.BatchNorm(3)(np.ones((4, 3), np.int64))


# -- docstrings -------------------------------------------------------------------------------

PUBLIC_CLASSES = [nk.BatchNorm, nk.InstanceNorm, nk.GroupNorm, nk.LayerNorm, nk.RMSNorm]


def _public_methods(cls):
    for name, member in inspect.getmembers(cls, inspect.isfunction):
        if not name.startswith("_") or name == "__call__":
            yield name, member


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda c: c.__name__)
def test_class_docstrings_have_sections(cls):
    doc = inspect.getdoc(cls)
    for section in ("Parameters\n----------", "Raises\n------"):
        assert section in doc, (cls.__name__, section)
    assert "SPEC" not in doc


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda c: c.__name__)
def test_method_docstrings(cls):
    for name, method in _public_methods(cls):
        doc = inspect.getdoc(method)
        assert doc, f"{cls.__name__}.{name} has no docstring"
        assert "SPEC" not in doc, f"{cls.__name__}.{name}"
        params = [p for p in inspect.signature(method).parameters if p != "self"]
        if params:
            assert "Parameters\n----------" in doc, f"{cls.__name__}.{name}"
        if name in ("forward", "backward", "load_state_dict", "recompute_statistics",
                    "as_affine", "train", "zero_grad"):
            assert "Raises\n------" in doc, f"{cls.__name__}.{name}"
        if name in ("forward", "backward", "parameters", "named_parameters", "state_dict",
                    "as_affine", "train", "eval"):
            assert "Returns\n-------" in doc, f"{cls.__name__}.{name}"


@pytest.mark.parametrize("cls", [nk.BatchNorm, nk.InstanceNorm], ids=lambda c: c.__name__)
def test_momentum_convention_is_documented(cls):
    doc = " ".join(inspect.getdoc(cls).split())
    assert "running = (1 - momentum) * running + momentum * batch_stat" in doc
    assert "None: a cumulative moving average" in doc
    assert "1 / num_batches_tracked" in doc


def test_help_batch_norm_is_informative():
    text = " ".join(pydoc_text(nk.BatchNorm).split())
    for phrase in ("num_features", "momentum", "track_running_stats", "channel_axis",
                   "parameters()", "zero_grad", "recompute_statistics", "Raises", "dtype"):
        assert phrase in text, phrase
    assert len(text) > 3000


def pydoc_text(obj):
    import pydoc

    return pydoc.render_doc(obj, renderer=pydoc.plaintext)


def test_layer_docstring_examples_run():
    result = doctest.testmod(layers, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0
    assert layers.__doc__ and "SPEC" not in layers.__doc__
