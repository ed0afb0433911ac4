"""`vlbench-bench` commands run end to end at toy sizes (their numbers are measured by hand, not asserted)."""

import re

import pytest
import torch

from vlbench.bench import main
from vlbench.host_memory import _glibc


def test_retrieval_bench_compares_the_three_scorings(cache_dir, capsys):
    main(["retrieval", "--images", "6", "--captions-per-image", "2", "--k", "3", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert "6 images × 12 captions" in out
    for mode in ("itc:", "itc→itm top-3:", "itm all pairs:", "speed-up of top-3 over all pairs"):
        assert mode in out
    # with k at least every candidate, re-ranking the top k is scoring all pairs: the same recalls
    main(["retrieval", "--images", "6", "--captions-per-image", "2", "--k", "12", "--batch-size", "16"])
    recalls = dict(re.findall(r"(itc→itm top-12|itm all pairs): +[\d.]+ s +(R@1 .+)", capsys.readouterr().out))
    assert len(recalls) == 2 and recalls["itc→itm top-12"] == recalls["itm all pairs"]


def test_retrieval_bench_reads_a_run(cache_dir, make_cfg, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from tests.test_tasks_end_to_end import SMALL_FORMATS
    from vlbench import init_from
    from vlbench.runner import run

    run_dir = tmp_path / "retrieval"
    run(make_cfg("model=albef", "task=retrieval", "head=native", "trainer.max_steps=1", *SMALL_FORMATS), run_dir)
    loaded = []
    original = init_from.load_init_weights
    monkeypatch.setattr(
        init_from, "load_init_weights", lambda model, *a, **k: (loaded.append(model), original(model, *a, **k))[1]
    )
    main(["retrieval", "--run", str(run_dir), "--images", "6", "--captions-per-image", "2", "--k", "3"])
    assert "randomly initialised" not in capsys.readouterr().out
    # the bench's model holds the run's weights (its best checkpoint), every tensor
    saved = load_file(run_dir / "checkpoints" / "best.safetensors")
    (model,) = loaded
    state = {f"model.{k}": v for k, v in model.state_dict().items() if f"model.{k}" in saved}
    assert len(state) > 50 and all(torch.equal(v, saved[k]) for k, v in state.items())
    with pytest.raises(SystemExit):
        main(["retrieval", "--k"])


def test_pixelbert_bench_compares_sampling_on_and_off(capsys):
    args = ["pixelbert", "--scale", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--text-length", "6"]
    with pytest.raises(SystemExit, match="model.pixel_sample is null at scale=tiny: give --sample N"):
        main(args)  # the tiny preset samples no pixels (NOTES.md: sampling half of 16 grid cells hurts)
    main([*args, "--sample", "8"])
    out = capsys.readouterr().out
    assert "64 px → 16 pixels" in out
    assert "sampled:" in out and "8 pixels)" in out and "all pixels:" in out and "16 pixels)" in out
    assert "speed-up of pixel sampling:" in out


def test_pixelbert_bench_compares_channels_last_and_contiguous(capsys):
    args = ["--scale", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--text-length", "6"]
    main(["pixelbert", *args, "--compare", "channels_last"])
    out = capsys.readouterr().out
    assert "channels_last:" in out and "contiguous:" in out and "speed-up of channels-last:" in out
    assert "sampled:" not in out


def test_models_bench_writes_table_json_and_history(cache_dir, tmp_path, capsys):
    import json

    from tests.conftest import SMALL_WORLD
    from vlbench.bench_models import save_record

    out_json, history = tmp_path / "latest.json", tmp_path / "history.jsonl"
    args = ["models", "--models", "textonly", "--steps", "1", "--warmup", "0", "--eager-steps", "1"]
    args += ["--loader-batches", "2", "--gemm-size", "256", "--json", str(out_json), "--history", str(history)]
    main([*args, *SMALL_WORLD, "trainer.batch_size=8"])
    out = capsys.readouterr().out
    assert "util = achieved FLOP/s" in out and "load×" in out and "compiled/s" not in out
    record = json.loads(out_json.read_text())
    row = record["rows"][0]
    assert row["compiled_train_samples_per_s"] is None and row["compile_s"] is None  # not asked for
    assert row["model"] == "textonly" and row["batch_size"] == 8 and row["params"] > 0
    assert row["flops_per_sample"] > 0 and row["utilisation"] > 0 and row["peak_memory_mb"] > 0
    for key in ("train_samples_per_s", "eval_samples_per_s", "loader_samples_per_s", "eager_attention_samples_per_s"):
        assert row[key] > 0, key
    assert record["git_sha"] and record["matmul_flops"] > 0
    assert row["freed_blocks_kept_up_to_mib"] >= (32 if _glibc() else 0)  # as a run (trainer.keep_freed_memory)
    save_record(record, None, str(history))
    assert len(history.read_text().splitlines()) == 2  # appended, not overwritten


def test_models_bench_can_time_with_mallocs_defaults(cache_dir, tmp_path):
    import json

    from tests.conftest import SMALL_WORLD

    out_json = tmp_path / "latest.json"
    args = ["--malloc-defaults", "models", "--models", "textonly", "--steps", "1", "--warmup", "0"]
    args += ["--eager-steps", "0", "--loader-batches", "1", "--gemm-size", "64", "--json", str(out_json)]
    main([*args, "--history", str(tmp_path / "history.jsonl"), *SMALL_WORLD, "trainer.batch_size=8"])
    record = json.loads(out_json.read_text())
    assert record["rows"][0]["freed_blocks_kept_up_to_mib"] == 0
    assert "trainer.keep_freed_memory=false" in record["overrides"]


def test_models_bench_with_lxmert_runs_the_transformers_reference_beside_it(cache_dir, tmp_path, capsys):
    import json

    from tests.conftest import SMALL_WORLD

    out_json = tmp_path / "latest.json"
    args = ["models", "--models", "lxmert", "--steps", "1", "--warmup", "0", "--eager-steps", "0"]
    args += ["--loader-batches", "1", "--gemm-size", "256", "--json", str(out_json), "--history", str(tmp_path / "h")]
    main([*args, *SMALL_WORLD, "trainer.batch_size=8"])
    assert "ratio ours / transformers" in capsys.readouterr().out
    record = json.loads(out_json.read_text())
    assert record["rows"][0]["model"] == "lxmert" and "error" not in record["rows"][0]
    reference = record["lxmert_vs_transformers"]
    assert reference["ours"] > 0 and reference["transformers"] > 0


@pytest.mark.slow  # compiling on CPU takes a minute or more
def test_models_bench_times_the_compiled_training_step(cache_dir, tmp_path, capsys):
    import json

    from tests.conftest import SMALL_WORLD

    out_json = tmp_path / "latest.json"
    args = ["models", "--models", "textonly", "--steps", "2", "--warmup", "1", "--eager-steps", "0", "--compile"]
    args += ["--loader-batches", "2", "--gemm-size", "256", "--json", str(out_json), "--history", ""]
    main([*args, *SMALL_WORLD, "trainer.batch_size=8"])
    assert "compiled/s" in capsys.readouterr().out
    row = json.loads(out_json.read_text())["rows"][0]
    assert row["compiled_train_samples_per_s"] > 0 and row["compile_s"] > 0
    assert row["compile_speedup"] == pytest.approx(row["compiled_train_samples_per_s"] / row["train_samples_per_s"])


def test_models_bench_reports_a_failing_model_as_a_row():
    import argparse

    from vlbench.bench_models import _child, format_table

    rows = []
    args = argparse.Namespace(threads=0, task="vqa", device="cpu", overrides=[])
    _child("nosuchmodel", "tiny", args, SimpleQueue(rows))
    assert rows[0]["model"] == "nosuchmodel" and "nosuchmodel" in rows[0]["error"]
    assert "failed:" in format_table(rows, 1e9, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_models_bench_on_cuda_without_a_gpu_stops_at_once(tmp_path):
    with pytest.raises(SystemExit, match=r"^vlbench-bench models --device cuda: no CUDA device is available here$"):
        main(["models", "--device", "cuda", "--json", str(tmp_path / "b.json"), "--history", str(tmp_path / "h")])
    assert not list(tmp_path.iterdir())


class SimpleQueue:
    def __init__(self, items: list):
        self.items = items

    def put(self, item) -> None:
        self.items.append(item)


def test_a_base_region_model_is_timed_on_butd_shaped_regions():
    from vlbench.bench_models import fit_region_features

    batch = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "region_features": torch.ones(2, 3, 147),
        "region_boxes": torch.ones(2, 3, 4),
        "region_mask": torch.ones(2, 3, dtype=torch.bool),
        "region_object_ids": torch.zeros(2, 3, dtype=torch.long),
    }
    fitted = fit_region_features(batch, dim=2048, boxes=36)
    assert fitted["region_features"].shape == (2, 36, 2048) and fitted["region_boxes"].shape == (2, 36, 4)
    assert fitted["region_features"][:, :3, :147].eq(1).all() and fitted["region_features"][:, :, 147:].eq(0).all()
    assert fitted["region_mask"].sum().item() == 6 and fitted["region_object_ids"][:, 3:].eq(-1).all()
    assert fitted["input_ids"] is batch["input_ids"]
    assert fit_region_features(batch, dim=147, boxes=36) is batch  # a model of the store's size reads it as it is


def test_eager_attention_equals_sdpa():
    import torch

    from vlbench.models.layers import MultiHeadAttention, attention_implementation

    torch.manual_seed(0)
    attention = MultiHeadAttention(32, 4, dropout=0.0).eval()
    x, context = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    for kwargs in ({"context": context, "context_mask": mask}, {"causal": True}):
        sdpa = attention(x, **kwargs)
        with attention_implementation("eager"):
            eager = attention(x, **kwargs)
        torch.testing.assert_close(eager, sdpa, atol=1e-6, rtol=1e-5)
    assert not MultiHeadAttention.eager  # restored


def test_lxmert_bench_compares_with_transformers_and_splits_a_step(capsys):
    main(["lxmert", "--scale", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--profile"])
    out = capsys.readouterr().out
    eval_losses = re.search(r"loss in eval mode: ours ([\d.]+), transformers ([\d.]+)", out)
    assert eval_losses and float(eval_losses[1]) == pytest.approx(float(eval_losses[2]), rel=1e-4)
    assert re.search(r"ratio ours / transformers: [\d.]+×", out)
    for name in ("ours", "transformers"):
        total, gemm, optimizer, rest = map(
            float, re.search(rf"{name}: +([\d.]+) +([\d.]+) +([\d.]+) +(-?[\d.]+)", out).groups()
        )
        # the parts are disjoint shares of the step: GEMMs and the optimizer fit in it, the rest is what is left
        assert gemm > 0 and optimizer > 0 and gemm + optimizer <= total + 2e-3 and rest >= -2e-3
    assert re.search(r"outside its GEMMs and optimizer update: [\d.]+×", out)


def test_profile_splits_a_step_by_kind_of_work():
    from vlbench.bench_profile import KERNEL_KINDS, format_profile, kind_of, profile_step

    assert kind_of("aten::addmm") == "gemm" and kind_of("aten::_fused_adamw_") == "optimizer"
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert kind_of("aten::native_layer_norm_backward") == "normalisation" and kind_of("aten::gelu") == "other"
    kernels = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "gemm",
        "nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64": "attention",
        "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<float, float>": "normalisation",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>": "attention",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>": "normalisation",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "other",
    }
    for name, kind in kernels.items():
        assert kind_of(name, KERNEL_KINDS) == kind, name
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.LayerNorm(1024))
    optimizer = torch.optim.AdamW(layer.parameters(), foreach=True)
    x = torch.randn(512, 256)

    def step() -> None:
        layer(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    profile = profile_step(step, torch.device("cpu"), steps=2, top=3)
    kinds = profile["kinds_ms"]
    assert sum(kinds.values()) == pytest.approx(profile["busy_ms"])
    assert {"gemm", "optimizer", "normalisation", "other"} <= kinds.keys()
    assert 0 < profile["busy_ms"] <= profile["wall_ms"] * 1.05 and profile["busy_share"] > 0.3
    assert len(profile["top_ops_ms"]) == 3 and profile["host_syncs"] is None  # CPU: no device to wait on
    assert "failed: RuntimeError: x" in format_profile("toy", "tiny", {"error": "RuntimeError: x"})
    assert "a step, busy" in format_profile("toy", "tiny", profile)


def test_profile_on_cuda_sums_the_device_side_kernels():
    """The CUDA branch without a GPU: the profiler's device-side events (kernels, copies) are summed per name."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from vlbench.bench_profile import device_busy

    def event(name: str, start: int, end: int, device: DeviceType) -> FunctionEvent:
        return FunctionEvent(0, name, 0, start, end, device_type=device)

    class Recorded:
        def events(self) -> list[FunctionEvent]:
            return [
                event("aten::mm", 0, 900, DeviceType.CPU),  # host side: not device time
                event("sm90_xmma_gemm_bf16", 10, 410, DeviceType.CUDA),
                event("sm90_xmma_gemm_bf16", 500, 700, DeviceType.CUDA),
                event("Memcpy DtoH (Device -> Pinned)", 800, 820, DeviceType.CUDA),
            ]

    busy = device_busy(Recorded(), steps=2)
    assert busy == pytest.approx({"sm90_xmma_gemm_bf16": 0.3, "Memcpy DtoH (Device -> Pinned)": 0.01})


def test_a_cuda_profile_is_summarised_from_kernels_with_ops_listed_apart():
    """Kernel time is the busy time and is split by kernel kind; ops are listed without the kernel rows the
    profiler's averages also hold (a long template name included); launches and syncs are counted per step."""
    from types import SimpleNamespace

    from vlbench.bench_profile import summarise_profile

    long_kernel = "void at::native::elementwise_kernel<128, 2, " + "x" * 300
    kernels = {"nvjet_sm90_tst_192x192_64x4": 6.0, long_kernel[:90]: 3.0, "cudnn_generated_fort_native_sdpa_sm90": 1.0}

    def average(key: str, device_us: float, count: int = 1) -> SimpleNamespace:
        return SimpleNamespace(key=key, self_device_time_total=device_us, self_cpu_time_total=5.0, count=count)

    averages = [
        average("aten::mm", 12_000), average("aten::mul", 6_000), average("nvjet_sm90_tst_192x192_64x4", 12_000),
        average(long_kernel, 6_000), average("cudaLaunchKernel", 0, count=40),
        average("aten::_local_scalar_dense", 0, count=6),
    ]  # fmt: skip
    profile = summarise_profile(averages, kernels, steps=2, wall_s=0.025)
    assert profile["busy_ms"] == pytest.approx(10.0) and profile["busy_share"] == pytest.approx(0.8)
    assert profile["kinds_ms"] == pytest.approx({"gemm": 6.0, "other": 3.0, "attention": 1.0})
    assert profile["top_ops_ms"] == pytest.approx({"aten::mm": 6.0, "aten::mul": 3.0})
    assert profile["kernel_launches"] == 20 and profile["host_syncs"] == 3
    assert list(profile["top_kernels_ms"]) == list(kernels)


def test_bench_threads_come_from_the_environment_not_a_runtime_switch(monkeypatch):
    # torch.set_num_threads in a running process slows torch's CPU flash attention (use_threads' docstring): the count
    # goes to OMP_NUM_THREADS, is set only when it differs, and the console command restarts once to start with it
    import os
    import sys

    import torch

    from vlbench import bench_models

    calls, execs = [], []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(os, "execv", lambda path, args: execs.append(args))
    monkeypatch.setattr(sys, "argv", ["vlbench-bench", "models", "--threads", "3"])
    monkeypatch.delenv("VLBENCH_BENCH_RESTARTED", raising=False)
    current = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "x")

    bench_models.use_threads(0)
    assert os.environ["OMP_NUM_THREADS"] == "x" and not calls  # torch's default: nothing touched
    bench_models.use_threads(current)
    assert os.environ["OMP_NUM_THREADS"] == str(current) and not calls  # the same count: no runtime switch
    bench_models.use_threads(current + 1)
    assert calls == [current + 1]

    bench_models.restart_with_threads(current)
    assert not execs
    bench_models.restart_with_threads(current + 1)
    assert execs == [[sys.executable, "-m", "vlbench.bench", "models", "--threads", "3"]]
    assert os.environ["OMP_NUM_THREADS"] == str(current + 1) and os.environ["VLBENCH_BENCH_RESTARTED"] == "1"
    bench_models.restart_with_threads(current + 1)  # the restarted process does not restart again
    assert len(execs) == 1


def test_unread_bench_times_both_variants_of_the_same_model(cache_dir, capsys):
    """``vlbench-bench unread``: both task models step, and in evaluation they compute the same loss (the same
    weights; only the token states nothing reads are skipped)."""
    from argparse import Namespace

    from tests.conftest import SMALL_WORLD
    from vlbench.bench_unread import bench_unread

    args = ["unread", "--models", "textonly,unimo3", "--rounds", "1", "--steps", "2", "--warmup", "0"]
    main([*args, *SMALL_WORLD, "trainer.batch_size=8"])
    out = capsys.readouterr().out
    assert "trainer.skip_unread_states" in out and "textonly" in out and "unimo3" in out
    for task in ("vqa", "pretrain"):  # pre-training's loss draws masks and negatives: the same draws for both
        rows = bench_unread(Namespace(
            models="unimo3", scale="tiny", task=task, rounds=1, steps=1, warmup=0, threads=0, device="cpu",
            overrides=[*SMALL_WORLD, "trainer.batch_size=8"],
        ))  # fmt: skip
        row = rows[0]
        assert row["skipped_ms"] > 0 and row["all_states_ms"] > 0 and row["batch_size"] == 8
        assert abs(row["eval_loss_skipped"] - row["eval_loss_all_states"]) < 1e-4, task
