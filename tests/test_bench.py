"""`vlbench-bench` commands run end to end at toy sizes (their numbers are measured by hand, not asserted)."""

import pytest

from vlbench.bench import main


def test_retrieval_bench_compares_the_three_scorings(cache_dir, capsys):
    main(["retrieval", "--images", "6", "--captions-per-image", "2", "--k", "3", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert "6 images × 12 captions" in out
    for mode in ("itc:", "itc→itm top-3:", "itm all pairs:", "speed-up of top-3 over all pairs"):
        assert mode in out


def test_retrieval_bench_reads_a_run(cache_dir, make_cfg, tmp_path, capsys):
    from tests.test_tasks_end_to_end import SMALL_FORMATS
    from vlbench.runner import run

    run_dir = tmp_path / "retrieval"
    run(make_cfg("model=albef", "task=retrieval", "head=native", "trainer.max_steps=1", *SMALL_FORMATS), run_dir)
    main(["retrieval", "--run", str(run_dir), "--images", "6", "--captions-per-image", "2", "--k", "3"])
    assert "randomly initialised" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["retrieval", "--k"])


def test_pixelbert_bench_compares_sampling_on_and_off(capsys):
    main(["pixelbert", "--scale", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--text-length", "6"])
    out = capsys.readouterr().out
    assert "64 px → 16 pixels" in out
    assert "sampled:" in out and "8 pixels)" in out and "all pixels:" in out and "16 pixels)" in out
    assert "speed-up of pixel sampling:" in out
