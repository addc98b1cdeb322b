"""Bad input: every public function raises TypeError/ValueError naming the bad argument, and the
raw ops (torch.ops.rosa_kernels.*) refuse bad shapes (ValueError / TypeError, the same checks) and
unsafe indices (ValueError) without crashing."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rosa_kernels

ops = torch.ops.rosa_kernels

# A valid 5 x 4 problem with an empty row and two-nonzero rows (so sortedness can break).
M, N, K = 5, 4, 3
OFFSETS = [0, 2, 2, 3, 5, 6]
COLS = [0, 3, 1, 0, 2, 3]
NNZ = len(COLS)


def valid(name):
    """Fresh valid arguments of each public function, as a dict of its parameter names."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor(OFFSETS, dtype=torch.int32)
    cols = torch.tensor(COLS, dtype=torch.int32)
    order = rosa_kernels.row_order(offsets)
    values = torch.randn(NNZ, generator=gen) + 2
    if name == "spmm":
        return dict(values=values, row_offsets=offsets, row_indices=order, col_indices=cols,
                    dense=torch.randn(N, K, generator=gen), m=M)
    if name == "sddmm":
        return dict(row_offsets=offsets, row_indices=order, col_indices=cols,
                    a=torch.randn(M, K, generator=gen), bt=torch.randn(N, K, generator=gen))
    if name == "csr_transpose":
        return dict(values=values, row_offsets=offsets, col_indices=cols, m=M, n=N)
    if name == "csr_add":
        return dict(values=values, row_offsets=offsets, row_indices=order, col_indices=cols,
                    dense=torch.randn(M, N, generator=gen))
    raise AssertionError(name)


def with_item(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


def call(name, args):
    return getattr(rosa_kernels, name)(**args)


# (case id, functions, argument, a function of the valid argument giving the bad one, exception,
#  text the message must contain)
INDEX_OPS = ["spmm", "sddmm", "csr_transpose", "csr_add"]
ORDER_OPS = ["spmm", "sddmm", "csr_add"]
VALUE_OPS = ["spmm", "csr_transpose", "csr_add"]
DENSE_OPS = ["spmm", "csr_add"]
CASES = [
    ("int_values", VALUE_OPS, "values", lambda v: v.to(torch.int32), TypeError, "values"),
    ("bool_values", VALUE_OPS, "values", lambda v: v > 0, TypeError, "values"),
    ("values_not_tensor", VALUE_OPS, "values", lambda v: v.tolist(), TypeError, "values"),
    ("values_2d", VALUE_OPS, "values", lambda v: v[None], ValueError, "values"),
    ("int_dense", DENSE_OPS, "dense", lambda d: d.to(torch.int64), TypeError, "dense"),
    ("bool_dense", DENSE_OPS, "dense", lambda d: d > 0, TypeError, "dense"),
    ("dense_1d", DENSE_OPS, "dense", lambda d: d[:, 0], ValueError, "dense"),
    ("dense_3d", DENSE_OPS, "dense", lambda d: d[None], ValueError, "dense"),
    ("dense_other_dtype", DENSE_OPS, "dense", lambda d: d.double(), TypeError, "dense"),
    ("dense_other_device", DENSE_OPS, "dense", lambda d: d.to("meta"), ValueError, "dense"),
    ("int_a", ["sddmm"], "a", lambda a: a.to(torch.int32), TypeError, "a"),
    ("bool_bt", ["sddmm"], "bt", lambda b: b > 0, TypeError, "bt"),
    ("bt_other_dtype", ["sddmm"], "bt", lambda b: b.half(), TypeError, "bt"),
    ("bt_wrong_inner_size", ["sddmm"], "bt", lambda b: b[:, :-1], ValueError, "bt"),
    ("bt_1d", ["sddmm"], "bt", lambda b: b[:, 0], ValueError, "bt"),
    ("a_wrong_rows", ["sddmm"], "a", lambda a: a[:-1], ValueError, "a.shape[0]"),
    ("bt_other_device", ["sddmm"], "bt", lambda b: b.to("meta"), ValueError, "bt"),
    ("float_row_offsets", INDEX_OPS, "row_offsets", lambda t: t.float(), TypeError, "row_offsets"),
    ("float_col_indices", INDEX_OPS, "col_indices", lambda t: t.double(), TypeError, "col_indices"),
    ("float_row_indices", ORDER_OPS, "row_indices", lambda t: t.float(), TypeError, "row_indices"),
    ("bool_col_indices", INDEX_OPS, "col_indices", lambda t: t > 0, TypeError, "col_indices"),
    ("row_offsets_not_tensor", INDEX_OPS, "row_offsets", lambda t: t.tolist(), TypeError, "row_offsets"),
    ("row_offsets_2d", INDEX_OPS, "row_offsets", lambda t: t[None], ValueError, "row_offsets"),
    ("row_offsets_too_short", INDEX_OPS, "row_offsets", lambda t: t[:-1], ValueError, "row_offsets"),
    ("row_offsets_too_long", INDEX_OPS, "row_offsets", lambda t: torch.cat([t, t[-1:]]), ValueError, "row_offsets"),
    ("row_offsets_not_from_0", INDEX_OPS, "row_offsets", lambda t: with_item(t, 0, 1), ValueError, "row_offsets[0]"),
    ("row_offsets_decreasing", INDEX_OPS, "row_offsets", lambda t: with_item(t, 2, 1), ValueError, "nondecreasing"),
    ("row_offsets_end_not_nnz", INDEX_OPS, "row_offsets", lambda t: with_item(t, -1, NNZ - 1), ValueError,
     "row_offsets[-1]"),
    ("row_offsets_int64_overflow", INDEX_OPS, "row_offsets", lambda t: with_item(t.long(), 1, 2**40), ValueError,
     "row_offsets"),
    ("col_indices_shorter_than_values", VALUE_OPS, "col_indices", lambda t: t[:-1], ValueError, "values.shape[0]"),
    ("col_index_negative", INDEX_OPS, "col_indices", lambda t: with_item(t, 2, -1), ValueError, "col_indices"),
    ("col_index_too_large", INDEX_OPS, "col_indices", lambda t: with_item(t, 2, N), ValueError, "col_indices"),
    ("col_indices_unsorted", INDEX_OPS, "col_indices", lambda t: with_item(t, 0, 3), ValueError, "col_indices"),
    ("row_indices_too_short", ORDER_OPS, "row_indices", lambda t: t[:-1], ValueError, "row_indices"),
    ("row_indices_out_of_range", ORDER_OPS, "row_indices", lambda t: with_item(t, 0, M), ValueError, "row_indices"),
    ("row_indices_negative", ORDER_OPS, "row_indices", lambda t: with_item(t, 0, -1), ValueError, "row_indices"),
    ("row_indices_repeat", ORDER_OPS, "row_indices", lambda t: with_item(t, 0, t[1]), ValueError, "row_indices"),
    ("row_offsets_other_device", INDEX_OPS, "row_offsets", lambda t: t.to("meta"), ValueError, "row_offsets"),
    ("col_indices_other_device", INDEX_OPS, "col_indices", lambda t: t.to("meta"), ValueError, "col_indices"),
    ("negative_m", ["spmm", "csr_transpose"], "m", lambda m: -1, ValueError, "m"),
    ("float_m", ["spmm", "csr_transpose"], "m", lambda m: float(m), TypeError, "m"),
    ("bool_m", ["spmm", "csr_transpose"], "m", lambda m: True, TypeError, "m"),
    ("tensor_m", ["spmm", "csr_transpose"], "m", lambda m: torch.tensor(m), TypeError, "m"),
    ("negative_n", ["csr_transpose"], "n", lambda n: -2, ValueError, "n"),
    ("float_n", ["csr_transpose"], "n", lambda n: 4.0, TypeError, "n"),
    ("wrong_m_for_offsets", ["spmm", "csr_transpose"], "m", lambda m: m + 1, ValueError, "row_offsets"),
    ("wrong_n_for_columns", ["csr_transpose"], "n", lambda n: 3, ValueError, "col_indices"),
]
# Cases about index *contents*: only validate=True checks those (it costs a GPU synchronization).
CONTENT_CASES = {
    "row_offsets_not_from_0", "row_offsets_decreasing", "row_offsets_end_not_nnz", "row_offsets_int64_overflow",
    "col_index_negative", "col_index_too_large", "col_indices_unsorted", "row_indices_out_of_range",
    "row_indices_negative", "row_indices_repeat", "wrong_n_for_columns",
}
PARAMS = [
    pytest.param(name, argument, make_bad, error, text, validate, id=f"{name}-{case}-validate={validate}")
    for case, names, argument, make_bad, error, text in CASES
    for name in names
    for validate in ((True,) if case in CONTENT_CASES else (True, False))
]


@pytest.mark.parametrize("name,argument,make_bad,error,text,validate", PARAMS)
def test_bad_argument_raises_naming_it(name, argument, make_bad, error, text, validate):
    """The same messages whether the checks ran in Python (contents) or inside the C++ op."""
    args = valid(name)
    call(name, {**args, "validate": validate})  # the unchanged arguments are fine
    args[argument] = make_bad(args[argument])
    with pytest.raises(error) as info:
        call(name, {**args, "validate": validate})
    message = str(info.value)
    assert text in message, message
    assert argument.split(".")[0] in message or argument in ("m", "n"), message


@pytest.mark.parametrize("name", INDEX_OPS)
@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int64])
def test_int16_and_int64_indices_give_the_int32_result(name, validate, index_dtype):
    args = valid(name)
    expected = call(name, args)
    for key in ("row_offsets", "row_indices", "col_indices"):
        if key in args:
            args[key] = args[key].to(index_dtype)
    got = call(name, {**args, "validate": validate})
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e)


def test_none_where_a_tensor_belongs_is_a_type_error():
    for name, argument in [("spmm", "values"), ("sddmm", "a"), ("csr_transpose", "col_indices"),
                           ("csr_add", "dense"), ("spmm", "row_indices")]:
        for validate in (True, False):
            with pytest.raises(TypeError, match=f"{argument} must be a torch.Tensor"):
                call(name, {**valid(name), argument: None, "validate": validate})


@pytest.mark.parametrize("name", ["spmm", "sddmm", "csr_add"])
@pytest.mark.parametrize("return_type,error", [(torch.int32, TypeError), ("float32", TypeError), (float, TypeError)])
def test_bad_return_type(name, return_type, error):
    with pytest.raises(error, match="return_type"):
        call(name, {**valid(name), "return_type": return_type})


@pytest.mark.parametrize("name", INDEX_OPS)
def test_validate_must_be_bool(name):
    with pytest.raises(TypeError, match="validate"):
        call(name, {**valid(name), "validate": 1})


def test_inplace_and_return_permutation_must_be_bool():
    with pytest.raises(TypeError, match="inplace"):
        call("csr_add", {**valid("csr_add"), "inplace": 1})
    with pytest.raises(TypeError, match="return_permutation"):
        call("csr_transpose", {**valid("csr_transpose"), "return_permutation": "yes"})


def test_messages_say_what_was_expected_and_got():
    args = valid("spmm")
    args["col_indices"] = with_item(args["col_indices"], 4, 9)
    with pytest.raises(ValueError, match=r"col_indices must be < n = dense.shape\[0\] = 4, got col_indices\[4\] = 9"):
        call("spmm", args)
    args = valid("csr_add")
    args["row_offsets"] = args["row_offsets"][:-1]
    with pytest.raises(ValueError, match=r"row_offsets must have length dense.shape\[0\] \+ 1 = 6, got 5"):
        call("csr_add", args)


def test_validate_false_skips_only_content_checks():
    args = valid("spmm")
    args["row_offsets"] = args["row_offsets"][:-1]
    with pytest.raises(ValueError, match="row_offsets"):
        rosa_kernels.spmm(**args, validate=False)
    args = valid("spmm")
    args["row_indices"] = with_item(args["row_indices"], 0, args["row_indices"][1])  # not a permutation
    rosa_kernels.spmm(**args, validate=False)  # accepted: contents are the caller's promise


def test_helpers_reject_bad_input():
    with pytest.raises(TypeError, match="mask"):
        rosa_kernels.csr_from_mask(torch.ones(2, 2))
    with pytest.raises(ValueError, match="mask"):
        rosa_kernels.csr_from_mask(torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="values"):
        rosa_kernels.csr_from_mask(torch.ones(2, 2, dtype=torch.bool), torch.ones(3, 2))
    with pytest.raises(TypeError, match="dense"):
        rosa_kernels.csr_from_dense(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="matrix"):
        rosa_kernels.csr_from_scipy(np.eye(2))
    with pytest.raises(ValueError, match="tensor"):
        rosa_kernels.csr_from_torch_sparse(torch.eye(2))
    with pytest.raises(TypeError, match="row_offsets"):
        rosa_kernels.row_order(torch.zeros(3))
    with pytest.raises(ValueError, match="row_offsets"):
        rosa_kernels.row_order(torch.zeros(0, dtype=torch.int32))
    offsets, cols = torch.tensor(OFFSETS, dtype=torch.int32), torch.tensor(COLS, dtype=torch.int32)
    with pytest.raises(ValueError, match="m"):
        rosa_kernels.validate_csr(offsets, cols, -1, N)
    with pytest.raises(ValueError, match="n"):
        rosa_kernels.validate_csr(offsets, cols, M, -1)
    with pytest.raises(ValueError, match="col_indices must have length nnz = 7"):
        rosa_kernels.validate_csr(offsets, cols, M, N, NNZ + 1)
    with pytest.raises(ValueError, match="shape"):
        rosa_kernels.csr_to_dense(torch.ones(NNZ), offsets, cols, (M, -1))


# ----------------------------------------------------------------------------------------------
# The raw ops: TORCH_CHECK on shapes always, and on the CPU a guard against unsafe index contents.
# ----------------------------------------------------------------------------------------------


def raw(name, **changes):
    args = valid(name)
    args.update(changes)
    return getattr(ops, name)(*args.values())


RAW_CASES = [
    ("spmm", dict(row_offsets=torch.tensor([0, 2, 2], dtype=torch.int32)), "row_offsets"),
    ("spmm", dict(row_offsets=torch.tensor(OFFSETS, dtype=torch.float64)), "row_offsets"),
    ("spmm", dict(row_offsets=torch.tensor([0, 2, 2, 3, 5, 600], dtype=torch.int32)), "row_offsets"),
    ("spmm", dict(row_offsets=torch.tensor([0, 2, 1, 3, 5, 6], dtype=torch.int32)), "row_offsets"),
    ("spmm", dict(row_offsets=torch.tensor([-4, 2, 2, 3, 5, 6], dtype=torch.int32)), "row_offsets"),
    ("spmm", dict(col_indices=torch.tensor([0, 3, 1, 0, 2, 1 << 20], dtype=torch.int32)), "col_indices"),
    ("spmm", dict(col_indices=torch.tensor([0, -3, 1, 0, 2, 3], dtype=torch.int32)), "col_indices"),
    ("spmm", dict(row_indices=torch.tensor([0, 1, 2, 3, 99], dtype=torch.int32)), "row_indices"),
    ("spmm", dict(row_indices=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), "row_indices"),
    ("spmm", dict(dense=torch.randn(N, K).double()), "dense"),
    ("spmm", dict(dense=torch.randn(N)), "dense"),
    ("spmm", dict(values=torch.ones(NNZ, dtype=torch.int32)), "values"),
    ("spmm", dict(values=torch.ones(NNZ - 1)), "col_indices"),
    ("spmm", dict(m=-1), "m"),
    ("sddmm", dict(bt=torch.randn(N, K + 1)), "bt"),
    ("sddmm", dict(a=torch.randn(M + 1, K)), "row_offsets"),
    ("sddmm", dict(row_offsets=torch.tensor([0, 2, 2, 3, 5, 60], dtype=torch.int32)), "row_offsets"),
    ("sddmm", dict(col_indices=torch.tensor([0, 3, 1, 0, 2, 4], dtype=torch.int32)), "col_indices"),
    ("sddmm", dict(row_indices=torch.tensor([-1, 1, 2, 3, 4], dtype=torch.int32)), "row_indices"),
    ("csr_transpose", dict(n=-1), "n"),
    ("csr_transpose", dict(n=2), "col_indices"),
    ("csr_transpose", dict(row_offsets=torch.tensor([0, 2, 2, 3, 7, 6], dtype=torch.int32)), "row_offsets"),
    ("csr_add", dict(dense=torch.randn(M, N - 1)), "col_indices"),
    ("csr_add", dict(dense=torch.randn(M - 1, N)), "row_offsets"),
    ("csr_add", dict(row_offsets=torch.tensor([0, 2, 2, 3, 5, 9], dtype=torch.int32)), "row_offsets"),
]


@pytest.mark.parametrize("name,changes,text", RAW_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RAW_CASES)])
def test_raw_ops_reject_bad_input(name, changes, text):
    with pytest.raises((ValueError, TypeError), match=text):
        raw(name, **changes)


def test_raw_csr_add_inplace_checks():
    args = valid("csr_add")
    with pytest.raises(ValueError, match="dense"):
        ops.csr_add_(*list(args.values())[:4], torch.randn(N, M).t())  # rows not contiguous
    bad_cols = with_item(args["col_indices"], 1, 40)
    with pytest.raises(ValueError, match="col_indices"):
        ops.csr_add_(args["values"], args["row_offsets"], args["row_indices"], bad_cols, args["dense"])


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.lists(st.integers(-3, 12), min_size=0, max_size=7),
    cols=st.lists(st.integers(-3, 8), min_size=0, max_size=10),
    order=st.lists(st.integers(-2, 7), min_size=0, max_size=7),
    m=st.integers(0, 6), n=st.integers(0, 6),
)
def test_raw_cpu_ops_never_crash_on_garbage_indices(offsets, cols, order, m, n):
    """Arbitrary index contents either compute or raise ValueError: never a crash."""
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    offsets, cols, order = as_int(offsets), as_int(cols), as_int(order)
    values = torch.ones(cols.shape[0])
    calls = [
        lambda: ops.spmm(values, offsets, order, cols, torch.ones(n, 2), m),
        lambda: ops.sddmm(offsets, order, cols, torch.ones(m, 2), torch.ones(n, 2)),
        lambda: ops.csr_transpose(values, offsets, cols, m, n),
        lambda: ops.csr_add(values, offsets, order, cols, torch.ones(m, n)),
    ]
    for run in calls:
        try:
            run()
        except ValueError:
            pass
