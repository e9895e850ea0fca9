"""``fxpp run`` end to end: pipeline x data parallel on gloo ranks, and its errors."""

import pytest


@pytest.mark.parametrize("extra", [[], ["--activation-checkpointing"]], ids=["plain", "activation-checkpointing"])
def test_run_pipeline_times_data_parallel_matches(capsys, extra):
    from fxpp.cli import main

    # 2 pipeline ranks x 2 dp replicas = 4 gloo processes; the parity check is on the global batch.
    rc = main(["run", "tiny-llama", "--stages", "2", "--dp", "2", "--schedule", "1F1B", "--steps", "2", *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("MATCH") == 1 and "MISMATCH" not in out, out  # one report: the last stage's dp rank 0


def test_run_batch_not_divisible_by_dp_times_microbatches(capsys):
    from fxpp.cli import main

    assert main(["run", "tiny-llama", "--stages", "2", "--dp", "2", "--batch", "6", "--steps", "1"]) == 2
    assert "--batch 6 must be a multiple of --dp 2 x --microbatches 4" in capsys.readouterr().err
