"""Shared test setup: quiet logs, deterministic seeds, a small thread count."""

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _qlora_cache(tmp_path_factory):
    """Builtin models are materialized once per test session, in a temp folder (subprocesses inherit it)."""
    if "QLORA_CACHE" not in os.environ:
        os.environ["QLORA_CACHE"] = str(tmp_path_factory.mktemp("qlora-cache"))
    yield


@pytest.fixture
def library_bars_on():
    """datasets' and transformers' progress bars on for one test (a bench script run in-process by another test
    turns transformers' off for the session), each put back as it was afterwards."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_off, hf_on = datasets.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()
    yield
    if datasets_off:
        datasets.disable_progress_bars()
    if not hf_on:
        hf_logging.disable_progress_bar()
