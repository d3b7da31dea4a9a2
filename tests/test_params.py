"""heads/params.py: what each kind of constraint accepts and refuses, and the messages naming them."""
import math

import numpy as np
import pytest

from hexpr.heads.params import FRACTION, N_THREADS, Anything, Bool, Device, Int, NoneOr, Options, Real, RealList, Widths, param_problems

CASES = [
    # constraint, accepted, refused
    (Int(1), [1, 7, np.int64(3)], [0, -2, 1.0, 1.5, "3", True, None]),
    (Int(0, 10), [0, 10], [-1, 11]),
    (Real(0, low_open=True), [1e-9, 3, 2.5, np.float32(0.1)], [0, -1.0, math.nan, math.inf, "1", False]),
    (Real(0, 1), [0, 1, 0.5], [-0.01, 1.01]),
    (FRACTION, [0.5, 1e-6], [0, 1, 1.5]),
    (Options("mse", "pearson"), ["mse", "pearson"], ["pearsn", "MSE", 1, None]),
    (Bool(), [True, False], [0, 1, "true", None]),
    (N_THREADS, [None, 1, 4], [0, -1, 2.0]),
    (NoneOr(Options("a")), [None, "a"], ["b"]),
    (RealList(Real(0, low_open=True)), [[0.1], (1, 10.0)], [[], [0.1, -1], [0.1, "x"], 0.1, None]),
    (Widths(), [None, "", [], [512, 256], (8,), 64, "512,256", "512x256"], [0, -4, [0], [8, 1.5], "512,-1", "a,b", 2.5]),
    (Device(), ["auto", "cpu", "cuda", "cuda:1", "mps"], ["gpu", "cuda:", "cuda:x", "CPU", None, 0]),
    (Anything(), [None, "x", -1, [1]], []),
]


@pytest.mark.parametrize("constraint, accepted, refused", CASES, ids=lambda c: type(c).__name__ if not isinstance(c, list) else "")
def test_constraint_accepts_and_refuses(constraint, accepted, refused):
    assert [v for v in accepted if not constraint(v)] == []
    assert [v for v in refused if constraint(v)] == []


@pytest.mark.parametrize("constraint, text", [
    (Int(1), "an integer >= 1"),
    (Int(0, 10), "an integer >= 0 and <= 10"),
    (Int(), "an integer"),
    (Real(0, 1, low_open=True), "a number > 0 and <= 1"),
    (Real(), "a number"),
    (Options("mse", "pearson"), "one of 'mse', 'pearson'"),
    (NoneOr(Int(1)), "null or an integer >= 1"),
    (RealList(Real(0, low_open=True)), "a non-empty list of numbers, each > 0"),
])
def test_descriptions_say_what_is_accepted(constraint, text):
    assert constraint.describe() == text


def test_param_problems_names_each_refused_value_and_ignores_undeclared_params():
    constraints = {"epochs": Int(1), "loss": Options("mse", "pearson"), "alphas": RealList(Real(0, low_open=True))}
    params = {"epochs": "abc", "loss": "mse", "alphas": [-1], "undeclared": object()}
    assert param_problems("mlp", constraints, params) == [
        "head 'mlp': epochs='abc' is not accepted; epochs must be an integer >= 1",
        "head 'mlp': alphas=[-1] is not accepted; alphas must be a non-empty list of numbers, each > 0",
    ]
    assert param_problems("mlp", constraints, {"epochs": 3, "loss": "pearson", "alphas": [0.5]}) == []
