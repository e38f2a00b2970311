"""linear_llama and hybrid models under LASP-1 / LASP-2 reproduce the single-process losses."""
import pytest

from tests.helpers.ranks import run_ranks
from tests.helpers.training import assert_losses_close, train_rank

MODELS = {
    "linear_data": ["model.arch=linear_llama", "model.linear_attn.decay=data"],
    "linear_fixed": ["model.arch=linear_llama", "model.linear_attn.decay=fixed"],
    "hybrid": ["model.arch=hybrid", "model.layer_pattern=LA", "model.linear_attn.decay=data"],
}
RUNS = [("linear_data", 2, "lasp2"), ("linear_data", 4, "lasp2"), ("linear_fixed", 2, "lasp1"),
        ("hybrid", 2, "lasp2"), ("hybrid", 4, "lasp1")]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return {name: run_ranks(1, train_rank, str(tmp_path_factory.mktemp(name)), over)[0]
            for name, over in MODELS.items()}


@pytest.mark.parametrize("model,sp,method", RUNS, ids=[f"{m}-sp{s}-{x}" for m, s, x in RUNS])
def test_lasp_reproduces_single_process_loss(references, tmp_path, model, sp, method):
    overrides = MODELS[model] + [f"parallel.sp={sp}", f"parallel.sp_method={method}"]
    losses = run_ranks(sp, train_rank, str(tmp_path), overrides)
    assert_losses_close(losses[0], references[model])
    # the model learns (5 steps from ~ln 259 = 5.56; the corpus is the running interpreter's stdlib,
    # so the exact drop varies by Python build: 0.29 to 0.44 seen)
    assert references[model][-1] < references[model][0] - 0.15
